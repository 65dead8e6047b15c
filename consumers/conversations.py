"""The ``conversations`` stage: a customer's message becomes a stored message in the one
open conversation of (account, business number, customer), opening it if needed (in the
``bot`` state, with ``conversation.bot-started``, where the workstream has a bot).

Idempotent: a message whose Twilio sid is already stored changes nothing and emits nothing
(Twilio resends webhooks; the broker redelivers). Two replicas handling two messages of one
new customer at once still open one conversation: "find or open" is a single
``INSERT … ON CONFLICT`` on the partial unique index ``conversations_one_open``.
"""

from __future__ import annotations

import re
from datetime import timedelta
from urllib.parse import urlsplit

from consumers.automated import queue_automated
from consumers.runtime import Stage, StageTx
from omniroute.domain.conversation import (
    Stored,
    opened_event_id,
    reopen,
    resume_waiting,
    store_inbound,
)
from omniroute.infra.ids import new_id
from omniroute.infra.store import Connection
from schemas.events import (
    ConversationBotStarted,
    ConversationOpened,
    ConversationQueued,
    ConversationReopened,
    Envelope,
    EventType,
    MessageReceived,
    SandboxJoined,
    SurveyAnswered,
)


def _may_answer_or_reopen(payload: MessageReceived, tx: StageTx) -> bool:
    """Whether the message could be a survey answer or reopen a conversation: only then is
    the duplicate check needed up front (storing checks it in the same statement)."""
    workstream = tx.config.current.workstream(payload.workstream)
    reopens = bool(workstream and workstream.lifecycle.reopen_within)
    return reopens or any(ws.survey for ws in tx.config.current.workstreams)


async def _seen(conn: Connection, message_sid: str) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM messages WHERE twilio_sid = $1", message_sid))


async def handle(event: Envelope, payload: MessageReceived, tx: StageTx) -> list[Envelope]:
    if payload.sandbox and SANDBOX_JOIN.match(payload.body):
        return await _sandbox_join(event, payload, tx)
    if _may_answer_or_reopen(payload, tx) and await _seen(tx.conn, payload.message_sid):
        return []  # Twilio resent it or the broker redelivered it: already done
    answered = await _survey_answer(event, payload, tx)
    if answered is not None:
        return answered
    reopened = await _reopen(event, payload, tx)
    workstream = tx.config.current.workstream(payload.workstream)
    bot = workstream.bot if workstream is not None else None
    stored = await store_inbound(
        tx.conn,
        event.account,
        payload,
        event.correlation_id,
        opened_event_id(event),
        opens_in="bot" if bot is not None else "open",
    )
    if stored is None:
        return []
    events = reopened + await _attachments_notice(event, payload, stored, tx)
    events += await _resume_waiting(event, payload, stored, tx)
    if not stored.opened:
        return events
    opened = ConversationOpened(
        conversation_id=stored.conversation_id,
        contact_id=stored.contact_id,
        business_number=payload.business_number,
        customer=payload.customer,
        workstream=payload.workstream,
        profile_name=payload.profile_name,
        first_message_id=stored.message_id,
        first_message_sid=payload.message_sid,
        first_message_body=payload.body,
        has_media=bool(payload.media),
        media_count=len(payload.media),
        opened_at=payload.received_at,
    )
    opened_event = event.caused(
        EventType.CONVERSATION_OPENED,
        opened.model_dump(mode="json"),
        conversation_id=stored.conversation_id,
    )
    if bot is None or stored.state != "bot":
        return [opened_event, *events]
    started = ConversationBotStarted(
        workstream=payload.workstream, bot_url=origin(str(bot.url)), started_at=payload.received_at
    )
    return [
        opened_event,
        opened_event.caused(EventType.CONVERSATION_BOT_STARTED, started.model_dump(mode="json")),
        *events,
    ]


def origin(url: str) -> str:
    """Scheme, host and port of a URL: its path and query may carry secrets."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


SANDBOX_JOIN = re.compile(r"^\s*join\s+\S+\s*$", re.IGNORECASE)
RATING = re.compile(r"^\s*(?P<rating>\d{1,2})\b[\s,.;:!-]*(?P<comment>.*)$", re.DOTALL)


async def _sandbox_join(event: Envelope, payload: MessageReceived, tx: StageTx) -> list[Envelope]:
    """``join <code>`` on Twilio's sandbox: Twilio answers it; we note it, route nothing."""
    await tx.conn.execute(
        "INSERT INTO contacts (id, account, address, wa_id, profile_name, sandbox_joined_at)"
        " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (account, address) DO UPDATE SET"
        " sandbox_joined_at = EXCLUDED.sandbox_joined_at, updated_at = now()",
        new_id(),
        event.account,
        payload.customer,
        payload.customer_wa_id,
        payload.profile_name,
        payload.received_at,
    )
    return [
        event.caused(
            EventType.SANDBOX_JOINED,
            SandboxJoined(
                customer=payload.customer,
                business_number=payload.business_number,
                code=payload.body.split()[-1],
                joined_at=payload.received_at,
            ).model_dump(mode="json"),
        )
    ]


