"""The ``status`` stage: Twilio's delivery receipts move a message's status forward.

Callbacks come shuffled, twice, or before the send's sid is stored. The status only moves
forward (``consumers.delivery.advance``) and never out of a terminal state; each step is
published once (event ids derive from the sid and the step); a callback for a sid not
stored yet is retried through redelivery and, past the delivery limit, kept as a dead
letter that can be replayed. Unknown statuses are recorded in the message's history.
"""

from __future__ import annotations

from pydantic import BaseModel

from consumers.delivery import advance
from consumers.runtime import Stage, StageTx
from omniroute.errors import TransientError
from schemas.events import Envelope, EventType, MessageStatus, new_event

WINDOW_CLOSED_CODE = "63016"


async def handle(event: Envelope, payload: BaseModel, tx: StageTx) -> list[Envelope]:
    assert isinstance(payload, MessageStatus)
    row = await tx.conn.fetchrow(
        "SELECT m.id, m.status, m.conversation_id, c.account FROM messages m"
        " JOIN conversations c ON c.id = m.conversation_id"
        " WHERE m.twilio_sid = $1 FOR UPDATE OF m",
        payload.message_sid,
    )
    if row is None:
        raise TransientError(f"message {payload.message_sid} is not stored yet")
    status, steps = advance(row["status"], payload.status)
    if payload.error_code == WINDOW_CLOSED_CODE:
        # WhatsApp reports a closed window in the failed callback: the gate must know.
        await tx.conn.execute(
            "UPDATE conversations SET window_closed_at = GREATEST(window_closed_at, $2)"
            " WHERE id = $1",
            row["conversation_id"],
            payload.received_at,
        )
    entry = {
        "status": payload.status,
        "error_code": payload.error_code,
        "received_at": payload.received_at.isoformat(),
    }
    await tx.conn.execute(
        "UPDATE messages SET status = $2, error_code = COALESCE($3, error_code),"
        " status_history = status_history || $4::jsonb, updated_at = now() WHERE id = $1",
        row["id"],
        status,
        payload.error_code if steps else None,
        [entry],
    )
    data = {
        "message_id": str(row["id"]),
        "message_sid": payload.message_sid,
        "status": status,
        "error_code": payload.error_code,
        "error_message": payload.error_message,
    }
    return [
        new_event(
            step,
            account=row["account"],
            key=(payload.message_sid,),
            data=data,
            occurred_at=payload.received_at,
            conversation_id=str(row["conversation_id"]),
            correlation_id=event.correlation_id,
            causation_id=event.id,
        )
        for step in steps
    ]


STAGE = Stage(
    name="status",
    payloads={EventType.MESSAGE_STATUS: MessageStatus},
    handle=handle,
)
