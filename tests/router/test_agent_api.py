"""The agent side end to end: offers pushed by the distribute stage, accepted, declined or
left to expire; pick mode; close and transfer; authorization of every agent endpoint."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from consumers import classify, conversations, distribute
from omniroute.infra.config_loader import LiveConfig, parse_config
from omniroute.infra.settings import Settings
from tests.consumers.conftest import RunnerFactory
from tests.support import (
    CONFIG_YAML,
    ENVIRON,
    EventTap,
    about,
    customer_writes,
    new_agent,
    new_customer,
    tap,
    wait_for,
)

# A queue per test run, so agents of other tests never take this run's work.
FAST_OFFERS = CONFIG_YAML.replace(
    "    language: pt-BR\n    timezone: America/Sao_Paulo\n    fallback_queue: general\n",
    "    language: pt-BR\n    timezone: America/Sao_Paulo\n    fallback_queue: general\n"
    "    distribution: {mode: push, offer_timeout: 1s, units: 1, keep_same_agent: true}\n",
)


@pytest.fixture
def config() -> LiveConfig:
    return LiveConfig(parse_config(FAST_OFFERS, "fast-offers.yaml", ENVIRON))


@pytest.fixture
async def stages(start_runner: RunnerFactory) -> None:
    await start_runner(conversations.STAGE)
    await start_runner(classify.STAGE, clock=lambda: datetime(2026, 11, 25, 15, tzinfo=UTC))
    await start_runner(distribute.STAGE, tick_interval=0.1)


@pytest.fixture
async def flow(settings: Settings) -> AsyncIterator[EventTap]:
    async with tap(settings.amqp_url.get_secret_value(), "conversation.*", "offer.*") as spy:
        yield spy


async def _next(spy: EventTap, kind: str, conversation_id: str | None = None) -> Any:
    async with asyncio.timeout(10):
        while True:
            event = await spy.next()
            if event["type"] == kind and conversation_id in (None, event["conversation_id"]):
                return event


async def _isolate(db: asyncpg.Pool) -> None:
    """Earlier tests leave agents and waiting work in 'billing': clear them out of the way.
    (Bulk updates beside a running distribute stage may deadlock with it: PostgreSQL aborts
    one side, and this side tries again.)"""
    for statement in (
        "UPDATE agents SET presence = 'offline' WHERE 'billing' = ANY(queues)",
        "UPDATE offers SET state = 'cancelled' WHERE state = 'pending'",
        "UPDATE conversations SET state = 'closed' WHERE state IN ('queued', 'offered')"
        " AND queue IN ('billing', 'sales')",
    ):
        for attempt in range(5):
            try:
                await db.execute(statement)
                break
            except asyncpg.DeadlockDetectedError:
                if attempt == 4:
                    raise


async def test_offer_accept_reply_close(
    router: TestClient[Any, Any], stages: None, flow: EventTap, db: asyncpg.Pool
) -> None:
    await _isolate(db)
    agent, auth = await new_agent(
        db, queues=["billing"], skills={"billing": 7}, presence="available"
    )
    customer = new_customer()
    await customer_writes(router, customer, "meu boleto venceu")
    offered = await _next(flow, "conversation.offered")
    assert offered["data"]["agent_id"] == agent
    offers = await (await router.get("/api/me/offers", headers=auth)).json()
    assert [o["id"] for o in offers] == [offered["data"]["offer_id"]]
    assert [(o["customer"], o["customer_name"]) for o in offers] == [(customer, "Maria")]

    accepted = await router.post(f"/api/offers/{offered['data']['offer_id']}/accept", headers=auth)
    assert accepted.status == 200, await accepted.text()
    mine = await (await router.get("/api/me/conversations", headers=auth)).json()
    assert [(c["id"], c["customer_name"]) for c in mine] == [(offered["conversation_id"], "Maria")]
    assigned = await _next(flow, "conversation.assigned", offered["conversation_id"])
    assert assigned["data"]["agent_id"] == agent and assigned["data"]["via"] == "offer"
    again = await router.post(f"/api/offers/{offered['data']['offer_id']}/accept", headers=auth)
    assert again.status == 409  # a double click does not assign twice

    conversation = await (
        await router.get(f"/api/conversations/{offered['conversation_id']}", headers=auth)
    ).json()
    assert conversation["window"]["open"] is True
    assert conversation["customer"] == customer
    messages = await (
        await router.get(f"/api/conversations/{offered['conversation_id']}/messages", headers=auth)
    ).json()
    assert [m["body"] for m in messages] == ["meu boleto venceu"]

    closed = await router.post(
        f"/api/conversations/{offered['conversation_id']}/close", headers=auth
    )
    assert closed.status == 200
    await _next(flow, "conversation.closed", offered["conversation_id"])
    used = await db.fetchval("SELECT used_units FROM agents WHERE id = $1", agent)
    assert used == 0


async def test_declined_offer_goes_to_the_next_agent_and_expired_too(
    router: TestClient[Any, Any], stages: None, flow: EventTap, db: asyncpg.Pool
) -> None:
    await _isolate(db)
    first, first_auth = await new_agent(
        db, queues=["billing"], skills={"billing": 9}, capacity=3, presence="available"
    )
    second, _ = await new_agent(
        db, queues=["billing"], skills={"billing": 9}, capacity=1, presence="available"
    )
    customer = new_customer()
    await customer_writes(router, customer, "boleto")
    offer = await _next(flow, "conversation.offered")
    assert offer["data"]["agent_id"] == first  # highest free capacity
    declined = await router.post(
        f"/api/offers/{offer['data']['offer_id']}/decline", headers=first_auth
    )
    assert declined.status == 200
    await _next(flow, "offer.declined", offer["conversation_id"])
    moved = await _next(flow, "conversation.offered", offer["conversation_id"])
    assert moved["data"]["agent_id"] == second
    # Nobody answers: the durable timer expires the offer within a second of its deadline.
    expired = await _next(flow, "offer.expired", offer["conversation_id"])
    deadline = datetime.fromisoformat(moved["data"]["expires_at"])
    lag = (datetime.fromisoformat(expired["occurred_at"]) - deadline).total_seconds()
    assert 0 <= lag < 1.0
    used = await db.fetchval("SELECT used_units FROM agents WHERE id = $1", second)
    assert used == 0


async def test_agents_only_reach_their_own_work(
    router: TestClient[Any, Any], stages: None, flow: EventTap, db: asyncpg.Pool
) -> None:
    await _isolate(db)
    owner, owner_auth = await new_agent(
        db, queues=["billing"], skills={"billing": 9}, presence="available"
    )
    _, other_auth = await new_agent(db, queues=["sales"], presence="offline")
    await customer_writes(router, new_customer(), "boleto")
    offer = await _next(flow, "conversation.offered")
    assert offer["data"]["agent_id"] == owner
    oid, cid = offer["data"]["offer_id"], offer["conversation_id"]
    for method, path in [
        ("POST", f"/api/offers/{oid}/accept"),
        ("POST", f"/api/offers/{oid}/decline"),
        ("GET", f"/api/conversations/{cid}"),
        ("GET", f"/api/conversations/{cid}/messages"),
        ("POST", f"/api/conversations/{cid}/close"),
        ("POST", f"/api/conversations/{cid}/transfer"),
        ("GET", "/api/queues/billing/items"),
        ("POST", f"/api/queue-items/{cid}/pick"),
    ]:
        response = await router.request(method, path, headers=other_auth, json={"queue": "sales"})
        assert response.status == 404, (method, path, response.status)
    for method, path in [
        ("GET", "/api/me"),
        ("GET", "/api/me/offers"),
        ("GET", f"/api/conversations/{cid}"),
    ]:
        anonymous = await router.request(method, path)
        assert anonymous.status == 401
        forged = await router.request(method, path, headers={"Authorization": "Bearer nope"})
        assert forged.status == 401
    me = await (await router.get("/api/me", headers=owner_auth)).json()
    assert me["id"] == owner and "token" not in me and "token_hash" not in me


async def test_presence_change_triggers_distribution(
    router: TestClient[Any, Any], stages: None, flow: EventTap, db: asyncpg.Pool
) -> None:
    await _isolate(db)
    agent, auth = await new_agent(db, queues=["billing"], skills={"billing": 9}, presence="away")
    await customer_writes(router, new_customer(), "boleto")
    queued = await _next(flow, "conversation.queued")
    # Nobody available: it waits.
    await flow.expect_none(within=0.4, where=about(conversation_id=queued["conversation_id"]))
    response = await router.put("/api/me/presence", headers=auth, json={"presence": "available"})
    assert response.status == 200
    offered = await _next(flow, "conversation.offered", queued["conversation_id"])
    assert offered["data"]["agent_id"] == agent
    bad = await router.put("/api/me/presence", headers=auth, json={"presence": "sleeping"})
    assert bad.status == 422


async def test_transfer_puts_the_conversation_in_another_queue(
    router: TestClient[Any, Any], stages: None, flow: EventTap, db: asyncpg.Pool
) -> None:
    await _isolate(db)
    agent, auth = await new_agent(
        db, queues=["billing"], skills={"billing": 9}, presence="available"
    )
    await customer_writes(router, new_customer(), "boleto")
    offer = await _next(flow, "conversation.offered")
    await router.post(f"/api/offers/{offer['data']['offer_id']}/accept", headers=auth)
    await _next(flow, "conversation.assigned", offer["conversation_id"])
    moved = await router.post(
        f"/api/conversations/{offer['conversation_id']}/transfer",
        headers=auth,
        json={"queue": "general"},
    )
    assert moved.status == 200, await moved.text()
    transferred = await _next(flow, "conversation.transferred", offer["conversation_id"])
    assert transferred["data"]["to_queue"] == "general"
    assert await db.fetchval("SELECT used_units FROM agents WHERE id = $1", agent) == 0
    unknown = await router.post(
        f"/api/conversations/{offer['conversation_id']}/transfer",
        headers=auth,
        json={"queue": "nowhere"},
    )
    assert unknown.status == 404  # no longer this agent's conversation


async def test_pick_mode_lists_and_picks_once(
    router: TestClient[Any, Any], stages: None, flow: EventTap, db: asyncpg.Pool
) -> None:
    # support-en is not in push mode here: make it pick mode through the sandbox number.
    _, auth = await new_agent(db, queues=["general"], capacity=1, presence="offline")
    _, rival_auth = await new_agent(db, queues=["general"], capacity=1, presence="offline")
    await db.execute(
        "UPDATE conversations SET state = 'closed' WHERE queue = 'general' AND state = 'queued'"
    )
    await customer_writes(router, new_customer(), "hi")
    queued = await _next(flow, "conversation.queued")
    items = await (await router.get("/api/queues/general/items", headers=auth)).json()
    assert queued["conversation_id"] in [i["id"] for i in items]
    first, second = await asyncio.gather(
        router.post(f"/api/queue-items/{queued['conversation_id']}/pick", headers=auth),
        router.post(f"/api/queue-items/{queued['conversation_id']}/pick", headers=rival_auth),
    )
    assert sorted([first.status, second.status]) == [200, 409]
    await wait_for(
        lambda: db.fetchval(
            "SELECT count(*) FROM assignments WHERE conversation_id = $1", queued["conversation_id"]
        )
    )
    assert (
        await db.fetchval(
            "SELECT count(*) FROM assignments WHERE conversation_id = $1", queued["conversation_id"]
        )
        == 1
    )


async def test_transfer_to_another_agent_offers_it_to_them(
    router: TestClient[Any, Any], stages: None, flow: EventTap, db: asyncpg.Pool
) -> None:
    await _isolate(db)
    first, first_auth = await new_agent(
        db, queues=["billing"], skills={"billing": 9}, presence="available"
    )
    second, second_auth = await new_agent(db, queues=["sales"], presence="offline")
    await customer_writes(router, new_customer(), "boleto")
    offer = await _next(flow, "conversation.offered")
    cid = offer["conversation_id"]
    await router.post(f"/api/offers/{offer['data']['offer_id']}/accept", headers=first_auth)
    await _next(flow, "conversation.assigned", cid)
    both = await router.post(
        f"/api/conversations/{cid}/transfer",
        headers=first_auth,
        json={"queue": "general", "agent_id": second},
    )
    assert both.status == 422
    # Refused with the reason, and the conversation stays with its agent: offline, then not
    # in the conversation's queue.
    for fix, code in (
        ("UPDATE agents SET presence = 'available' WHERE id = $1", "agent_unavailable"),
        ("UPDATE agents SET queues = '{billing}' WHERE id = $1", "agent_not_in_queue"),
    ):
        refused = await router.post(
            f"/api/conversations/{cid}/transfer", headers=first_auth, json={"agent_id": second}
        )
        assert refused.status == 409
        assert (await refused.json())["error"]["code"] == code
        still = await db.fetchrow("SELECT state, agent_id FROM conversations WHERE id = $1", cid)
        assert still is not None
        assert (still["state"], str(still["agent_id"])) == ("active", first)
        await db.execute(fix, second)
    moved = await router.post(
        f"/api/conversations/{cid}/transfer", headers=first_auth, json={"agent_id": second}
    )
    assert moved.status == 200, await moved.text()
    transferred = await _next(flow, "conversation.transferred", cid)
    assert transferred["data"]["to_agent"] == second
    offered = await _next(flow, "conversation.offered", cid)
    assert offered["data"]["agent_id"] == second
    accepted = await router.post(
        f"/api/offers/{offered['data']['offer_id']}/accept", headers=second_auth
    )
    assert accepted.status == 200
    assert await db.fetchval("SELECT used_units FROM agents WHERE id = $1", first) == 0
    assert await db.fetchval("SELECT agent_id FROM conversations WHERE id = $1", cid) == (
        uuid.UUID(second)
    )


async def test_a_parked_conversation_comes_back_to_its_agent_when_the_customer_writes(
    router: TestClient[Any, Any], stages: None, flow: EventTap, db: asyncpg.Pool
) -> None:
    await _isolate(db)
    owner, owner_auth = await new_agent(
        db, queues=["billing"], skills={"billing": 9}, presence="available"
    )
    customer = new_customer()
    await customer_writes(router, customer, "boleto")
    offer = await _next(flow, "conversation.offered")
    cid = offer["conversation_id"]
    assert offer["data"]["agent_id"] == owner
    # A roomier colleague joins: without affinity the conversation would go to them.
    await new_agent(db, queues=["billing"], skills={"billing": 9}, capacity=9, presence="available")
    await router.post(f"/api/offers/{offer['data']['offer_id']}/accept", headers=owner_auth)
    await _next(flow, "conversation.assigned", cid)
    parked = await router.post(f"/api/conversations/{cid}/wait", headers=owner_auth)
    assert parked.status == 200, await parked.text()
    assert await db.fetchval("SELECT state FROM conversations WHERE id = $1", cid) == "waiting"
    assert await db.fetchval("SELECT used_units FROM agents WHERE id = $1", owner) == 0
    await customer_writes(router, customer, "voltei, e aí?")
    back = await _next(flow, "conversation.offered", cid)
    assert back["data"]["agent_id"] == owner and back["data"]["affinity"] is True
