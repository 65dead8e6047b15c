"""The ``distribute`` stage: queued conversations reach the best available agent.

Triggers (work queued or transferred, an offer declined or expired, capacity freed by a
close, an agent's presence change) run an assignment cycle for the queues concerned; the
stage's tick, in every replica, expires due offers (the durable offer timer: rows with
``expires_at``) and runs a cycle over every queue, so nothing waits on a lost trigger.

A cycle locks a block of queued conversations with ``FOR UPDATE SKIP LOCKED`` (replicas
never hold the same conversations), reads the available agents of their queues, lets
``consumers.assignment.plan`` match them, and claims each agent's capacity with a guarded
UPDATE (``used_units + units <= capacity_units``) before writing the offer (push) or the
assignment (auto-accept). A claim that loses to another replica leaves the conversation
queued for the next cycle; unique indexes make a double assignment impossible regardless.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from consumers import overflow
from consumers.assignment import AgentView, QueuePolicy, WorkItem, eligible, plan
from consumers.runtime import Stage, StageTx
from omniroute.domain.conversation import (
    ConversationRef,
    assign,
    claim_capacity,
    end_offer,
    make_offer,
    rescue_orphans,
    restart_offer_round,
)
from omniroute.infra.metrics import ASSIGNMENTS
from omniroute.infra.store import Connection
from schemas.config import Config
from schemas.events import (
    Envelope,
    EventType,
)

# The agents who could take work now (a small table: every available agent with room).
AGENTS = """
SELECT id, queues, skills, capacity_units, used_units, last_assigned_at,
       capacity_released_at, created_at
FROM agents
WHERE presence = 'available' AND deleted_at IS NULL AND used_units < capacity_units
  AND ($1::text[] IS NULL OR queues && $1::text[])
"""

# The head of each queue that has an agent with room, walked on ``conversations_queue``
# (queue, priority DESC, queued_at WHERE state = 'queued'): a cycle's cost follows the
# agents' free room, never the backlog or the stored history. Affinity is the contact's
# row in ``contact_agents``, read by primary key, unless that agent declined, let expire or
# transferred away this conversation (``not_preferred``).
ITEMS = """
SELECT c.id, c.account, c.queue, c.priority, c.queued_at, c.skills, c.declined_by,
       c.workstream, c.correlation_id, c.last_event_id,
       CASE WHEN ca.agent_id = ANY(c.not_preferred) THEN NULL ELSE ca.agent_id END
           AS previous_agent
