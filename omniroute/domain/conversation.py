"""The conversation state machine's one owner: every change of a conversation's row
(opened — for classification, or for the workstream's bot —, escalated by the bot or
closed at it, classified and queued, offered, assigned, declined, transferred, parked waiting, ended
into wrap-up, closed, reopened) and the agent capacity it moves, each a few
statements inside the caller's transaction, each returning the event it causes (to be
written to the outbox). Nothing else in omniroute writes ``UPDATE conversations``.

The trace survives end to end: a transition with its cause in hand builds its event with
``Envelope.caused`` (same correlation, causation = that event); one done later without it
(a distribution cycle, an agent's accept) reads the conversation's ``correlation_id`` (the
opening webhook's) and ``last_event_id`` (its cause) from the row it locks anyway, and
records its own event's id there in the same UPDATE.

Lock order, everywhere: offer → conversation → agent. Capacity is claimed with a guarded
UPDATE (``used_units + units <= capacity_units``), so no interleaving can push an agent
over capacity; one pending offer and one active assignment per conversation are unique
indexes, so none can assign a conversation twice.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel

from omniroute.errors import WorkConflict
from omniroute.infra.ids import new_id
from omniroute.infra.store import Connection
from schemas.events import (
    ConversationAssigned,
    ConversationClosed,
    ConversationEnded,
    ConversationEscalated,
    ConversationOffered,
    ConversationOverflowed,
    ConversationTransferred,
    ConversationWaiting,
    Envelope,
    EscalationReason,
    EventType,
    MessageReceived,
    OfferEnded,
    event_id,
    new_event,
)


@dataclass(frozen=True)
class ConversationRef:
    """A conversation as a transition needs it: who, where, and its trace."""

    id: str
    account: str
    queue: str | None
    correlation_id: str | None = None  # None: rows from before the trace was kept
    last_event_id: str | None = None

    def transferred(self, data: ConversationTransferred, now: datetime) -> Envelope:
        """``conversation.transferred`` (one per conversation and moment)."""
        return self.event(EventType.CONVERSATION_TRANSFERRED, (self.id, now.isoformat()), data, now)

    def event(self, type: str, key: tuple[str, ...], data: BaseModel, now: datetime) -> Envelope:
        """The event of a transition of this conversation, carrying its trace."""
        return new_event(
            type,
            account=self.account,
            key=key,
            data=data.model_dump(mode="json"),
            occurred_at=now,
            conversation_id=self.id,
            correlation_id=self.correlation_id,
            causation_id=self.last_event_id,
        )


@dataclass(frozen=True)
class Classified:
    """What classification decided for an opened conversation."""

    state: str  # queued, or closed (out of hours)
    queue: str | None
    skills: dict[str, int]
    priority: int
    severity: str
    language: str
    variables: dict[str, Any]
    trace: dict[str, Any]  # why: matched rules, notes
    out_of_hours: bool
    close_reason: str = "out_of_hours"  # when closed: out_of_hours, or overflow
    overflowed: bool = False


_CLASSIFY = """
UPDATE conversations SET
    state = $2::text, queue = $3, skills = $4, priority = $5, severity = $6, language = $7,
    variables = $8, classification = $9, out_of_hours = $10, classified_at = $11::timestamptz,
    queued_at = CASE WHEN $2::text = 'queued' THEN $11::timestamptz END,
    closed_at = CASE WHEN $2::text = 'closed' THEN $11::timestamptz END,
    close_reason = CASE WHEN $2::text = 'closed' THEN $13 END,
    overflowed_at = CASE WHEN $14 THEN $11::timestamptz END,
    last_event_id = $12, updated_at = now()
