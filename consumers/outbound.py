"""The ``outbound`` stage: the 24-hour window gate, then the Twilio send, exactly once.

``message.send-requested`` → lock the message → gate again at send time (the window may
have closed since the agent asked) → pace per sender → mark ``sending`` and commit →
call Twilio (after the commit) → store the sid, or schedule a retry (429, 5xx, a refused
connection: exponential backoff with jitter through the message's ``next_attempt_at``,
picked up by the stage's tick in any replica), or reject (63016 window closed, which also
corrects the conversation's window; 21610 opted out), or fail (other 4xx, retries spent).

Order: a conversation's messages are handed to Twilio in the order they were requested (a
bot's answers, an agent's quick lines, across replicas): one whose earlier sibling is still
to go out waits for it (held in place by the runtime, or a later tick for a retry), at most
``send_order_wait`` seconds after it was requested.

Never two sends: a redelivered message already past ``requested`` is not sent again; one
found in ``sending`` (the process died during the call) becomes ``unknown`` and is shown
as such, for the agent to retry explicitly.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import orjson
import structlog
from pydantic import BaseModel

from consumers.runtime import Stage, StageTx
from omniroute.domain.conversation import note_window_closed
from omniroute.domain.window import gate, window
from omniroute.errors import NotYetStored, TransientError
from omniroute.infra.config_loader import LiveConfig
from omniroute.infra.metrics import GATE_REJECTIONS, TWILIO_CALLS, TWILIO_ERRORS
from omniroute.infra.outbox import add_to_outbox
from omniroute.infra.settings import Settings
from omniroute.infra.store import Connection
from omniroute.infra.twilio_gateway import SendOutcome, TwilioClients, classify_error
from omniroute.infra.webhook_urls import status_url
from schemas.events import (
    Envelope,
    EventType,
    MessageOutcome,
    MessageRejected,
    MessageSendRequested,
    new_event,
)

log = structlog.get_logger("omniroute.outbound")

_MESSAGE = """
SELECT m.id, m.status, m.kind, m.body, m.media, m.template, m.attempts, m.agent_id,
       m.received_at, c.id AS conversation_id, c.account, c.business_number, c.customer,
       c.workstream, c.language, c.last_customer_message_at, c.window_closed_at
FROM messages m JOIN conversations c ON c.id = m.conversation_id
WHERE m.id = $1
FOR UPDATE OF m
"""


# An earlier outbound message of the same conversation, requested within the order wait,
# that has not been handed to Twilio yet (messages_conversation: conversation, received_at).
_EARLIER_UNSENT = """
SELECT EXISTS (
    SELECT 1 FROM messages
    WHERE conversation_id = $1 AND received_at >= $2::timestamptz - make_interval(secs => $4)
      AND (received_at, id) < ($2, $3) AND direction = 'outbound'
      AND status IN ('requested', 'retrying', 'sending'))
"""


@asynccontextmanager
async def twilio_clients(settings: Settings, _config: LiveConfig) -> AsyncIterator[TwilioClients]:
    clients = TwilioClients(str(settings.twilio_api_url), timeout=settings.twilio_timeout)
    try:
        yield clients
    finally:
        await clients.close()


def _event(kind: str, row: Any, data: BaseModel, now: datetime, *key: str) -> Envelope:
    return new_event(
        kind,
        account=row["account"],
        key=(str(row["id"]), *key),
        data=data.model_dump(mode="json"),
        occurred_at=now,
        conversation_id=str(row["conversation_id"]),
    )


async def _reject(
    conn: Connection,
    row: Any,
    reason: str,
    message: str | None,
    now: datetime,
    templates: list[str] | None = None,
    code: str | None = None,
) -> Envelope:
    await conn.execute(
        "UPDATE messages SET status = 'rejected', error_code = $2, error_message = $3,"
        " next_attempt_at = NULL, updated_at = now() WHERE id = $1",
        row["id"],
        code or reason,
        message,
    )
    data = MessageRejected(
        message_id=str(row["id"]),
        reason=reason,
        message=message,
        templates=templates or [],
        error_code=code,
    )
    return _event(EventType.MESSAGE_REJECTED, row, data, now)


async def _fail(conn: Connection, row: Any, outcome: SendOutcome, now: datetime) -> Envelope:
    code = str(outcome.code) if outcome.code is not None else None
    await conn.execute(
        "UPDATE messages SET status = 'failed', error_code = $2, error_message = $3,"
        " next_attempt_at = NULL, updated_at = now() WHERE id = $1",
        row["id"],
        code,
        outcome.message,
    )
    data = MessageOutcome(
        message_id=str(row["id"]), status="failed", error_code=code, error_message=outcome.message
    )
    return _event(EventType.MESSAGE_FAILED, row, data, now)


async def _pace(conn: Connection, sender: str, interval: float, now: datetime) -> datetime:
    """The sender's next free slot (GCRA), claimed atomically across replicas."""
    slot: datetime = await conn.fetchval(
        "INSERT INTO sender_pacing (sender, next_free_at)"
        " VALUES ($1, $2::timestamptz + make_interval(secs => $3::float8))"
        " ON CONFLICT (sender) DO UPDATE SET next_free_at ="
        " GREATEST(sender_pacing.next_free_at, $2::timestamptz)"
        " + make_interval(secs => $3::float8)"
        " RETURNING next_free_at - make_interval(secs => $3::float8)",
        sender,
        now,
        interval,
    )
    return slot


