"""The supervisor's admin API over HTTP against the real database and broker: transfer, close,
end an offer, set presence and remove an agent, each refusal with its code and nothing
changed, each action audited as ``supervisor.acted`` naming the actor; a removed agent's
conversation rescued by another agent of its queue (the stages running); one action under an
``Idempotency-Key``; the conversation list a supervisor reads (by agent, how long, who
declined).

Each test has a queue of its own (routed to by a word in the customer's message), so the work
of other tests never meets its agents.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from consumers import classify, conversations, distribute
from omniroute.infra.config_loader import LiveConfig, parse_config
from omniroute.infra.settings import Settings
from router.app import create_app
from router.state import BUS
from tests.conftest import Infra, RunnerFactory, make_settings
from tests.support import (
    BUSINESS,
    CONFIG_YAML,
    ENVIRON,
    EventTap,
    customer_writes,
    new_agent,
    new_customer,
    tap,
)

Client = TestClient[Any, Any]
ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CONVERSATIONS = "/api/admin/conversations"


def _as(actor: str) -> dict[str, str]:
    return {**AUTH, "X-Omniroute-Actor": actor}


@pytest.fixture
def queue() -> str:
    return f"sup{uuid.uuid4().hex[:10]}"


def supervised_config(queue: str) -> str:
    """The test configuration plus ``queue``, routed to by its name in a message;
    support-pt requeues an agent's conversations when it goes offline."""
    text = CONFIG_YAML.replace(
        "    routing:\n",
        "    routing:\n"
        f"      - {{name: {queue}, when: {{field: body, op: contains, value: {queue}}},"
        f" queue: {queue}}}\n",
        1,
    )
    text = text.replace("\nqueues:\n", f"\nqueues:\n  - {{name: {queue}}}\n", 1)
    return text.replace(
        "    fallback_queue: general\n    classification:",
        "    fallback_queue: general\n    distribution: {on_agent_offline: requeue}\n"
        "    classification:",
        1,
    )


@pytest.fixture
def config(queue: str) -> LiveConfig:
    return LiveConfig(parse_config(supervised_config(queue), "supervisor.yaml", ENVIRON))


@pytest.fixture
async def admin(infra: Infra, config: LiveConfig) -> AsyncIterator[Client]:
    app = create_app(make_settings(infra, admin_token=ADMIN_TOKEN), config)
    async with TestClient(TestServer(app)) as client:
        async with asyncio.timeout(10):
            await app[BUS].wait_ready()
        yield client


@pytest.fixture
async def events(settings: Settings) -> AsyncIterator[EventTap]:
    keys = ("supervisor.acted", "conversation.*", "offer.*")
    async with tap(settings.amqp_url.get_secret_value(), *keys) as spy:
        yield spy


def _is(kind: str, conversation_id: str | None = None) -> Callable[[dict[str, Any]], bool]:
    def match(event: dict[str, Any]) -> bool:
        return event["type"] == kind and conversation_id in (None, event["conversation_id"])

    return match


