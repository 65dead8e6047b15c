"""Work-distribution state changes shared by the agent API and the ``distribute`` stage:
offers, assignments and agent capacity, each a few statements inside the caller's
transaction, each returning the event it causes (to be written to the outbox).

Lock order, everywhere: offer → conversation → agent. Capacity is claimed with a guarded
UPDATE (``used_units + units <= capacity_units``), so no interleaving can push an agent
over capacity; one pending offer and one active assignment per conversation are unique
indexes, so none can assign a conversation twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from omniroute.infra.ids import new_id
from omniroute.infra.store import Connection
from schemas.events import (
    ConversationAssigned,
    ConversationClosed,
    ConversationOffered,
    ConversationTransferred,
    Envelope,
    EventType,
    OfferEnded,
    new_event,
)


class WorkConflict(Exception):
    """The state changed under the caller (offer gone, no capacity, not yours)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ConversationRef:
    id: str
    account: str
    queue: str | None


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
        " updated_at = now() WHERE id = $1",
        conv.id,
        agent_id,
        units,
    )
    data = ConversationOffered(
        offer_id=offer_id,
        agent_id=agent_id,
        queue=conv.queue or "",
        units=units,
        affinity=affinity,
        expires_at=expires,
    )
    return new_event(
        EventType.CONVERSATION_OFFERED,
        account=conv.account,
        key=(offer_id,),
        data=data.model_dump(mode="json"),
        occurred_at=now,
        conversation_id=conv.id,
    )


async def assign(
    conn: Connection, conv: ConversationRef, agent_id: str, units: int, via: str, now: datetime
) -> Envelope:
    """Record the assignment (capacity already claimed) and make the conversation active."""
    assignment_id = str(new_id())
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
        " assigned_at = $4, updated_at = now() WHERE id = $1 RETURNING contact_id)"
        " INSERT INTO contact_agents (contact_id, agent_id, assigned_at)"
        " SELECT contact_id, $2, $4 FROM c ON CONFLICT (contact_id) DO UPDATE"
        " SET agent_id = EXCLUDED.agent_id, assigned_at = EXCLUDED.assigned_at"
        " WHERE contact_agents.assigned_at <= EXCLUDED.assigned_at",
        conv.id,
        agent_id,
        units,
        now,
    )
    data = ConversationAssigned(
        agent_id=agent_id, assignment_id=assignment_id, queue=conv.queue, via=via, assigned_at=now
    )
    return new_event(
        EventType.CONVERSATION_ASSIGNED,
        account=conv.account,
        key=(assignment_id,),
        data=data.model_dump(mode="json"),
        occurred_at=now,
        conversation_id=conv.id,
    )


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
    conn: Connection, offer_id: str, agent_id: str | None, outcome: str, now: datetime
) -> Envelope:
    """Decline (agent) or expire (timer) a pending offer: capacity back, work back to queue,
    and this agent is not offered the same conversation again."""
    offer = await _lock_offer(conn, offer_id, agent_id)
    if offer["state"] != "pending":
        raise WorkConflict("offer_closed", f"the offer is {offer['state']}, not pending")
    await conn.execute(
        "UPDATE offers SET state = $2, decided_at = $3 WHERE id = $1", offer_id, outcome, now
    )
    conv = await _conversation(conn, str(offer["conversation_id"]))
    await conn.execute(
        "UPDATE conversations SET state = 'queued', agent_id = NULL,"
        " declined_by = array_append(declined_by, $2), updated_at = now() WHERE id = $1",
        conv.id,
        offer["agent_id"],
    )
    await release_capacity(conn, str(offer["agent_id"]), offer["units"], now)
    kind = EventType.OFFER_DECLINED if outcome == "declined" else EventType.OFFER_EXPIRED
    data = OfferEnded(offer_id=offer_id, agent_id=str(offer["agent_id"]), queue=conv.queue)
    return new_event(
        kind,
        account=conv.account,
        key=(offer_id,),
        data=data.model_dump(mode="json"),
        occurred_at=now,
        conversation_id=conv.id,
    )


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
    conn: Connection, conversation_id: str, reason: str, now: datetime
) -> Envelope:
    """Close a conversation: pending offers cancelled and assignment released (capacity
    back), state closed. A reason recorded earlier (the agent's, at the start of wrap-up)
    is kept; the event carries the reason that stands."""
    offers = await conn.fetch(
        "UPDATE offers SET state = 'cancelled', decided_at = $2 WHERE conversation_id = $1"
        " AND state = 'pending' RETURNING agent_id, units",
        conversation_id,
        now,
    )
    for offer in offers:
        await release_capacity(conn, str(offer["agent_id"]), offer["units"], now)
    await release_assignment(conn, conversation_id, now)
    row = await conn.fetchrow(
        "UPDATE conversations SET state = 'closed', closed_at = $2,"
        " close_reason = COALESCE(close_reason, $3), updated_at = now() WHERE id = $1"
        " RETURNING account, workstream, close_reason",
        conversation_id,
        now,
        reason,
    )
    if row is None:
        raise WorkConflict("not_found", "no such conversation")
    data = ConversationClosed(
        reason=row["close_reason"], workstream=row["workstream"], closed_at=now
    )
    return new_event(
        EventType.CONVERSATION_CLOSED,
        account=row["account"],
        key=(conversation_id,),
        data=data.model_dump(mode="json"),
        occurred_at=now,
        conversation_id=conversation_id,
    )


