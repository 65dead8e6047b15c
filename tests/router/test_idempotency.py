"""``Idempotency-Key`` over HTTP, one semantics for every endpoint that takes it: the same key
and body answer as the first time and do nothing again; the same key with another body is a
422 ``idempotency_key_reused``; a key still held by a request in progress is a 409; keys are
scoped per caller (the admin, each agent)."""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from omniroute.domain import idempotency
from omniroute.infra.config_loader import LiveConfig
from omniroute.infra.store import Store
from router.app import create_app
from router.state import BUS
from tests.conftest import Infra, make_settings
from tests.support import BUSINESS, new_customer

Client = TestClient[Any, Any]
ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
async def api(infra: Infra, config: LiveConfig) -> AsyncIterator[Client]:
    app = create_app(make_settings(infra, admin_token=ADMIN_TOKEN), config)
    async with TestClient(TestServer(app)) as client:
        await app[BUS].wait_ready()
        yield client


async def _agent_in_a_conversation(db: asyncpg.Pool) -> tuple[dict[str, str], str]:
    """An agent (offline, so no other test's work reaches it) and its active conversation,
    inside the window: free text may be sent."""
    token = "omr_" + secrets.token_urlsafe(24)
    agent_id, contact_id, conversation_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    customer, now = new_customer(), datetime.now(UTC)
    await db.execute(
        "INSERT INTO agents (id, name, queues, capacity_units, presence, token_hash)"
        " VALUES ($1, 'Idem', $2, 2, 'offline', $3)",
        agent_id,
        [f"idem-{agent_id.hex[:8]}"],
        hashlib.sha256(token.encode()).hexdigest(),
    )
    await db.execute(
        "INSERT INTO contacts (id, account, address) VALUES ($1, 'contoso', $2)",
        contact_id,
        customer,
    )
    await db.execute(
        "INSERT INTO conversations (id, account, business_number, customer, contact_id,"
        " workstream, state, opened_at, last_customer_message_at, agent_id, assigned_at)"
        " VALUES ($1, 'contoso', $2, $3, $4, 'support-pt', 'active', $5, $5, $6, $5)",
        conversation_id,
        BUSINESS,
        customer,
        contact_id,
        now,
        agent_id,
    )
    return {"Authorization": f"Bearer {token}"}, f"/api/conversations/{conversation_id}/messages"


async def _sent(db: asyncpg.Pool, path: str) -> int:
    conversation_id = path.split("/")[3]
    count: int = await db.fetchval(
        "SELECT count(*) FROM messages WHERE conversation_id = $1 AND direction = 'outbound'",
        uuid.UUID(conversation_id),
    )
    return count


async def _post(
    api: Client, path: str, auth: dict[str, str], body: Any, key: str
) -> tuple[int, Any]:
    response = await api.post(path, json=body, headers={**auth, "Idempotency-Key": key})
    return response.status, await response.json()


async def test_a_message_retried_with_its_key_is_sent_once(api: Client, db: asyncpg.Pool) -> None:
    auth, path = await _agent_in_a_conversation(db)
    key = f"click-{uuid.uuid4()}"
    first = await _post(api, path, auth, {"text": "Um momento"}, key)
    assert first[0] == 202, first
    # Same body, spelled differently (defaults written out): the same request.
    again = await _post(api, path, auth, {"media_urls": [], "text": "Um momento"}, key)
    assert again == first
    assert await _sent(db, path) == 1
    requested = await db.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'message.send-requested'"
        " AND body->'data'->>'message_id' = $1",
        first[1]["id"],
    )
    assert requested == 1


async def test_a_message_key_reused_with_another_text_is_refused(
    api: Client, db: asyncpg.Pool
) -> None:
    auth, path = await _agent_in_a_conversation(db)
    key = f"click-{uuid.uuid4()}"
    assert (await _post(api, path, auth, {"text": "Um momento"}, key))[0] == 202
    status, body = await _post(api, path, auth, {"text": "Outra coisa"}, key)
    assert (status, body["error"]["code"]) == (422, "idempotency_key_reused")
    assert await _sent(db, path) == 1


async def test_a_rejected_message_is_answered_again_too(api: Client, db: asyncpg.Pool) -> None:
    """The first answer is what a retry gets, even when it was a refusal of the gate."""
    auth, path = await _agent_in_a_conversation(db)
    await db.execute(
        "UPDATE conversations SET last_customer_message_at = now() - interval '25 hours'"
        " WHERE id = $1",
        uuid.UUID(path.split("/")[3]),
    )
    key = f"late-{uuid.uuid4()}"
    first = await _post(api, path, auth, {"text": "Ainda aí?"}, key)
    assert first[0] == 422 and first[1]["error"]["code"] == "window_closed", first
    assert await _post(api, path, auth, {"text": "Ainda aí?"}, key) == first
    assert await _sent(db, path) == 1


async def test_two_agents_keys_never_meet(api: Client, db: asyncpg.Pool) -> None:
    key = f"shared-{uuid.uuid4()}"
    answers = []
    for _ in range(2):
        auth, path = await _agent_in_a_conversation(db)
        status, body = await _post(api, path, auth, {"text": "Olá"}, key)
        assert status == 202, body
        answers.append(body["id"])
    assert answers[0] != answers[1]
    # The admin's key space is its own as well.
    created = await api.post(
        "/api/admin/agents",
        json={"name": "idem", "capacity": 0},
        headers={**ADMIN, "Idempotency-Key": key},
    )
    assert created.status == 201


@pytest.mark.parametrize("key", ["", "k" * (idempotency.MAX_KEY_LENGTH + 1)])
async def test_an_empty_or_too_long_key_is_refused(api: Client, db: asyncpg.Pool, key: str) -> None:
    auth, path = await _agent_in_a_conversation(db)
    for url, headers, body in [
        (path, auth, {"text": "Olá"}),
        ("/api/admin/agents", ADMIN, {"name": "idem", "capacity": 0}),
    ]:
        status, answer = await _post(api, url, headers, body, key)
        assert (status, answer["error"]["code"]) == (400, "invalid_idempotency_key"), url
    assert await _sent(db, path) == 0


@contextlib.asynccontextmanager
async def _held(store: Store, scope: str, key: str) -> AsyncIterator[None]:
    """The key claimed by a request that has not finished yet."""
    async with store.transaction() as conn:
        request = idempotency.IdempotentRequest(scope, key, "-")
        assert await idempotency.claim(conn, request) is None
        yield


async def test_a_key_held_by_a_request_in_progress_is_a_conflict(
    api: Client, db: asyncpg.Pool, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(idempotency, "IN_PROGRESS_WAIT", 0.2)
    auth, path = await _agent_in_a_conversation(db)
    agent_id = await db.fetchval(
        "SELECT agent_id FROM conversations WHERE id = $1", uuid.UUID(path.split("/")[3])
    )
    key = f"slow-{uuid.uuid4()}"
    async with _held(store, idempotency.agent_scope(agent_id), key):
        status, body = await _post(api, path, auth, {"text": "Olá"}, key)
        assert (status, body["error"]["code"]) == (409, "idempotency_key_in_use")
    async with _held(store, idempotency.ADMIN_SCOPE, key):
        admin = {"name": "idem", "capacity": 0}
        status, body = await _post(api, "/api/admin/agents", ADMIN, admin, key)
        assert (status, body["error"]["code"]) == (409, "idempotency_key_in_use")
    assert await _sent(db, path) == 0