async def _await_all(
    events: EventTap, *wanted: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> list[dict[str, Any]]:
    """The first event matching each of ``wanted``, in that order, whatever order they
    arrive in."""
    found: list[dict[str, Any] | None] = [None] * len(wanted)
    async with asyncio.timeout(timeout):
        while None in found:
            event = await events.next(timeout=timeout)
            for n, match in enumerate(wanted):
                if found[n] is None and match(event):
                    found[n] = event
                    break
    return [event for event in found if event is not None]


async def seed_conversation(
    db: asyncpg.Pool,
    queue: str,
    *,
    state: str = "queued",
    agent: str | None = None,
    waited: float = 30.0,
) -> str:
    """A conversation of support-pt in ``queue``, queued ``waited`` seconds ago; ``active``
    with ``agent`` holds an assignment of one unit of that agent's capacity."""
    contact, conversation = uuid.uuid4(), uuid.uuid4()
    customer, now = new_customer(), datetime.now(UTC)
    await db.execute(
        "INSERT INTO contacts (id, account, address, profile_name)"
        " VALUES ($1, 'contoso', $2, 'Ana')",
        contact,
        customer,
    )
    await db.execute(
        "INSERT INTO conversations (id, account, business_number, customer, contact_id,"
        " workstream, state, opened_at, last_customer_message_at, queue, queued_at, agent_id,"
        " assigned_at, closed_at) VALUES ($1, 'contoso', $2, $3, $4, 'support-pt', $5, $6, $6,"
        " $7, $8, $9, CASE WHEN $9::uuid IS NULL THEN NULL ELSE $6::timestamptz END,"
        " CASE WHEN $5::text = 'closed' THEN $6::timestamptz END)",
        conversation,
        BUSINESS,
        customer,
        contact,
        state,
        now,
        queue,
        now - timedelta(seconds=waited),
        agent,
    )
    if agent is not None and state == "active":
        await db.execute(
            "INSERT INTO assignments (id, conversation_id, agent_id, units, assigned_at)"
            " VALUES ($1, $2, $3, 1, $4)",
            uuid.uuid4(),
            conversation,
            agent,
            now,
        )
        await db.execute("UPDATE agents SET used_units = used_units + 1 WHERE id = $1", agent)
    return str(conversation)


async def _error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    body: dict[str, Any] = (await response.json())["error"]
    assert body["code"] == code, body
    return body


async def test_transfer_to_a_queue_is_audited_with_the_actor(
    admin: Client, db: asyncpg.Pool, events: EventTap, queue: str
) -> None:
    cid = await seed_conversation(db, queue)
    response = await admin.post(
        f"{CONVERSATIONS}/{cid}/transfer",
        json={"queue": "general", "reason": "needs a generalist"},
        headers=_as("alice"),
    )
    assert response.status == 200, await response.text()
    assert await response.json() == {
        "conversation_id": cid,
        "state": "queued",
        "queue": "general",
        "agent_id": None,
    }
    acted, moved = await _await_all(
        events, _is("supervisor.acted", cid), _is("conversation.transferred", cid)
    )
    assert acted["data"]["actor"] == "alice"
    assert acted["data"]["action"] == "transfer"
    assert acted["data"]["to_queue"] == "general"
    assert acted["data"]["reason"] == "needs a generalist"
    assert moved["data"]["by"] == "alice" and moved["data"]["to_queue"] == "general"
    row = await db.fetchrow("SELECT state, queue FROM conversations WHERE id = $1", cid)
    assert row is not None and dict(row) == {"state": "queued", "queue": "general"}


async def test_transfer_refusals_change_nothing(
    admin: Client, db: asyncpg.Pool, queue: str
) -> None:
    cid = await seed_conversation(db, queue)
    path = f"{CONVERSATIONS}/{cid}/transfer"
    offline, _ = await new_agent(db, queues=[queue], presence="offline")
    elsewhere, _ = await new_agent(db, queues=["general"], capacity=0, presence="available")
    full, _ = await new_agent(db, queues=[queue], capacity=0, presence="available")
    for agent, status, code in [
        (offline, 409, "agent_unavailable"),
        (elsewhere, 409, "agent_not_in_queue"),
        (full, 409, "no_capacity"),
        (str(uuid.uuid4()), 404, "not_found"),
    ]:
        response = await admin.post(path, json={"agent_id": agent}, headers=AUTH)
        await _error(response, status, code)
    unknown = await _error(
        await admin.post(path, json={"queue": "nowhere"}, headers=AUTH), 422, "unknown_queue"
    )
    assert "nowhere" in unknown["message"] and queue in unknown["details"]["known"]
    for body in [{"queue": "general", "agent_id": offline}, {}, {"queue": "general", "x": 1}]:
        await _error(await admin.post(path, json=body, headers=AUTH), 422, "invalid_body")
    for missing in [str(uuid.uuid4()), "not-a-uuid"]:
        response = await admin.post(
            f"{CONVERSATIONS}/{missing}/transfer", json={"queue": "general"}, headers=AUTH
        )
        await _error(response, 404, "not_found")
    closed = await seed_conversation(db, queue, state="closed")
    response = await admin.post(
        f"{CONVERSATIONS}/{closed}/transfer", json={"queue": "general"}, headers=AUTH
    )
    await _error(response, 409, "already_closed")
    row = await db.fetchrow("SELECT state, queue, agent_id FROM conversations WHERE id = $1", cid)
    assert row is not None
    assert dict(row) == {"state": "queued", "queue": queue, "agent_id": None}
    assert await db.fetchval("SELECT count(*) FROM offers WHERE conversation_id = $1", cid) == 0
    audited = await db.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'supervisor.acted'"
        " AND body->>'conversation_id' = $1",
        cid,
    )
    assert audited == 0


