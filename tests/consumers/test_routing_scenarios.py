"""Routing a supervisor can trust (issue 12), scenario by scenario, on the real router,
stages, RabbitMQ and PostgreSQL.

Each rule is a table of cases: the agents (queues, capacity, presence), the steps (a
customer writes, an agent accepts, declines, transfers, goes offline, is removed, a
supervisor acts, time passes) and the events each conversation must have published, in
order, each exactly once. Actions go through the HTTP API where it has one (offers,
transfers, presence, the admin's removal) and through ``omniroute.domain.supervisor`` for
the supervisor's. The distribute stage runs on a test clock, so ``reoffer_after``,
``offer_timeout`` and ``max_wait`` pass without sleeping; "it waits" is checked after two
distribution ticks that started once the step was done.

Every case gets a configuration of its own, with queues named for it alone
(``rs<hex>-main``, ``-other``, ``-spill``): no other case's or module's agents or work meet it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import aio_pika
import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from consumers import classify, conversations, distribute
from consumers.runtime import Stage, StageTx
from omniroute.domain import supervisor
from omniroute.domain.agents import offline_requeue
from omniroute.errors import WorkConflict
from omniroute.infra.bus import declare_stage
from omniroute.infra.config_loader import LiveConfig, parse_config
from omniroute.infra.settings import Settings
from omniroute.infra.topology import STAGES
from schemas.events import Envelope
from tests.conftest import Infra, make_settings
from tests.consumers.conftest import RunnerFactory
from tests.support import (
    CONFIG_YAML,
    ENVIRON,
    customer_writes,
    new_agent,
    new_customer,
    tap,
    wait_for,
)

Client = TestClient[Any, Any]
ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
QUEUES = ("main", "other", "spill")
SUPERVISOR = "supervisor@example.com"
STAGE_QUEUES = ("conversations", "classify", "distribute")

# ---------------------------------------------------------------------------------------
# The table's vocabulary
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """The workstream's distribution and lifecycle, and the main queue's overflow rule."""

    offer_timeout: float = 120.0
    reoffer_after: float = 30.0
    on_agent_offline: str = "keep"
    wrap_up: float = 0.0
    overflow: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Agent:
    name: str
    queues: tuple[str, ...] = ("main",)
    capacity: int = 2
    presence: str = "available"


@dataclass(frozen=True)
class Ag:
    """An agent of the case, by name, where an event's data names an agent."""

    name: str


@dataclass(frozen=True)
class Q:
    """A queue of the case, by its short name, where an event's data names a queue."""

    name: str


@dataclass(frozen=True)
class Ev:
    """An expected event: its type, and the fields of its data that matter."""

    type: str
    data: Mapping[str, object] = field(default_factory=dict)


def ev(kind: str, **data: object) -> Ev:
    return Ev(kind, data)


class Step(Protocol):
    async def run(self, rig: Rig) -> None: ...


@dataclass(frozen=True)
class Case:
    id: str
    agents: tuple[Agent, ...]
    steps: tuple[Step, ...]
    events: Mapping[str, tuple[Ev, ...]]  # conversation → every event about it, in order
    policy: Policy = Policy()
    bug: str | None = None  # a known product bug: expected to fail (strict), see the report


Play = Callable[[Case], Awaitable["Rig"]]


def cases(*table: Case) -> pytest.MarkDecorator:
    params = [
        pytest.param(
            c, id=c.id, marks=[pytest.mark.xfail(reason=c.bug, strict=True)] if c.bug else []
        )
        for c in table
    ]
    return pytest.mark.parametrize("case", params)


# ---------------------------------------------------------------------------------------
# The rig: router, stages on a test clock, the events seen
# ---------------------------------------------------------------------------------------


