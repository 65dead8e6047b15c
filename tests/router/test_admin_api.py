"""The admin API over HTTP against the real database and broker: the admin token, agents
(token shown once, strict bodies, partial updates, soft delete, idempotent creation,
presence events) and the conversation views."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from omniroute.domain.agents import agent_by_token
from omniroute.infra.config_loader import LiveConfig
from omniroute.infra.settings import Settings
from omniroute.infra.store import Store
from router.app import create_app
from router.auth import current_agent
from router.state import BUS
from schemas.events import event_id
from tests.conftest import Infra, make_settings
from tests.support import BUSINESS, new_customer, tap, wait_for

Client = TestClient[Any, Any]
ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
AGENTS = "/api/admin/agents"
WHOAMI = "/test/whoami"


async def _whoami(request: web.Request) -> web.Response:
    """A probe behind ``current_agent``, as every agent endpoint is."""
    agent = await current_agent(request)
    return web.json_response({"id": str(agent["id"])})


@contextlib.asynccontextmanager
async def _admin_router(
    infra: Infra, config: LiveConfig, admin_token: str | None
) -> AsyncIterator[Client]:
    settings = make_settings(infra, admin_token=admin_token)
    app = create_app(settings, config)
    app.router.add_get(WHOAMI, _whoami)
    async with TestClient(TestServer(app)) as client:
        async with asyncio.timeout(10):
            await app[BUS].wait_ready()
        yield client


@pytest.fixture
async def admin(infra: Infra, config: LiveConfig) -> AsyncIterator[Client]:
    async with _admin_router(infra, config, ADMIN_TOKEN) as client:
        yield client


def _name() -> str:
    return f"agent-{uuid.uuid4().hex[:10]}"


def _new_agent(**overrides: Any) -> dict[str, Any]:
    # Capacity 0 by default: agents made available here never take other tests' work.
    body: dict[str, Any] = {
        "name": _name(),
        "queues": ["general"],
        "skills": {"billing": 7},
        "capacity": 0,
    }
    body.update(overrides)
    return body


async def _create(admin: Client, **overrides: Any) -> dict[str, Any]:
    response = await admin.post(AGENTS, json=_new_agent(**overrides), headers=AUTH)
    assert response.status == 201, await response.text()
    created: dict[str, Any] = await response.json()
    return created


async def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body: dict[str, Any] = (await response.json())["error"]
    assert set(body) == {"code", "message", "details"}
    return body


def _fields(error: dict[str, Any]) -> set[str]:
    return {f["field"] for f in error["details"]["fields"]}


async def test_every_admin_call_needs_the_admin_token(admin: Client) -> None:
    agent = await _create(admin)
    calls = [
        ("GET", AGENTS),
        ("POST", AGENTS),
        ("GET", f"{AGENTS}/{agent['id']}"),
        ("PATCH", f"{AGENTS}/{agent['id']}"),
        ("DELETE", f"{AGENTS}/{agent['id']}"),
        ("GET", "/api/admin/conversations"),
        ("GET", f"/api/admin/conversations/{uuid.uuid4()}"),
    ]
    for method, path in calls:
        missing = await admin.request(method, path, json={"presence": "away"})
        assert (await _error(missing, 401))["code"] == "unauthorized", (method, path)
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        for wrong in (f"Bearer {ADMIN_TOKEN}x", "Bearer ", f"Basic {ADMIN_TOKEN}", agent["token"]):
            response = await admin.request(method, path, headers={"Authorization": wrong})
            assert response.status == 401, (method, path, wrong)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    # The agent's own token is no admin token, and nothing above changed the agent.
    still = await admin.get(f"{AGENTS}/{agent['id']}", headers=AUTH)
    assert still.status == 200
    assert (await still.json())["presence"] == "offline"


async def test_without_an_admin_token_the_admin_api_is_disabled(
    infra: Infra, config: LiveConfig
) -> None:
    async with _admin_router(infra, config, None) as client:
        for headers in ({}, AUTH, {"Authorization": "Bearer "}):
            response = await client.get(AGENTS, headers=headers)
            assert (await _error(response, 503))["code"] == "admin_disabled"


async def test_create_shows_the_token_once(admin: Client, store: Store) -> None:
    body = _new_agent(queues=["general", "billing", "general"], language="pt-BR", capacity=3)
    response = await admin.post(AGENTS, json=body, headers=AUTH)
    assert response.status == 201
    created = await response.json()
    token = created.pop("token")
    assert token.startswith("omr_") and len(token) > 40
    assert created["name"] == body["name"]
    assert created["queues"] == ["general", "billing"]
    assert created["skills"] == {"billing": 7}
    assert (created["capacity"], created["used"]) == (3, 0)
    assert created["presence"] == "offline"
    assert created["language"] == "pt-BR"
    assert created["last_assigned_at"] is None
    datetime.fromisoformat(created["created_at"])
    uuid.UUID(created["id"])

    shown = await (await admin.get(f"{AGENTS}/{created['id']}", headers=AUTH)).json()
    assert shown == created
    listed = await (await admin.get(AGENTS, headers=AUTH)).json()
    assert created in listed
    assert all("token" not in a and "token_hash" not in a for a in listed)

    async with store.transaction() as conn:
        stored = await conn.fetchval("SELECT token_hash FROM agents WHERE id = $1", created["id"])
        found = await agent_by_token(conn, token)
        assert await agent_by_token(conn, token + "x") is None
    assert stored == hashlib.sha256(token.encode()).hexdigest()
    assert found is not None and str(found["id"]) == created["id"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({"queus": ["general"]}, "queus", id="unknown key"),
        pytest.param({"skills": {"billing": 11}}, "skills.billing", id="skill level 11"),
        pytest.param({"skills": {"billing": 0}}, "skills.billing", id="skill level 0"),
        pytest.param({"capacity": -1}, "capacity", id="negative capacity"),
        pytest.param({"name": ""}, "name", id="empty name"),
        pytest.param({"name": "x" * 101}, "name", id="long name"),
        pytest.param({"capacity": None}, "capacity", id="capacity null"),
        pytest.param({"queues": "general"}, "queues", id="queues not a list"),
    ],
)
async def test_invalid_agents_are_422_naming_the_field(
    admin: Client, body: dict[str, Any], field: str
) -> None:
    response = await admin.post(AGENTS, json=_new_agent(**body), headers=AUTH)
    error = await _error(response, 422)
    assert error["code"] == "invalid_body"
    assert field in _fields(error)


async def test_missing_fields_unknown_queues_and_bad_json(admin: Client, db: asyncpg.Pool) -> None:
    error = await _error(await admin.post(AGENTS, json={}, headers=AUTH), 422)
    assert {"name", "capacity"} <= _fields(error)

    name = _name()
    response = await admin.post(
        AGENTS, json=_new_agent(name=name, queues=["general", "nowhere", "gone"]), headers=AUTH
    )
    error = await _error(response, 422)
    assert error["code"] == "unknown_queue"
    assert error["details"]["unknown"] == ["nowhere", "gone"]
    assert error["details"]["known"] == ["billing", "general", "sales"]
    assert "nowhere" in error["message"] and "queues" in _fields(error)
    assert await db.fetchval("SELECT count(*) FROM agents WHERE name = $1", name) == 0

    bad = await admin.post(
        AGENTS, data=b"{not json", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert (await _error(bad, 400))["code"] == "invalid_json"


async def test_patch_changes_only_what_is_sent(admin: Client) -> None:
    agent = await _create(admin, language="en")
    path = f"{AGENTS}/{agent['id']}"
    response = await admin.patch(
        path, json={"queues": ["billing", "sales"], "skills": {"sales": 4}}, headers=AUTH
    )
    assert response.status == 200
    changed = await response.json()
    assert changed["queues"] == ["billing", "sales"]
    assert changed["skills"] == {"sales": 4}
    assert (changed["name"], changed["capacity"], changed["language"]) == (
        agent["name"],
        0,
        "en",
    )
    assert datetime.fromisoformat(changed["updated_at"]) > datetime.fromisoformat(
        agent["updated_at"]
    )

    new_name = _name()
    response = await admin.patch(
        path, json={"name": new_name, "capacity": 5, "language": None}, headers=AUTH
    )
    changed = await response.json()
    assert (changed["name"], changed["capacity"], changed["language"]) == (new_name, 5, None)
    assert changed["queues"] == ["billing", "sales"]
    assert await (await admin.get(path, headers=AUTH)).json() == changed

    for body, field in [
        ({"capacity": -2}, "capacity"),
        ({"presense": "away"}, "presense"),
        ({"presence": "sleeping"}, "presence"),
        ({"skills": {"x": 11}}, "skills.x"),
    ]:
        error = await _error(await admin.patch(path, json=body, headers=AUTH), 422)
        assert field in _fields(error), body
    for body in ({}, {"name": None}):
        error = await _error(await admin.patch(path, json=body, headers=AUTH), 422)
        assert error["code"] == "invalid_body"
    error = await _error(await admin.patch(path, json={"queues": ["nope"]}, headers=AUTH), 422)
    assert error["code"] == "unknown_queue"
    assert await (await admin.get(path, headers=AUTH)).json() == changed

    for missing in (str(uuid.uuid4()), "not-a-uuid"):
        response = await admin.patch(f"{AGENTS}/{missing}", json={"capacity": 1}, headers=AUTH)
        assert (await _error(response, 404))["code"] == "not_found"


async def test_a_presence_change_publishes_agent_presence_changed(
    admin: Client, settings: Settings, db: asyncpg.Pool
) -> None:
    agent = await _create(admin, queues=["sales"])
    path = f"{AGENTS}/{agent['id']}"
    async with tap(settings.amqp_url.get_secret_value(), "agent.presence-changed") as spy:
        response = await admin.patch(path, json={"presence": "available"}, headers=AUTH)
        assert response.status == 200
        changed = await response.json()
        event = await spy.next()
        assert event["type"] == "agent.presence-changed"
        assert event["account"] == "*" and event["conversation_id"] is None
        assert event["data"] == {
            "agent_id": agent["id"],
            "presence": "available",
            "previous": "offline",
            "queues": ["sales"],
        }
        at = datetime.fromisoformat(changed["updated_at"]).isoformat()
        assert event["id"] == event_id("agent.presence-changed", agent["id"], at)
        # The relay's watermark passes the row once the broker confirmed it.
        await wait_for(
            lambda: db.fetchval(
                "SELECT (o.txid, o.seq) <= (w.txid, w.seq) FROM outbox o, outbox_watermark w"
                " WHERE o.id = $1",
                event["id"],
            )
        )

        # The same presence again, or other fields: no event.
        await admin.patch(path, json={"presence": "available", "capacity": 0}, headers=AUTH)
        await admin.patch(path, json={"queues": ["general"]}, headers=AUTH)
        await spy.expect_none(0.5)

        # Removing an agent that was not offline takes it offline, and says so.
        assert (await admin.delete(path, headers=AUTH)).status == 204
        gone = await spy.next()
        assert gone["data"]["agent_id"] == agent["id"]
        assert (gone["data"]["presence"], gone["data"]["previous"]) == ("offline", "available")


async def test_delete_removes_the_agent_and_its_token(admin: Client, store: Store) -> None:
    agent = await _create(admin)
    path = f"{AGENTS}/{agent['id']}"
    response = await admin.delete(path, headers=AUTH)
    assert response.status == 204
    for method in ("GET", "PATCH", "DELETE"):
        response = await admin.request(method, path, json={"capacity": 1}, headers=AUTH)
        assert (await _error(response, 404))["code"] == "not_found", method
    listed = await (await admin.get(AGENTS, headers=AUTH)).json()
    assert agent["id"] not in {a["id"] for a in listed}
    async with store.transaction() as conn:
        assert await agent_by_token(conn, agent["token"]) is None
        row = await conn.fetchrow(
            "SELECT presence, deleted_at FROM agents WHERE id = $1", agent["id"]
        )
    assert row is not None and row["deleted_at"] is not None and row["presence"] == "offline"
    for missing in ("not-a-uuid", str(uuid.uuid4())):
        response = await admin.get(f"{AGENTS}/{missing}", headers=AUTH)
        assert (await _error(response, 404))["code"] == "not_found"


async def test_agent_tokens_authenticate_until_the_agent_is_removed(admin: Client) -> None:
    agent = await _create(admin)
    own = {"Authorization": f"Bearer {agent['token']}"}
    response = await admin.get(WHOAMI, headers=own)
    assert response.status == 200 and (await response.json())["id"] == agent["id"]
    for headers in ({}, {"Authorization": "Bearer nope"}, AUTH, {"Authorization": "omr_x"}):
        response = await admin.get(WHOAMI, headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await _error(response, 401))["code"] in {"unauthorized", "invalid_token"}
    assert (await admin.delete(f"{AGENTS}/{agent['id']}", headers=AUTH)).status == 204
    response = await admin.get(WHOAMI, headers=own)
    assert (await _error(response, 401))["code"] == "invalid_token"


async def test_list_filters_by_queue(admin: Client) -> None:
    seller = await _create(admin, queues=["sales", "general"])
    general = await _create(admin, queues=["general"])
    in_sales = {
        a["id"] for a in await (await admin.get(f"{AGENTS}?queue=sales", headers=AUTH)).json()
    }
    assert seller["id"] in in_sales and general["id"] not in in_sales
    everyone = {a["id"] for a in await (await admin.get(AGENTS, headers=AUTH)).json()}
    assert {seller["id"], general["id"]} <= everyone


async def test_idempotency_key_returns_the_first_answer(admin: Client, db: asyncpg.Pool) -> None:
    key = str(uuid.uuid4())
    body = _new_agent()
    headers = {**AUTH, "Idempotency-Key": key}
    first = await admin.post(AGENTS, json=body, headers=headers)
    again = await admin.post(AGENTS, json=body, headers=headers)
    assert first.status == again.status == 201
    created = await first.json()
    assert await again.json() == created
    assert await db.fetchval("SELECT count(*) FROM agents WHERE name = $1", body["name"]) == 1

    # The key row keeps neither the key nor the token in the clear.
    stored = await db.fetchrow(
        "SELECT key, body::text AS body, sealed::text AS sealed FROM idempotency_keys"
        " WHERE scope = 'admin' AND body ->> 'id' = $1",
        created["id"],
    )
    assert stored is not None
    assert key not in stored["key"]
    assert created["token"] not in stored["body"] and created["token"] not in stored["sealed"]

    other = await admin.post(AGENTS, json=_new_agent(), headers=headers)
    assert (await _error(other, 422))["code"] == "idempotency_key_reused"
    too_long = await admin.post(AGENTS, json=body, headers={**AUTH, "Idempotency-Key": "k" * 201})
    assert (await _error(too_long, 400))["code"] == "invalid_idempotency_key"


async def test_concurrent_retries_create_one_agent(admin: Client, db: asyncpg.Pool) -> None:
    body = _new_agent()
    headers = {**AUTH, "Idempotency-Key": f"retry-{uuid.uuid4()}"}
    responses = await asyncio.gather(
        *(admin.post(AGENTS, json=body, headers=headers) for _ in range(5))
    )
    assert {r.status for r in responses} == {201}
    bodies = [await r.json() for r in responses]
    assert all(b == bodies[0] for b in bodies)
    assert await db.fetchval("SELECT count(*) FROM agents WHERE name = $1", body["name"]) == 1


async def _conversation(
    db: asyncpg.Pool, *, state: str, queue: str, agent_id: str | None = None
) -> str:
    """A conversation written straight to the database, with two messages."""
    customer = new_customer()
    contact_id, conversation_id = uuid.uuid4(), uuid.uuid4()
    opened = datetime.now(UTC) - timedelta(minutes=5)
    await db.execute(
        "INSERT INTO contacts (id, account, address, profile_name)"
        " VALUES ($1, 'contoso', $2, 'Ana')",
        contact_id,
        customer,
    )
    await db.execute(
        "INSERT INTO conversations (id, account, business_number, customer, contact_id,"
        " workstream, state, opened_at, last_customer_message_at, queue, skills, priority,"
        " language, classification, queued_at, agent_id, closed_at)"
        " VALUES ($1, 'contoso', $2, $3, $4, 'support-pt', $5, $6, $6, $7, $8, 5, 'pt-BR',"
        " $9, $6, $10, CASE WHEN $5::text = 'closed' THEN $6::timestamptz END)",
        conversation_id,
        BUSINESS,
        customer,
        contact_id,
        state,
        opened,
        queue,
        {"billing": 5},
        {"matched": [{"ruleset": "topics", "rule": "billing", "why": "body contains boleto"}]},
        agent_id,
    )
    for n, body in enumerate(["segundo", "primeiro"]):  # stored out of order on purpose
        await db.execute(
            "INSERT INTO messages (id, conversation_id, direction, twilio_sid, body, media,"
            " status, received_at) VALUES ($1, $2, 'inbound', $3, $4, $5, 'received', $6)",
            uuid.uuid4(),
            conversation_id,
            f"SM{uuid.uuid4().hex}",
            body,
            [{"url": "https://api.twilio.com/m/1", "content_type": "image/jpeg"}] if n else [],
            opened + timedelta(seconds=10 - n),
        )
    return str(conversation_id)


async def test_conversations_with_trace_and_messages(admin: Client, db: asyncpg.Pool) -> None:
    # A queue of its own, and states distribution leaves alone: other tests never see these.
    queue = f"admin-{uuid.uuid4().hex[:8]}"
    agent = await _create(admin)
    active = await _conversation(db, state="active", queue=queue, agent_id=agent["id"])
    closed = await _conversation(db, state="closed", queue=queue)

    listed = await (await admin.get(f"/api/admin/conversations?queue={queue}", headers=AUTH)).json()
    assert {c["id"] for c in listed} == {active, closed}
    only_closed = await admin.get(
        f"/api/admin/conversations?queue={queue}&state=closed", headers=AUTH
    )
    assert [c["id"] for c in await only_closed.json()] == [closed]
    one = await admin.get(f"/api/admin/conversations?queue={queue}&limit=1", headers=AUTH)
    assert len(await one.json()) == 1

    detail = await (await admin.get(f"/api/admin/conversations/{active}", headers=AUTH)).json()
    assert detail["state"] == "active" and detail["queue"] == queue
    assert detail["agent_id"] == agent["id"]
    assert detail["skills"] == {"billing": 5} and detail["priority"] == 5
    assert detail["classification"]["matched"][0]["rule"] == "billing"
    assert detail["closed_at"] is None
    datetime.fromisoformat(detail["last_customer_message_at"])
    assert [m["body"] for m in detail["messages"]] == ["primeiro", "segundo"]
    first = detail["messages"][0]
    assert first["direction"] == "inbound" and first["status"] == "received"
    assert first["media"][0]["content_type"] == "image/jpeg"
    assert first["twilio_sid"].startswith("SM")
    assert set(listed[0]) == set(detail) - {"messages"}

    for query, field in [("state=sleeping", "state"), ("limit=0", "limit"), ("limit=x", "limit")]:
        response = await admin.get(f"/api/admin/conversations?{query}", headers=AUTH)
        error = await _error(response, 422)
        assert error["code"] == "invalid_query" and _fields(error) == {field}
    for missing in (str(uuid.uuid4()), "nope"):
        response = await admin.get(f"/api/admin/conversations/{missing}", headers=AUTH)
        assert (await _error(response, 404))["code"] == "not_found"