WHERE id = $1
"""


async def apply_classification(
    conn: Connection, conversation_id: str, c: Classified, now: datetime, event_id: str
) -> None:
    """An opened conversation classified: queued (or closed out of hours) by the event
    ``event_id`` the caller built from its cause."""
    await conn.execute(
        _CLASSIFY,
        conversation_id,
        c.state,
        c.queue,
        c.skills,
        c.priority,
        c.severity,
        c.language,
        c.variables,
        c.trace,
        c.out_of_hours,
        now,
        event_id,
        c.close_reason,
        c.overflowed,
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
         opened_at, last_customer_message_at, correlation_id, last_event_id)
    SELECT $7, $2, $8, $3, contact.id, $9, $18, $10, $10, $16, $17 FROM contact
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
    state: str = "open"  # the conversation's state when the message was stored


def opened_event_id(received: Envelope) -> str:
    """The id of the ``conversation.opened`` event a received message causes."""
    return event_id(received.id, EventType.CONVERSATION_OPENED)


async def store_inbound(
    conn: Connection,
    account: str,
    message: MessageReceived,
    correlation_id: str | None = None,
    opened_event_id: str | None = None,
    *,
    opens_in: str = "open",
) -> Stored | None:
    """Store a customer's message in its conversation, opening one if none is open (then
    traced by ``correlation_id``, caused by ``opened_event_id``, in state ``opens_in``:
    ``open`` for classification, ``bot`` for a workstream's bot); None if it was stored
    already."""
    if opens_in not in ("open", "bot"):
        raise ValueError(f"a conversation opens in open or bot, not {opens_in!r}")
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
        correlation_id,
        opened_event_id,
        opens_in,
    )
    if row is None or row["message_id"] is None:
        return None  # stored before, or by a concurrent replica just now
    return Stored(
        str(row["id"]),
        str(row["contact_id"]),
        str(row["message_id"]),
        bool(row["opened"]),
        waiting=row["state"] == "waiting",
        state=row["state"],
    )


def _attributes(message: MessageReceived) -> dict[str, object]:
    attributes: dict[str, object] = {"form": message.form}
    for key in ("message_type", "button_text", "button_payload", "location", "replied_to_sid"):
        value = getattr(message, key)
        if value is not None:
            attributes[key] = value
    return attributes


# The customer's last conversation decides: when it never reached a queue (the bot's, closed
# resolved or idle, or by a supervisor while at the bot) there is nothing to go back to, and
# the message opens a new conversation — at the workstream's bot where it has one. (Without
# this it came back 'queued' with no queue, and every later message sat in it unrouted.)
_REOPEN = """
UPDATE conversations SET state = 'queued', closed_at = NULL, close_reason = NULL,
    agent_id = NULL, declined_by = '{}', queued_at = $5, wrap_up_until = NULL,
    last_customer_message_at = GREATEST(last_customer_message_at, $5),
    correlation_id = $6, last_event_id = $7, updated_at = now()
WHERE id = (
    SELECT id FROM conversations
    WHERE account = $1 AND business_number = $2 AND customer = $3 AND state = 'closed'
      AND closed_at >= $4 AND close_reason IS DISTINCT FROM 'out_of_hours'
    ORDER BY closed_at DESC LIMIT 1)
  AND queue IS NOT NULL
  AND NOT EXISTS (
    SELECT 1 FROM conversations
    WHERE account = $1 AND business_number = $2 AND customer = $3 AND state <> 'closed')
RETURNING id, queue, workstream, skills, priority, language, contact_id
"""


async def reopen(
    conn: Connection, received: Envelope, message: MessageReceived, since: datetime
) -> Any:
    """The customer's message within ``reopen_within`` of a close brings the last closed
    conversation (closed at or after ``since``, not out of hours) back to its queue, traced
    by that message. Its row (queue, skills, …), or None — also when that conversation
    never reached a queue (it ended at the bot): the message then opens a new one."""
    return await conn.fetchrow(
        _REOPEN,
        received.account,
        message.business_number,
        message.customer,
        since,
        message.received_at,
        received.correlation_id,
        event_id(received.id, EventType.CONVERSATION_QUEUED),
    )


async def resume_waiting(
    conn: Connection, received: Envelope, conversation_id: str, at: datetime
) -> Any:
    """A conversation the agent parked comes back to its queue when the customer writes;
    its row (queue, skills, …), or None when it is not waiting."""
    return await conn.fetchrow(
        "UPDATE conversations SET state = 'queued', queued_at = $2, declined_by = '{}',"
        " correlation_id = $3, last_event_id = $4, updated_at = now()"
        " WHERE id = $1 AND state = 'waiting'"
        " RETURNING queue, workstream, skills, priority, language",
        conversation_id,
        at,
        received.correlation_id,
        event_id(received.id, EventType.CONVERSATION_QUEUED),
    )


async def claim_capacity(conn: Connection, agent_id: str, units: int, now: datetime) -> bool:
    """Take ``units`` of the agent's capacity if it has them; False if not."""
    row = await conn.fetchval(
        "UPDATE agents SET used_units = used_units + $2, last_assigned_at = $3"
        " WHERE id = $1 AND deleted_at IS NULL AND used_units + $2 <= capacity_units"
        " RETURNING id",
        agent_id,
        units,
        now,
    )
    return row is not None