FROM unnest($1::text[], $2::int[]) AS q(name, take)
CROSS JOIN LATERAL (
    SELECT * FROM conversations c
    WHERE c.state = 'queued' AND c.queue = q.name AND NOT (c.workstream = ANY($3::text[]))
    ORDER BY c.priority DESC, c.queued_at
    LIMIT q.take
    FOR UPDATE SKIP LOCKED
) c
LEFT JOIN contact_agents ca ON ca.contact_id = c.contact_id
"""


# The durable offer timer: due offers through ``offers_due``.
DUE_OFFERS = """
SELECT id FROM offers WHERE state = 'pending' AND expires_at <= $1
ORDER BY expires_at LIMIT 100 FOR UPDATE SKIP LOCKED
"""


def _takes(agents: list[AgentView], queues: list[str] | None, block: int) -> dict[str, int]:
    """How many queued conversations to read per queue: enough to fill the free room of
    its agents with some to spare (skills or declines may pass over the first ones), never
    more than ``block``."""
    free: dict[str, int] = {}
    for agent in agents:
        for queue in agent.queues:
            if queues is None or queue in queues:
                free[queue] = free.get(queue, 0) + agent.capacity - agent.used
    return {queue: min(block, 2 * room + 10) for queue, room in sorted(free.items())}


def _policies(config: Config) -> dict[str, QueuePolicy]:
    return {
        q.name: QueuePolicy(q.assignment, q.skill_matching, q.relax_skills_after)
        for q in config.queues
    }


def _queue_priorities(config: Config) -> dict[str, int]:
    return {q.name: q.priority for q in config.queues}


async def cycle(tx: StageTx, queues: list[str] | None) -> list[Envelope]:
    """One assignment cycle over ``queues`` (None: all); the events it causes."""
    config = tx.config.current
    pick_mode = [w.name for w in config.workstreams if w.distribution.mode == "pick"]
    agent_rows = await tx.conn.fetch(AGENTS, queues)
    if not agent_rows:
        return []  # nobody has room: the queues are not even read
    agents = [_agent(row) for row in agent_rows]
    takes = _takes(agents, queues, tx.settings.distribution_block)
    rows = await tx.conn.fetch(ITEMS, list(takes), list(takes.values()), pick_mode)
    if not rows:
        return []
    queue_priority = _queue_priorities(config)
    items = [_item(row, config, queue_priority) for row in rows]
    result = plan(items, agents, _policies(config), tx.now)
    by_id = {str(r["id"]): r for r in rows}
    events = []
    # Agents are read without locks (replicas plan side by side); the guarded capacity
    # UPDATE decides. Claims go in agent-id order so two replicas never deadlock.
    for decision in sorted(result.decisions, key=lambda d: d.agent_id):
        row = by_id[decision.conversation_id]
        conv = ConversationRef(
            decision.conversation_id,
            row["account"],
            row["queue"],
            row["correlation_id"],
            row["last_event_id"],
        )
        if not await claim_capacity(tx.conn, decision.agent_id, decision.units, tx.now):
            continue  # another replica took that capacity first: next cycle
        distribution = _distribution(config, row["workstream"])
        ASSIGNMENTS.labels(
            "auto-accept" if distribution and distribution.auto_accept else "offer"
        ).inc()
        if distribution is not None and distribution.auto_accept:
            events.append(
                await assign(
                    tx.conn, conv, decision.agent_id, decision.units, "auto-accept", tx.now
                )
            )
        else:
            timeout = distribution.offer_timeout if distribution else 60.0
            events.append(
                await make_offer(
                    tx.conn,
                    conv,
                    decision.agent_id,
                    decision.units,
                    timeout,
                    tx.now,
                    affinity=decision.affinity,
                )
            )
    await _restart_exhausted_rounds(tx.conn, items, agents, config, result.unmatched, by_id, tx.now)
    return events


async def _restart_exhausted_rounds(
    conn: Connection,
    items: list[WorkItem],
    agents: list[AgentView],
    config: Config,
    unmatched: list[str],
    rows: dict[str, Any],
    now: datetime,
) -> None:
    """When every eligible agent has declined an item, start a new round of offers once
    the workstream's ``reoffer_after`` has passed (until then it waits in its queue)."""
    policies = _policies(config)
    for item in items:
        if item.conversation_id not in unmatched or not item.declined_by:
            continue
        fresh = WorkItem(**{**item.__dict__, "declined_by": frozenset()})
        candidates = eligible(fresh, agents, policies.get(item.queue, QueuePolicy()), now)
        if candidates and all(a.id in item.declined_by for a in candidates):
            distribution = _distribution(config, rows[item.conversation_id]["workstream"])
            wait = distribution.reoffer_after if distribution else 30.0
            await restart_offer_round(conn, item.conversation_id, wait, now)


def _distribution(config: Config, workstream: str) -> Any:
    found = config.workstream(workstream)
    return found.distribution if found else None


def _item(row: Any, config: Config, queue_priority: dict[str, int]) -> WorkItem:
    distribution = _distribution(config, row["workstream"])
    keep_same = distribution.keep_same_agent if distribution else True
    return WorkItem(
        conversation_id=str(row["id"]),
        queue=row["queue"],
        queue_priority=queue_priority.get(row["queue"], 0),
        priority=row["priority"],
        queued_at=row["queued_at"],
        skills=row["skills"] or {},
        units=distribution.units if distribution else 1,
        declined_by=frozenset(str(a) for a in row["declined_by"]),
        preferred_agent=str(row["previous_agent"]) if keep_same and row["previous_agent"] else None,
    )


def _agent(row: Any) -> AgentView:
    return AgentView(
        id=str(row["id"]),
        queues=frozenset(row["queues"]),
        skills=row["skills"] or {},
        capacity=row["capacity_units"],
        used=row["used_units"],
        last_assigned_at=row["last_assigned_at"],
        capacity_released_at=row["capacity_released_at"],
        created_at=row["created_at"],
    )


async def tick(tx: StageTx) -> list[Envelope]:
    """Expire due offers (durable timers), apply the queues' overflow to conversations that
    waited too long, hand back what a removed agent still holds, then a cycle over every
    queue."""
    due = await tx.conn.fetch(DUE_OFFERS, tx.now)
    events = [await end_offer(tx.conn, str(r["id"]), None, "expired", tx.now) for r in due]
    events += await overflow.sweep(tx.conn, tx.config.current, tx.now)
    events += await rescue_orphans(tx.conn, tx.now)
    return events + await cycle(tx, None)


STAGE = Stage(
    name="distribute",
    tick=tick,
    # Work queued or transferred, an offer declined or expired, capacity freed by a close,
    # an agent available: each only wakes the tick's cycle (the work is in the database).
    wakes=frozenset(
        {
            EventType.CONVERSATION_QUEUED,
            EventType.CONVERSATION_TRANSFERRED,
            EventType.CONVERSATION_CLOSED,
            EventType.OFFER_DECLINED,
            EventType.OFFER_EXPIRED,
            EventType.AGENT_PRESENCE_CHANGED,
        }
    ),
)
