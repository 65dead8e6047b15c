"""The admin API (``Authorization: Bearer $OMNIROUTE_ADMIN_TOKEN``): agents, and any
conversation with its classification trace and messages.

- ``POST /api/admin/agents`` → 201 with the agent's token, the only time it is shown. An
  ``Idempotency-Key`` makes a retry return the first answer (token included) instead of
  creating a second agent; the key row is written in the agent's transaction.
- ``GET /api/admin/agents[?queue=]``, ``GET/PATCH/DELETE /api/admin/agents/{id}``: an unknown,
  removed or malformed id is a 404. A PATCH that changes presence (and a DELETE of an agent
  that was not offline) publishes ``agent.presence-changed`` through the outbox.
- ``GET /api/admin/conversations[?state=&queue=&limit=]``, ``GET …/conversations/{id}``.

Bodies are strict: an unknown field, a skill level outside 1..10 or a negative capacity is a
422 naming the field; a queue the configuration does not define is a 422 ``unknown_queue``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel

from omniroute.domain.agents import (
    UnknownQueues,
    agent_out,
    create_agent,
    delete_agent,
    get_agent,
    list_agents,
    parse_id,
    update_agent,
)
from omniroute.errors import StoreUnavailable
from omniroute.infra.store import Connection
from router.agent_api import _body
from router.auth import require_admin
from router.responses import error
from router.state import CONFIG, STORE
from schemas.api import (
    CONVERSATION_STATES,
    AgentCreate,
    AgentCreated,
    AgentUpdate,
    ConversationDetail,
    ConversationOut,
    MessageOut,
)

log = structlog.get_logger("omniroute.admin_api")

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.Response]]

IDEMPOTENCY_SCOPE = "admin"
MAX_IDEMPOTENCY_KEY = 200
DEFAULT_LIMIT = 100
MAX_LIMIT = 500


def _admin(handler: Handler) -> Handler:
    """Admin token first; a database outage is a 503, not a 500."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.Response:
        require_admin(request)
        structlog.contextvars.bind_contextvars(api="admin")
        try:
            return await handler(request)
        except StoreUnavailable:
            return error(503, "store_unavailable", "the database is unreachable; retry later")

    return guarded


async def _parse(request: web.Request, model: type[M]) -> M | web.Response:
    parsed = await _body(request, model)
    if isinstance(parsed, web.Response):
        return parsed
    assert isinstance(parsed, model)
    return parsed


def _not_found(what: str) -> web.Response:
    return error(404, "not_found", f"no such {what}")


def _known_queues(request: web.Request) -> set[str]:
    return {q.name for q in request.app[CONFIG].current.queues}


def _unknown_queues(exc: UnknownQueues) -> web.Response:
    return error(
        422,
        "unknown_queue",
        str(exc),
        unknown=exc.unknown,
        known=exc.known,
        fields=[{"field": "queues", "problem": str(exc)}],
    )


# Idempotent creation. The first answer holds the agent's token, and tokens are stored only
# hashed: the key row keeps the key's hash and the token sealed with the key itself, so a
# retry that presents the key gets the token back and a database reader does not.


def _key_digest(key: str) -> str:
    return hashlib.sha256(b"omniroute.admin.idempotency\x00" + key.encode()).hexdigest()


def _keystream(key: str, length: int) -> bytes:
    blocks = (length + 31) // 32
    stream = b"".join(
        hmac.new(key.encode(), b"agent-token" + n.to_bytes(4, "big"), hashlib.sha256).digest()
        for n in range(blocks)
    )
    return stream[:length]


def _seal(token: str, key: str) -> str:
    raw = token.encode()
    return bytes(a ^ b for a, b in zip(raw, _keystream(key, len(raw)), strict=True)).hex()


def _unseal(sealed: str, key: str) -> str:
    raw = bytes.fromhex(sealed)
    return bytes(a ^ b for a, b in zip(raw, _keystream(key, len(raw)), strict=True)).decode()


def _fingerprint(body: BaseModel) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def _claim_key(conn: Connection, key: str, fingerprint: str) -> web.Response | None:
    """Claim the key for this request, or the first answer given for it.

    The claim is an insert: a concurrent request with the same key waits on it until the
    first transaction ends, then sees its committed answer.
    """
    digest = _key_digest(key)
    claimed = await conn.fetchval(
        "INSERT INTO idempotency_keys (scope, key, status, body) VALUES ($1, $2, 0, '{}')"
        " ON CONFLICT (scope, key) DO NOTHING RETURNING key",
        IDEMPOTENCY_SCOPE,
        digest,
    )
    if claimed is not None:
        return None
    row = await conn.fetchrow(
        "SELECT status, body FROM idempotency_keys WHERE scope = $1 AND key = $2",
        IDEMPOTENCY_SCOPE,
        digest,
    )
    if row is None or row["status"] == 0:
        return error(409, "idempotency_key_in_use", "a request with this key is in progress")
    stored: dict[str, Any] = row["body"]
    if stored.get("request") != fingerprint:
        return error(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different body",
        )
    body = dict(stored["response"])
    if "sealed_token" in stored:
        body["token"] = _unseal(stored["sealed_token"], key)
    return web.json_response(body, status=row["status"])