async def test_transfer_to_an_agent_offers_it_and_a_supervisor_ends_the_offer(
    admin: Client, db: asyncpg.Pool, events: EventTap, queue: str
) -> None:
    cid = await seed_conversation(db, queue, waited=90)
    agent, _ = await new_agent(db, queues=[queue], capacity=2, presence="available")
    response = await admin.post(
        f"{CONVERSATIONS}/{cid}/transfer", json={"agent_id": agent}, headers=_as("bob")
    )
    assert response.status == 200, await response.text()
    assert await response.json() == {
        "conversation_id": cid,
        "state": "offered",
        "queue": None,
        "agent_id": agent,
    }
    offered = await events.next(where=_is("conversation.offered", cid))
    assert offered["data"]["agent_id"] == agent
    offer_id = offered["data"]["offer_id"]

    ended = await admin.post(f"/api/admin/offers/{offer_id}/end", headers=_as("bob"))
    assert ended.status == 200, await ended.text()
    assert await ended.json() == {"offer_id": offer_id, "conversation_id": cid, "state": "queued"}
    acted = await events.next(
        where=lambda e: _is("supervisor.acted", cid)(e) and e["data"]["action"] == "end_offer"
    )
    assert acted["data"]["actor"] == "bob" and acted["data"]["offer_id"] == offer_id
    assert acted["data"]["agent_id"] == agent
    again = await admin.post(f"/api/admin/offers/{offer_id}/end", headers=AUTH)
    await _error(again, 409, "offer_closed")
    for missing in [str(uuid.uuid4()), "not-a-uuid"]:
        await _error(
            await admin.post(f"/api/admin/offers/{missing}/end", headers=AUTH), 404, "not_found"
        )
    assert await db.fetchval("SELECT used_units FROM agents WHERE id = $1", agent) == 0

    # The supervisor's view: who waits in the queue, how long, and who declined this round.
    listed = await admin.get(CONVERSATIONS, params={"queue": queue}, headers=AUTH)
    [item] = await listed.json()
    assert item["id"] == cid and item["state"] == "queued"
    assert item["declined_by"] == [agent]
    assert 90 <= item["wait_seconds"] < 120


async def test_close_any_conversation(
    admin: Client, db: asyncpg.Pool, events: EventTap, queue: str
) -> None:
    cid = await seed_conversation(db, queue)
    response = await admin.post(f"{CONVERSATIONS}/{cid}/close", headers=AUTH)
    assert response.status == 200, await response.text()
    assert (await response.json())["state"] == "closed"
    acted, closed = await _await_all(
        events, _is("supervisor.acted", cid), _is("conversation.closed", cid)
    )
    assert acted["data"]["actor"] == "admin" and acted["data"]["action"] == "close"
    assert closed["data"]["reason"] == "supervisor"
    again = await admin.post(f"{CONVERSATIONS}/{cid}/close", json={}, headers=AUTH)
    await _error(again, 409, "already_closed")
    for missing in [str(uuid.uuid4()), "nope"]:
        await _error(
            await admin.post(f"{CONVERSATIONS}/{missing}/close", headers=AUTH), 404, "not_found"
        )
    other = await seed_conversation(db, queue)
    bad = await admin.post(f"{CONVERSATIONS}/{other}/close", json={"reason": ""}, headers=AUTH)
    await _error(bad, 422, "invalid_body")


async def test_the_actor_header_is_checked(admin: Client, db: asyncpg.Pool, queue: str) -> None:
    cid = await seed_conversation(db, queue)
    for actor in ["x" * 101, "tab\there"]:
        response = await admin.post(f"{CONVERSATIONS}/{cid}/close", headers=_as(actor))
        await _error(response, 400, "invalid_actor")
    assert await db.fetchval("SELECT state FROM conversations WHERE id = $1", cid) == "queued"
    response = await admin.post(f"{CONVERSATIONS}/{cid}/close", headers=_as("x" * 100))
    assert response.status == 200


async def test_a_close_under_an_idempotency_key_happens_once(
    admin: Client, db: asyncpg.Pool, queue: str
) -> None:
    cid = await seed_conversation(db, queue)
    path = f"{CONVERSATIONS}/{cid}/close"
    headers = {**_as("erin"), "Idempotency-Key": f"close-{cid}"}
    first = await admin.post(path, json={"reason": "spam"}, headers=headers)
    retry = await admin.post(path, json={"reason": "spam"}, headers=headers)
    assert first.status == retry.status == 200
    assert (
        await first.json()
        == await retry.json()
        == {
            "conversation_id": cid,
            "state": "closed",
            "queue": None,
            "agent_id": None,
        }
    )
    audited = await db.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'supervisor.acted'"
        " AND body->>'conversation_id' = $1",
        cid,
    )
    assert audited == 1
    other = await admin.post(path, json={"reason": "abuse"}, headers=headers)
    await _error(other, 422, "idempotency_key_reused")


