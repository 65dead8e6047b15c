"""Supervisor actions over the admin API (``Authorization: Bearer $OMNIROUTE_ADMIN_TOKEN``),
each audited as ``supervisor.acted`` naming who acted (``X-Omniroute-Actor``, by default
the console session's name, else ``admin``), in the action's transaction
(``omniroute.domain.supervisor``):

- ``POST /api/admin/conversations/{id}/transfer`` ``{"queue"}`` or ``{"agent_id"}``: into a
  queue (the agent it leaves is not offered it again this round), or offered to one agent,
  who must be available, serve its queue and have room (else 409 ``agent_unavailable``,
  ``agent_not_in_queue``, ``no_capacity``; an unknown agent is a 404).
- ``POST /api/admin/conversations/{id}/close``: closed, whatever its state (409
  ``already_closed``).
- ``POST /api/admin/offers/{id}/end``: a pending offer ends, the conversation is back in its
  queue (409 ``offer_closed``).
- ``PUT /api/admin/agents/{id}/presence``: offline ends the agent's offers and requeues its
  conversations where the workstream's ``on_agent_offline`` says so.
- ``DELETE /api/admin/agents/{id}``: the agent is removed; its offers end and its
  conversations go back to their queues ahead of others.

A refusal changes nothing. Every action but the removal takes an ``Idempotency-Key`` with the
one semantics of ``omniroute.domain.idempotency`` (a refusal leaves the key free).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection

import structlog
from aiohttp import web
from pydantic import BaseModel

from omniroute.domain import idempotency, supervisor
from omniroute.domain.agents import agent_out, offline_requeue
from omniroute.errors import WorkConflict
from omniroute.infra.store import Connection
from router.admin_api import TAGS, admin_only
from router.auth import PRINCIPAL, http_error
from router.requests import not_found, once, parse_body, path_id
from router.responses import error
from router.routes import Header, Route
from router.state import CONFIG, STORE
from schemas.api import (
    AgentOut,
    ConversationMoved,
    EndedOffer,
    PresenceUpdate,
    SupervisorClose,
    SupervisorTransfer,
)
from schemas.events import utcnow

log = structlog.get_logger("omniroute.supervisor_api")

ACTOR_HEADER = "X-Omniroute-Actor"
ACTOR = Header(
    ACTOR_HEADER,
    {
        "type": "string",
        "minLength": 1,
        "maxLength": supervisor.MAX_ACTOR_LENGTH,
        "default": supervisor.DEFAULT_ACTOR,
    },
    "who acts, recorded in the supervisor.acted audit event: 1 to"
    f" {supervisor.MAX_ACTOR_LENGTH} printable characters (400 invalid_actor otherwise)",
)
# WorkConflict codes that are not a conflict with the current state.
_STATUS = {"not_found": 404, "unknown_queue": 422, "invalid_target": 422}


class _NoBody(BaseModel):
    """What an action without a body is keyed on."""


def actor(request: web.Request) -> str:
    """The name of the supervisor's session (bound at sign-in: a script on the page cannot
    act under another name), else the request's ``X-Omniroute-Actor``, else ``admin``.
    Raises 400 ``invalid_actor``."""
    session = request.get(PRINCIPAL)
    raw = session.name if session is not None else request.headers.get(ACTOR_HEADER)
    try:
        return supervisor.checked_actor(raw)
    except ValueError as exc:
        raise http_error(web.HTTPBadRequest, "invalid_actor", f"{ACTOR_HEADER}: {exc}") from None


def _refusal(exc: WorkConflict, known: Collection[str]) -> web.Response:
    if exc.code == "unknown_queue":
        return error(
            422,
            exc.code,
            str(exc),
            known=sorted(known),
            fields=[{"field": "queue", "problem": str(exc)}],
        )
    return error(_STATUS.get(exc.code, 409), exc.code, str(exc))


Action = Callable[[Connection], Awaitable[BaseModel]]


async def _once(
    request: web.Request, body: BaseModel, action: Action, known: Collection[str] = ()
) -> web.Response:
    """Run ``action`` under the request's ``Idempotency-Key``; a refusal (WorkConflict)
    changes nothing and is not remembered."""
    try:
        return await once(request, body, idempotency.ADMIN_SCOPE, action)
    except WorkConflict as exc:
        return _refusal(exc, known)


@admin_only
async def transfer(request: web.Request) -> web.Response:
    who = actor(request)
    conversation_id = path_id(request, "conversation_id", "conversation")
    body = await parse_body(request, SupervisorTransfer)
    config = request.app[CONFIG].current
    known = [q.name for q in config.queues]
    to_agent = None if body.agent_id is None else str(body.agent_id)

    async def act(conn: Connection) -> ConversationMoved:
        await supervisor.transfer(
            conn,
            conversation_id,
            who,
            utcnow(),
            to_queue=body.queue,
            to_agent=to_agent,
            known_queues=known,
            offer_seconds=await supervisor.offer_seconds(conn, config, conversation_id),
            reason=body.reason,
        )
        if body.queue is not None:
            return ConversationMoved(
                conversation_id=conversation_id, state="queued", queue=body.queue
            )
        return ConversationMoved(
            conversation_id=conversation_id, state="offered", agent_id=body.agent_id
        )

    answer = await _once(request, body, act, known)
    log.info(
        "supervisor.transfer",
        conversation_id=conversation_id,
        actor=who,
        to_queue=body.queue,
        to_agent=to_agent,
        status=answer.status,
    )
    return answer


@admin_only
async def close(request: web.Request) -> web.Response:
    who = actor(request)
    conversation_id = path_id(request, "conversation_id", "conversation")
    body = await parse_body(request, SupervisorClose)

    async def act(conn: Connection) -> ConversationMoved:
        await supervisor.close(conn, conversation_id, who, utcnow(), body.reason)
        return ConversationMoved(conversation_id=conversation_id, state="closed")

    answer = await _once(request, body, act)
    log.info("supervisor.close", conversation_id=conversation_id, actor=who, status=answer.status)
    return answer


@admin_only
async def end_offer(request: web.Request) -> web.Response:
    who = actor(request)
    offer_id = path_id(request, "offer_id", "offer")

    async def act(conn: Connection) -> EndedOffer:
        ended, _ = await supervisor.end_offer(conn, offer_id, who, utcnow())
        return EndedOffer(offer_id=offer_id, conversation_id=ended.conversation_id, state="queued")

    answer = await _once(request, _NoBody(), act)
    log.info("supervisor.end_offer", offer_id=offer_id, actor=who, status=answer.status)
    return answer


@admin_only
async def set_presence(request: web.Request) -> web.Response:
    who = actor(request)
    agent_id = path_id(request, "agent_id", "agent")
    body = await parse_body(request, PresenceUpdate)
    requeue = offline_requeue(request.app[CONFIG].current)

    async def act(conn: Connection) -> AgentOut:
        changed = await supervisor.set_presence(
            conn, agent_id, body.presence, who, utcnow(), requeue_workstreams=requeue
        )
        if changed is None:
            raise WorkConflict("not_found", "no such agent")
        return agent_out(changed.after)

    answer = await _once(request, body, act)
    log.info(
        "supervisor.presence",
        agent_id=agent_id,
        presence=body.presence,
        actor=who,
        status=answer.status,
    )
    return answer


@admin_only
async def remove_agent(request: web.Request) -> web.Response:
    """Remove an agent: nothing stays with it (offers end, conversations requeued ahead of
    others, each transfer naming the actor), audited."""
    who = actor(request)
    agent_id = path_id(request, "agent_id", "agent")
    now = utcnow()
    async with request.app[STORE].transaction() as conn:
        removed = await supervisor.remove_agent(conn, agent_id, who, now)
    if removed is None:
        raise not_found("agent")
    log.info("supervisor.agent_removed", agent_id=agent_id, actor=who)
    return web.Response(status=204)


_CONFLICTS = "409: agent_unavailable, agent_not_in_queue, no_capacity, already_closed"
ROUTES = [
    Route(
        "POST",
        "/api/admin/conversations/{conversation_id}/transfer",
        transfer,
        "superviseTransfer",
        "Move any open conversation to a queue, or offer it to one agent"
        f" ({_CONFLICTS}; 422 unknown_queue)",
        TAGS,
        "adminToken",
        {200: ConversationMoved},
        errors=(400, 404, 409, 422),
        request=SupervisorTransfer,
        headers=(ACTOR,),
        idempotency_key=True,
    ),
    Route(
        "POST",
        "/api/admin/conversations/{conversation_id}/close",
        close,
        "superviseClose",
        "Close any conversation (409 already_closed)",
        TAGS,
        "adminToken",
        {200: ConversationMoved},
        errors=(400, 404, 409, 422),
        request=SupervisorClose,
        request_required=False,
        headers=(ACTOR,),
        idempotency_key=True,
    ),
    Route(
        "POST",
        "/api/admin/offers/{offer_id}/end",
        end_offer,
        "superviseEndOffer",
        "End a pending offer: the conversation goes back to its queue (409 offer_closed)",
        TAGS,
        "adminToken",
        {200: EndedOffer},
        errors=(400, 404, 409, 422),
        headers=(ACTOR,),
        idempotency_key=True,
    ),
    Route(
        "PUT",
        "/api/admin/agents/{agent_id}/presence",
        set_presence,
        "superviseAgentPresence",
        "Set an agent's presence; offline applies the workstreams' on_agent_offline",
        TAGS,
        "adminToken",
        {200: AgentOut},
        errors=(400, 404, 409, 422),
        request=PresenceUpdate,
        headers=(ACTOR,),
        idempotency_key=True,
    ),
    Route(
        "DELETE",
        "/api/admin/agents/{agent_id}",
        remove_agent,
        "deleteAgent",
        "Remove an agent: its offers end, its conversations go back to their queues",
        TAGS,
        "adminToken",
        {204: "Removed"},
        errors=(400, 404),
        headers=(ACTOR,),
    ),
]