class Clock:
    """Real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


class Ticks:
    """The distribute stage with its ticks recorded (monotonic start times)."""

    def __init__(self) -> None:
        self.started: list[float] = []

    def stage(self) -> Stage:
        async def tick(tx: StageTx) -> list[Envelope]:
            self.started.append(time.monotonic())
            return await distribute.tick(tx)

        return dataclasses.replace(distribute.STAGE, tick=tick)

    async def settle(self) -> None:
        """Two ticks started after now: the first, with its cycle over what is committed
        now, has committed (one runner's ticks run one after the other)."""
        mark = time.monotonic()

        async def enough() -> bool:
            return sum(1 for t in self.started if t > mark) >= 2

        await wait_for(enough, timeout=10)


@dataclass
class Rig:
    router: Client
    db: asyncpg.Pool
    config: LiveConfig
    prefix: str
    clock: Clock = field(default_factory=Clock)
    ticks: Ticks = field(default_factory=Ticks)
    seen: list[dict[str, Any]] = field(default_factory=list)
    agents: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    convs: dict[str, str] = field(default_factory=dict)
    customers: dict[str, str] = field(default_factory=dict)

    def queue(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def agent(self, name: str) -> str:
        return self.agents[name][0]

    def auth(self, name: str) -> dict[str, str]:
        return self.agents[name][1]

    def about(self, conv: str) -> list[dict[str, Any]]:
        return [e for e in self.seen if e.get("conversation_id") == self.convs[conv]]

    def resolve(self, value: object) -> object:
        if isinstance(value, Ag):
            return self.agent(value.name)
        if isinstance(value, Q):
            return self.queue(value.name)
        return value

    async def row(self, conv: str) -> asyncpg.Record:
        row = await self.db.fetchrow(
            "SELECT c.state, c.queue, c.agent_id::text AS agent_id, c.priority,"
            " c.declined_by::text[] AS declined_by, c.close_reason,"
            " (SELECT o.agent_id::text FROM offers o WHERE o.conversation_id = c.id"
            "  AND o.state = 'pending') AS offered_to"
            " FROM conversations c WHERE c.id = $1",
            self.convs[conv],
        )
        assert row is not None
        return row

    async def pending_offer(self, conv: str, agent: str) -> str:
        """The id of the conversation's pending offer to ``agent``, once there is one."""

        async def offer() -> str | None:
            found: str | None = await self.db.fetchval(
                "SELECT id::text FROM offers WHERE conversation_id = $1 AND agent_id = $2"
                " AND state = 'pending'",
                self.convs[conv],
                self.agent(agent),
            )
            return found

        try:
            found: str = await wait_for(offer, timeout=10)
        except TimeoutError:
            row = await self.row(conv)
            raise AssertionError(f"{conv} was not offered to {agent}: {dict(row)}") from None
        return found


@contextlib.asynccontextmanager
async def _events(amqp_url: str, rig: Rig) -> AsyncIterator[None]:
    """Keep everything published about conversations, offers and the supervisor."""
    async with tap(amqp_url, "conversation.*", "offer.*", "supervisor.acted") as spy:

        async def drain() -> None:
            while True:
                event, _ = await spy.events.get()
                rig.seen.append(event)

        task = asyncio.create_task(drain())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _yaml(prefix: str, policy: Policy) -> str:
    """The case's configuration: the test accounts, both workstreams on the case's
    queues (a body containing ``#other#`` or ``#spill#`` routes there), the policy."""
    accounts = CONFIG_YAML.split("workstreams:\n")[0]
    distribution = {
        "mode": "push",
        "units": 1,
        "keep_same_agent": True,
        "offer_timeout": policy.offer_timeout,
        "reoffer_after": policy.reoffer_after,
        "on_agent_offline": policy.on_agent_offline,
    }
    routing = [
        {
            "name": f"to-{q}",
            "when": {"field": "body", "op": "contains", "value": f"#{q}#"},
            "queue": f"{prefix}-{q}",
        }
        for q in QUEUES[1:]
    ]
    workstreams = [
        {
            "name": name,
            "language": "en",
            "fallback_queue": f"{prefix}-main",
            "distribution": distribution,
            "lifecycle": {"wrap_up": policy.wrap_up},
            "routing": routing,
        }
        for name in ("support-pt", "support-en")
    ]
    queues: list[dict[str, Any]] = [{"name": f"{prefix}-{q}"} for q in QUEUES]
    if policy.overflow is not None:
        rule = dict(policy.overflow)
        if "queue" in rule:
            rule["queue"] = f"{prefix}-{rule['queue']}"
        queues[0]["overflow"] = rule
    return f"{accounts}workstreams: {json.dumps(workstreams)}\nqueues: {json.dumps(queues)}\n"


@pytest.fixture
def settings(infra: Infra) -> Settings:
    return make_settings(infra, admin_token=ADMIN_TOKEN)


async def _purge(amqp_url: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for stage in STAGE_QUEUES:
            await (await declare_stage(channel, STAGES[stage])).purge()


@pytest.fixture(scope="module", autouse=True)
async def quiet_queues(infra: Infra) -> AsyncIterator[None]:
    """Earlier modules leave events in the stage queues: this module's classify would put
    their conversations in its queues. Start clean, and leave nothing behind."""
    await _purge(infra.amqp_url)
    yield
    await _purge(infra.amqp_url)


@pytest.fixture
async def play(
    router: Client,
    config: LiveConfig,
    start_runner: RunnerFactory,
    db: asyncpg.Pool,
    settings: Settings,
) -> AsyncIterator[Play]:
    """Play a case: its configuration, agents, stages; its steps; then its events."""
    rigs: list[Rig] = []

    async def run(case: Case) -> Rig:
        prefix = "rs" + uuid.uuid4().hex[:8]
        config.current = parse_config(_yaml(prefix, case.policy), f"{case.id}.yaml", ENVIRON)
        rig = Rig(router, db, config, prefix)
        rigs.append(rig)
        for agent in case.agents:
            rig.agents[agent.name] = await new_agent(
                db,
                queues=[rig.queue(q) for q in agent.queues],
                name=f"{prefix}-{agent.name}",
                capacity=agent.capacity,
                presence=agent.presence,
            )
        await start_runner(conversations.STAGE)
        await start_runner(classify.STAGE)
        await start_runner(rig.ticks.stage(), clock=rig.clock, tick_interval=0.1)
        async with _events(settings.amqp_url.get_secret_value(), rig):
            for step in case.steps:
                await step.run(rig)
            await rig.ticks.settle()
            await _check_events(rig, case.events)
        return rig

    yield run
    for rig in rigs:  # nobody left available for later modules' stages
        await db.execute(
            "UPDATE agents SET presence = 'offline' WHERE id = ANY($1::uuid[])",
            [agent_id for agent_id, _ in rig.agents.values()],
        )


async def _check_events(rig: Rig, expected: Mapping[str, tuple[Ev, ...]]) -> None:
    """Each conversation's events, in order, each once: none lost, none duplicated."""

    async def arrived() -> bool:
        return all(len(rig.about(conv)) >= len(events) for conv, events in expected.items())

    with contextlib.suppress(TimeoutError):
        await wait_for(arrived, timeout=10)
    await asyncio.sleep(0.5)  # anything more (a duplicate, an extra offer) shows by now
    for conv, events in expected.items():
        seen = rig.about(conv)
        kinds = [e["type"] for e in seen]
        assert kinds == [e.type for e in events], f"{conv}: {kinds}"
        assert len({e["id"] for e in seen}) == len(seen), f"{conv}: an event id twice"
        for got, want in zip(seen, events, strict=True):
            for key, value in want.data.items():
                assert got["data"].get(key) == rig.resolve(value), (conv, want.type, key, got)


# ---------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrive:
    """A customer writes (a new one unless named again), routed to ``queue``; the
    conversation is known as ``conv`` once classified."""

    conv: str
    customer: str | None = None
    queue: str = "main"

    async def run(self, rig: Rig) -> None:
        name = self.customer or self.conv
        number = rig.customers.setdefault(name, new_customer())
        body = "hello" if self.queue == "main" else f"hello #{self.queue}#"
        await customer_writes(rig.router, number, body)

        async def classified() -> str | None:
            found: str | None = await rig.db.fetchval(
                "SELECT id::text FROM conversations WHERE customer = $1"
                " AND state NOT IN ('open') ORDER BY opened_at DESC LIMIT 1",
                number,
            )
            return None if found in rig.convs.values() else found

        rig.convs[self.conv] = await wait_for(classified, timeout=10)


@dataclass(frozen=True)
class Offered:
    """The conversation is offered to ``agent`` (with affinity or not, when given)."""

    conv: str
    agent: str
    affinity: bool | None = None

    async def run(self, rig: Rig) -> None:
        offer_id = await rig.pending_offer(self.conv, self.agent)
        if self.affinity is None:
            return

        async def published() -> dict[str, Any] | None:
            return next(
                (
                    e
                    for e in rig.about(self.conv)
                    if e["type"] == "conversation.offered" and e["data"]["offer_id"] == offer_id
                ),
                None,
            )

        event = await wait_for(published, timeout=10)
        assert event["data"]["affinity"] is self.affinity, event


@dataclass(frozen=True)
class Accept:
    conv: str
    agent: str

    async def run(self, rig: Rig) -> None:
        offer_id = await rig.pending_offer(self.conv, self.agent)
        response = await rig.router.post(
            f"/api/offers/{offer_id}/accept", headers=rig.auth(self.agent)
        )
        assert response.status == 200, await response.text()


@dataclass(frozen=True)
class Decline:
    conv: str
    agent: str

    async def run(self, rig: Rig) -> None:
        offer_id = await rig.pending_offer(self.conv, self.agent)
        response = await rig.router.post(
            f"/api/offers/{offer_id}/decline", headers=rig.auth(self.agent)
        )
        assert response.status == 200, await response.text()


@dataclass(frozen=True)
class Close:
    """The agent closes (or, with wrap-up, ends) its conversation."""

    conv: str
    agent: str

    async def run(self, rig: Rig) -> None:
        response = await rig.router.post(
            f"/api/conversations/{rig.convs[self.conv]}/close", headers=rig.auth(self.agent)
        )
        assert response.status == 200, await response.text()


@dataclass(frozen=True)
class Transfer:
    """The agent transfers its conversation to a queue or to an agent; ``refused``: the
    reason it must be refused with, changing nothing."""

    conv: str
    agent: str
    queue: str | None = None
    to: str | None = None
    refused: str | None = None

    async def run(self, rig: Rig) -> None:
        before = await rig.row(self.conv)
        used = await _used(rig)
        body = (
            {"queue": rig.queue(self.queue)}
            if self.queue
            else {"agent_id": rig.agent(self.to or "")}
        )
        response = await rig.router.post(
            f"/api/conversations/{rig.convs[self.conv]}/transfer",
            headers=rig.auth(self.agent),
            json=body,
        )
        if self.refused is None:
            assert response.status == 200, await response.text()
            return
        assert response.status == 409, await response.text()
        assert (await response.json())["error"]["code"] == self.refused
        assert dict(await rig.row(self.conv)) == dict(before)
        assert await _used(rig) == used


@dataclass(frozen=True)
class Presence:
    """The agent sets its presence through the API."""

    agent: str
    presence: str

    async def run(self, rig: Rig) -> None:
        response = await rig.router.put(
            "/api/me/presence", headers=rig.auth(self.agent), json={"presence": self.presence}
        )
        assert response.status == 200, await response.text()


@dataclass(frozen=True)
class Remove:
    """The admin removes the agent."""

    agent: str

    async def run(self, rig: Rig) -> None:
        response = await rig.router.delete(
            f"/api/admin/agents/{rig.agent(self.agent)}", headers=ADMIN
        )
        assert response.status == 204, await response.text()


@dataclass(frozen=True)
class Advance:
    """Time passes for the distribute stage."""

    seconds: float

    async def run(self, rig: Rig) -> None:
        rig.clock.offset += timedelta(seconds=self.seconds)
        await rig.ticks.settle()


@dataclass(frozen=True)
class Holds:
    """After the distribution settled: the conversation's state, agent, pending offer and
    other columns are these (``agent``/``offered_to`` name agents; None: nobody)."""

    conv: str
    state: str
    agent: str | None = None
    offered_to: str | None = None
    queue: str | None = None
    declined_by: tuple[str, ...] | None = None
    priority: int | None = None
    close_reason: str | None = None

    async def run(self, rig: Rig) -> None:
        await rig.ticks.settle()
        row = await rig.row(self.conv)
        got: dict[str, object] = {
            "state": row["state"],
            "agent": row["agent_id"],
            "offered_to": row["offered_to"],
        }
        want: dict[str, object] = {
            "state": self.state,
            "agent": rig.agent(self.agent) if self.agent else None,
            "offered_to": rig.agent(self.offered_to) if self.offered_to else None,
        }
        if self.queue is not None:
            got["queue"], want["queue"] = row["queue"], rig.queue(self.queue)
        if self.declined_by is not None:
            got["declined_by"] = sorted(row["declined_by"])
            want["declined_by"] = sorted(rig.agent(a) for a in self.declined_by)
        if self.priority is not None:
            got["priority"], want["priority"] = row["priority"], self.priority
        if self.close_reason is not None:
            got["close_reason"], want["close_reason"] = row["close_reason"], self.close_reason
        assert got == want, self.conv


@dataclass(frozen=True)
class Supervise:
    """A supervisor acts through ``omniroute.domain.supervisor``: ``transfer`` (to
    ``queue`` or agent ``to``), ``end_offer`` or ``set_presence`` (of agent ``to``);
    ``refused``: the reason it must be refused with, changing nothing."""

    action: str
    conv: str | None = None
    queue: str | None = None
    to: str | None = None
    presence: str = "offline"
    refused: str | None = None

    async def run(self, rig: Rig) -> None:
        config = rig.config.current
        now = datetime.now(UTC)
        before = await rig.row(self.conv) if self.conv else None
        try:
            async with rig.db.acquire() as conn, conn.transaction():
                if self.action == "transfer":
                    assert self.conv is not None
                    await supervisor.transfer(
                        conn,
                        rig.convs[self.conv],
                        SUPERVISOR,
                        now,
                        to_queue=rig.queue(self.queue) if self.queue else None,
                        to_agent=rig.agent(self.to) if self.to else None,
                        known_queues=[q.name for q in config.queues],
                        offer_seconds=120.0,
                    )
                elif self.action == "end_offer":
                    assert self.conv is not None
                    offer_id = await conn.fetchval(
                        "SELECT id::text FROM offers WHERE conversation_id = $1"
                        " AND state = 'pending'",
                        rig.convs[self.conv],
                    )
                    await supervisor.end_offer(conn, offer_id, SUPERVISOR, now)
                else:
                    assert self.to is not None
                    await supervisor.set_presence(
                        conn,
                        rig.agent(self.to),
                        self.presence,
                        SUPERVISOR,
                        now,
                        requeue_workstreams=offline_requeue(config),
                    )
        except WorkConflict as exc:
            assert exc.code == self.refused, exc
            assert self.conv is not None and before is not None
            assert dict(await rig.row(self.conv)) == dict(before)
            return
        assert self.refused is None, f"not refused ({self.refused} expected)"


async def _used(rig: Rig) -> dict[str, int]:
    rows = await rig.db.fetch(
        "SELECT id::text, used_units FROM agents WHERE id = ANY($1::uuid[])",
        [aid for aid, _ in rig.agents.values()],
    )
    return {r["id"]: r["used_units"] for r in rows}


# ---------------------------------------------------------------------------------------
# Event shorthands
# ---------------------------------------------------------------------------------------

OPENED = ev("conversation.opened")
CLASSIFIED = ev("conversation.classified")
QUEUED = ev("conversation.queued")
ARRIVED = (OPENED, CLASSIFIED, QUEUED)


def offered(agent: str, **data: object) -> Ev:
    return ev("conversation.offered", agent_id=Ag(agent), **data)


def assigned(agent: str) -> Ev:
    return ev("conversation.assigned", agent_id=Ag(agent))


def declined(agent: str) -> Ev:
    return ev("offer.declined", agent_id=Ag(agent))


def expired(agent: str, **data: object) -> Ev:
    return ev("offer.expired", agent_id=Ag(agent), **data)


def served(agent: str) -> tuple[Ev, ...]:
    """Arrived, offered to the agent and accepted."""
    return (*ARRIVED, offered(agent), assigned(agent))


CLOSED = ev("conversation.closed")
ACTED = ev("supervisor.acted", actor=SUPERVISOR)


# ---------------------------------------------------------------------------------------
# Affinity: the agent who served the customer before, only when eligible with room; never
# one who declined or transferred this conversation, never a removed one.
# ---------------------------------------------------------------------------------------

# The customer's first conversation, served and closed by A while B is offline; then B
# (more room than A) comes online.
SERVED_BEFORE: tuple[Step, ...] = (
    Arrive("first", customer="x"),
    Accept("first", "A"),
    Close("first", "A"),
    Presence("B", "available"),
)
FIRST = (*served("A"), CLOSED)
A_AND_B = (Agent("A", capacity=2), Agent("B", capacity=5, presence="offline"))

AFFINITY = cases(
    Case(
        "last-agent-eligible-with-room-is-preferred",
        A_AND_B,
        (*SERVED_BEFORE, Arrive("again", customer="x"), Offered("again", "A", affinity=True)),
        {"first": FIRST, "again": (*ARRIVED, offered("A", affinity=True))},
    ),
    Case(
        "last-agent-away-is-not",
        A_AND_B,
        (
            *SERVED_BEFORE,
            Presence("A", "away"),
            Arrive("again", customer="x"),
            Offered("again", "B", affinity=False),
        ),
        {"first": FIRST, "again": (*ARRIVED, offered("B", affinity=False))},
    ),
    Case(
        "last-agent-without-room-is-not",
        (Agent("A", capacity=1), Agent("B", capacity=5, presence="offline")),
        (
            Arrive("first", customer="x"),
            Accept("first", "A"),
            Close("first", "A"),
            Arrive("busy", customer="y"),
            Accept("busy", "A"),  # A is full
            Presence("B", "available"),
            Arrive("again", customer="x"),
            Offered("again", "B", affinity=False),
        ),
        {"first": FIRST, "busy": served("A"), "again": (*ARRIVED, offered("B", affinity=False))},
    ),
    Case(
        "removed-last-agent-is-not",
        A_AND_B,
        (
            *SERVED_BEFORE,
            Remove("A"),
            Arrive("again", customer="x"),
            Offered("again", "B", affinity=False),
        ),
        {"first": FIRST, "again": (*ARRIVED, offered("B", affinity=False))},
    ),
    Case(
        # A and B decline; once reoffer_after passes a new round starts: B has more room,
        # and A, who declined, is no longer preferred.
        "last-agent-who-declined-is-not-preferred-in-the-next-round",
        A_AND_B,
        (
            *SERVED_BEFORE,
            Arrive("again", customer="x"),
            Decline("again", "A"),
            Decline("again", "B"),
            Holds("again", "queued", declined_by=("A", "B")),
            Advance(31),
            Offered("again", "B", affinity=False),
        ),
        {
            "first": FIRST,
            "again": (
                *ARRIVED,
                offered("A", affinity=True),
                declined("A"),
                offered("B", affinity=False),
                declined("B"),
                offered("B", affinity=False),
            ),
        },
    ),
    Case(
        "last-agent-who-transferred-to-the-queue-is-not-preferred",
        A_AND_B,
        (
            *SERVED_BEFORE,
            Arrive("again", customer="x"),
            Accept("again", "A"),
            Transfer("again", "A", queue="main"),
            Decline("again", "B"),
            Holds("again", "queued", declined_by=("A", "B")),
            Advance(31),
            Offered("again", "B", affinity=False),
        ),
        {
            "first": FIRST,
            "again": (
                *ARRIVED,
                offered("A", affinity=True),
                assigned("A"),
                ev("conversation.transferred", from_agent=Ag("A"), to_queue=Q("main")),
                offered("B"),
                declined("B"),
                offered("B", affinity=False),
            ),
        },
    ),
    Case(
        # A hands it to B, who declines: C (most room) gets it, not A by affinity.
        "last-agent-who-transferred-to-an-agent-is-not-preferred",
        (*A_AND_B, Agent("C", capacity=9, presence="offline")),
        (
            *SERVED_BEFORE,
            Presence("C", "available"),
            Arrive("again", customer="x"),
            Accept("again", "A"),
            Transfer("again", "A", to="B"),
            Decline("again", "B"),
            Offered("again", "C", affinity=False),
        ),
        {
            "first": FIRST,
            "again": (
                *ARRIVED,
                offered("A", affinity=True),
                assigned("A"),
                ev("conversation.transferred", from_agent=Ag("A"), to_agent=Ag("B")),
                offered("B"),
                declined("B"),
                offered("C", affinity=False),
            ),
        },
    ),
)


@AFFINITY
async def test_affinity(play: Play, case: Case) -> None:
    await play(case)


# ---------------------------------------------------------------------------------------
# Transfer to a queue: the source agent is left out for the offer round.
# ---------------------------------------------------------------------------------------

A_ROOMY_B = (Agent("A", capacity=3), Agent("B", capacity=1))


def transferred(**data: object) -> Ev:
    return ev("conversation.transferred", **data)


TRANSFER_TO_QUEUE = cases(
    Case(
        "source-left-out-though-it-has-the-most-room",
        A_ROOMY_B,
        (
            Arrive("c"),
            Accept("c", "A"),
            Transfer("c", "A", queue="main"),
            Offered("c", "B"),
            Holds("c", "offered", agent="B", offered_to="B"),
        ),
        {"c": (*served("A"), transferred(from_agent=Ag("A"), to_queue=Q("main")), offered("B"))},
    ),
    Case(
        "another-queue-another-agent",
        (Agent("A", capacity=3), Agent("B", queues=("other",), capacity=1)),
        (Arrive("c"), Accept("c", "A"), Transfer("c", "A", queue="other"), Accept("c", "B")),
        {
            "c": (
                *served("A"),
                transferred(from_agent=Ag("A"), from_queue=Q("main"), to_queue=Q("other")),
                offered("B", queue=Q("other")),
                assigned("B"),
            )
        },
    ),
    Case(
        "source-alone-waits-reoffer-after-then-gets-it-back",
        (Agent("A"),),
        (
            Arrive("c"),
            Accept("c", "A"),
            Transfer("c", "A", queue="main"),
            Holds("c", "queued", declined_by=("A",)),
            Advance(31),
            Offered("c", "A"),
        ),
        {"c": (*served("A"), transferred(from_agent=Ag("A")), offered("A"))},
    ),
    Case(
        "supervisor-moves-it-to-the-queue-its-agent-left-out",
        A_ROOMY_B,
        (
            Arrive("c"),
            Accept("c", "A"),
            Supervise("transfer", "c", queue="main"),
            Offered("c", "B"),
        ),
        {
            "c": (
                *served("A"),
                transferred(from_agent=Ag("A"), reason="supervisor", by=SUPERVISOR),
                ACTED,
                offered("B"),
            )
        },
    ),
)


@TRANSFER_TO_QUEUE
async def test_transfer_to_a_queue(play: Play, case: Case) -> None:
    await play(case)


# ---------------------------------------------------------------------------------------
# Transfer to an agent: that agent, or refused with the reason and nothing lost.
# ---------------------------------------------------------------------------------------


def _refused(reason: str, target: Agent) -> Case:
    return Case(
        f"refused-{reason}",
        (Agent("A", capacity=3), target),
        (
            Arrive("c"),
            Accept("c", "A"),
            Transfer("c", "A", to="B", refused=reason),
            Holds("c", "active", agent="A"),
        ),
        {"c": served("A")},
    )


TRANSFER_TO_AGENT = cases(
    _refused("agent_unavailable", Agent("B", presence="away")),
    _refused("agent_not_in_queue", Agent("B", queues=("other",))),
    _refused("no_capacity", Agent("B", capacity=0)),
    Case(
        "offered-to-that-agent",
        (Agent("A", capacity=3), Agent("B", capacity=1)),
        (
            Arrive("c"),
            Accept("c", "A"),
            Transfer("c", "A", to="B"),
            Accept("c", "B"),
            Holds("c", "active", agent="B"),
        ),
        {
            "c": (
                *served("A"),
                transferred(from_agent=Ag("A"), to_agent=Ag("B")),
                offered("B"),
                assigned("B"),
            )
        },
    ),
    Case(
        "supervisor-refused-no_capacity",
        (Agent("A", capacity=3), Agent("B", capacity=0)),
        (
            Arrive("c"),
            Accept("c", "A"),
            Supervise("transfer", "c", to="B", refused="no_capacity"),
            Holds("c", "active", agent="A"),
        ),
        {"c": served("A")},
    ),
)


@TRANSFER_TO_AGENT
async def test_transfer_to_an_agent(play: Play, case: Case) -> None:
    await play(case)


# ---------------------------------------------------------------------------------------
# Decline and timeout: the next eligible agent; when every eligible agent declined, the
# conversation waits until a new agent comes or reoffer_after passes.
# ---------------------------------------------------------------------------------------

DECLINE = cases(
    Case(
        "next-eligible-agent-at-once",
        A_ROOMY_B,
        (Arrive("c"), Decline("c", "A"), Offered("c", "B")),
        {"c": (*ARRIVED, offered("A"), declined("A"), offered("B"))},
    ),
    Case(
        "only-agent-declined-waits-reoffer-after",
        (Agent("A"),),
        (
            Arrive("c"),
            Decline("c", "A"),
            Holds("c", "queued", declined_by=("A",)),
            Advance(20),
            Holds("c", "queued", declined_by=("A",)),
            Advance(11),
            Offered("c", "A"),
        ),
        {"c": (*ARRIVED, offered("A"), declined("A"), offered("A"))},
    ),
    Case(
        "only-agent-declined-a-new-agent-gets-it-at-once",
        (Agent("A"), Agent("B", presence="offline")),
        (
            Arrive("c"),
            Decline("c", "A"),
            Holds("c", "queued", declined_by=("A",)),
            Presence("B", "available"),
            Offered("c", "B"),
        ),
        {"c": (*ARRIVED, offered("A"), declined("A"), offered("B"))},
    ),
    Case(
        "only-agent-let-it-expire-waits-reoffer-after",
        (Agent("A"),),
        (
            Arrive("c"),
            Offered("c", "A"),
            Advance(11),  # the offer expires
            Holds("c", "queued", declined_by=("A",)),
            Advance(31),
            Offered("c", "A"),
        ),
        {"c": (*ARRIVED, offered("A"), expired("A"), offered("A"))},
        Policy(offer_timeout=10),
    ),
    Case(
        "supervisor-ends-the-offer-next-agent",
        A_ROOMY_B,
        (Arrive("c"), Offered("c", "A"), Supervise("end_offer", "c"), Offered("c", "B")),
        {
            "c": (
                *ARRIVED,
                offered("A"),
                expired("A", ended_by=SUPERVISOR),
                ACTED,
                offered("B"),
            )
        },
    ),
)


@DECLINE
async def test_decline_and_timeout(play: Play, case: Case) -> None:
    await play(case)


# ---------------------------------------------------------------------------------------
# Removed agents, and offline agents under on_agent_offline: nothing stays with them.
# ---------------------------------------------------------------------------------------

REQUEUE = Policy(on_agent_offline="requeue")

REMOVAL_AND_OFFLINE = cases(
    Case(
        "removed-active-requeued-ahead-and-offered-to-another",
        A_ROOMY_B,
        (
            Arrive("c"),
            Accept("c", "A"),
            Remove("A"),
            Offered("c", "B"),
            Holds("c", "offered", agent="B", offered_to="B", priority=1),
        ),
        {
            "c": (
                *served("A"),
                transferred(from_agent=Ag("A"), reason="agent_removed"),
                offered("B"),
            )
        },
    ),
    Case(
        "removed-with-a-pending-offer-offer-ends",
        A_ROOMY_B,
        (Arrive("c"), Offered("c", "A"), Remove("A"), Offered("c", "B")),
        {"c": (*ARRIVED, offered("A"), expired("A"), offered("B"))},
    ),
    Case(
        "removed-in-wrap-up-closed",
        A_ROOMY_B,
        (
            Arrive("c"),
            Accept("c", "A"),
            Close("c", "A"),
            Holds("c", "wrap-up", agent="A"),
            Remove("A"),
            Holds("c", "closed", agent="A"),
        ),
        {"c": (*served("A"), ev("conversation.ended"), CLOSED)},
        Policy(wrap_up=30),
    ),
    Case(
        "offline-keep-conversation-stays",
        A_ROOMY_B,
        (
            Arrive("c"),
            Accept("c", "A"),
            Presence("A", "offline"),
            Holds("c", "active", agent="A"),
        ),
        {"c": served("A")},
    ),
    Case(
        "offline-keep-pending-offer-ends",
        A_ROOMY_B,
        (Arrive("c"), Offered("c", "A"), Presence("A", "offline"), Offered("c", "B")),
        {"c": (*ARRIVED, offered("A"), expired("A"), offered("B"))},
    ),
    Case(
        "offline-requeue-requeued-ahead-and-offered-to-another",
        A_ROOMY_B,
        (
            Arrive("c"),
            Accept("c", "A"),
            Presence("A", "offline"),
            Offered("c", "B"),
            Holds("c", "offered", agent="B", offered_to="B", priority=1),
        ),
        {
            "c": (
                *served("A"),
                transferred(from_agent=Ag("A"), reason="agent_offline"),
                offered("B"),
            )
        },
        REQUEUE,
    ),
    Case(
        "supervisor-sets-offline-requeue",
        A_ROOMY_B,
        (
            Arrive("c"),
            Accept("c", "A"),
            Supervise("set_presence", to="A"),
            Offered("c", "B"),
        ),
        {
            "c": (
                *served("A"),
                transferred(from_agent=Ag("A"), reason="agent_offline"),
                offered("B"),
            )
        },
        REQUEUE,
    ),
)


@REMOVAL_AND_OFFLINE
async def test_removed_and_offline_agents(play: Play, case: Case) -> None:
    await play(case)


# ---------------------------------------------------------------------------------------
# Overflow: each condition × each action, once per conversation.
# ---------------------------------------------------------------------------------------

# Nobody serves main; S serves the spill queue.
SPILL = (Agent("S", queues=("spill",), capacity=3),)
ACTIONS: dict[str, dict[str, Any]] = {
    "transfer": {"action": "transfer", "queue": "spill"},
    "message": {"action": "message"},
    "end": {"action": "end"},
}


def overflowed(condition: str, action: str) -> Ev:
    data: dict[str, object] = {"condition": condition, "action": action, "queue": Q("main")}
    data["to_queue"] = Q("spill") if action == "transfer" else None
    return Ev("conversation.overflowed", data)


def _arrival_outcome(action: str) -> tuple[Ev, ...]:
    if action == "transfer":
        return (ev("conversation.queued", queue=Q("spill")), offered("S"))
    if action == "message":
        return (ev("conversation.queued", queue=Q("main")),)
    return (ev("conversation.closed", reason="overflow"),)


def _arrival_holds(conv: str, action: str) -> Holds:
    if action == "transfer":
        return Holds(conv, "offered", agent="S", offered_to="S", queue="spill")
    if action == "message":
        return Holds(conv, "queued", queue="main")
    return Holds(conv, "closed", close_reason="overflow")


def _max_waiting(action: str) -> Case:
    # max_waiting 0: the first waits; the second finds one waiting, more than 0.
    return Case(
        f"max_waiting-{action}",
        SPILL,
        (Arrive("first"), Arrive("second"), _arrival_holds("second", action)),
        {
            "first": ARRIVED,
            "second": (
                OPENED,
                CLASSIFIED,
                overflowed("max_waiting", action),
                *_arrival_outcome(action),
            ),
        },
        Policy(overflow={"max_waiting": 0, **ACTIONS[action]}),
    )


def _no_agents(action: str) -> Case:
    # B serves main but is away: nobody of main is available.
    return Case(
        f"no_agents-{action}",
        (*SPILL, Agent("B", presence="away")),
        (Arrive("c"), _arrival_holds("c", action)),
        {"c": (OPENED, CLASSIFIED, overflowed("no_agents", action), *_arrival_outcome(action))},
        Policy(overflow={"no_agents": True, **ACTIONS[action]}),
    )


def _max_wait(action: str) -> Case:
    after: dict[str, tuple[Ev, ...]] = {
        "transfer": (transferred(reason="overflow", to_queue=Q("spill")), offered("S")),
        "message": (),
        "end": (ev("conversation.closed", reason="overflow"),),
    }
    return Case(
        f"max_wait-{action}",
        SPILL,
        (
            Arrive("c"),
            Advance(50),
            Holds("c", "queued", queue="main"),
            Advance(11),
            _arrival_holds("c", action),
            Advance(61),  # once per conversation
            _arrival_holds("c", action),
        ),
        {"c": (*ARRIVED, overflowed("max_wait", action), *after[action])},
        Policy(overflow={"max_wait": "60s", **ACTIONS[action]}),
    )


OVERFLOW = cases(
    *(
        make(action)
        for make in (_max_waiting, _no_agents, _max_wait)
        for action in ("transfer", "message", "end")
    )
)


@OVERFLOW
async def test_overflow(play: Play, case: Case) -> None:
    await play(case)


def test_every_table_names_its_conversations_once() -> None:
    """The tables themselves: unique case ids, every expected conversation arrives."""
    tables: Sequence[Any] = (AFFINITY, TRANSFER_TO_QUEUE, TRANSFER_TO_AGENT, DECLINE)
    tables = (*tables, REMOVAL_AND_OFFLINE, OVERFLOW)
    table = [p.values[0] for mark in tables for p in mark.args[1]]
    ids = [c.id for c in table]
    assert len(ids) == len(set(ids))
    for case in table:
        arrivals = {s.conv for s in case.steps if isinstance(s, Arrive)}
        assert set(case.events) == arrivals, case.id
