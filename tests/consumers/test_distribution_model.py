"""A model of the distribution loop driven only by ``consumers.assignment.plan``.

Agents come and go (presence), conversations arrive, assignment cycles turn waiting work into
offers that reserve capacity, offers are accepted, declined or time out, assignments close.
After every step the bookkeeping must be consistent, and right after a cycle no waiting
conversation may be left that some available agent could have taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from consumers.assignment import (
    AgentView,
    QueuePolicy,
    WorkItem,
    coverage,
    exact_match,
    plan,
)

QUEUES = ("q1", "q2")
SKILLS = ("es", "en", "billing")
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

levels = st.integers(min_value=1, max_value=5)
skill_maps = st.dictionaries(st.sampled_from(SKILLS), levels, max_size=3)
queue_sets = st.frozensets(st.sampled_from(QUEUES), max_size=2)


@dataclass
class AgentSpec:
    capacity: int
    queues: frozenset[str]
    skills: dict[str, int]
    available: bool


agent_specs = st.builds(
    AgentSpec,
    capacity=st.integers(min_value=0, max_value=5),
    queues=queue_sets,
    skills=skill_maps,
    available=st.booleans(),
)

policies = st.builds(
    QueuePolicy,
    assignment=st.sampled_from(["highest_capacity", "round_robin", "least_active"]),
    skill_matching=st.sampled_from(["exact", "closest"]),
    relax_skills_after=st.sampled_from([None, None, 60.0]),
)


@dataclass
class AgentModel:
    id: str
    capacity: int
    queues: frozenset[str]
    skills: dict[str, int]
    available: bool
    created_at: datetime
    used: int = 0
    last_assigned_at: datetime | None = None
    capacity_released_at: datetime | None = None

    def view(self) -> AgentView:
        return AgentView(
            id=self.id,
            queues=self.queues,
            skills=dict(self.skills),
            capacity=self.capacity,
            used=self.used,
            last_assigned_at=self.last_assigned_at,
            capacity_released_at=self.capacity_released_at,
            created_at=self.created_at,
        )


@dataclass
class ItemModel:
    id: str
    queue: str
    priority: int
    skills: dict[str, int]
    units: int
    queued_at: datetime
    preferred_agent: str | None
    declined_by: set[str] = field(default_factory=set)

    def work(self, queue_priority: int) -> WorkItem:
        return WorkItem(
            conversation_id=self.id,
            queue=self.queue,
            queue_priority=queue_priority,
            priority=self.priority,
            queued_at=self.queued_at,
            skills=dict(self.skills),
            units=self.units,
            declined_by=frozenset(self.declined_by),
            preferred_agent=self.preferred_agent,
        )


class DistributionMachine(RuleBasedStateMachine):
    agents = Bundle("agents")

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.agent_models: dict[str, AgentModel] = {}
        self.items: dict[str, ItemModel] = {}
        self.waiting: list[str] = []
        self.offers: dict[str, str] = {}  # item → agent
        self.assignments: dict[str, str] = {}  # item → agent
        self.closed: set[str] = set()
        self.policies: dict[str, QueuePolicy] = {}
        self.queue_priority: dict[str, int] = {}
        self.just_cycled = False
        self.counter = 0

    # ------------------------------------------------------------------ set-up

    @initialize(
        target=agents,
        specs=st.lists(agent_specs, min_size=1, max_size=4),
        queue_policies=st.tuples(policies, policies),
        queue_priorities=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    )
    def create_agents(
        self,
        specs: list[AgentSpec],
        queue_policies: tuple[QueuePolicy, QueuePolicy],
        queue_priorities: tuple[int, int],
    ) -> object:
        self.policies = dict(zip(QUEUES, queue_policies, strict=True))
        self.queue_priority = dict(zip(QUEUES, queue_priorities, strict=True))
        for n, spec in enumerate(specs):
            agent_id = f"agent-{n}"
            self.agent_models[agent_id] = AgentModel(
                id=agent_id,
                capacity=spec.capacity,
                queues=spec.queues,
                skills=spec.skills,
                available=spec.available,
                created_at=T0 - timedelta(days=1, minutes=n),
            )
        return multiple(*self.agent_models)

    # ------------------------------------------------------------------ helpers

    def _step(self, seconds: int = 1) -> None:
        self.now += timedelta(seconds=seconds)
        self.just_cycled = False

    def _release(self, item_id: str, agent_id: str) -> None:
        agent = self.agent_models[agent_id]
        agent.used -= self.items[item_id].units
        agent.capacity_released_at = self.now

    def _end_offer(self, item_id: str) -> None:
        """Decline or timeout: capacity back, the agent is not asked again, item waits."""
        agent_id = self.offers.pop(item_id)
        self._release(item_id, agent_id)
        self.items[item_id].declined_by.add(agent_id)
        self.waiting.append(item_id)

    # ------------------------------------------------------------------ rules

    @rule(
        queue=st.sampled_from(QUEUES),
        priority=st.integers(min_value=0, max_value=3),
        skills=st.dictionaries(st.sampled_from(SKILLS), st.integers(1, 3), max_size=2),
        units=st.integers(min_value=1, max_value=3),
        preferred=st.none() | st.integers(min_value=0, max_value=4),
    )
    def arrive(
        self,
        queue: str,
        priority: int,
        skills: dict[str, int],
        units: int,
        preferred: int | None,
    ) -> None:
        self._step()
        item_id = f"conv-{self.counter}"
        self.counter += 1
        self.items[item_id] = ItemModel(
            id=item_id,
            queue=queue,
            priority=priority,
            skills=skills,
            units=units,
            queued_at=self.now,
            preferred_agent=None if preferred is None else f"agent-{preferred}",
        )
        self.waiting.append(item_id)

    @rule(agent_id=agents)
    def flip_presence(self, agent_id: str) -> None:
        self._step()
        agent = self.agent_models[agent_id]
        agent.available = not agent.available

    @rule(seconds=st.integers(min_value=1, max_value=200))
    def time_passes(self, seconds: int) -> None:
        self._step(seconds)

    @rule()
    def cycle(self) -> None:
        self._step()
        available = [a for a in self.agent_models.values() if a.available]
        views = [a.view() for a in available]
        free_before = {a.id: a.capacity - a.used for a in available}
        waiting = [self.items[i] for i in self.waiting]
        result = plan(
            [w.work(self.queue_priority[w.queue]) for w in waiting],
            views,
            self.policies,
            self.now,
        )

        decided = [d.conversation_id for d in result.decisions]
        assert len(set(decided)) == len(decided), "an item decided twice in one cycle"
        assert set(decided).isdisjoint(result.unmatched)
        assert sorted([*decided, *result.unmatched]) == sorted(self.waiting)

        given: dict[str, int] = {}
        for d in result.decisions:
            work_item = self.items[d.conversation_id]
            agent = self.agent_models[d.agent_id]
            assert agent.available, "offered to an agent who is not available"
            assert work_item.queue in agent.queues
            assert d.agent_id not in work_item.declined_by
            assert d.units == work_item.units
            assert d.affinity == (d.agent_id == work_item.preferred_agent)
            policy = self.policies[work_item.queue]
            relaxed = (
                policy.relax_skills_after is not None
                and (self.now - work_item.queued_at).total_seconds() >= policy.relax_skills_after
            )
            if policy.skill_matching == "exact" and not relaxed:
                assert exact_match(agent.skills, work_item.skills)
            elif not relaxed and work_item.skills:
                assert coverage(agent.skills, work_item.skills) > 0
            given[d.agent_id] = given.get(d.agent_id, 0) + d.units
            # The decision becomes an offer reserving the units.
            agent.used += d.units
            agent.last_assigned_at = self.now
            self.offers[d.conversation_id] = d.agent_id
        for agent_id, units in given.items():
            assert units <= free_before[agent_id], f"{agent_id} got more units than free"
        # plan mutates its views the same way the model does.
        for view in views:
            assert view.used == self.agent_models[view.id].used
        self.waiting = list(result.unmatched)
        self.just_cycled = True

    @precondition(lambda self: bool(self.offers))
    @rule(data=st.data())
    def accept(self, data: st.DataObject) -> None:
        self._step()
        item_id = data.draw(st.sampled_from(sorted(self.offers)))
        self.assignments[item_id] = self.offers.pop(item_id)

    @precondition(lambda self: bool(self.offers))
    @rule(data=st.data())
    def decline(self, data: st.DataObject) -> None:
        self._step()
        self._end_offer(data.draw(st.sampled_from(sorted(self.offers))))

    @precondition(lambda self: bool(self.offers))
    @rule(data=st.data())
    def offer_times_out(self, data: st.DataObject) -> None:
        self._step(120)
        self._end_offer(data.draw(st.sampled_from(sorted(self.offers))))

    @precondition(lambda self: bool(self.assignments))
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        self._step()
        item_id = data.draw(st.sampled_from(sorted(self.assignments)))
        self._release(item_id, self.assignments.pop(item_id))
        self.closed.add(item_id)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def each_item_in_exactly_one_place(self) -> None:
        assert len(set(self.waiting)) == len(self.waiting), "an item waits twice"
        waiting = set(self.waiting)
        offered = set(self.offers)
        assigned = set(self.assignments)
        assert waiting.isdisjoint(offered)
        assert waiting.isdisjoint(assigned)
        assert offered.isdisjoint(assigned)
        assert self.closed.isdisjoint(waiting | offered | assigned)
        assert waiting | offered | assigned | self.closed == set(self.items)

    @invariant()
    def used_units_match_offers_and_assignments(self) -> None:
        for agent in self.agent_models.values():
            held = sum(
                self.items[item_id].units
                for book in (self.offers, self.assignments)
                for item_id, agent_id in book.items()
                if agent_id == agent.id
            )
            assert agent.used == held
            assert 0 <= agent.used <= agent.capacity

    @invariant()
    def nothing_matchable_left_after_a_cycle(self) -> None:
        if not self.just_cycled:
            return
        for item_id in self.waiting:
            work_item = self.items[item_id]
            for agent in self.agent_models.values():
                assert not (
                    agent.available
                    and agent.capacity - agent.used >= work_item.units
                    and work_item.queue in agent.queues
                    and exact_match(agent.skills, work_item.skills)
                    and agent.id not in work_item.declined_by
                ), f"{item_id} left waiting although {agent.id} could take it"


DistributionMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None
)
TestDistribution = DistributionMachine.TestCase