async def release_capacity(conn: Connection, agent_id: str, units: int, now: datetime) -> None:
    await conn.execute(
        "UPDATE agents SET used_units = GREATEST(used_units - $2, 0),"
        " capacity_released_at = $3 WHERE id = $1",
        agent_id,
        units,
        now,
    )


async def make_offer(
    conn: Connection,
    conv: ConversationRef,
    agent_id: str,
    units: int,
    offer_seconds: float,
    now: datetime,
    *,
    affinity: bool = False,
) -> Envelope:
    """Offer a queued conversation to an agent whose capacity the caller has claimed."""
    offer_id = str(new_id())
    expires = now + timedelta(seconds=offer_seconds)
    data = ConversationOffered(
        offer_id=offer_id,
        agent_id=agent_id,
        queue=conv.queue or "",
        units=units,
        affinity=affinity,
        expires_at=expires,
    )
    event = conv.event(EventType.CONVERSATION_OFFERED, (offer_id,), data, now)
    await conn.execute(
        "INSERT INTO offers (id, conversation_id, agent_id, units, created_at, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        offer_id,
        conv.id,
        agent_id,
        units,
        now,
        expires,
    )
    await conn.execute(
        "UPDATE conversations SET state = 'offered', agent_id = $2, units = $3,"
        " last_event_id = $4, updated_at = now() WHERE id = $1",
        conv.id,
        agent_id,
        units,
        event.id,
    )
    return event


async def assign(
    conn: Connection, conv: ConversationRef, agent_id: str, units: int, via: str, now: datetime
) -> Envelope:
    """Record the assignment (capacity already claimed) and make the conversation active."""
    assignment_id = str(new_id())
    data = ConversationAssigned(
        agent_id=agent_id, assignment_id=assignment_id, queue=conv.queue, via=via, assigned_at=now
    )
    event = conv.event(EventType.CONVERSATION_ASSIGNED, (assignment_id,), data, now)
    await conn.execute(
        "INSERT INTO assignments (id, conversation_id, agent_id, units, assigned_at)"
        " VALUES ($1, $2, $3, $4, $5)",
        assignment_id,
        conv.id,
        agent_id,
        units,
        now,
    )
    # The contact's agent for affinity, in the same statement (read by primary key).
    await conn.execute(
        "WITH c AS (UPDATE conversations SET state = 'active', agent_id = $2, units = $3,"
        " assigned_at = $4, last_event_id = $5, updated_at = now() WHERE id = $1"
        " RETURNING contact_id)"
        " INSERT INTO contact_agents (contact_id, agent_id, assigned_at)"
        " SELECT contact_id, $2, $4 FROM c ON CONFLICT (contact_id) DO UPDATE"
        " SET agent_id = EXCLUDED.agent_id, assigned_at = EXCLUDED.assigned_at"
        " WHERE contact_agents.assigned_at <= EXCLUDED.assigned_at",
        conv.id,
        agent_id,
        units,
        now,
        event.id,
    )
    return event


async def accept_offer(conn: Connection, offer_id: str, agent_id: str, now: datetime) -> Envelope:
    """The agent accepts its pending offer. Raises WorkConflict if it is not pending."""
    offer = await _lock_offer(conn, offer_id, agent_id)
    if offer["state"] != "pending" or offer["expires_at"] <= now:
        raise WorkConflict("offer_closed", f"the offer is {offer['state']}, not pending")
    await conn.execute(
        "UPDATE offers SET state = 'accepted', decided_at = $2 WHERE id = $1", offer_id, now
    )
    conv = await _conversation(conn, str(offer["conversation_id"]))
    return await assign(conn, conv, agent_id, offer["units"], "offer", now)


