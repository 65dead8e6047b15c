"""The ``conversations`` stage: a customer's message becomes a stored message in the one
open conversation of (account, business number, customer), opening it if needed.

Idempotent: a message whose Twilio sid is already stored changes nothing and emits nothing
(Twilio resends webhooks; the broker redelivers). Two replicas handling two messages of one
new customer at once still open one conversation: "find or open" is a single
``INSERT … ON CONFLICT`` on the partial unique index ``conversations_one_open``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from pydantic import BaseModel

from consumers.automated import queue_automated
from consumers.runtime import Stage, StageTx
from omniroute.store import Connection
from schemas.events import ConversationOpened, Envelope, EventType, MessageReceived

_UPSERT_CONTACT = """
INSERT INTO contacts (id, account, address, wa_id, external_user_id, profile_name)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (account, address) DO UPDATE SET
    wa_id = COALESCE(EXCLUDED.wa_id, contacts.wa_id),
    external_user_id = COALESCE(EXCLUDED.external_user_id, contacts.external_user_id),
    profile_name = COALESCE(EXCLUDED.profile_name, contacts.profile_name),
    updated_at = now()
RETURNING id
"""

# One statement: open a conversation, or move the window anchor of the open one.
_FIND_OR_OPEN = """
INSERT INTO conversations
    (id, account, business_number, customer, contact_id, workstream, state,
     opened_at, last_customer_message_at)
VALUES ($1, $2, $3, $4, $5, $6, 'open', $7, $7)
ON CONFLICT (account, business_number, customer) WHERE state <> 'closed' DO UPDATE SET
    -- Replicas may commit a customer's messages out of order: the earliest receipt wins.
    opened_at = LEAST(conversations.opened_at, EXCLUDED.opened_at),
    last_customer_message_at =
        GREATEST(conversations.last_customer_message_at, EXCLUDED.last_customer_message_at),
    updated_at = now()
RETURNING id, (xmax = 0) AS opened
"""

_INSERT_MESSAGE = """
INSERT INTO messages
    (id, conversation_id, direction, twilio_sid, body, media, attributes, status, received_at)
VALUES ($1, $2, 'inbound', $3, $4, $5, $6, 'received', $7)
ON CONFLICT (twilio_sid) DO NOTHING
RETURNING id
"""


@dataclass(frozen=True)
class Stored:
    conversation_id: str
    contact_id: str
    message_id: str
    opened: bool


async def store_inbound(conn: Connection, account: str, message: MessageReceived) -> Stored | None:
    """Store a customer's message in its conversation; None if it was already stored."""
    if await conn.fetchval("SELECT 1 FROM messages WHERE twilio_sid = $1", message.message_sid):
        return None
    contact_id = await conn.fetchval(
        _UPSERT_CONTACT,
        uuid.uuid4(),
        account,
        message.customer,
        message.customer_wa_id,
        message.external_user_id,
        message.profile_name,
    )
    row = await conn.fetchrow(
        _FIND_OR_OPEN,
        uuid.uuid4(),
        account,
        message.business_number,
        message.customer,
        contact_id,
        message.workstream,
        message.received_at,
    )
    assert row is not None  # INSERT … ON CONFLICT DO UPDATE always returns the row
    message_id = await conn.fetchval(
        _INSERT_MESSAGE,
        uuid.uuid4(),
        row["id"],
        message.message_sid,
        message.body,
        [m.model_dump(mode="json") for m in message.media],
        _attributes(message),
        message.received_at,
    )
    if message_id is None:  # the same sid committed by a concurrent replica meanwhile
        return None
    return Stored(str(row["id"]), str(contact_id), str(message_id), bool(row["opened"]))


def _attributes(message: MessageReceived) -> dict[str, object]:
    attributes: dict[str, object] = {"form": message.form}
    for key in ("message_type", "button_text", "button_payload", "location", "replied_to_sid"):
        value = getattr(message, key)
        if value is not None:
            attributes[key] = value
    return attributes


async def handle(event: Envelope, payload: BaseModel, tx: StageTx) -> list[Envelope]:
    assert isinstance(payload, MessageReceived)
    stored = await store_inbound(tx.conn, event.account, payload)
    if stored is None:
        return []
    events = await _attachments_notice(event, payload, stored, tx)
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
    return [
        event.caused(
            EventType.CONVERSATION_OPENED,
            opened.model_dump(mode="json"),
            conversation_id=stored.conversation_id,
        ),
        *events,
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
    payloads={EventType.MESSAGE_RECEIVED: MessageReceived},
    handle=handle,
)
