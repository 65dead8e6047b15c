"""The ``conversations`` stage: a customer's message becomes a stored message in the one
open conversation of (account, business number, customer), opening it if needed.

Idempotent: a message whose Twilio sid is already stored changes nothing and emits nothing
(Twilio resends webhooks; the broker redelivers). Two replicas handling two messages of one
new customer at once still open one conversation: "find or open" is a single
``INSERT … ON CONFLICT`` on the partial unique index ``conversations_one_open``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

from pydantic import BaseModel

from consumers.automated import queue_automated
from consumers.runtime import Stage, StageTx
from omniroute.infra.ids import new_id
from omniroute.infra.store import Connection
from schemas.events import (
    ConversationOpened,
    ConversationQueued,
    Envelope,
    EventType,
    MessageReceived,
    SurveyAnswered,
)

# One statement, one round trip: unless the message is stored already (then nothing at all),
# upsert the contact, find or open the conversation (or move the window anchor of the open
# one), insert the message. Replicas may commit a customer's
# messages out of order: the earliest receipt opens, the latest anchors the window.
_STORE_INBOUND = """
WITH contact AS (
    INSERT INTO contacts (id, account, address, wa_id, external_user_id, profile_name)
    SELECT $1, $2, $3, $4, $5, $6
    WHERE NOT EXISTS (SELECT 1 FROM messages WHERE twilio_sid = $12)  -- stored before: no-op
    ON CONFLICT (account, address) DO UPDATE SET
        wa_id = COALESCE(EXCLUDED.wa_id, contacts.wa_id),
        external_user_id = COALESCE(EXCLUDED.external_user_id, contacts.external_user_id),
        profile_name = COALESCE(EXCLUDED.profile_name, contacts.profile_name),
        updated_at = now()
    RETURNING id
), conversation AS (
    INSERT INTO conversations
        (id, account, business_number, customer, contact_id, workstream, state,
         opened_at, last_customer_message_at)
    SELECT $7, $2, $8, $3, contact.id, $9, 'open', $10, $10 FROM contact
    ON CONFLICT (account, business_number, customer) WHERE state <> 'closed' DO UPDATE SET
        opened_at = LEAST(conversations.opened_at, EXCLUDED.opened_at),
        last_customer_message_at =
            GREATEST(conversations.last_customer_message_at, EXCLUDED.last_customer_message_at),
        updated_at = now()
    RETURNING id, contact_id, state, (xmax = 0) AS opened
), message AS (
    INSERT INTO messages
        (id, conversation_id, direction, twilio_sid, body, media, attributes, status, received_at)
    SELECT $11, conversation.id, 'inbound', $12, $13, $14, $15, 'received', $10 FROM conversation
    ON CONFLICT (twilio_sid) DO NOTHING
    RETURNING id
)
SELECT conversation.id, conversation.contact_id, conversation.state, conversation.opened,
       (SELECT id FROM message) AS message_id
FROM conversation
"""


@dataclass(frozen=True)
class Stored:
    conversation_id: str
    contact_id: str
    message_id: str
    opened: bool
    waiting: bool = False  # the agent had parked the conversation


async def store_inbound(conn: Connection, account: str, message: MessageReceived) -> Stored | None:
    """Store a customer's message in its conversation; None if it was already stored."""
    return await _store_new(conn, account, message)


def _may_answer_or_reopen(payload: MessageReceived, tx: StageTx) -> bool:
    """Whether the message could be a survey answer or reopen a conversation: only then is
    the duplicate check needed up front (storing checks it in the same statement)."""
    workstream = tx.config.current.workstream(payload.workstream)
    reopens = bool(workstream and workstream.lifecycle.reopen_within)
    return reopens or any(ws.survey for ws in tx.config.current.workstreams)


async def _seen(conn: Connection, message_sid: str) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM messages WHERE twilio_sid = $1", message_sid))