async def test_presence_offline_requeues_under_the_workstreams_policy(
    admin: Client, db: asyncpg.Pool, events: EventTap, queue: str
) -> None:
    agent, _ = await new_agent(db, queues=[queue], capacity=2, presence="available")
    cid = await seed_conversation(db, queue, state="active", agent=agent)
    await seed_conversation(db, queue, state="closed", agent=agent)
    held = await admin.get(CONVERSATIONS, params={"agent": agent}, headers=AUTH)
    [item] = await held.json()  # without a state: what the agent holds now
    assert item["id"] == cid and item["state"] == "active" and item["wait_seconds"] is None
    bad = await admin.get(CONVERSATIONS, params={"agent": "someone"}, headers=AUTH)
    details = (await _error(bad, 422, "invalid_query"))["details"]
    assert [f["field"] for f in details["fields"]] == ["agent"]

    response = await admin.put(
        f"/api/admin/agents/{agent}/presence", json={"presence": "offline"}, headers=_as("dave")
    )
    assert response.status == 200, await response.text()
    answer = await response.json()
    assert answer["id"] == agent and answer["presence"] == "offline" and answer["used"] == 0
    moved, acted = await _await_all(
        events,
        _is("conversation.transferred", cid),
        lambda e: e["type"] == "supervisor.acted" and e["data"].get("agent_id") == agent,
    )
    assert moved["data"]["reason"] == "agent_offline" and moved["data"]["from_agent"] == agent
    assert acted["data"]["action"] == "set_presence" and acted["data"]["actor"] == "dave"
    assert acted["data"]["presence"] == "offline"
    assert await db.fetchval("SELECT state FROM conversations WHERE id = $1", cid) == "queued"

    path = f"/api/admin/agents/{agent}/presence"
    await _error(
        await admin.put(path, json={"presence": "asleep"}, headers=AUTH), 422, "invalid_body"
    )
    for missing in [str(uuid.uuid4()), "nobody"]:
        response = await admin.put(
            f"/api/admin/agents/{missing}/presence", json={"presence": "away"}, headers=AUTH
        )
        await _error(response, 404, "not_found")


async def test_a_removed_agents_conversation_is_rescued_by_another_agent(
    admin: Client,
    db: asyncpg.Pool,
    events: EventTap,
    queue: str,
    start_runner: RunnerFactory,
) -> None:
    await start_runner(conversations.STAGE)
    await start_runner(classify.STAGE)
    await start_runner(distribute.STAGE, tick_interval=0.1)
    first, first_auth = await new_agent(db, queues=[queue], capacity=1, presence="available")
    await customer_writes(admin, new_customer(), f"preciso de ajuda {queue}")
    offered = await events.next(
        timeout=10,
        where=lambda e: e["type"] == "conversation.offered" and e["data"]["agent_id"] == first,
    )
    cid = offered["conversation_id"]
    accepted = await admin.post(
        f"/api/offers/{offered['data']['offer_id']}/accept", headers=first_auth
    )
    assert accepted.status == 200, await accepted.text()
    await events.next(timeout=10, where=_is("conversation.assigned", cid))
    second, _ = await new_agent(db, queues=[queue], capacity=1, presence="available")

    removed = await admin.delete(f"/api/admin/agents/{first}", headers=_as("carol"))
    assert removed.status == 204, await removed.text()
    moved, acted, rescued = await _await_all(
        events,
        _is("conversation.transferred", cid),
        lambda e: e["type"] == "supervisor.acted" and e["data"].get("agent_id") == first,
        _is("conversation.offered", cid),
    )
    assert moved["data"]["reason"] == "agent_removed"
    assert moved["data"]["from_agent"] == first and moved["data"]["by"] == "carol"
    assert acted["data"]["action"] == "remove_agent" and acted["data"]["actor"] == "carol"
    assert rescued["data"]["agent_id"] == second

    listed = await admin.get(CONVERSATIONS, params={"agent": second}, headers=AUTH)
    [item] = await listed.json()
    assert item["id"] == cid and item["state"] == "offered" and item["wait_seconds"] >= 0
    assert item["declined_by"] == [first]
    gone = await admin.delete(f"/api/admin/agents/{first}", headers=AUTH)
    await _error(gone, 404, "not_found")
