"""Supervisor actions, each audited: move any conversation to a queue or an agent, close
it, end an offer, set an agent's presence, remove an agent. Each runs the conversation
state machine's own transition (``omniroute.domain.conversation``) and adds a
``supervisor.acted`` event naming who did it to the outbox, in the caller's transaction,
and returns the events; the admin API and the ``omniroute supervise`` command both call
these.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from omniroute.domain import agents, conversation
from omniroute.errors import WorkConflict
from omniroute.infra.ids import new_id
from omniroute.infra.outbox import add_to_outbox
from omniroute.infra.store import Connection
from schemas.api import AgentUpdate
from schemas.events import Envelope, EventType, SupervisorActed, new_event


def audit(actor: str, now: datetime, **fields: str | None) -> Envelope:
    """``supervisor.acted``: the record of one action (a fresh id: every action counts)."""
    data = SupervisorActed.model_validate({"actor": actor, "acted_at": now, **fields})
    return new_event(
        EventType.SUPERVISOR_ACTED,
        account="*",
        key=(str(new_id()),),
        data=data.model_dump(mode="json"),
        occurred_at=now,
        conversation_id=data.conversation_id,
    )


async def transfer(
    conn: Connection,
    conversation_id: str,
    actor: str,
    now: datetime,
    *,
    to_queue: str | None = None,
    to_agent: str | None = None,
    known_queues: Collection[str],
    offer_seconds: float = 60.0,
    reason: str | None = None,
) -> list[Envelope]:
    """Move any open conversation to a queue (its agent, if any, is not offered it again
    this round) or offer it to one agent (who must be available, in its queue, with room).
    Raises WorkConflict with the reason when it cannot, changing nothing."""
    if (to_queue is None) == (to_agent is None):
        raise WorkConflict("invalid_target", "name a queue or an agent to transfer to")
    if to_queue is not None:
        if to_queue not in known_queues:
            raise WorkConflict(
                "unknown_queue", f"no queue {to_queue} (configured: {', '.join(known_queues)})"
            )
        moved = [
            await conversation.transfer_to_queue(
                conn, conversation_id, to_queue, None, now, reason="supervisor", by=actor
            )
        ]
    else:
        assert to_agent is not None
        moved = await conversation.transfer_to_agent(
            conn, conversation_id, to_agent, None, offer_seconds, now, by=actor
        )
    record = audit(
        actor,
        now,
        action="transfer",
        conversation_id=conversation_id,
        to_queue=to_queue,
        to_agent=to_agent,
        reason=reason,
    )
    return await add_to_outbox(conn, [*moved, record])


async def close(
    conn: Connection, conversation_id: str, actor: str, now: datetime, reason: str | None = None
) -> list[Envelope]:
    """Close any conversation not closed yet; the closing message rules apply as for any
    close (a conversation that never reached an agent gets no survey)."""
    state = await conn.fetchval("SELECT state FROM conversations WHERE id = $1", conversation_id)
    if state is None:
        raise WorkConflict("not_found", "no such conversation")
    if state == "closed":
        raise WorkConflict("already_closed", "the conversation is closed")
    closed = await conversation.close_conversation(conn, conversation_id, "supervisor", now)
    record = audit(actor, now, action="close", conversation_id=conversation_id, reason=reason)
    return await add_to_outbox(conn, [closed, record])


async def end_offer(conn: Connection, offer_id: str, actor: str, now: datetime) -> list[Envelope]:
    """End a pending offer: the conversation goes back to its queue; that agent is not
    offered it again this round."""
    ended = await conversation.end_offer(conn, offer_id, None, "cancelled", now, ended_by=actor)
    record = audit(
        actor,
        now,
        action="end_offer",
        offer_id=offer_id,
        conversation_id=ended.conversation_id,
        agent_id=ended.data.get("agent_id"),
    )
    return await add_to_outbox(conn, [ended, record])


async def set_presence(
    conn: Connection,
    agent_id: str,
    presence: str,
    actor: str,
    now: datetime,
    *,
    requeue_workstreams: Collection[str] = (),
) -> agents.AgentChange | None:
    """Set an agent's presence as a supervisor (offline ends its offers, and requeues its
    conversations where the workstream's policy says so); None when there is no agent."""
    body = AgentUpdate.model_validate({"presence": presence})
    changed = await agents.update_agent(
        conn, agent_id, body, now=now, requeue_workstreams=requeue_workstreams
    )
    if changed is None:
        return None
    record = audit(
        actor, now, action="set_presence", agent_id=str(changed.after["id"]), presence=presence
    )
    changed.events.extend(await add_to_outbox(conn, [record]))
    return changed
