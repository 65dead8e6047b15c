"""The ``status`` stage: Twilio's delivery receipts move a message's status forward.

Callbacks come shuffled, twice, or before the send's sid is stored. The status only moves
forward (``consumers.delivery.advance``) and never out of a terminal state; each step is
published once (event ids derive from the sid and the step). Unknown statuses are recorded
in the message's history.

A callback for a sid not stored yet is parked in ``parked_status`` (durably, no events) and
the stage's tick applies it, exactly as a fresh callback, once the message is stored; it is
retried with backoff for ``status_park_grace`` and then dropped and counted: a Messaging
Service also calls back about other applications' messages, which we never store, so this
is not an error (and never a dead letter).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any

import structlog
from pydantic import ValidationError

from consumers.delivery import TERMINAL, advance
from consumers.runtime import Stage, StageTx
from omniroute.domain.conversation import note_window_closed
from omniroute.infra.metrics import STATUS_CALLBACKS_FOREIGN
from omniroute.infra.settings import Settings
from omniroute.infra.store import Connection
from schemas.events import Envelope, EventType, MessageOutcome, MessageStatus, new_event

log = structlog.get_logger("omniroute.status")

WINDOW_CLOSED_CODE = "63016"


async def apply_status(
    conn: Connection, event: Envelope, payload: MessageStatus
) -> list[Envelope] | None:
    """Apply one status callback to its stored message; return the step events it causes.

    Returns None, changing nothing, when no message has that sid (yet). Not idempotent on
    its own: a callback applied twice is recorded twice in the history (as Twilio sent it),
    but publishes its steps once (the status moves only forward; event ids are stable).
    """
    row = await conn.fetchrow(
        "SELECT m.id, m.status, m.conversation_id, c.account FROM messages m"
        " JOIN conversations c ON c.id = m.conversation_id"
        " WHERE m.twilio_sid = $1 FOR UPDATE OF m",
        payload.message_sid,
    )
    if row is None:
        return None
    status, steps = advance(row["status"], payload.status)
    if payload.error_code == WINDOW_CLOSED_CODE and status in TERMINAL:
        # WhatsApp reports a closed window in the failed callback: the gate must know.
        await note_window_closed(conn, str(row["conversation_id"]), payload.received_at)
    entry = {
        "status": payload.status,
        "error_code": payload.error_code,
        "received_at": payload.received_at.isoformat(),
    }
    await conn.execute(
        "UPDATE messages SET status = $2, error_code = COALESCE($3, error_code),"
        " status_history = status_history || $4::jsonb, updated_at = now() WHERE id = $1",
        row["id"],
        status,
        payload.error_code if steps else None,
        [entry],
    )
    data = MessageOutcome(
        message_id=str(row["id"]),
        message_sid=payload.message_sid,
        status=status,
        error_code=payload.error_code,
        error_message=payload.error_message,
    )
    return [
        new_event(
            step,
            account=row["account"],
            key=(payload.message_sid,),
            data=data.model_dump(mode="json"),
            occurred_at=payload.received_at,
            conversation_id=str(row["conversation_id"]),
            correlation_id=event.correlation_id,
            causation_id=event.id,
        )
        for step in steps
    ]


async def handle(event: Envelope, payload: MessageStatus, tx: StageTx) -> list[Envelope]:
    events = await apply_status(tx.conn, event, payload)
    if events is not None:
        return events
    # Parked once per event (a callback delivered twice is the same event id).
    await tx.conn.execute(
        "INSERT INTO parked_status (event_id, message_sid, body, first_seen, due_at)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING",
        event.id,
        payload.message_sid,
        event.model_dump(mode="json"),
        tx.now,
        tx.now + _retry_delay(tx.settings, 0),
    )
    log.info("status.parked", message_sid=payload.message_sid, message_status=payload.status)
    return []


def _retry_delay(settings: Settings, attempts: int) -> timedelta:
    seconds = settings.status_park_backoff_base * 2 ** min(attempts, 16)
    return timedelta(seconds=min(settings.status_park_backoff_max, seconds))


async def retry_parked(tx: StageTx) -> list[Envelope]:
    """The tick: apply due parked callbacks whose message is stored now; reschedule the
    others with backoff; drop (and count) those past ``status_park_grace``.

    Safe in every replica at once: due rows are claimed ``FOR UPDATE SKIP LOCKED``.
    """
    rows = await tx.conn.fetch(
        "SELECT event_id, body, first_seen, attempts FROM parked_status WHERE due_at <= $1"
        " ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        tx.now,
        tx.settings.status_park_batch,
    )
    if not rows:
        return []
    grace = timedelta(seconds=tx.settings.status_park_grace)
    events: list[Envelope] = []
    done: list[Any] = []
    later: list[tuple[Any, datetime]] = []
    foreign = 0
    for row in rows:
        try:
            event = Envelope.model_validate(row["body"])
            payload = MessageStatus.model_validate(event.data)
        except ValidationError as exc:  # parked by a release with another contract
            log.error("status.parked_invalid", event_id=str(row["event_id"]), error=str(exc)[:300])
            done.append(row["event_id"])
            continue
        applied = await apply_status(tx.conn, event, payload)
        if applied is not None:
            events += applied
            done.append(row["event_id"])
            log.info(
                "status.unparked",
                message_sid=payload.message_sid,
                message_status=payload.status,
                attempts=row["attempts"] + 1,
            )
        elif tx.now - row["first_seen"] >= grace:
            done.append(row["event_id"])
            foreign += 1
            log.info(
                "status.foreign_callback",
                message_sid=payload.message_sid,
                message_status=payload.status,
                first_seen=row["first_seen"].isoformat(),
                attempts=row["attempts"] + 1,
            )
        else:
            # The last retry lands on the end of the grace, so a drop is never late.
            due = min(
                tx.now + _retry_delay(tx.settings, row["attempts"] + 1), row["first_seen"] + grace
            )
            later.append((row["event_id"], due))
    if done:
        await tx.conn.execute("DELETE FROM parked_status WHERE event_id = ANY($1::uuid[])", done)
    if later:
        await tx.conn.execute(
            "UPDATE parked_status p SET attempts = p.attempts + 1, due_at = u.due_at"
            " FROM unnest($1::uuid[], $2::timestamptz[]) AS u (event_id, due_at)"
            " WHERE p.event_id = u.event_id",
            [event_id for event_id, _ in later],
            [due for _, due in later],
        )
    if foreign:
        tx.after_commit.append(_count_foreign(foreign))
    return events


def _count_foreign(count: int) -> Callable[[], Coroutine[Any, Any, list[Envelope]]]:
    # Counted once the drop committed (a rolled-back tick drops nothing).
    async def count_them() -> list[Envelope]:
        STATUS_CALLBACKS_FOREIGN.inc(count)
        return []

    return count_them


STAGE = Stage(
    name="status",
    handlers={EventType.MESSAGE_STATUS: handle},
    tick=retry_parked,
    # A message's receipts (sent, delivered, read) are published in the order they were
    # applied: each callback in a transaction of its own (see Stage.batch).
    batch=False,
)
