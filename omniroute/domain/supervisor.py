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
from typing import Any

import asyncpg

from omniroute.domain import agents, conversation
from omniroute.errors import WorkConflict
from omniroute.infra.ids import new_id
from omniroute.infra.outbox import add_to_outbox
from omniroute.infra.store import Connection
from schemas.api import CONVERSATION_STATES, AgentUpdate, ConversationOut, ConversationState
from schemas.config import Config
from schemas.events import Envelope, EventType, SupervisorActed, new_event, utcnow


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


async def remove_agent(
    conn: Connection, agent_id: str, actor: str, now: datetime
) -> agents.AgentChange | None:
    """Remove an agent: nothing stays with it (its offers end, its conversations go back to
    their queues ahead of others, each transfer naming the actor), audited. None when there
    is no such agent (nothing written)."""
    removed = await agents.delete_agent(conn, agent_id, now=now, by=actor)
    if removed is None:
        return None
    record = audit(actor, now, action="remove_agent", agent_id=str(removed.after["id"]))
    removed.events.extend(await add_to_outbox(conn, [record]))
    return removed


DEFAULT_ACTOR = "admin"
MAX_ACTOR_LENGTH = 100
# How long an offer made by a transfer to an agent stands when the workstream is unknown.
DEFAULT_OFFER_SECONDS = 60.0


def checked_actor(raw: str | None) -> str:
    """Who acts: ``raw`` when it is 1 to ``MAX_ACTOR_LENGTH`` printable characters,
    ``DEFAULT_ACTOR`` when None. Raises ValueError saying what an actor must be."""
    if raw is None:
        return DEFAULT_ACTOR
    if not 0 < len(raw) <= MAX_ACTOR_LENGTH or not raw.isprintable():
        raise ValueError(f"an actor is 1 to {MAX_ACTOR_LENGTH} printable characters")
    return raw


async def offer_seconds(conn: Connection, config: Config, conversation_id: str) -> float:
    """How long an offer of the conversation stands: its workstream's ``offer_timeout``."""
    name = await conn.fetchval(
        "SELECT workstream FROM conversations WHERE id = $1", conversation_id
    )
    workstream = config.workstream(name) if name is not None else None
    return workstream.distribution.offer_timeout if workstream else DEFAULT_OFFER_SECONDS


CONVERSATION_COLUMNS = """
id, account, business_number, customer, workstream, state, queue, skills, priority, severity,
language, variables, classification, agent_id, opened_at, queued_at, assigned_at, closed_at,
close_reason, last_customer_message_at, declined_by
"""
# The states in which a conversation is someone's: the partial index conversations_agent.
HELD = ("offered", "active", "waiting", "wrap-up")


def conversation_out(row: asyncpg.Record, now: datetime) -> ConversationOut:
    """A conversation row as admins see it, with how long it has waited (queued or
    offered) at ``now``."""
    waited = row["queued_at"] if row["state"] in ("queued", "offered") else None
    wait = None if waited is None else round(max((now - waited).total_seconds(), 0.0), 3)
    return ConversationOut.model_validate({**dict(row), "wait_seconds": wait})


async def list_conversations(
    conn: Connection,
    *,
    state: ConversationState | None = None,
    queue: str | None = None,
    agent: str | None = None,
    limit: int = 100,
    now: datetime | None = None,
) -> list[ConversationOut]:
    """Conversations newest first: in ``state``, of ``queue``, held by ``agent`` (without a
    ``state``, those it holds now: offered, active, waiting, wrap-up).

    Only the filters given are in the statement, and the state as a literal (one of
    CONVERSATION_STATES, checked), so the planner can use the partial indexes
    (``conversations_queue``: queued by queue; ``conversations_agent``: held by agent)
    in a generic plan as in a custom one."""
    conditions: list[str] = []
    values: list[Any] = []
    if state is not None:
        if state not in CONVERSATION_STATES:
            raise ValueError(f"no conversation state {state!r}")
        conditions.append(f"state = '{state}'")
    elif agent is not None:
        conditions.append("state IN (" + ", ".join(f"'{s}'" for s in HELD) + ")")
    if queue is not None:
        values.append(queue)
        conditions.append(f"queue = ${len(values)}")
    if agent is not None:
        values.append(agent)
        conditions.append(f"agent_id = ${len(values)}::uuid")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    values.append(limit)
    rows = await conn.fetch(
        f"SELECT {CONVERSATION_COLUMNS} FROM conversations{where}"
        f" ORDER BY opened_at DESC, id LIMIT ${len(values)}",
        *values,
    )
    now = now or utcnow()
    return [conversation_out(row, now) for row in rows]