async def end_offer(
    conn: Connection,
    offer_id: str,
    agent_id: str | None,
    outcome: str,
    now: datetime,
    *,
    ended_by: str | None = None,
) -> Envelope:
    """Decline (agent), expire (timer) or end (supervisor, as ``expired``) a pending offer:
    capacity back, work back to its queue, and this agent is not offered the same
    conversation again in this round (``restart_offer_round``)."""
    offer = await _lock_offer(conn, offer_id, agent_id)
    if offer["state"] != "pending":
        raise WorkConflict("offer_closed", f"the offer is {offer['state']}, not pending")
    await conn.execute(
        "UPDATE offers SET state = $2, decided_at = $3 WHERE id = $1", offer_id, outcome, now
    )
    conv = await _conversation(conn, str(offer["conversation_id"]))
    kind = EventType.OFFER_DECLINED if outcome == "declined" else EventType.OFFER_EXPIRED
    data = OfferEnded(
        offer_id=offer_id, agent_id=str(offer["agent_id"]), queue=conv.queue, ended_by=ended_by
    )
    event = conv.event(kind, (offer_id,), data, now)
    await conn.execute(
        "UPDATE conversations SET state = 'queued', agent_id = NULL,"
        " declined_by = array_append(declined_by, $2), last_declined_at = $4,"
        " not_preferred = array_append(not_preferred, $2),"
        " last_event_id = $3, updated_at = now() WHERE id = $1",
        conv.id,
        offer["agent_id"],
        event.id,
        now,
    )
    await release_capacity(conn, str(offer["agent_id"]), offer["units"], now)
    return event


async def restart_offer_round(
    conn: Connection, conversation_id: str, reoffer_after: float, now: datetime
) -> bool:
    """Every eligible agent declined (or let expire) the offer: once ``reoffer_after`` has
    passed since the last one, forget the declines so offers start again. Until then the
    conversation waits in its queue (an agent who has not declined it still gets it at
    once). Whether a new round started."""
    row = await conn.fetchval(
        "UPDATE conversations SET declined_by = '{}' WHERE id = $1 AND state = 'queued'"
        " AND (last_declined_at IS NULL OR last_declined_at <= $2) RETURNING id",
        conversation_id,
        now - timedelta(seconds=reoffer_after),
    )
    return row is not None


async def release_assignment(conn: Connection, conversation_id: str, now: datetime) -> str | None:
    """End the conversation's active assignment and give the capacity back; its agent."""
    row = await conn.fetchrow(
        "UPDATE assignments SET released_at = $2 WHERE conversation_id = $1"
        " AND released_at IS NULL RETURNING agent_id, units",
        conversation_id,
        now,
    )
    if row is None:
        return None
    await release_capacity(conn, str(row["agent_id"]), row["units"], now)
    return str(row["agent_id"])


async def close_conversation(
    conn: Connection,
    conversation_id: str,
    reason: str,
    now: datetime,
    *,
    automated_message: str | None = None,
) -> Envelope:
    """Close a conversation: pending offers cancelled and assignment released (capacity
    back), state closed. A reason recorded earlier (the agent's, at the start of wrap-up)
    is kept; the event carries the reason that stands."""
    conv = await _conversation(conn, conversation_id, lock=True)
    await _cancel_offers(conn, conversation_id, now)
    await release_assignment(conn, conversation_id, now)
    closed_id = event_id(EventType.CONVERSATION_CLOSED, conversation_id)
    row = await conn.fetchrow(
        "UPDATE conversations SET state = 'closed', closed_at = $2,"
        " close_reason = COALESCE(close_reason, $3), last_event_id = $4, updated_at = now()"
        " WHERE id = $1 RETURNING workstream, close_reason",
        conversation_id,
        now,
        reason,
        closed_id,
    )
    assert row is not None  # locked above
    data = ConversationClosed(
        reason=row["close_reason"],
        workstream=row["workstream"],
        automated_message=automated_message,
        closed_at=now,
    )
    return conv.event(EventType.CONVERSATION_CLOSED, (conversation_id,), data, now)