async def prepare_send(tx: StageTx, message_id: str, from_tick: bool = False) -> list[Envelope]:
    """Gate, pace and mark ``sending`` inside the transaction; the send runs after commit."""
    row = await tx.conn.fetchrow(_MESSAGE, message_id)
    if row is None:
        raise TransientError(f"message {message_id} is not stored (yet)")
    if row["status"] == "sending":
        await tx.conn.execute(
            "UPDATE messages SET status = 'unknown', updated_at = now() WHERE id = $1", row["id"]
        )
        log.warning("outbound.outcome_unknown", message_id=message_id)
        return []
    if row["status"] not in ("requested", "retrying"):
        return []  # handled before: a redelivery
    config = tx.config.current
    workstream = config.workstream(row["workstream"])
    template = row["template"] or {}
    verdict = gate(
        workstream,
        window(row["last_customer_message_at"], tx.now, row["window_closed_at"]),
        text=row["body"] if row["kind"] != "template" else None,
        media_urls=[m["url"] for m in row["media"]],
        template=template.get("name"),
        language=template.get("language") or row["language"],
        variables=template.get("variables") or {},
    )
    if not verdict.allowed:
        GATE_REJECTIONS.labels(verdict.reason or "rejected").inc()
        return [
            await _reject(
                tx.conn,
                row,
                verdict.reason or "rejected",
                verdict.message,
                tx.now,
                verdict.templates,
            )
        ]
    if await _behind_an_earlier_send(tx, row):
        # Twilio sends what it is given in the order it was queued (support.twilio.com,
        # "Can my SMS messages arrive in order?"), so a conversation's messages are handed
        # over in the order they were requested: a bot's two answers, an agent's quick
        # lines. Not an attempt. A delivery is held in place by the runtime (a crash leaves
        # it on the queue, still ``requested``); the tick's retries wait for a later tick.
        if not from_tick:
            raise NotYetStored(f"message {message_id} waits for an earlier one to go out")
        return await _retry_at(tx.conn, row, tx.now + timedelta(seconds=tx.settings.tick_interval))
    slot = await _pace(tx.conn, row["business_number"], tx.settings.send_interval, tx.now)
    if slot > tx.now + timedelta(seconds=tx.settings.tick_interval):
        return await _retry_at(tx.conn, row, slot)
    await tx.conn.execute(
        "UPDATE messages SET status = 'sending', attempts = attempts + 1,"
        " next_attempt_at = NULL, updated_at = now() WHERE id = $1",
        row["id"],
    )
    params = _twilio_params(tx, row, verdict.rendered)
    tx.after_commit.append(lambda: _send(tx, row, params))
    return []


async def _retry_at(conn: Connection, row: Any, at: datetime) -> list[Envelope]:
    """Leave the message to the tick at ``at`` (not an attempt: nothing was sent)."""
    await conn.execute(
        "UPDATE messages SET status = 'retrying', next_attempt_at = $2 WHERE id = $1",
        row["id"],
        at,
    )
    return []


async def _behind_an_earlier_send(tx: StageTx, row: Any) -> bool:
    """Whether an earlier message of the conversation is still to be handed to Twilio; a
    message waits for that at most ``send_order_wait`` after it was requested (an earlier
    one stuck in ``sending`` by a crash, or retrying for long, does not hold it forever)."""
    wait = tx.settings.send_order_wait
    if wait <= 0 or tx.now - row["received_at"] >= timedelta(seconds=wait):
        return False
    return bool(
        await tx.conn.fetchval(
            _EARLIER_UNSENT, row["conversation_id"], row["received_at"], row["id"], wait
        )
    )