async def _survey_answer(
    event: Envelope, payload: MessageReceived, tx: StageTx
) -> list[Envelope] | None:
    """A reply to an open post-conversation survey is its answer, not new work.

    Surveys are only asked where a workstream configures one; with none configured there
    is nothing to look up (answers to surveys asked before one was removed from the
    configuration then count as ordinary messages)."""
    if not any(ws.survey for ws in tx.config.current.workstreams):
        return None
    survey = await tx.conn.fetchrow(
        "SELECT conversation_id, workstream FROM surveys WHERE account = $1"
        " AND business_number = $2 AND customer = $3 AND answered_at IS NULL"
        " AND expires_at > $4 ORDER BY asked_at DESC LIMIT 1 FOR UPDATE",
        event.account,
        payload.business_number,
        payload.customer,
        payload.received_at,
    )
    if survey is None:
        return None
    if await tx.conn.fetchval(
        "SELECT 1 FROM conversations WHERE account = $1 AND business_number = $2"
        " AND customer = $3 AND state <> 'closed'",
        event.account,
        payload.business_number,
        payload.customer,
    ):
        return None  # the customer moved on to a new conversation: not a late answer
    workstream = tx.config.current.workstream(survey["workstream"])
    scale = workstream.survey.scale if workstream and workstream.survey else 5
    match = RATING.match(payload.body)
    if match is None or not 1 <= int(match["rating"]) <= scale:
        return None  # not an answer: an ordinary message (a new conversation)
    comment = match["comment"].strip() or None
    await tx.conn.execute(
        "UPDATE surveys SET rating = $2, comment = $3, answered_at = $4 WHERE conversation_id = $1",
        survey["conversation_id"],
        int(match["rating"]),
        comment,
        payload.received_at,
    )
    await tx.conn.execute(
        "INSERT INTO messages (id, conversation_id, direction, twilio_sid, body, media,"
        " attributes, status, received_at) VALUES ($1, $2, 'inbound', $3, $4, $5, $6,"
        " 'received', $7) ON CONFLICT (twilio_sid) DO NOTHING",
        new_id(),
        survey["conversation_id"],
        payload.message_sid,
        payload.body,
        [m.model_dump(mode="json") for m in payload.media],
        {"survey_answer": True},
        payload.received_at,
    )
    answer = SurveyAnswered(
        rating=int(match["rating"]), comment=comment, answered_at=payload.received_at
    )
    return [
        event.caused(
            EventType.SURVEY_ANSWERED,
            answer.model_dump(mode="json"),
            conversation_id=str(survey["conversation_id"]),
        )
    ]


async def _reopen(event: Envelope, payload: MessageReceived, tx: StageTx) -> list[Envelope]:
    """Within the workstream's reopen_within after a close, the customer's new message brings
    the last conversation back to its queue (its previous agent is offered it first)."""
    workstream = tx.config.current.workstream(payload.workstream)
    within = workstream.lifecycle.reopen_within if workstream else None
    if not within or workstream is None:
        return []
    row = await reopen(tx.conn, event, payload, payload.received_at - timedelta(seconds=within))
    if row is None or row["queue"] is None:
        return []
    cid = str(row["id"])
    queued = ConversationQueued(
        queue=row["queue"],
        workstream=row["workstream"],
        skills=row["skills"] or {},
        priority=row["priority"],
        language=row["language"] or workstream.language,
        queued_at=payload.received_at,
    )
    return [
        event.caused(
            EventType.CONVERSATION_REOPENED,
            ConversationReopened(
                reopened_at=payload.received_at, workstream=row["workstream"]
            ).model_dump(mode="json"),
            conversation_id=cid,
        ),
        event.caused(
            EventType.CONVERSATION_QUEUED, queued.model_dump(mode="json"), conversation_id=cid
        ),
    ]


async def _resume_waiting(
    event: Envelope, payload: MessageReceived, stored: Stored, tx: StageTx
) -> list[Envelope]:
    """A conversation the agent parked comes back to its queue when the customer writes;
    distribution offers it to that agent first (affinity)."""
    if not stored.waiting:
        return []
    row = await resume_waiting(tx.conn, event, stored.conversation_id, payload.received_at)
    if row is None or row["queue"] is None:
        return []
    queued = ConversationQueued(
        queue=row["queue"],
        workstream=row["workstream"],
        skills=row["skills"] or {},
        priority=row["priority"],
        language=row["language"] or "en",
        queued_at=payload.received_at,
    )
    return [
        event.caused(
            EventType.CONVERSATION_QUEUED,
            queued.model_dump(mode="json"),
            conversation_id=stored.conversation_id,
        )
    ]


async def _attachments_notice(
    event: Envelope, payload: MessageReceived, stored: Stored, tx: StageTx
) -> list[Envelope]:
    """Media where the workstream takes none: tell the customer (its media stays hidden)."""
    workstream = tx.config.current.workstream(payload.workstream)
    if not payload.media or workstream is None or workstream.attachments.customers:
        return []
    return await queue_automated(
        tx.conn,
        account=event.account,
        conversation_id=stored.conversation_id,
        workstream=workstream,
        kind="attachments_not_allowed",
        language=workstream.language,
        window_open=True,
        now=payload.received_at,
        key=payload.message_sid,
    )


STAGE = Stage(
    name="conversations",
    handlers={EventType.MESSAGE_RECEIVED: handle},
)
