"""What API handlers read from a request the same way: a JSON body validated by its model,
an id from the path, the calling agent's own conversation, the ``Idempotency-Key``.

Each helper returns what was asked for or raises the HTTP error the API answers (the
``{"error": {...}}`` body), so a handler reads top to bottom without checking unions.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Collection
from typing import TypeVar

import asyncpg
from aiohttp import web
from pydantic import BaseModel, ValidationError

from omniroute.domain import idempotency
from omniroute.errors import IdempotencyError
from omniroute.infra.store import Connection
from router.auth import current_agent, http_error
from router.responses import invalid
from router.state import SETTINGS, STORE

M = TypeVar("M", bound=BaseModel)

_REFUSALS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest,
    409: web.HTTPConflict,
    422: web.HTTPUnprocessableEntity,
}

OWN_CONVERSATION = """
SELECT c.id, c.account, c.business_number, c.customer, c.workstream, c.state, c.queue,
       c.agent_id,
       c.skills, c.priority, c.severity, c.language, c.variables, c.opened_at,
       c.assigned_at, c.last_customer_message_at, c.window_closed_at, ct.profile_name
FROM conversations c JOIN contacts ct ON ct.id = c.contact_id
WHERE c.id = $1 AND c.agent_id = $2 AND c.state IN ('active', 'waiting', 'wrap-up')
"""


def not_found(what: str) -> web.HTTPException:
    """404 ``not_found``: no such thing, or not the caller's (existence never leaks)."""
    return http_error(web.HTTPNotFound, "not_found", f"no such {what}")


def as_uuid(value: str) -> str | None:
    """``value`` as a canonical uuid string, or None when it is not one."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def path_id(request: web.Request, name: str, what: str) -> str:
    """The uuid in the path's ``{name}``; raises 404 ``no such {what}`` when it is not one."""
    found = as_uuid(request.match_info[name])
    if found is None:
        raise not_found(what)
    return found


async def parse_body(request: web.Request, model: type[M]) -> M:
    """The JSON body validated by ``model`` (no body: an empty object).

    Raises 400 ``invalid_json`` or 422 ``invalid_body`` naming each field and its problem.
    """
    try:
        raw = await request.json() if request.body_exists else {}
    except ValueError:
        raise http_error(web.HTTPBadRequest, "invalid_json", "the body is not JSON") from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise http_error(
            web.HTTPUnprocessableEntity,
            "invalid_body",
            "the body does not match the API",
            fields=invalid(exc),
        ) from None


async def own_conversation(request: web.Request) -> tuple[asyncpg.Record, asyncpg.Record]:
    """The calling agent and the conversation in the path's ``{conversation_id}``, which must
    be assigned to it and not closed. Raises 401 (token), 404 (anything else)."""
    agent = await current_agent(request)
    conversation_id = path_id(request, "conversation_id", "conversation")
    pool = await request.app[STORE].pool()
    row = await pool.fetchrow(OWN_CONVERSATION, conversation_id, agent["id"])
    if row is None:
        raise not_found("conversation")
    return agent, row


def idempotency_key(request: web.Request) -> str | None:
    """The request's ``Idempotency-Key``, or None. Raises 400 ``invalid_idempotency_key``."""
    try:
        return idempotency.checked_key(request.headers.get("Idempotency-Key"))
    except IdempotencyError as exc:
        raise refused(exc) from None


def refused(exc: IdempotencyError) -> web.HTTPException:
    """The API's answer to a key that cannot be honoured (400, 409 or 422)."""
    return http_error(_REFUSALS[exc.status], exc.code, str(exc))


def keyed(
    request: web.Request, key: str | None, scope: str, body: BaseModel
) -> idempotency.IdempotentRequest | None:
    """This request under its ``Idempotency-Key`` (None without one), in the caller's scope."""
    if key is None:
        return None
    fingerprint = idempotency.fingerprint(
        request.method, request.path, body.model_dump(mode="json")
    )
    return idempotency.IdempotentRequest(scope, key, fingerprint)


async def once(
    request: web.Request,
    body: BaseModel,
    scope: str,
    action: Callable[[Connection], Awaitable[BaseModel]],
    *,
    status: int = 200,
    sealed: Collection[str] = (),
) -> web.Response:
    """Run ``action`` in one transaction under the request's ``Idempotency-Key`` (if any):
    a retry answers what the first request answered and does nothing again; an exception
    from ``action`` rolls back and leaves the key free. ``sealed``: answer fields stored
    readable only with the key (a new agent's token)."""
    key = keyed(request, idempotency_key(request), scope, body)
    try:
        async with request.app[STORE].transaction() as conn:
            if key is not None and (
                replay := await idempotency.claim(
                    conn, key, wait=request.app[SETTINGS].idempotency_wait
                )
            ):
                return web.json_response(replay.body, status=replay.status)
            payload = (await action(conn)).model_dump(mode="json")
            if key is not None:
                answer = idempotency.Answer(status, payload)
                await idempotency.remember(conn, key, answer, sealed=sealed)
    except IdempotencyError as exc:
        raise refused(exc) from None
    return web.json_response(payload, status=status)