def _twilio_params(tx: StageTx, row: Any, rendered: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "to": f"whatsapp:{row['customer']}",
        "from_": f"whatsapp:{row['business_number']}",
        "status_callback": status_url(tx.settings.public_base(), row["account"]),
    }
    if rendered is not None:
        params["content_sid"] = rendered.content_sid
        params["content_variables"] = orjson.dumps(rendered.variables).decode()
    else:
        if row["body"]:
            params["body"] = row["body"]
        if row["media"]:
            params["media_url"] = [m["url"] for m in row["media"]]
    return params


async def _send(tx: StageTx, row: Any, params: dict[str, Any]) -> list[Envelope]:
    """Call Twilio (no transaction open), then record what happened."""
    account = tx.config.current.account(row["account"])
    if account is None or account.auth_token is None:
        outcome = SendOutcome("failed", message=f"account {row['account']} is not configured")
    else:
        client = tx.resources.get(account.account_sid, account.auth_token.get_secret_value())
        started = time.perf_counter()
        try:
            created = await client.messages.create_async(**params)
            outcome = SendOutcome("sent", sid=created.sid, status=created.status)
        except Exception as exc:
            outcome = classify_error(exc)
        TWILIO_CALLS.labels(outcome.kind).observe(time.perf_counter() - started)
        if outcome.code is not None:
            TWILIO_ERRORS.labels(str(outcome.code)).inc()
    store = tx.store
    assert store is not None
    now = datetime.now(tx.now.tzinfo)

    async def record() -> list[Envelope]:
        async with store.transaction() as conn:
            events = await _record(conn, tx, row, outcome, now)
            return await add_to_outbox(conn, events)

    # The send happened: its record (the sid) waits for the database rather than being lost.
    return await tx.until_stored(record)


async def _record(
    conn: Connection, tx: StageTx, row: Any, outcome: SendOutcome, now: datetime
) -> list[Envelope]:
    log.info(
        "outbound.sent" if outcome.kind == "sent" else "outbound.not_sent",
        message_id=str(row["id"]),
        outcome=outcome.kind,
        code=outcome.code,
    )
    if outcome.kind == "sent":
        # A status callback may already have moved the status on: keep the later one.
        await conn.execute(
            "UPDATE messages SET twilio_sid = $2, status = CASE WHEN status = 'sending'"
            " THEN $3 ELSE status END, error_code = NULL, error_message = NULL,"
            " updated_at = now() WHERE id = $1",
            row["id"],
            outcome.sid,
            outcome.status or "queued",
        )
        return []
    if outcome.kind == "rejected":
        if outcome.message == "window_closed":
            await note_window_closed(conn, str(row["conversation_id"]), now)
        workstream = tx.config.current.workstream(row["workstream"])
        templates = [t.name for t in workstream.templates] if workstream else []
        return [
            await _reject(
                conn,
                row,
                outcome.message or "rejected",
                None,
                now,
                templates,
                code=str(outcome.code),
            )
        ]
    if outcome.kind == "retry" and row["attempts"] + 1 < tx.settings.send_attempts:
        delay = min(
            tx.settings.send_backoff_max, tx.settings.send_backoff_base * 2 ** row["attempts"]
        )
        due = now + timedelta(seconds=delay * random.uniform(0.5, 1.0))
        await conn.execute(
            "UPDATE messages SET status = 'retrying', next_attempt_at = $2, error_code = $3,"
            " error_message = $4, updated_at = now() WHERE id = $1",
            row["id"],
            due,
            str(outcome.code) if outcome.code else None,
            outcome.message,
        )
        return []
    if outcome.kind == "unknown":
        await conn.execute(
            "UPDATE messages SET status = 'unknown', error_message = $2, updated_at = now()"
            " WHERE id = $1",
            row["id"],
            outcome.message,
        )
        return []
    return [await _fail(conn, row, outcome, now)]


async def handle(event: Envelope, payload: MessageSendRequested, tx: StageTx) -> list[Envelope]:
    return await prepare_send(tx, payload.message_id)


async def tick(tx: StageTx) -> list[Envelope]:
    """Durable retry timers: send the messages whose next attempt is due."""
    due = await tx.conn.fetch(
        "SELECT id FROM messages WHERE status = 'retrying' AND next_attempt_at <= $1"
        " ORDER BY next_attempt_at LIMIT 50 FOR UPDATE SKIP LOCKED",
        tx.now,
    )
    events: list[Envelope] = []
    for row in due:
        events += await prepare_send(tx, str(row["id"]), from_tick=True)
    return events


STAGE = Stage(
    name="outbound",
    handlers={EventType.MESSAGE_SEND_REQUESTED: handle},
    tick=tick,
    resources=twilio_clients,
)