async def overflow(
    conn: Connection,
    conversation_id: str,
    data: ConversationOverflowed,
    message: str | None,
    now: datetime,
) -> list[Envelope]:
    """A waiting conversation's queue overflowed (``data`` says why and what applies):
    moved to the overflow queue (its wait so far kept), left waiting, or closed with
    ``message``. Once per conversation (``overflowed_at``)."""
    conv = await _conversation(conn, conversation_id, lock=True)
    if conv.state != "queued":
        return []
    event = conv.event(EventType.CONVERSATION_OVERFLOWED, (conversation_id, "overflow"), data, now)
    await conn.execute(
        "UPDATE conversations SET overflowed_at = $2, last_event_id = $3 WHERE id = $1",
        conversation_id,
        now,
        event.id,
    )
    events = [event]
    if data.action == "transfer" and data.to_queue:
        moved = replace(conv, last_event_id=event.id)
        moved_data = ConversationTransferred(
            from_queue=conv.queue, to_queue=data.to_queue, transferred_at=now, reason="overflow"
        )
        transferred = moved.transferred(moved_data, now)
        await conn.execute(
            "UPDATE conversations SET queue = $2, declined_by = '{}', last_declined_at = NULL,"
            " last_event_id = $3, updated_at = now() WHERE id = $1",
            conversation_id,
            data.to_queue,
            transferred.id,
        )
        events.append(transferred)
    elif data.action == "end":
        events.append(
            await close_conversation(
                conn, conversation_id, "overflow", now, automated_message=message
            )
        )
    return events


async def end_by_agent(
    conn: Connection,
    conversation_id: str,
    agent_id: str,
    reason: str,
    wrap_up_seconds: float,
    now: datetime,
) -> Envelope:
    """The agent ends the conversation: into wrap-up (which holds the capacity until its
    timer or a second close) when the workstream has one, else closed at once."""
    conv = await _conversation(conn, conversation_id, lock=True)
    if conv.state == "closed":
        raise WorkConflict("already_closed", "the conversation is closed")
    if wrap_up_seconds <= 0 or conv.state in ("wrap-up", "waiting"):
        # A parked conversation holds no capacity: there is nothing for wrap-up to hold.
        return await close_conversation(conn, conversation_id, reason, now)
    until = now + timedelta(seconds=wrap_up_seconds)
    row = await conn.fetchrow("SELECT workstream FROM conversations WHERE id = $1", conversation_id)
    assert row is not None
    data = ConversationEnded(agent_id=agent_id, workstream=row["workstream"], until=until)
    event = conv.event(EventType.CONVERSATION_ENDED, (conversation_id,), data, now)
    await conn.execute(
        "UPDATE conversations SET state = 'wrap-up', wrap_up_until = $2,"
        " close_reason = $3, last_event_id = $4, updated_at = now() WHERE id = $1",
        conversation_id,
        until,
        reason,
        event.id,
    )
    return event


async def wait_for_customer(
    conn: Connection, conversation_id: str, agent_id: str, now: datetime
) -> Envelope:
    """Park an active conversation waiting for the customer: capacity released, the
    customer's next message brings it back (``resume_waiting``)."""
    conv = await _conversation(conn, conversation_id, lock=True)
    if conv.state != "active":
        raise WorkConflict("not_active", f"the conversation is {conv.state}, not active")
    await release_assignment(conn, conversation_id, now)
    data = ConversationWaiting(agent_id=agent_id, waiting_since=now)
    event = conv.event(
        EventType.CONVERSATION_WAITING, (conversation_id, now.isoformat()), data, now
    )
    await conn.execute(
        "UPDATE conversations SET state = 'waiting', last_event_id = $2, updated_at = now()"
        " WHERE id = $1",
        conversation_id,
        event.id,
    )
    return event


