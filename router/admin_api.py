"""The admin API (``Authorization: Bearer $OMNIROUTE_ADMIN_TOKEN``): agents, and any
conversation with its classification trace and messages.

- ``POST /api/admin/agents`` → 201 with the agent's token, the only time it is shown. An
  ``Idempotency-Key`` makes a retry return the first answer (token included) instead of
  creating a second agent; the key row is written in the agent's transaction.
- ``GET /api/admin/agents[?queue=]``, ``GET/PATCH /api/admin/agents/{id}``: an unknown,
  removed or malformed id is a 404. A PATCH that changes presence publishes
  ``agent.presence-changed`` through the outbox; to offline, it ends the agent's offers and
  requeues its conversations where the workstream's ``on_agent_offline`` says so. (Removing
  an agent is a supervisor action: ``router.supervisor_api``.)
- ``GET /api/admin/conversations[?state=&queue=&agent=&limit=]``, ``GET …/conversations/{id}``:
  each with how long it has waited and who declined it this round.

Bodies are strict: an unknown field, a skill level outside 1..10 or a negative capacity is a
422 naming the field; a queue the configuration does not define is a 422 ``unknown_queue``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import cast

import structlog
from aiohttp import web

from omniroute.domain import idempotency, supervisor
from omniroute.domain.agents import (
    agent_out,
    create_agent,
    get_agent,
    list_agents,
    offline_requeue,
    parse_id,
    update_agent,
)
from omniroute.errors import StoreUnavailable, UnknownQueues
from omniroute.infra.store import Connection
from router.auth import require_admin
from router.messages_api import TWILIO_COLUMNS
from router.requests import as_uuid, not_found, once, parse_body
from router.responses import error
from router.routes import Many, Query, Route
from router.state import CONFIG, STORE
from schemas.api import (
    CONVERSATION_STATES,
    AgentCreate,
    AgentCreated,
    AgentOut,
    AgentUpdate,
    ConversationDetail,
    ConversationOut,
    ConversationState,
    MessageOut,
)
from schemas.events import utcnow

log = structlog.get_logger("omniroute.admin_api")

Handler = Callable[[web.Request], Awaitable[web.Response]]

DEFAULT_LIMIT = 100
MAX_LIMIT = 500
TAGS = ("admin",)


def admin_only(handler: Handler) -> Handler:
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


def known_queues(request: web.Request) -> set[str]:
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


@admin_only
async def create(request: web.Request) -> web.Response:
    """Create an agent. With an ``Idempotency-Key`` a retry gets the first answer, token
    included (stored sealed with the key), and creates nothing."""
    body = await parse_body(request, AgentCreate)

    async def act(conn: Connection) -> AgentCreated:
        row, token = await create_agent(conn, body, known_queues=known_queues(request))
        log.info("admin.agent_created", agent_id=str(row["id"]), queues=list(row["queues"]))
        return AgentCreated(**agent_out(row).model_dump(), token=token)

    try:
        return await once(
            request, body, idempotency.ADMIN_SCOPE, act, status=201, sealed=("token",)
        )
    except UnknownQueues as exc:
        return _unknown_queues(exc)


@admin_only
async def index(request: web.Request) -> web.Response:
    queue = request.query.get("queue") or None
    async with request.app[STORE].transaction() as conn:
        rows = await list_agents(conn, queue=queue)
    return web.json_response([agent_out(r).model_dump(mode="json") for r in rows])


@admin_only
async def show(request: web.Request) -> web.Response:
    async with request.app[STORE].transaction() as conn:
        row = await get_agent(conn, request.match_info["agent_id"])
    if row is None:
        raise not_found("agent")
    return web.json_response(agent_out(row).model_dump(mode="json"))


@admin_only
async def change(request: web.Request) -> web.Response:
    agent_id = parse_id(request.match_info["agent_id"])
    if agent_id is None:
        raise not_found("agent")
    body = await parse_body(request, AgentUpdate)
    try:
        async with request.app[STORE].transaction() as conn:
            changed = await update_agent(
                conn,
                agent_id,
                body,
                known_queues=known_queues(request),
                requeue_workstreams=offline_requeue(request.app[CONFIG].current),
            )
    except UnknownQueues as exc:
        return _unknown_queues(exc)
    if changed is None:
        raise not_found("agent")
    log.info("admin.agent_changed", agent_id=str(agent_id), fields=sorted(body.model_fields_set))
    return web.json_response(agent_out(changed.after).model_dump(mode="json"))


def _limit(raw: str | None) -> int | None:
    if raw is None:
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        return None
    return limit if 1 <= limit <= MAX_LIMIT else None


@admin_only
async def conversations(request: web.Request) -> web.Response:
    state = request.query.get("state") or None
    problems = []
    if state is not None and state not in CONVERSATION_STATES:
        problems.append({"field": "state", "problem": f"one of {', '.join(CONVERSATION_STATES)}"})
    agent = request.query.get("agent") or None
    if agent is not None and (agent := as_uuid(agent)) is None:
        problems.append({"field": "agent", "problem": "an agent id (uuid)"})
    limit = _limit(request.query.get("limit"))
    if limit is None:
        problems.append({"field": "limit", "problem": f"an integer from 1 to {MAX_LIMIT}"})
    if problems or limit is None:
        return error(422, "invalid_query", "the query does not match the API", fields=problems)
    async with request.app[STORE].transaction() as conn:
        found = await supervisor.list_conversations(
            conn,
            state=cast(ConversationState | None, state),
            queue=request.query.get("queue") or None,
            agent=agent,
            limit=limit,
        )
    return web.json_response([c.model_dump(mode="json") for c in found])


@admin_only
async def conversation(request: web.Request) -> web.Response:
    conversation_id = parse_id(request.match_info["conversation_id"])
    if conversation_id is None:
        raise not_found("conversation")
    async with request.app[STORE].transaction() as conn:
        row = await conn.fetchrow(
            f"SELECT {supervisor.CONVERSATION_COLUMNS} FROM conversations WHERE id = $1",
            conversation_id,
        )
        messages = await conn.fetch(
            "SELECT id, direction, body, media, status, error_code, error_message, received_at,"
            f" {TWILIO_COLUMNS} FROM messages WHERE conversation_id = $1"
            " ORDER BY received_at, id",
            conversation_id,
        )
    if row is None:
        raise not_found("conversation")
    detail = ConversationDetail(
        **supervisor.conversation_out(row, utcnow()).model_dump(),
        messages=[MessageOut.model_validate(dict(m)) for m in messages],
    )
    return web.json_response(detail.model_dump(mode="json"))


ROUTES = [
    Route(
        "POST",
        "/api/admin/agents",
        create,
        "createAgent",
        "Create an agent; the answer holds its token, shown only this once",
        TAGS,
        "adminToken",
        {201: AgentCreated},
        errors=(400, 409, 422),
        request=AgentCreate,
        idempotency_key=True,
    ),
    Route(
        "GET",
        "/api/admin/agents",
        index,
        "listAgents",
        "List agents",
        TAGS,
        "adminToken",
        {200: Many(AgentOut)},
        query=(Query("queue", {"type": "string"}, "only the agents in this queue"),),
    ),
    Route(
        "GET",
        "/api/admin/agents/{agent_id}",
        show,
        "getAgent",
        "An agent",
        TAGS,
        "adminToken",
        {200: AgentOut},
        errors=(404,),
    ),
    Route(
        "PATCH",
        "/api/admin/agents/{agent_id}",
        change,
        "updateAgent",
        "Change an agent: only the fields sent change",
        TAGS,
        "adminToken",
        {200: AgentOut},
        errors=(400, 404, 422),
        request=AgentUpdate,
    ),
    Route(
        "GET",
        "/api/admin/conversations",
        conversations,
        "listConversations",
        "List conversations, newest first",
        TAGS,
        "adminToken",
        {200: Many(ConversationOut)},
        errors=(422,),
        query=(
            Query("state", {"enum": list(CONVERSATION_STATES)}, "only conversations in this state"),
            Query("queue", {"type": "string"}, "only conversations of this queue"),
            Query(
                "agent",
                {"type": "string", "format": "uuid"},
                "only conversations this agent holds (without state: offered, active,"
                " waiting or in wrap-up)",
            ),
            Query(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
                "how many at most",
            ),
        ),
    ),
    Route(
        "GET",
        "/api/admin/conversations/{conversation_id}",
        conversation,
        "getConversation",
        "A conversation with its classification trace and messages",
        TAGS,
        "adminToken",
        {200: ConversationDetail},
        errors=(404,),
    ),
]