async def transfer_to_queue(
    conn: Connection, conversation_id: str, queue: str, by_agent: str, now: datetime
) -> Envelope:
    """Put an agent's active conversation back into (another) queue."""
    conv = await _conversation(conn, conversation_id, lock=True)
    await release_assignment(conn, conversation_id, now)
    await conn.execute(
        "UPDATE conversations SET state = 'queued', queue = $2, agent_id = NULL,"
        " queued_at = $3, declined_by = '{}', updated_at = now() WHERE id = $1",
        conversation_id,
        queue,
        now,
    )
    data = ConversationTransferred(
        from_queue=conv.queue, to_queue=queue, from_agent=by_agent, transferred_at=now
    )
    return new_event(
        EventType.CONVERSATION_TRANSFERRED,
        account=conv.account,
        key=(conversation_id, now.isoformat()),
        data=data.model_dump(mode="json"),
        occurred_at=now,
        conversation_id=conversation_id,
    )


async def transfer_to_agent(
    conn: Connection,
    conversation_id: str,
    agent_id: str,
    by_agent: str,
    offer_seconds: float,
    now: datetime,
) -> list[Envelope]:
    """Offer an agent's active conversation to another agent, who must have the capacity."""
    conv = await _conversation(conn, conversation_id, lock=True)
    row = await conn.fetchrow("SELECT units FROM conversations WHERE id = $1", conversation_id)
    units = row["units"] if row else 1
    exists = await conn.fetchval(
        "SELECT 1 FROM agents WHERE id = $1 AND deleted_at IS NULL", agent_id
    )
    if not exists or agent_id == by_agent:
        raise WorkConflict("not_found", "no such agent to transfer to")
    await release_assignment(conn, conversation_id, now)
    if not await claim_capacity(conn, agent_id, units, now):
        raise WorkConflict("no_capacity", "that agent has no free capacity")
    data = ConversationTransferred(
        from_queue=conv.queue,
        to_queue=conv.queue,
        from_agent=by_agent,
        to_agent=agent_id,
        transferred_at=now,
    )
    transferred = new_event(
        EventType.CONVERSATION_TRANSFERRED,
        account=conv.account,
        key=(conversation_id, now.isoformat()),
        data=data.model_dump(mode="json"),
        occurred_at=now,
        conversation_id=conversation_id,
    )
    offered = await make_offer(conn, conv, agent_id, units, offer_seconds, now)
    return [transferred, offered]


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


async def _conversation(
    conn: Connection, conversation_id: str, *, lock: bool = False
) -> ConversationRef:
    row = await conn.fetchrow(
        "SELECT id, account, queue FROM conversations WHERE id = $1"
        + (" FOR UPDATE" if lock else ""),
        conversation_id,
    )
    if row is None:
        raise WorkConflict("not_found", "no such conversation")
    return ConversationRef(str(row["id"]), row["account"], row["queue"])