async def transfer_to_queue(
    conn: Connection,
    conversation_id: str,
    queue: str,
    by_agent: str | None,
    now: datetime,
    *,
    reason: str | None = None,
    by: str | None = None,
) -> Envelope:
    """Put a conversation back into (another) queue: its pending offer ends and its
    assignment is released (capacity back). The agent it leaves (``by_agent``, or the one
    holding it) is not offered it again in this offer round: when it is the only eligible
    one, the conversation waits ``reoffer_after`` for another (as after a decline)."""
    conv = await _conversation(conn, conversation_id, lock=True)
    if conv.state == "closed":
        raise WorkConflict("already_closed", "the conversation is closed")
    source = by_agent or conv.agent_id
    await _cancel_offers(conn, conversation_id, now)
    await release_assignment(conn, conversation_id, now)
    data = ConversationTransferred(
        from_queue=conv.queue,
        to_queue=queue,
        from_agent=source,
        transferred_at=now,
        reason=reason,
        by=by,
    )
    event = conv.transferred(data, now)
    await conn.execute(
        "UPDATE conversations SET state = 'queued', queue = $2, agent_id = NULL,"
        " queued_at = $3, declined_by = $4::uuid[],"
        " last_declined_at = CASE WHEN cardinality($4::uuid[]) > 0 THEN $3::timestamptz END,"
        " not_preferred = not_preferred || $4::uuid[],"
        " wrap_up_until = NULL, last_event_id = $5, updated_at = now() WHERE id = $1",
        conversation_id,
        queue,
        now,
        [source] if source else [],
        event.id,
    )
    return event


async def transfer_to_agent(
    conn: Connection,
    conversation_id: str,
    agent_id: str,
    by_agent: str | None,
    offer_seconds: float,
    now: datetime,
    *,
    by: str | None = None,
) -> list[Envelope]:
    """Offer a conversation to one agent, who must exist, be available, serve the
    conversation's queue and have the capacity; otherwise WorkConflict says which, and
    nothing changed (the caller's transaction is left as it was)."""
    conv = await _conversation(conn, conversation_id, lock=True)
    if conv.state == "closed":
        raise WorkConflict("already_closed", "the conversation is closed")
    target = await conn.fetchrow(
        "SELECT presence, queues, capacity_units - used_units AS free FROM agents"
        " WHERE id = $1 AND deleted_at IS NULL FOR UPDATE",
        agent_id,
    )
    if target is None or agent_id == (by_agent or conv.agent_id):
        raise WorkConflict("not_found", "no such agent to transfer to")
    if target["presence"] != "available":
        raise WorkConflict("agent_unavailable", f"that agent is {target['presence']}")
    if conv.queue is not None and conv.queue not in target["queues"]:
        raise WorkConflict(
            "agent_not_in_queue", f"that agent does not serve the queue {conv.queue}"
        )
    if target["free"] < conv.units:
        raise WorkConflict("no_capacity", "that agent has no free capacity")
    await _cancel_offers(conn, conversation_id, now)
    await release_assignment(conn, conversation_id, now)
    if not await claim_capacity(conn, agent_id, conv.units, now):
        raise WorkConflict("no_capacity", "that agent has no free capacity")
    source = by_agent or conv.agent_id
    if source is not None:  # handed on: affinity never brings it back to them
        await conn.execute(
            "UPDATE conversations SET not_preferred = array_append(not_preferred, $2::uuid)"
            " WHERE id = $1",
            conversation_id,
            source,
        )
    data = ConversationTransferred(
        from_queue=conv.queue,
        to_queue=conv.queue,
        from_agent=by_agent or conv.agent_id,
        to_agent=agent_id,
        transferred_at=now,
        reason="supervisor" if by else None,
        by=by,
    )
    transferred = conv.transferred(data, now)
    offered = await make_offer(
        conn, replace(conv, last_event_id=transferred.id), agent_id, conv.units, offer_seconds, now
    )
    return [transferred, offered]


