"""The OpenAPI document served at ``/api/openapi.json``: well-formed, complete (every route the
router serves is in it, with an operationId, and nothing else), self-contained (every ``$ref``
resolves), faithful to the contract's rules (API bodies reject unknown fields, Twilio forms keep
them) and to the answers the handlers really give."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pydantic import BaseModel

from router import openapi
from router.app import ROUTES
from router.state import SETTINGS
from schemas.api import (
    AgentConversation,
    AgentMessage,
    AgentProfile,
    ConversationSummary,
    Health,
    Readiness,
)
from tests.support import BUSINESS, new_customer

Client = TestClient[Any, Any]
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
API_BODIES = {
    "AgentCreate",
    "AgentUpdate",
    "SendMessage",
    "PresenceUpdate",
    "SessionCreate",
    "SupervisorClose",
    "SupervisorTransfer",
    "TransferRequest",
    "VariablesUpdate",
}


@pytest.fixture
async def document(router: Client) -> dict[str, Any]:
    response = await router.get(openapi.PATH)
    assert response.status == 200
    assert response.content_type == "application/json"
    parsed: dict[str, Any] = orjson.loads(await response.read())
    return parsed


def _app(client: Client) -> web.Application:
    app = client.app
    assert isinstance(app, web.Application)
    return app


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _resolve(document: dict[str, Any], ref: str) -> Any:
    """A local JSON pointer (RFC 6901) into the document; KeyError if it points nowhere."""
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield method, path, operation


def _objects(document: dict[str, Any], schema: Any, seen: set[str]) -> Iterator[dict[str, Any]]:
    """Every schema with ``properties`` reachable from ``schema``, following refs once."""
    if isinstance(schema, list):
        for item in schema:
            yield from _objects(document, item, seen)
        return
    if not isinstance(schema, dict):
        return
    if "$ref" in schema:
        if schema["$ref"] not in seen:
            seen.add(schema["$ref"])
            yield from _objects(document, _resolve(document, schema["$ref"]), seen)
        return
    if "properties" in schema:
        yield schema
    for value in schema.values():
        yield from _objects(document, value, seen)


def _body_schema(operation: dict[str, Any], media_type: str) -> Any:
    return operation["requestBody"]["content"][media_type]["schema"]


async def test_the_document_is_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1.")
    assert document["info"]["title"] and document["info"]["version"]
    assert document["paths"]
    schemes = document["components"]["securitySchemes"]
    assert {name: s.get("scheme") for name, s in schemes.items()} == {
        "adminToken": "bearer",
        "agentToken": "bearer",
        "sessionCookie": None,
    }
    assert schemes["sessionCookie"] | {"description": ""} == {
        "type": "apiKey",
        "in": "cookie",
        "name": "omniroute_session",
        "description": "",
    }


async def test_the_document_names_its_server(document: dict[str, Any]) -> None:
    [server] = document["servers"]
    assert server["url"] and server["description"]


async def test_every_route_is_documented(router: Client, document: dict[str, Any]) -> None:
    """Walks the aiohttp app's router: every route it serves is an operation of the
    document, with an operationId, and every operation is a served route."""
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in _app(router).router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(method, path) for method, path, _ in _operations(document)}
    assert served - documented == set(), "served routes missing from the document"
    assert documented - served == set(), "documented routes nobody serves"
    assert ("get", openapi.PATH) in served
    ids = [operation.get("operationId") for _, _, operation in _operations(document)]
    assert all(isinstance(i, str) and i.isidentifier() for i in ids), ids
    assert len(set(ids)) == len(ids), "operationIds repeat"


async def test_every_ref_resolves(document: dict[str, Any]) -> None:
    refs = set(_refs(document))
    assert "#/components/schemas/ErrorBody" in refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert isinstance(_resolve(document, ref), dict), ref


async def test_api_bodies_reject_unknown_fields(document: dict[str, Any]) -> None:
    bodies = set()
    for _, path, operation in _operations(document):
        content = operation.get("requestBody", {}).get("content", {})
        if "application/json" not in content:
            continue
        schema = _body_schema(operation, "application/json")
        bodies.add(schema["$ref"].rsplit("/", 1)[-1])
        for model in _objects(document, schema, set()):
            assert model.get("additionalProperties") is False, (path, model.get("title"))
    assert bodies == API_BODIES | {"CloseRequest"}


async def test_twilio_webhooks_take_signed_forms_and_answer_twiml(
    document: dict[str, Any],
) -> None:
    for kind, form in [("inbound", "InboundMessageForm"), ("status", "StatusCallbackForm")]:
        operation = document["paths"][f"/twilio/{{account}}/{kind}"]["post"]
        assert operation["security"] == []
        schema = _body_schema(operation, "application/x-www-form-urlencoded")
        assert schema == {"$ref": f"#/components/schemas/{form}"}
        # Twilio adds fields without notice: the form keeps what it does not know.
        assert _resolve(document, schema["$ref"])["additionalProperties"] is True
        headers = {p["name"]: p for p in operation["parameters"] if p["in"] == "header"}
        assert headers["X-Twilio-Signature"]["required"] is True
        assert set(operation["responses"]["200"]["content"]) == {"text/xml"}
        assert "403" in operation["responses"]


async def test_security_and_errors_follow_the_caller(document: dict[str, Any]) -> None:
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for method, path, operation in _operations(document):
        where = f"{method.upper()} {path}"
        # The console's session cookie stands in for either token.
        if path.startswith("/api/admin/"):
            assert operation["security"] == [{"adminToken": []}, {"sessionCookie": []}], where
        elif path == "/api/session":
            expected: list[dict[str, list[str]]] = (
                [{"sessionCookie": []}] if method == "get" else []
            )
            assert operation["security"] == expected, where
        elif path.startswith("/api/") and path != openapi.PATH:
            assert operation["security"] == [{"agentToken": []}, {"sessionCookie": []}], where
        else:
            assert operation["security"] == [], where
        responses = operation["responses"]
        if operation["security"]:
            assert "401" in responses, where
        for status, response in responses.items():
            if int(status) >= 400 and path != "/readyz":
                assert response["content"]["application/json"]["schema"] == error_ref, where


async def test_idempotent_posts_take_the_key(document: dict[str, Any]) -> None:
    takes_key = {
        (method, path)
        for method, path, operation in _operations(document)
        if any(p["name"] == "Idempotency-Key" for p in operation.get("parameters", []))
    }
    assert takes_key == {
        ("post", "/api/admin/agents"),
        ("post", "/api/conversations/{conversation_id}/messages"),
        ("post", "/api/admin/conversations/{conversation_id}/transfer"),
        ("post", "/api/admin/conversations/{conversation_id}/close"),
        ("post", "/api/admin/offers/{offer_id}/end"),
        ("put", "/api/admin/agents/{agent_id}/presence"),
    }


async def test_supervisor_actions_name_the_actor(document: dict[str, Any]) -> None:
    names_actor = {
        (method, path)
        for method, path, operation in _operations(document)
        if any(
            p["name"] == "X-Omniroute-Actor" and p["in"] == "header" and not p["required"]
            for p in operation.get("parameters", [])
        )
    }
    assert names_actor == {
        ("post", "/api/admin/conversations/{conversation_id}/transfer"),
        ("post", "/api/admin/conversations/{conversation_id}/close"),
        ("post", "/api/admin/offers/{offer_id}/end"),
        ("put", "/api/admin/agents/{agent_id}/presence"),
        ("delete", "/api/admin/agents/{agent_id}"),
    }


async def test_the_document_is_built_once_per_app(router: Client) -> None:
    served = [await (await router.get(openapi.PATH)).read() for _ in range(2)]
    app = _app(router)
    assert served[0] is not None and served == [app[openapi.DOCUMENT]] * 2
    assert orjson.loads(served[0]) == openapi.document(ROUTES, app[SETTINGS].public_base())


def test_an_operation_id_is_used_once() -> None:
    twice = [ROUTES[0], replace(ROUTES[1], operation_id=ROUTES[0].operation_id)]
    with pytest.raises(ValueError, match=ROUTES[0].operation_id):
        openapi.document(twice, "/")


async def _agent_with_a_conversation(db: asyncpg.Pool) -> tuple[dict[str, str], str, str]:
    """An agent, its queue and an active conversation with one customer message."""
    token = "omr_" + secrets.token_urlsafe(24)
    agent_id, contact_id, conversation_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    queue, customer, now = f"doc-{agent_id.hex[:8]}", new_customer(), datetime.now(UTC)
    await db.execute(
        "INSERT INTO agents (id, name, queues, capacity_units, presence, token_hash)"
        " VALUES ($1, 'Doc', $2, 2, 'offline', $3)",
        agent_id,
        [queue],
        hashlib.sha256(token.encode()).hexdigest(),
    )
    await db.execute(
        "INSERT INTO contacts (id, account, address, profile_name)"
        " VALUES ($1, 'contoso', $2, 'Ana')",
        contact_id,
        customer,
    )
    await db.execute(
        "INSERT INTO conversations (id, account, business_number, customer, contact_id,"
        " workstream, state, opened_at, last_customer_message_at, queue, agent_id, assigned_at)"
        " VALUES ($1, 'contoso', $2, $3, $4, 'support-pt', 'active', $5, $5, $6, $7, $5)",
        conversation_id,
        BUSINESS,
        customer,
        contact_id,
        now,
        queue,
        agent_id,
    )
    await db.execute(
        "INSERT INTO messages (id, conversation_id, direction, twilio_sid, body, media, status,"
        " received_at) VALUES ($1, $2, 'inbound', $3, 'oi', '[]', 'received', $4)",
        uuid.uuid4(),
        conversation_id,
        f"SM{uuid.uuid4().hex}",
        now,
    )
    return {"Authorization": f"Bearer {token}"}, queue, str(conversation_id)


def _documented(body: Any, model: type[BaseModel]) -> None:
    """The answer validates against the model, has all its required fields and no other."""
    model.model_validate(body)
    required = {name for name, field in model.model_fields.items() if field.is_required()}
    assert required <= set(body) <= set(model.model_fields), model.__name__


async def test_agent_answers_are_what_the_document_says(router: Client, db: asyncpg.Pool) -> None:
    auth, queue, conversation_id = await _agent_with_a_conversation(db)
    conversation = f"/api/conversations/{conversation_id}"
    single: list[tuple[str, type[BaseModel]]] = [
        ("/api/me", AgentProfile),
        (conversation, AgentConversation),
    ]
    lists: list[tuple[str, type[BaseModel]]] = [
        ("/api/me/conversations", ConversationSummary),
        (f"{conversation}/messages", AgentMessage),
    ]
    for path, model in single:
        response = await router.get(path, headers=auth)
        assert response.status == 200, path
        _documented(await response.json(), model)
    for path, model in lists:
        response = await router.get(path, headers=auth)
        assert response.status == 200, path
        [item] = await response.json()
        _documented(item, model)
    for path in ["/api/me/offers", f"/api/queues/{queue}/items"]:
        response = await router.get(path, headers=auth)
        assert response.status == 200 and await response.json() == [], path
    _documented(await (await router.get("/healthz")).json(), Health)
    _documented(await (await router.get("/readyz")).json(), Readiness)
