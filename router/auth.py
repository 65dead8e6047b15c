"""Who calls the admin and agent APIs: a bearer token, or the console's session cookie.

Both guards raise aiohttp HTTP exceptions that carry the API's JSON error body, so a
handler starts with ``require_admin(request)`` or ``agent = await current_agent(request)``
and never sees an unauthenticated request. A missing or wrong token is a 401 with
``WWW-Authenticate: Bearer`` (RFC 6750). Tokens are never logged.

A request with an ``Authorization`` header is judged by its bearer token alone. Without one,
the session middleware (``router.session.authenticate``) has already resolved the session
cookie into a ``Principal`` (or the reason it could not) stored on the request under
``PRINCIPAL``: a supervisor session passes ``require_admin``, an agent session
``current_agent``, each with the same answers as the token it was opened with.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg
from aiohttp import web

from omniroute.domain.agents import agent_by_token
from omniroute.errors import StoreUnavailable
from router.state import SETTINGS, STORE

REALM = 'Bearer realm="omniroute"'


@dataclass(frozen=True)
class Principal:
    """Who a valid session cookie signs in: a supervisor, or an agent (its current row)."""

    role: Literal["agent", "supervisor"]
    name: str
    csrf_token: str
    expires_at: datetime
    agent: asyncpg.Record | None = None


# What the session middleware found: the principal, or the error a guard answers with.
PRINCIPAL = web.RequestKey("principal", Principal)
REFUSAL = web.RequestKey("session_refusal", web.HTTPException)


def http_error(
    exc: type[web.HTTPException],
    code: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    **details: Any,
) -> web.HTTPException:
    """An HTTP exception whose body is ``{"error": {"code", "message", "details"}}``."""
    body = {"error": {"code": code, "message": message, "details": details}}
    return exc(text=json.dumps(body), content_type="application/json", headers=headers)


def bearer_token(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer …`` header, or None."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _unauthorized(token: str | None) -> web.HTTPException:
    if token is None:
        return http_error(
            web.HTTPUnauthorized,
            "unauthorized",
            "send Authorization: Bearer <token>",
            headers={"WWW-Authenticate": REALM},
        )
    return http_error(
        web.HTTPUnauthorized,
        "invalid_token",
        "the bearer token is not valid",
        headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'},
    )


def _wrong_role(needed: str) -> web.HTTPException:
    return http_error(web.HTTPForbidden, "forbidden", f"this needs {needed}")


def session_principal(request: web.Request) -> Principal | None:
    """The session's principal, when the request is authenticated by the session cookie.

    Raises the session's refusal (401 ``session_expired``, ``invalid_session``) when it
    came with a cookie that signs nobody in and no ``Authorization`` header.
    """
    if (refusal := request.get(REFUSAL)) is not None:
        raise refusal
    return request.get(PRINCIPAL)


def admin_token(request: web.Request) -> str:
    """The configured admin token. Raises 503 ``admin_disabled`` when there is none."""
    configured = request.app[SETTINGS].admin_token
    expected = configured.get_secret_value() if configured is not None else ""
    if not expected:
        raise http_error(
            web.HTTPServiceUnavailable,
            "admin_disabled",
            "the admin API is disabled: set OMNIROUTE_ADMIN_TOKEN to enable it",
        )
    return expected


def is_admin_token(token: str, expected: str) -> bool:
    # Bytes, so any text compares in constant time (str needs ASCII).
    return hmac.compare_digest(token.encode(), expected.encode())


def require_admin(request: web.Request) -> None:
    """Let the request through only with ``Bearer $OMNIROUTE_ADMIN_TOKEN`` or a
    supervisor's session.

    Raises 503 ``admin_disabled`` when no admin token is configured, 403 for an agent's
    session, 401 otherwise.
    """
    expected = admin_token(request)
    token = bearer_token(request)
    if token is None and (principal := session_principal(request)) is not None:
        if principal.role != "supervisor":
            raise _wrong_role("a supervisor's session")
        return
    if token is None or not is_admin_token(token, expected):
        raise _unauthorized(token)


async def current_agent(request: web.Request) -> asyncpg.Record:
    """The agent whose bearer token or session the request carries (removed agents
    excluded: the session's lookup reads the agent row as it is now).

    Raises 401 for a missing or unknown token, 403 for a supervisor's session, 503 when
    the database is unreachable.
    """
    token = bearer_token(request)
    if token is None and (principal := session_principal(request)) is not None:
        if principal.agent is None:
            raise _wrong_role("an agent's session")
        return principal.agent
    if token is None:
        raise _unauthorized(None)
    try:
        async with request.app[STORE].transaction() as conn:
            agent = await agent_by_token(conn, token)
    except StoreUnavailable:
        raise http_error(
            web.HTTPServiceUnavailable,
            "store_unavailable",
            "the database is unreachable; retry later",
            headers={"Retry-After": "1"},
        ) from None
    if agent is None:
        raise _unauthorized(token)
    return agent