async def requeue_agent_work(
    conn: Connection,
    agent_id: str,
    reason: str,
    now: datetime,
    *,
    by: str | None = None,
    workstreams: Collection[str] | None = None,
) -> list[Envelope]:
    """Nothing stays with an agent who cannot answer (removed, or offline under the
    ``requeue`` policy): pending offers end, active and waiting conversations go back to
    their queues ahead of others of their priority (their first queue time kept, priority
    raised by one) with ``reason``, and conversations in wrap-up close. ``workstreams``
    limits the conversations moved to those workstreams (None: all); offers always end.

    Lock order as everywhere (offer → conversation → agent): call it before locking the
    agent's row."""
    events: list[Envelope] = []
    offers = await conn.fetch(
        "SELECT id FROM offers WHERE agent_id = $1 AND state = 'pending' ORDER BY id"
        " FOR UPDATE SKIP LOCKED",
        agent_id,
    )
    for offer in offers:
        events.append(await end_offer(conn, str(offer["id"]), None, "cancelled", now, ended_by=by))
    if workstreams is not None and not workstreams:
        return events  # nobody's policy moves the conversations: only the offers end
    held = await conn.fetch(
        "SELECT id, state, queue FROM conversations WHERE agent_id = $1"
        " AND state IN ('active', 'waiting', 'wrap-up')"
        " AND ($2::text[] IS NULL OR workstream = ANY($2::text[])) ORDER BY id"
        " FOR UPDATE SKIP LOCKED",
        agent_id,
        None if workstreams is None else sorted(workstreams),
    )
    for row in held:
        cid = str(row["id"])
        if row["state"] == "wrap-up":
            events.append(await close_conversation(conn, cid, "agent", now))
            continue
        conv = await _conversation(conn, cid, lock=True)
        await release_assignment(conn, cid, now)
        data = ConversationTransferred(
            from_queue=conv.queue,
            to_queue=conv.queue,
            from_agent=agent_id,
            transferred_at=now,
            reason=reason,
            by=by,
        )
        event = conv.transferred(data, now)
        await conn.execute(
            "UPDATE conversations SET state = 'queued', agent_id = NULL, declined_by = $2,"
            " not_preferred = not_preferred || $2::uuid[],"
            " last_declined_at = NULL, priority = priority + 1,"
            " queued_at = LEAST(COALESCE(queued_at, $3), $3), last_event_id = $4,"
            " updated_at = now() WHERE id = $1",
            cid,
            [agent_id],
            now,
            event.id,
        )
        events.append(event)
    return events


# Agents removed while something still names them (an offer or a conversation committed by
# a replica at the moment of the removal): few rows, each found through ``conversations_agent``
# or ``offers_agent``.
ORPHANED = """
SELECT a.id FROM agents a
WHERE a.deleted_at IS NOT NULL
  AND (EXISTS (SELECT 1 FROM conversations c WHERE c.agent_id = a.id
               AND c.state IN ('offered', 'active', 'waiting', 'wrap-up'))
       OR EXISTS (SELECT 1 FROM offers o WHERE o.agent_id = a.id AND o.state = 'pending'))
ORDER BY a.id LIMIT $1
"""


async def rescue_orphans(conn: Connection, now: datetime, limit: int = 10) -> list[Envelope]:
    """Nothing stays with someone who cannot answer, even work that reached an agent in
    the instant it was removed: the distribution tick hands it back (one replica per agent
    at a time)."""
    events: list[Envelope] = []
    for row in await conn.fetch(ORPHANED, limit):
        agent_id = str(row["id"])
        if await conn.fetchval(
            "SELECT pg_try_advisory_xact_lock(hashtext($1))", f"rescue:{agent_id}"
        ):
            events += await requeue_agent_work(conn, agent_id, "agent_removed", now)
    return events


@dataclass(frozen=True)
class Handoff:
    """Why and with what the bot gives a conversation to agents: its variables merge into
    the conversation's context; its skills, priority and queue are hints classification
    applies over the rules' outcome."""

    reason: EscalationReason
    detail: str | None = None
    variables: dict[str, Any] = field(default_factory=dict)
    skills: dict[str, int] = field(default_factory=dict)
    priority: int | None = None
    queue: str | None = None
    turns: int = 0

    def hint(self) -> dict[str, Any]:
        """What classification reads back from the row (``bot_handoff``)."""
        return {
            "reason": self.reason,
            "detail": self.detail,
            "skills": self.skills,
            "priority": self.priority,
            "queue": self.queue,
            "turns": self.turns,
        }


async def escalate(
    conn: Connection, conversation_id: str, handoff: Handoff, workstream: str, now: datetime
) -> Envelope | None:
    """The bot is done with the conversation: ``bot`` → ``open`` (classification's), its
    variables merged into the context and the hand-off kept for classification, as
    ``conversation.escalated``. None when it is no longer the bot's (escalated before,
    closed by a supervisor): once per conversation."""
    conv = await _conversation(conn, conversation_id, lock=True)
    if conv.state != "bot":
        return None
    data = ConversationEscalated(
        workstream=workstream,
        reason=handoff.reason,
        detail=handoff.detail,
        variables=handoff.variables,
        skills=handoff.skills,
        priority=handoff.priority,
        queue=handoff.queue,
        turns=handoff.turns,
        escalated_at=now,
    )
    event = conv.event(EventType.CONVERSATION_ESCALATED, (conversation_id,), data, now)
    await conn.execute(
        "UPDATE conversations SET state = 'open', variables = variables || $2::jsonb,"
        " bot_handoff = $3, last_event_id = $4, updated_at = now() WHERE id = $1",
        conversation_id,
        handoff.variables,
        handoff.hint(),
        event.id,
    )
    return event