async def _remember(
    conn: Connection, key: str, fingerprint: str, status: int, body: dict[str, Any]
) -> None:
    response = {k: v for k, v in body.items() if k != "token"}
    stored: dict[str, Any] = {"request": fingerprint, "response": response}
    if "token" in body:
        stored["sealed_token"] = _seal(body["token"], key)
    await conn.execute(
        "UPDATE idempotency_keys SET status = $3, body = $4 WHERE scope = $1 AND key = $2",
        IDEMPOTENCY_SCOPE,
        _key_digest(key),
        status,
        stored,
    )


@_admin
async def create(request: web.Request) -> web.Response:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        return error(400, "invalid_idempotency_key", f"1 to {MAX_IDEMPOTENCY_KEY} characters")
    body = await _parse(request, AgentCreate)
    if isinstance(body, web.Response):
        return body
    fingerprint = _fingerprint(body)
    try:
        async with request.app[STORE].transaction() as conn:
            if key is not None:
                replay = await _claim_key(conn, key, fingerprint)
                if replay is not None:
                    return replay
            row, token = await create_agent(conn, body, known_queues=_known_queues(request))
            created = AgentCreated(**agent_out(row).model_dump(), token=token)
            payload = created.model_dump(mode="json")
            if key is not None:
                await _remember(conn, key, fingerprint, 201, payload)
    except UnknownQueues as exc:
        return _unknown_queues(exc)
    log.info("admin.agent_created", agent_id=payload["id"], queues=payload["queues"])
    return web.json_response(payload, status=201)


@_admin
async def index(request: web.Request) -> web.Response:
    queue = request.query.get("queue") or None
    async with request.app[STORE].transaction() as conn:
        rows = await list_agents(conn, queue=queue)
    return web.json_response([agent_out(r).model_dump(mode="json") for r in rows])


@_admin
async def show(request: web.Request) -> web.Response:
    async with request.app[STORE].transaction() as conn:
        row = await get_agent(conn, request.match_info["agent_id"])
    if row is None:
        return _not_found("agent")
    return web.json_response(agent_out(row).model_dump(mode="json"))


@_admin
async def change(request: web.Request) -> web.Response:
    agent_id = parse_id(request.match_info["agent_id"])
    if agent_id is None:
        return _not_found("agent")
    body = await _parse(request, AgentUpdate)
    if isinstance(body, web.Response):
        return body
    try:
        async with request.app[STORE].transaction() as conn:
            changed = await update_agent(conn, agent_id, body, known_queues=_known_queues(request))
    except UnknownQueues as exc:
        return _unknown_queues(exc)
    if changed is None:
        return _not_found("agent")
    log.info("admin.agent_changed", agent_id=str(agent_id), fields=sorted(body.model_fields_set))
    return web.json_response(agent_out(changed.after).model_dump(mode="json"))


@_admin
async def remove(request: web.Request) -> web.Response:
    async with request.app[STORE].transaction() as conn:
        removed = await delete_agent(conn, request.match_info["agent_id"])
    if removed is None:
        return _not_found("agent")
    log.info("admin.agent_removed", agent_id=str(removed.after["id"]))
    return web.Response(status=204)


_CONVERSATION_COLUMNS = """
id, account, business_number, customer, workstream, state, queue, skills, priority, severity,
language, variables, classification, agent_id, opened_at, queued_at, assigned_at, closed_at,
close_reason, last_customer_message_at
"""


def _limit(raw: str | None) -> int | None:
    if raw is None:
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        return None
    return limit if 1 <= limit <= MAX_LIMIT else None


@_admin
async def conversations(request: web.Request) -> web.Response:
    state = request.query.get("state") or None
    problems = []
    if state is not None and state not in CONVERSATION_STATES:
        problems.append({"field": "state", "problem": f"one of {', '.join(CONVERSATION_STATES)}"})
    limit = _limit(request.query.get("limit"))
    if limit is None:
        problems.append({"field": "limit", "problem": f"an integer from 1 to {MAX_LIMIT}"})
    if problems:
        return error(422, "invalid_query", "the query does not match the API", fields=problems)
    async with request.app[STORE].transaction() as conn:
        rows = await conn.fetch(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations"
            " WHERE ($1::text IS NULL OR state = $1::text)"
            " AND ($2::text IS NULL OR queue = $2::text)"
            " ORDER BY opened_at DESC, id LIMIT $3",
            state,
            request.query.get("queue") or None,
            limit,
        )
    return web.json_response(
        [ConversationOut.model_validate(dict(r)).model_dump(mode="json") for r in rows]
    )


@_admin
async def conversation(request: web.Request) -> web.Response:
    conversation_id = parse_id(request.match_info["conversation_id"])
    if conversation_id is None:
        return _not_found("conversation")
    async with request.app[STORE].transaction() as conn:
        row = await conn.fetchrow(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = $1", conversation_id
        )
        messages = await conn.fetch(
            "SELECT id, direction, body, media, status, error_code, received_at, twilio_sid"
            " FROM messages WHERE conversation_id = $1 ORDER BY received_at, id",
            conversation_id,
        )
    if row is None:
        return _not_found("conversation")
    detail = ConversationDetail(
        **dict(row), messages=[MessageOut.model_validate(dict(m)) for m in messages]
    )
    return web.json_response(detail.model_dump(mode="json"))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/admin/agents", create)
    app.router.add_get("/api/admin/agents", index)
    app.router.add_get("/api/admin/agents/{agent_id}", show)
    app.router.add_patch("/api/admin/agents/{agent_id}", change)
    app.router.add_delete("/api/admin/agents/{agent_id}", remove)
    app.router.add_get("/api/admin/conversations", conversations)
    app.router.add_get("/api/admin/conversations/{conversation_id}", conversation)