async def _store_new(conn: Connection, account: str, message: MessageReceived) -> Stored | None:
    row = await conn.fetchrow(
        _STORE_INBOUND,
        new_id(),
        account,
        message.customer,
        message.customer_wa_id,
        message.external_user_id,
        message.profile_name,
        new_id(),
        message.business_number,
        message.workstream,
        message.received_at,
        new_id(),
        message.message_sid,
        message.body,
        [m.model_dump(mode="json") for m in message.media],
        _attributes(message),
    )
    if row is None or row["message_id"] is None:
        return None  # stored before, or by a concurrent replica just now
    return Stored(
        str(row["id"]),
        str(row["contact_id"]),
        str(row["message_id"]),
        bool(row["opened"]),
        waiting=row["state"] == "waiting",
    )


def _attributes(message: MessageReceived) -> dict[str, object]:
    attributes: dict[str, object] = {"form": message.form}
    for key in ("message_type", "button_text", "button_payload", "location", "replied_to_sid"):
        value = getattr(message, key)
        if value is not None:
            attributes[key] = value
    return attributes


async def handle(event: Envelope, payload: BaseModel, tx: StageTx) -> list[Envelope]:
    assert isinstance(payload, MessageReceived)
    if payload.sandbox and SANDBOX_JOIN.match(payload.body):
        return await _sandbox_join(event, payload, tx)
    if _may_answer_or_reopen(payload, tx) and await _seen(tx.conn, payload.message_sid):
        return []  # Twilio resent it or the broker redelivered it: already done
    answered = await _survey_answer(event, payload, tx)
    if answered is not None:
        return answered
    reopened = await _reopen(event, payload, tx)
    stored = await _store_new(tx.conn, event.account, payload)
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
    return [
        event.caused(
            EventType.CONVERSATION_OPENED,
            opened.model_dump(mode="json"),
            conversation_id=stored.conversation_id,
        ),
        *events,
    ]


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
            {
                "customer": payload.customer,
                "business_number": payload.business_number,
                "code": payload.body.split()[-1],
                "joined_at": payload.received_at.isoformat(),
            },
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


_REOPEN = """
UPDATE conversations SET state = 'queued', closed_at = NULL, close_reason = NULL,
    agent_id = NULL, declined_by = '{}', queued_at = $5, wrap_up_until = NULL,
    last_customer_message_at = GREATEST(last_customer_message_at, $5), updated_at = now()
WHERE id = (
    SELECT id FROM conversations
    WHERE account = $1 AND business_number = $2 AND customer = $3 AND state = 'closed'
      AND closed_at >= $4 AND close_reason IS DISTINCT FROM 'out_of_hours'
    ORDER BY closed_at DESC LIMIT 1)
  AND NOT EXISTS (
    SELECT 1 FROM conversations
    WHERE account = $1 AND business_number = $2 AND customer = $3 AND state <> 'closed')
RETURNING id, queue, workstream, skills, priority, language, contact_id
"""


async def _reopen(event: Envelope, payload: MessageReceived, tx: StageTx) -> list[Envelope]:
    """Within the workstream's reopen_within after a close, the customer's new message brings
    the last conversation back to its queue (its previous agent is offered it first)."""
    workstream = tx.config.current.workstream(payload.workstream)
    within = workstream.lifecycle.reopen_within if workstream else None
    if not within or workstream is None:
        return []
    row = await tx.conn.fetchrow(
        _REOPEN,
        event.account,
        payload.business_number,
        payload.customer,
        payload.received_at - timedelta(seconds=within),
        payload.received_at,
    )
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
            {"reopened_at": payload.received_at.isoformat(), "workstream": row["workstream"]},
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
    row = await tx.conn.fetchrow(
        "UPDATE conversations SET state = 'queued', queued_at = $2, declined_by = '{}',"
        " updated_at = now() WHERE id = $1 AND state = 'waiting'"
        " RETURNING queue, workstream, skills, priority, language",
        stored.conversation_id,
        payload.received_at,
    )
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
    payloads={EventType.MESSAGE_RECEIVED: MessageReceived},
    handle=handle,
)
