"""Pure unit tests for ``consumers.assignment``: ordering, eligibility, ranking and planning."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone

import pytest

from consumers.assignment import (
    AgentView,
    Decision,
    QueuePolicy,
    WorkItem,
    coverage,
    eligible,
    exact_match,
    order_work,
    plan,
    rank,
)

UTC = UTC
PLUS2 = timezone(timedelta(hours=2))
MINUS5 = timezone(timedelta(hours=-5))
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(minutes=10)


def at(minutes: float, tz: timezone = UTC) -> datetime:
    """T0 + minutes, expressed in ``tz`` (the same instant whatever the zone)."""
    return (T0 + timedelta(minutes=minutes)).astimezone(tz)


def agent(
    agent_id: str,
    *,
    queues: tuple[str, ...] = ("q1",),
    skills: Mapping[str, int] | None = None,
    capacity: int = 3,
    used: int = 0,
    last_assigned_at: datetime | None = None,
    capacity_released_at: datetime | None = None,
    created_at: datetime | None = None,
) -> AgentView:
    return AgentView(
        id=agent_id,
        queues=frozenset(queues),
        skills=dict(skills or {}),
        capacity=capacity,
        used=used,
        last_assigned_at=last_assigned_at,
        capacity_released_at=capacity_released_at,
        created_at=created_at,
    )


def item(
    conversation_id: str,
    *,
    queue: str = "q1",
    queue_priority: int = 0,
    priority: int = 0,
    queued_at: datetime = T0,
    skills: Mapping[str, int] | None = None,
    units: int = 1,
    declined_by: tuple[str, ...] = (),
    preferred_agent: str | None = None,
) -> WorkItem:
    return WorkItem(
        conversation_id=conversation_id,
        queue=queue,
        queue_priority=queue_priority,
        priority=priority,
        queued_at=queued_at,
        skills=dict(skills or {}),
        units=units,
        declined_by=frozenset(declined_by),
        preferred_agent=preferred_agent,
    )


def ids(agents: list[AgentView]) -> list[str]:
    return [a.id for a in agents]


# --------------------------------------------------------------------------- order_work


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        pytest.param(
            [item("old", queued_at=at(0)), item("new", queued_at=at(5))],
            ["old", "new"],
            id="oldest-first",
        ),
        pytest.param(
            [item("low", priority=0, queued_at=at(0)), item("high", priority=2, queued_at=at(9))],
            ["high", "low"],
            id="priority-beats-age",
        ),
        pytest.param(
            [
                item("hi-item", queue_priority=0, priority=9, queued_at=at(0)),
                item("hi-queue", queue_priority=1, priority=0, queued_at=at(9)),
            ],
            ["hi-queue", "hi-item"],
            id="queue-priority-beats-item-priority",
        ),
        pytest.param(
            [
                item("a", queue_priority=0, priority=0, queued_at=at(0)),
                item("b", queue_priority=1, priority=0, queued_at=at(3)),
                item("c", queue_priority=1, priority=1, queued_at=at(4)),
                item("d", queue_priority=1, priority=1, queued_at=at(2)),
                item("e", queue_priority=0, priority=3, queued_at=at(1)),
            ],
            ["d", "c", "b", "e", "a"],
            id="all-three-keys",
        ),
        pytest.param(
            # 12:01 UTC written as 14:01+02:00 is older than 12:02 UTC.
            [item("utc", queued_at=at(2)), item("plus2", queued_at=at(1, PLUS2))],
            ["plus2", "utc"],
            id="mixed-offsets-compare-as-instants",
        ),
    ],
)
def test_order_work(items: list[WorkItem], expected: list[str]) -> None:
    assert [w.conversation_id for w in order_work(items)] == expected


def test_order_work_does_not_mutate_input() -> None:
    items = [item("b", queued_at=at(1)), item("a", queued_at=at(0))]
    order_work(items)
    assert [w.conversation_id for w in items] == ["b", "a"]


# --------------------------------------------------------------------------- skill matching


@pytest.mark.parametrize(
    ("skills", "required", "expected"),
    [
        ({"es": 3}, {"es": 3}, True),
        ({"es": 5}, {"es": 3}, True),
        ({"es": 2}, {"es": 3}, False),
        ({}, {"es": 1}, False),
        ({"en": 5}, {"es": 1}, False),
        ({"es": 3, "billing": 1}, {"es": 3, "billing": 2}, False),
        ({"es": 3, "billing": 2, "en": 1}, {"es": 3, "billing": 2}, True),
        ({}, {}, True),
        ({"es": 1}, {}, True),
    ],
)
def test_exact_match(skills: dict[str, int], required: dict[str, int], expected: bool) -> None:
    assert exact_match(skills, required) is expected


@pytest.mark.parametrize(
    ("skills", "required", "expected"),
    [
        ({}, {}, 1.0),
        ({"es": 5}, {"es": 4}, 1.0),
        ({"es": 2}, {"es": 4}, 0.5),
        ({}, {"es": 4}, 0.0),
        ({"es": 4}, {"es": 4, "billing": 2}, 0.5),
        ({"es": 2, "billing": 1}, {"es": 4, "billing": 2}, 0.5),
        ({"es": 9, "billing": 9}, {"es": 4, "billing": 2}, 1.0),
    ],
)
def test_coverage(skills: dict[str, int], required: dict[str, int], expected: float) -> None:
    assert coverage(skills, required) == pytest.approx(expected)


EXACT = QueuePolicy(skill_matching="exact")
CLOSEST = QueuePolicy(skill_matching="closest")


def test_exact_matching_every_skill_at_or_above_level() -> None:
    agents = [
        agent("above", skills={"es": 5, "billing": 3}),
        agent("at", skills={"es": 3, "billing": 2}),
        agent("below", skills={"es": 2, "billing": 2}),
        agent("missing", skills={"es": 5}),
        agent("none"),
    ]
    work = item("c1", skills={"es": 3, "billing": 2})
    assert ids(eligible(work, agents, EXACT, NOW)) == ["above", "at"]


@pytest.mark.parametrize("policy", [EXACT, CLOSEST], ids=["exact", "closest"])
def test_no_required_skills_everyone_in_queue(policy: QueuePolicy) -> None:
    agents = [agent("a"), agent("b", skills={"es": 1}), agent("other", queues=("q2",))]
    assert ids(eligible(item("c1"), agents, policy, NOW)) == ["a", "b"]


def test_closest_matching_best_coverage_wins() -> None:
    agents = [
        agent("half", skills={"es": 2}),
        agent("most", skills={"es": 4, "billing": 1}),
        agent("none", skills={"en": 5}),
    ]
    work = item("c1", skills={"es": 4, "billing": 2})
    assert ids(eligible(work, agents, CLOSEST, NOW)) == ["most"]


def test_closest_matching_zero_coverage_excluded() -> None:
    agents = [agent("none", skills={"en": 5}), agent("empty")]
    work = item("c1", skills={"es": 1})
    assert eligible(work, agents, CLOSEST, NOW) == []


def test_closest_matching_ties_all_returned() -> None:
    agents = [
        agent("a", skills={"es": 2}),
        agent("b", skills={"billing": 2}),
        agent("c", skills={"es": 1}),
        agent("full-but-busy", skills={"es": 4, "billing": 4}, capacity=1, used=1),
    ]
    work = item("c1", skills={"es": 2, "billing": 2})
    assert ids(eligible(work, agents, CLOSEST, NOW)) == ["a", "b"]


def test_closest_matching_exact_agents_win_over_partial() -> None:
    agents = [agent("partial", skills={"es": 3}), agent("exact", skills={"es": 5, "billing": 2})]
    work = item("c1", skills={"es": 4, "billing": 2})
    assert ids(eligible(work, agents, CLOSEST, NOW)) == ["exact"]


@pytest.mark.parametrize(
    ("waited", "expected"),
    [
        pytest.param(timedelta(seconds=0), ["skilled"], id="just-queued"),
        pytest.param(timedelta(seconds=59), ["skilled"], id="before-relax"),
        pytest.param(timedelta(seconds=60), ["skilled", "unskilled"], id="at-relax"),
        pytest.param(timedelta(hours=1), ["skilled", "unskilled"], id="long-after"),
    ],
)
@pytest.mark.parametrize("matching", ["exact", "closest"])
def test_relax_skills_after(waited: timedelta, expected: list[str], matching: str) -> None:
    policy = QueuePolicy(skill_matching=matching, relax_skills_after=60.0)
    agents = [
        agent("skilled", skills={"es": 3}),
        agent("unskilled"),
        agent("other-queue", queues=("q2",), skills={"es": 3}),
        agent("full", capacity=1, used=1),
        agent("decliner"),
    ]
    work = item("c1", queued_at=NOW - waited, skills={"es": 3}, declined_by=("decliner",))
    assert ids(eligible(work, agents, policy, NOW)) == expected


def test_no_relax_without_setting() -> None:
    agents = [agent("skilled", skills={"es": 3}), agent("unskilled")]
    work = item("c1", queued_at=NOW - timedelta(days=7), skills={"es": 3})
    assert ids(eligible(work, agents, EXACT, NOW)) == ["skilled"]


@pytest.mark.parametrize(
    ("capacity", "used", "units", "expected"),
    [
        (3, 0, 1, True),
        (3, 2, 1, True),
        (3, 3, 1, False),
        (3, 1, 2, True),
        (3, 2, 2, False),
        (0, 0, 1, False),
        (2, 3, 1, False),  # over capacity (capacity lowered at runtime)
        (5, 0, 5, True),
        (5, 0, 6, False),
    ],
)
def test_capacity_free_at_least_units(capacity: int, used: int, units: int, expected: bool) -> None:
    agents = [agent("a", capacity=capacity, used=used)]
    assert bool(eligible(item("c1", units=units), agents, EXACT, NOW)) is expected


def test_queue_membership() -> None:
    agents = [
        agent("q1-only", queues=("q1",)),
        agent("both", queues=("q1", "q2")),
        agent("q2-only", queues=("q2",)),
        agent("nowhere", queues=()),
    ]
    assert ids(eligible(item("c1", queue="q1"), agents, EXACT, NOW)) == ["q1-only", "both"]
    assert ids(eligible(item("c2", queue="q2"), agents, EXACT, NOW)) == ["both", "q2-only"]
    assert eligible(item("c3", queue="q3"), agents, EXACT, NOW) == []


@pytest.mark.parametrize("policy", [EXACT, CLOSEST], ids=["exact", "closest"])
def test_declined_by_excluded(policy: QueuePolicy) -> None:
    agents = [agent("a", skills={"es": 3}), agent("b", skills={"es": 3}), agent("c")]
    work = item("c1", skills={"es": 3}, declined_by=("a", "c"))
    assert ids(eligible(work, agents, policy, NOW)) == ["b"]
    assert eligible(item("c2", declined_by=("a", "b", "c")), agents, policy, NOW) == []


# --------------------------------------------------------------------------- rank


def test_rank_highest_capacity_most_free_first() -> None:
    agents = [
        agent("two", capacity=3, used=1),
        agent("five", capacity=5, used=0),
        agent("one", capacity=4, used=3),
    ]
    assert ids(rank(agents, "highest_capacity")) == ["five", "two", "one"]


def test_rank_highest_capacity_tie_least_recently_assigned() -> None:
    agents = [
        agent("recent", last_assigned_at=at(5)),
        agent("never"),
        agent("older", last_assigned_at=at(1)),
        agent("more-free", capacity=4, last_assigned_at=at(9)),
    ]
    assert ids(rank(agents, "highest_capacity")) == ["more-free", "never", "older", "recent"]


def test_rank_highest_capacity_is_default_method() -> None:
    agents = [agent("a", used=2), agent("b", used=0)]
    assert ids(rank(agents, "highest_capacity")) == ids(rank(agents, "something_else"))


def test_rank_round_robin() -> None:
    agents = [
        agent("recent", last_assigned_at=at(5), created_at=at(-100)),
        agent("never-young", created_at=at(-1)),
        agent("older", last_assigned_at=at(1), capacity=1),
        agent("never-old", created_at=at(-50)),
        agent("older-same-tie", last_assigned_at=at(1), created_at=at(-90), capacity=9),
    ]
    # capacity plays no part; never assigned first; equal last assignment → earlier created_at.
    assert ids(rank(agents, "round_robin")) == [
        "never-old",
        "never-young",
        "older",
        "older-same-tie",
        "recent",
    ]


def test_rank_least_active() -> None:
    agents = [
        agent("released-late", capacity_released_at=at(8), capacity=9),
        agent("released-early", capacity_released_at=at(1)),
        agent("released-mid", capacity_released_at=at(4), last_assigned_at=at(0)),
        agent("released-mid-older", capacity_released_at=at(4), last_assigned_at=at(-5)),
    ]
    assert ids(rank(agents, "least_active")) == [
        "released-early",
        "released-mid-older",
        "released-mid",
        "released-late",
    ]


def test_rank_least_active_never_released_first() -> None:
    agents = [agent("released", capacity_released_at=at(0)), agent("never")]
    assert ids(rank(agents, "least_active")) == ["never", "released"]


@pytest.mark.parametrize("method", ["highest_capacity", "round_robin", "least_active"])
def test_rank_full_tie_broken_by_id(method: str) -> None:
    agents = [agent("c"), agent("a"), agent("b")]
    assert ids(rank(agents, method)) == ["a", "b", "c"]


def stamped(agent_id: str, field: str, moment: datetime) -> AgentView:
    """An agent with one of its datetime fields set."""
    view = agent(agent_id)
    setattr(view, field, moment)
    return view


@pytest.mark.parametrize(
    ("method", "field"),
    [
        ("highest_capacity", "last_assigned_at"),
        ("round_robin", "last_assigned_at"),
        ("round_robin", "created_at"),
        ("least_active", "capacity_released_at"),
    ],
)
def test_rank_aware_datetimes_same_zone(method: str, field: str) -> None:
    early = stamped("early", field, at(1))
    late = stamped("late", field, at(2))
    assert ids(rank([late, early], method)) == ["early", "late"]


@pytest.mark.parametrize(
    ("method", "field"),
    [
        ("highest_capacity", "last_assigned_at"),
        ("round_robin", "last_assigned_at"),
        ("round_robin", "created_at"),
        ("least_active", "capacity_released_at"),
    ],
)
def test_rank_mixed_aware_datetimes(method: str, field: str) -> None:
    # 12:01 UTC (= 14:01+02:00) is one hour before 13:01 UTC (= 08:01-05:00): "early" first.
    early = stamped("early", field, at(1, PLUS2))
    late = stamped("late", field, at(61, MINUS5))
    assert ids(rank([late, early], method)) == ["early", "late"]


# --------------------------------------------------------------------------- plan


def three_agents(capacity: int = 5) -> list[AgentView]:
    return [agent(x, capacity=capacity) for x in ("a", "b", "c")]


def burst(n: int, *, queue: str = "q1") -> list[WorkItem]:
    return [item(f"c{i:02}", queue=queue, queued_at=at(i)) for i in range(n)]


def counts(decisions: list[Decision]) -> Counter[str]:
    return Counter(d.agent_id for d in decisions)


def test_plan_highest_capacity_burst_is_spread() -> None:
    agents = three_agents()
    result = plan(burst(10), agents, {"q1": QueuePolicy("highest_capacity")}, NOW)
    assert result.unmatched == []
    assert sorted(counts(result.decisions).values()) == [3, 3, 4]
    assert [d.conversation_id for d in result.decisions] == [f"c{i:02}" for i in range(10)]
    assert all(not d.affinity for d in result.decisions)


def test_plan_highest_capacity_prefers_free_then_rotates() -> None:
    agents = [agent("big", capacity=5), agent("small", capacity=3)]
    result = plan(burst(4), agents, {"q1": QueuePolicy("highest_capacity")}, NOW)
    # big 5 → 4 → 3 (tie with small: small never assigned) → small ...
    assert [d.agent_id for d in result.decisions] == ["big", "big", "small", "big"]


def test_plan_round_robin_rotates_one_each() -> None:
    agents = [
        agent("a", last_assigned_at=at(3)),
        agent("b", last_assigned_at=at(1)),
        agent("c", last_assigned_at=at(2)),
    ]
    result = plan(burst(3), agents, {"q1": QueuePolicy("round_robin")}, NOW)
    assert [d.agent_id for d in result.decisions] == ["b", "c", "a"]


def test_plan_round_robin_keeps_rotating_within_a_cycle() -> None:
    agents = three_agents()
    result = plan(burst(6), agents, {"q1": QueuePolicy("round_robin")}, NOW)
    assert [d.agent_id for d in result.decisions] == ["a", "b", "c", "a", "b", "c"]


@pytest.mark.parametrize("method", ["highest_capacity", "round_robin", "least_active"])
def test_plan_never_exceeds_free_units(method: str) -> None:
    agents = [
        agent("a", capacity=3, used=1),
        agent("b", capacity=4, used=0),
        agent("c", capacity=2, used=2),
    ]
    free_before = {a.id: a.free for a in agents}
    items = [item(f"c{i}", units=1 + i % 3, queued_at=at(i)) for i in range(8)]
    result = plan(items, agents, {"q1": QueuePolicy(method)}, NOW)
    given: Counter[str] = Counter()
    for d in result.decisions:
        given[d.agent_id] += d.units
    for a in agents:
        assert given[a.id] <= free_before[a.id]
        assert a.used <= a.capacity
    assert "c" not in given
    decided = {d.conversation_id for d in result.decisions}
    assert decided.isdisjoint(result.unmatched)
    assert decided | set(result.unmatched) == {w.conversation_id for w in items}


def test_plan_units_larger_than_any_free_is_unmatched() -> None:
    agents = [agent("a", capacity=3, used=1)]
    result = plan([item("big", units=3), item("small", units=2)], agents, {}, NOW)
    assert result.decisions == [Decision("small", "a", 2)]
    assert result.unmatched == ["big"]


def test_plan_updates_agent_views() -> None:
    agents = [agent("a", capacity=3, used=1, last_assigned_at=at(-60))]
    plan([item("c1", units=2)], agents, {}, NOW)
    assert agents[0].used == 3
    assert agents[0].last_assigned_at == NOW


def test_plan_affinity_wins_when_eligible() -> None:
    agents = [agent("busy", capacity=5, used=4), agent("idle", capacity=5)]
    work = [item("c1", preferred_agent="busy"), item("c2")]
    result = plan(work, agents, {"q1": QueuePolicy("highest_capacity")}, NOW)
    assert result.decisions == [
        Decision("c1", "busy", 1, affinity=True),
        Decision("c2", "idle", 1, affinity=False),
    ]


@pytest.mark.parametrize(
    "preferred",
    [
        pytest.param(agent("pref", capacity=2, used=2), id="no-capacity"),
        pytest.param(agent("pref", capacity=1, used=0), id="too-few-free-units"),
        pytest.param(agent("pref", queues=("q2",)), id="not-in-queue"),
        pytest.param(agent("pref", skills={}), id="lacks-skill"),
    ],
)
def test_plan_affinity_ignored_when_not_eligible(preferred: AgentView) -> None:
    other = agent("other", capacity=5, skills={"es": 1})
    work = item("c1", units=2, skills={"es": 1}, preferred_agent="pref")
    result = plan([work], [preferred, other], {}, NOW)
    assert result.decisions == [Decision("c1", "other", 2, affinity=False)]


def test_plan_affinity_ignored_when_declined() -> None:
    agents = [agent("pref"), agent("other")]
    work = item("c1", preferred_agent="pref", declined_by=("pref",))
    assert plan([work], agents, {}, NOW).decisions == [Decision("c1", "other", 1)]


def test_plan_affinity_to_unknown_agent_ignored() -> None:
    result = plan([item("c1", preferred_agent="gone")], [agent("a")], {}, NOW)
    assert result.decisions == [Decision("c1", "a", 1, affinity=False)]


def test_plan_unmatched_items_listed() -> None:
    agents = [agent("a", skills={"es": 1}, capacity=1)]
    work = [
        item("first", queued_at=at(0)),
        item("no-room", queued_at=at(1)),
        item("other-queue", queue="q9", queued_at=at(2)),
        item("needs-en", skills={"en": 1}, queued_at=at(3)),
    ]
    result = plan(work, agents, {}, NOW)
    assert result.decisions == [Decision("first", "a", 1)]
    assert result.unmatched == ["no-room", "other-queue", "needs-en"]


def test_plan_higher_priority_gets_only_free_agent() -> None:
    agents = [agent("only", capacity=1)]
    work = [
        item("old-low", priority=0, queued_at=at(-30)),
        item("new-high", priority=3, queued_at=at(0)),
    ]
    result = plan(work, agents, {}, NOW)
    assert result.decisions == [Decision("new-high", "only", 1)]
    assert result.unmatched == ["old-low"]


def test_plan_higher_priority_queue_gets_shared_agent() -> None:
    agents = [agent("shared", queues=("q1", "q2"), capacity=1)]
    work = [
        item("q1-urgent", queue="q1", queue_priority=0, priority=9, queued_at=at(-30)),
        item("q2-vip", queue="q2", queue_priority=5, priority=0, queued_at=at(0)),
    ]
    result = plan(work, agents, {}, NOW)
    assert result.decisions == [Decision("q2-vip", "shared", 1)]
    assert result.unmatched == ["q1-urgent"]


def test_plan_uses_each_queues_policy() -> None:
    agents = [
        agent("rich", queues=("q1", "q2"), capacity=5, last_assigned_at=at(5)),
        agent("rested", queues=("q1", "q2"), capacity=2, last_assigned_at=at(1)),
    ]
    policies = {"q1": QueuePolicy("round_robin"), "q2": QueuePolicy("highest_capacity")}
    result = plan([item("x", queue="q1"), item("y", queue="q2")], agents, policies, NOW)
    assert result.decisions == [Decision("x", "rested", 1), Decision("y", "rich", 1)]


def test_plan_empty() -> None:
    assert plan([], [agent("a")], {}, NOW).decisions == []
    result = plan([item("c1")], [], {}, NOW)
    assert result.decisions == []
    assert result.unmatched == ["c1"]