BotEnd = Literal["resolved_by_bot", "bot_idle"]


async def close_at_bot(
    conn: Connection, conversation_id: str, reason: BotEnd, now: datetime
) -> Envelope | None:
    """The conversation ends where it is, at the bot: the bot resolved it
    (``resolved_by_bot``) or the customer went silent there (``bot_idle``). Closed as any
    close (``conversation.closed`` with the reason); no agent ever held it, so there is no
    wrap-up and no survey. None when it is no longer the bot's (escalated, closed): once per
    conversation, like ``escalate``."""
    conv = await _conversation(conn, conversation_id, lock=True)
    if conv.state != "bot":
        return None
    return await close_conversation(conn, conversation_id, reason, now)


async def set_variables(
    conn: Connection, conversation_id: str, values: dict[str, Any], removed: list[str]
) -> dict[str, Any] | None:
    """Merge context variables into the conversation (None values remove); the result, or
    None when there is no such conversation."""
    variables: dict[str, Any] | None = await conn.fetchval(
        "UPDATE conversations SET variables = (variables || $2::jsonb) - $3::text[],"
        " updated_at = now() WHERE id = $1 RETURNING variables",
        conversation_id,
        values,
        removed,
    )
    return variables


async def note_window_closed(conn: Connection, conversation_id: str, at: datetime) -> None:
    """Twilio said the 24-hour window is closed (63016): the gate believes it from now on."""
    await conn.execute(
        "UPDATE conversations SET window_closed_at = GREATEST(window_closed_at, $2) WHERE id = $1",
        conversation_id,
        at,
    )


async def _cancel_offers(conn: Connection, conversation_id: str, now: datetime) -> None:
    """End the conversation's pending offer, if any, giving the capacity back."""
    offers = await conn.fetch(
        "UPDATE offers SET state = 'cancelled', decided_at = $2 WHERE conversation_id = $1"
        " AND state = 'pending' RETURNING agent_id, units",
        conversation_id,
        now,
    )
    for offer in offers:
        await release_capacity(conn, str(offer["agent_id"]), offer["units"], now)


async def _lock_offer(conn: Connection, offer_id: str, agent_id: str | None) -> Any:
    row = await conn.fetchrow(
        "SELECT * FROM offers WHERE id = $1 AND ($2::uuid IS NULL OR agent_id = $2) FOR UPDATE",
        offer_id,
        agent_id,
    )
    if row is None:
        raise WorkConflict("not_found", "no such offer")
    await conn.execute(
        "SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", row["conversation_id"]
    )
    return row


@dataclass(frozen=True)
class _Locked(ConversationRef):
    state: str = ""
    units: int = 1
    agent_id: str | None = None


LOCK_PENDING_OFFER = (
    "SELECT 1 FROM offers WHERE conversation_id = $1 AND state = 'pending' FOR UPDATE"
)


async def _conversation(conn: Connection, conversation_id: str, *, lock: bool = False) -> _Locked:
    """The conversation; with ``lock``, its row locked, after its pending offer (the lock
    order: a transition that ends the offer must not take it after the conversation, where
    an expiring or declined offer, locked first, would wait on it the other way round)."""
    if lock:
        await conn.execute(LOCK_PENDING_OFFER, conversation_id)
    row = await conn.fetchrow(
        "SELECT id, account, queue, correlation_id, last_event_id, state, units, agent_id"
        " FROM conversations WHERE id = $1" + (" FOR UPDATE" if lock else ""),
        conversation_id,
    )
    if row is None:
        raise WorkConflict("not_found", "no such conversation")
    return _Locked(
        str(row["id"]),
        row["account"],
        row["queue"],
        row["correlation_id"],
        row["last_event_id"],
        state=row["state"],
        units=row["units"] or 1,
        agent_id=str(row["agent_id"]) if row["agent_id"] else None,
    )
