"""Bearer tokens for the admin and agent APIs.

Both guards raise aiohttp HTTP exceptions that carry the API's JSON error body, so a
handler starts with ``require_admin(request)`` or ``agent = await current_agent(request)``
and never sees an unauthenticated request. A missing or wrong token is a 401 with
``WWW-Authenticate: Bearer`` (RFC 6750). Tokens are never logged.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

import asyncpg
from aiohttp import web

from omniroute.domain.agents import agent_by_token
from omniroute.errors import StoreUnavailable
from router.state import SETTINGS, STORE

REALM = 'Bearer realm="omniroute"'


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


def require_admin(request: web.Request) -> None:
    """Let the request through only with ``Bearer $OMNIROUTE_ADMIN_TOKEN``.

    Raises 503 ``admin_disabled`` when no admin token is configured, 401 otherwise.
    """
    configured = request.app[SETTINGS].admin_token
    expected = configured.get_secret_value() if configured is not None else ""
    if not expected:
        raise http_error(
            web.HTTPServiceUnavailable,
            "admin_disabled",
            "the admin API is disabled: set OMNIROUTE_ADMIN_TOKEN to enable it",
        )
    token = bearer_token(request)
    # Bytes, so any header text compares in constant time (str needs ASCII).
    if token is None or not hmac.compare_digest(token.encode(), expected.encode()):
        raise _unauthorized(token)


async def current_agent(request: web.Request) -> asyncpg.Record:
    """The agent whose bearer token the request carries (removed agents excluded).

    Raises 401 for a missing or unknown token, 503 when the database is unreachable.
    """
    token = bearer_token(request)
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
