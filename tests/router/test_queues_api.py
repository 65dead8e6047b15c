"""The supervisor's queue view over HTTP against the real router, database and broker:
the waiting count rises as customers write with no agent to take them and falls as an agent
accepts (the stages running); the longest wait; available agents by presence and capacity;
pending offers; the minute-by-minute history; the query checked.

Each test has queues of its own (routed to by a word in the customer's message), so the work
of other tests never shows in its counts.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from consumers import classify, conversations, distribute
from omniroute.infra.config_loader import LiveConfig, parse_config
from router.app import create_app
from router.state import BUS
from tests.conftest import Infra, RunnerFactory, make_settings
from tests.support import BUSINESS, CONFIG_YAML, ENVIRON, customer_writes, new_agent, new_customer

Client = TestClient[Any, Any]
ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
QUEUES = "/api/admin/queues"
HISTORY = "/api/admin/queues/history"


@pytest.fixture
def queue() -> str:
    return f"qv{uuid.uuid4().hex[:10]}"


@pytest.fixture
def config(queue: str) -> LiveConfig:
    """The test configuration plus ``queue``, routed to by its name in a message."""
    text = CONFIG_YAML.replace(
        "    routing:\n",
        "    routing:\n"
        f"      - {{name: {queue}, when: {{field: body, op: contains, value: {queue}}},"
        f" queue: {queue}}}\n",
        1,
    )
    text = text.replace("\nqueues:\n", f"\nqueues:\n  - {{name: {queue}}}\n", 1)
    return LiveConfig(parse_config(text, "queues.yaml", ENVIRON))


@pytest.fixture
async def admin(infra: Infra, config: LiveConfig) -> AsyncIterator[Client]:
    app = create_app(make_settings(infra, admin_token=ADMIN_TOKEN), config)
    async with TestClient(TestServer(app)) as client:
        async with asyncio.timeout(10):
            await app[BUS].wait_ready()
        yield client


async def seed(
    db: asyncpg.Pool,
    queue: str,
    state: str,
    *,
    queued: timedelta,
    assigned: timedelta | None = None,
    closed: timedelta | None = None,
    agent: str | None = None,
) -> str:
    """A conversation of ``queue`` in ``state``, queued (assigned, closed) that long ago."""
    contact, conversation, now = uuid.uuid4(), uuid.uuid4(), datetime.now(UTC)
    customer = new_customer()
    await db.execute(
        "INSERT INTO contacts (id, account, address) VALUES ($1, 'contoso', $2)",
        contact,
        customer,
    )
    await db.execute(
        "INSERT INTO conversations (id, account, business_number, customer, contact_id,"
        " workstream, state, opened_at, last_customer_message_at, queue, queued_at,"
        " assigned_at, closed_at, agent_id)"
        " VALUES ($1, 'contoso', $2, $3, $4, 'support-pt', $5, $6, $6, $7, $8, $9, $10, $11)",
        conversation,
        BUSINESS,
        customer,
        contact,
        state,
        now - queued - timedelta(seconds=1),
        queue,
        now - queued,
        None if assigned is None else now - assigned,
        None if closed is None else now - closed,
        agent,
    )
    return str(conversation)


async def view(admin: Client, queue: str) -> dict[str, Any]:
    response = await admin.get(QUEUES, headers=AUTH)
    assert response.status == 200, await response.text()
    found: dict[str, Any] = next(
        q for q in (await response.json())["queues"] if q["queue"] == queue
    )
    return found


async def until(admin: Client, queue: str, offers: int = 0, **wanted: int) -> dict[str, Any]:
    """The queue's view once its counts are ``wanted`` and it lists ``offers`` pending
    offers (fails after 10 s, saying what it saw)."""
    seen: dict[str, Any] = {}
    try:
        async with asyncio.timeout(10):
            while True:
                seen = await view(admin, queue)
                if len(seen["offers"]) == offers and all(seen[k] == v for k, v in wanted.items()):
                    return seen
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"wanted {wanted}, {offers} offers; the view: {seen}") from None


async def test_waiting_rises_as_customers_write_and_falls_as_an_agent_accepts(
    admin: Client, db: asyncpg.Pool, queue: str, start_runner: RunnerFactory
) -> None:
    await start_runner(conversations.STAGE)
    await start_runner(classify.STAGE)
    await start_runner(distribute.STAGE, tick_interval=0.1)
    agent, agent_auth = await new_agent(db, queues=[queue], capacity=2, presence="away")
    empty = await view(admin, queue)
    assert empty["waiting"] == 0 and empty["longest_wait_seconds"] is None
    assert empty["available_agents"] == 0 and empty["active"] == 0

    await customer_writes(admin, new_customer(), f"oi {queue}")
    await customer_writes(admin, new_customer(), f"olá {queue}")
    queued = await until(admin, queue, waiting=2, active=0, available_agents=0)
    assert queued["longest_wait_seconds"] >= 0
    [listed] = queued["agents"]
    assert listed["id"] == agent and listed["presence"] == "away" and not listed["available"]

    response = await admin.put(
        f"/api/admin/agents/{agent}/presence", json={"presence": "available"}, headers=AUTH
    )
    assert response.status == 200, await response.text()
    # Offered is still waiting: an offer is not an assignment. Both offered fill her room.
    offered = await until(admin, queue, offers=2, waiting=2, active=0, available_agents=0)
    assert {o["agent_id"] for o in offered["offers"]} == {agent}
    assert offered["agents"][0]["used"] == 2 and offered["agents"][0]["capacity"] == 2

    accepted = await admin.post(
        f"/api/offers/{offered['offers'][0]['id']}/accept", headers=agent_auth
    )
    assert accepted.status == 200, await accepted.text()
    one = await until(admin, queue, offers=1, waiting=1, active=1)
    assert one["agents"][0]["active_conversations"] == 1
    accepted = await admin.post(
        f"/api/offers/{offered['offers'][1]['id']}/accept", headers=agent_auth
    )
    assert accepted.status == 200, await accepted.text()
    done = await until(admin, queue, waiting=0, active=2, available_agents=0)
    assert done["longest_wait_seconds"] is None and done["offers"] == []
    assert done["agents"][0]["active_conversations"] == 2


async def test_longest_wait_is_the_oldest_queued_or_offered(
    admin: Client, db: asyncpg.Pool, queue: str
) -> None:
    agent, _ = await new_agent(db, queues=[queue], capacity=3, used=1, presence="available")
    await seed(db, queue, "queued", queued=timedelta(seconds=90))
    offered = await seed(db, queue, "offered", queued=timedelta(seconds=200), agent=agent)
    offer = uuid.uuid4()
    now = datetime.now(UTC)
    await db.execute(
        "INSERT INTO offers (id, conversation_id, agent_id, units, created_at, expires_at)"
        " VALUES ($1, $2, $3, 1, $4, $5)",
        offer,
        offered,
        agent,
        now,
        now + timedelta(seconds=60),
    )
    # Neither assigned work nor a wait that ended counts; nor a conversation of a year ago.
    await seed(db, queue, "active", queued=timedelta(hours=1), assigned=timedelta(minutes=50))
    await seed(db, queue, "closed", queued=timedelta(days=365), closed=timedelta(days=364))
    found = await view(admin, queue)
    assert found["waiting"] == 2 and found["active"] == 1
    assert 200 <= found["longest_wait_seconds"] < 230
    [pending] = found["offers"]
    assert pending["id"] == str(offer) and pending["conversation_id"] == offered
    assert pending["agent_id"] == agent
    customer = await db.fetchval("SELECT customer FROM conversations WHERE id = $1", offered)
    assert pending["customer"] == customer
    general = await view(admin, "general")
    assert all(o["conversation_id"] != offered for o in general["offers"])


async def test_available_agents_need_presence_available_and_free_capacity(
    admin: Client, db: asyncpg.Pool, queue: str
) -> None:
    free, _ = await new_agent(
        db, queues=[queue, "general"], capacity=2, used=1, presence="available"
    )
    full, _ = await new_agent(db, queues=[queue], capacity=2, used=2, presence="available")
    await new_agent(db, queues=[queue], capacity=0, presence="available")
    busy, _ = await new_agent(db, queues=[queue], capacity=2, presence="busy")
    gone, _ = await new_agent(db, queues=[queue], capacity=2, presence="available")
    await db.execute("UPDATE agents SET deleted_at = now() WHERE id = $1", gone)
    await new_agent(db, queues=["billing"], capacity=2, presence="available")
    await seed(
        db, queue, "active", queued=timedelta(minutes=5), assigned=timedelta(minutes=4), agent=full
    )
    await seed(
        db, queue, "wrap-up", queued=timedelta(minutes=9), assigned=timedelta(minutes=8), agent=full
    )

    found = await view(admin, queue)
    assert found["available_agents"] == 1
    agents = {a["id"]: a for a in found["agents"]}
    assert len(agents) == 4 and gone not in agents
    assert agents[free]["available"] and (agents[free]["used"], agents[free]["capacity"]) == (1, 2)
    assert not agents[full]["available"] and agents[full]["active_conversations"] == 1
    assert agents[busy]["presence"] == "busy" and not agents[busy]["available"]
    # An agent of several queues is counted in each.
    assert free in {a["id"] for a in (await view(admin, "general"))["agents"]}


async def test_history_counts_what_waited_at_the_end_of_each_minute(
    admin: Client, db: asyncpg.Pool, queue: str
) -> None:
    minutes = timedelta(minutes=1)
    # Waiting still, since 30.5 minutes ago.
    await seed(db, queue, "queued", queued=30.5 * minutes)
    # Waited from 50.5 to 20.5 minutes ago, then assigned (still active).
    await seed(db, queue, "active", queued=50.5 * minutes, assigned=20.5 * minutes)
    # Waited from 10.5 minutes ago until closed (never assigned) 5.5 minutes ago.
    await seed(db, queue, "closed", queued=10.5 * minutes, closed=5.5 * minutes)
    # Waited and closed hours ago: outside the window.
    await seed(db, queue, "closed", queued=5 * 60 * minutes, closed=4 * 60 * minutes)

    response = await admin.get(HISTORY, headers=AUTH)
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["minutes"] == 60
    [series] = [s for s in body["queues"] if s["queue"] == queue]
    points = series["points"]
    assert len(points) == 60 and points[-1]["at"] == body["at"]
    waiting: list[int] = [p["waiting"] for p in points]

    def ago(m: int) -> int:
        return waiting[-1 - m]

    assert [ago(m) for m in (59, 51, 50, 31, 30, 21, 20, 11, 10, 6, 5, 0)] == [
        0, 0, 1, 1, 2, 2, 1, 1, 2, 2, 1, 1,
    ]  # fmt: skip
    assert body["queues"][0]["queue"] == queue  # configuration order

    longer = await admin.get(HISTORY, params={"minutes": "180"}, headers=AUTH)
    [series] = [s for s in (await longer.json())["queues"] if s["queue"] == queue]
    assert len(series["points"]) == 180 and series["points"][0]["waiting"] == 0


async def test_the_history_query_and_the_token_are_checked(admin: Client) -> None:
    for minutes in ["0", "181", "an hour", "-5"]:
        response = await admin.get(HISTORY, params={"minutes": minutes}, headers=AUTH)
        assert response.status == 422, await response.text()
        error = (await response.json())["error"]
        assert error["code"] == "invalid_query"
        assert [f["field"] for f in error["details"]["fields"]] == ["minutes"]
    for path in [QUEUES, HISTORY]:
        assert (await admin.get(path)).status == 401
        wrong = await admin.get(path, headers={"Authorization": "Bearer nope"})
        assert wrong.status == 401
