"""Who gets which conversation: eligibility, skill matching and the assignment methods.

Pure functions over plain data (no database): the ``distribute`` stage locks the rows,
hands them here, and writes back what this module decides.

- Work goes in order: queue priority, then conversation priority (higher first), then the
  oldest wait first.
- Eligible agents: in the queue, with enough free units, not having declined this
  conversation, and (exact matching) every required skill at or above its proficiency, or
  (closest matching) ranked by how well their skills cover the requirement. After the
  queue's ``relax_skills_after`` the skill requirement is dropped.
- Methods: highest free capacity (ties: the least recently assigned), round robin (least
  recently assigned first), least active (capacity released longest ago first).
- Within one cycle an agent's free units and last assignment move as work is handed out,
  so a burst is spread instead of flooding the first agent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

EPOCH = datetime.min


@dataclass
class AgentView:
    id: str
    queues: frozenset[str]
    skills: Mapping[str, int]
    capacity: int
    used: int
    last_assigned_at: datetime | None = None
    capacity_released_at: datetime | None = None
    created_at: datetime | None = None
    assigned_this_cycle: int = 0

    @property
    def free(self) -> int:
        return self.capacity - self.used


@dataclass(frozen=True)
class WorkItem:
    conversation_id: str
    queue: str
    queue_priority: int
    priority: int
    queued_at: datetime
    skills: Mapping[str, int]
    units: int
    declined_by: frozenset[str] = frozenset()
    preferred_agent: str | None = None  # affinity: the agent who had this customer


@dataclass(frozen=True)
class QueuePolicy:
    assignment: str = "highest_capacity"
    skill_matching: str = "exact"
    relax_skills_after: float | None = None


@dataclass(frozen=True)
class Decision:
    conversation_id: str
    agent_id: str
    units: int
    affinity: bool = False


def order_work(items: Sequence[WorkItem]) -> list[WorkItem]:
    """Queue priority, then priority (higher first), then oldest first."""
    return sorted(items, key=lambda w: (-w.queue_priority, -w.priority, w.queued_at))


def coverage(agent: Mapping[str, int], required: Mapping[str, int]) -> float:
    """How well an agent's skills cover a requirement, 0 … 1 (1: every skill at level)."""
    if not required:
        return 1.0
    total = 0.0
    for skill, level in required.items():
        total += min(agent.get(skill, 0), level) / level
    return total / len(required)


def exact_match(agent: Mapping[str, int], required: Mapping[str, int]) -> bool:
    return all(agent.get(skill, 0) >= level for skill, level in required.items())


def eligible(
    item: WorkItem, agents: Sequence[AgentView], policy: QueuePolicy, now: datetime
) -> list[AgentView]:
    """Agents who may take the item, best skill coverage first for closest matching."""
    relaxed = (
        policy.relax_skills_after is not None
        and (now - item.queued_at).total_seconds() >= policy.relax_skills_after
    )
    candidates = [
        a
        for a in agents
        if item.queue in a.queues and a.free >= item.units and a.id not in item.declined_by
    ]
    if relaxed or not item.skills:
        return candidates
    if policy.skill_matching == "closest":
        scored = [(coverage(a.skills, item.skills), a) for a in candidates]
        best = max((score for score, _ in scored), default=0.0)
        return [a for score, a in scored if score > 0 and score == best]
    return [a for a in candidates if exact_match(a.skills, item.skills)]


def _when(moment: datetime | None) -> datetime:
    """Comparable instants: aware times by their UTC instant, None as 'never'."""
    if moment is None:
        return EPOCH
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.replace(tzinfo=None)


def rank(candidates: Sequence[AgentView], method: str) -> list[AgentView]:
    """Candidates best first by the queue's assignment method (ties broken by id)."""
    # Work handed out earlier in the same cycle counts first, so a burst keeps rotating.
    key: Callable[[AgentView], tuple[Any, ...]]
    if method == "round_robin":
        key = lambda a: (
            a.assigned_this_cycle,
            _when(a.last_assigned_at),
            _when(a.created_at),
            a.id,
        )
    elif method == "least_active":
        key = lambda a: (
            a.assigned_this_cycle,
            _when(a.capacity_released_at),
            _when(a.last_assigned_at),
            a.id,
        )
    else:
        key = lambda a: (-a.free, _when(a.last_assigned_at), a.id)
    return sorted(candidates, key=key)


@dataclass
class Plan:
    decisions: list[Decision] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)


def plan(
    items: Sequence[WorkItem],
    agents: Sequence[AgentView],
    policies: Mapping[str, QueuePolicy],
    now: datetime,
) -> Plan:
    """Match the items (in order) to agents; never exceeds an agent's free units."""
    result = Plan()
    for item in order_work(items):
        policy = policies.get(item.queue, QueuePolicy())
        candidates = eligible(item, agents, policy, now)
        if not candidates:
            result.unmatched.append(item.conversation_id)
            continue
        preferred = next((a for a in candidates if a.id == item.preferred_agent), None)
        agent = preferred or rank(candidates, policy.assignment)[0]
        agent.used += item.units
        agent.last_assigned_at = now
        agent.assigned_this_cycle += 1
        result.decisions.append(
            Decision(item.conversation_id, agent.id, item.units, affinity=preferred is not None)
        )
    return result
