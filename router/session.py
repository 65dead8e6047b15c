"""The browser console's session (``/api/session``): an HttpOnly SameSite=Strict cookie
instead of a bearer token, with a CSRF token for state-changing calls.

- ``POST /api/session`` ``{"token", "name"?}``: an agent's token opens an agent session, the
  admin token a supervisor's (constant-time compare); anything else is 401 ``invalid_token``
  (the token is never echoed or logged). 201 with the session and ``Set-Cookie``.
- ``GET /api/session``: the session the cookie holds, or 401.
- ``DELETE /api/session``: sign-out; the row is deleted and the cookie cleared (Max-Age=0).

Sessions live in PostgreSQL (``console_sessions``) so that every router replica accepts
them. The cookie holds 32 random bytes; only their SHA-256 is stored. A session ends
``OMNIROUTE_SESSION_TTL`` seconds after sign-in (absolute, 401 ``session_expired``), when its
agent is removed, or, for a supervisor, when the admin token changes.

``authenticate`` (a middleware) resolves the cookie of an ``/api/`` request without an
``Authorization`` header in one indexed query, and stores the principal on the request for
``router.auth``'s guards. Bearer callers are not affected. A POST, PUT, PATCH or DELETE
authenticated by the cookie must carry ``X-CSRF-Token`` equal to the session's token, else
403 ``csrf_failed``: the synchronizer token pattern of OWASP's Cross-Site Request Forgery
Prevention Cheat Sheet (cheatsheetseries.owasp.org/cheatsheets/
Cross-Site_Request_Forgery_Prevention_Cheat_Sheet.html); a cross-site page can make the
browser send the cookie (SameSite=Strict stops that in current browsers: defence in depth),
never read the token. Signing in needs no CSRF token: there is no session yet.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections.abc import Awaitable, Callable
from datetime import timedelta

import structlog
from aiohttp import web

from omniroute.domain import supervisor
from omniroute.domain.agents import agent_by_token
from omniroute.errors import StoreUnavailable
from omniroute.infra.store import UNAVAILABLE, Connection
from router.auth import (
    PRINCIPAL,
    REALM,
    REFUSAL,
    Principal,
    http_error,
    is_admin_token,
    session_principal,
)
from router.requests import parse_body
from router.routes import Header, Route
from router.state import SETTINGS, STORE
from schemas.events import utcnow
from schemas.session import SessionCreate, SessionOut

log = structlog.get_logger("omniroute.session")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

COOKIE = "omniroute_session"
CSRF_HEADER = "X-CSRF-Token"
PATH = "/api/session"
SESSION_BYTES = 32
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PRUNE_BATCH = 100  # expired sessions deleted per sign-in
NO_STORE = {"Cache-Control": "no-store"}

# One indexed lookup (primary key; the agent by its primary key): the session, and its
# agent as it is now, or NULLs when the agent was removed.
LOOKUP = """
SELECT s.role AS session_role, s.name AS session_name, s.csrf_token AS session_csrf,
       s.expires_at AS session_expires_at, s.admin_hash AS session_admin_hash, a.*
FROM console_sessions s
LEFT JOIN agents a ON a.id = s.agent_id AND a.deleted_at IS NULL
WHERE s.id_hash = $1
"""
# Expired sessions, oldest first, a batch at a time (console_sessions_expiry).
PRUNE = """
DELETE FROM console_sessions WHERE id_hash = ANY(ARRAY(
    SELECT id_hash FROM console_sessions WHERE expires_at < $1
    ORDER BY expires_at LIMIT $2))
"""
INSERT = """
INSERT INTO console_sessions (id_hash, role, agent_id, admin_hash, name, csrf_token,
                              created_at, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
"""


def digest(secret: str) -> str:
    """What is stored for a session id or compared for the admin token: SHA-256, hex."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _refusal(code: str, message: str) -> web.HTTPException:
    return http_error(
        web.HTTPUnauthorized, code, message, headers={"WWW-Authenticate": REALM, **NO_STORE}
    )


def _store_unavailable() -> web.HTTPException:
    return http_error(
        web.HTTPServiceUnavailable,
        "store_unavailable",
        "the database is unreachable; retry later",
        headers={"Retry-After": "1"},
    )


def _admin_hash(request: web.Request) -> str | None:
    configured = request.app[SETTINGS].admin_token
    token = configured.get_secret_value() if configured is not None else ""
    return digest(token) if token else None


async def resolve(request: web.Request, cookie: str) -> Principal:
    """The principal of a session cookie. Raises 401 ``invalid_session`` (unknown, signed
    out, its agent removed, or the admin token changed), 401 ``session_expired``, 503."""
    try:
        pool = await request.app[STORE].pool()
        row = await pool.fetchrow(LOOKUP, digest(cookie))
    except StoreUnavailable:
        raise _store_unavailable() from None
    except UNAVAILABLE:
        raise _store_unavailable() from None
    if row is None:
        raise _refusal("invalid_session", "the session is not valid; sign in again")
    if row["session_expires_at"] <= utcnow():
        raise _refusal("session_expired", "the session has expired; sign in again")
    if row["session_role"] == "agent":
        if row["id"] is None:
            raise _refusal("invalid_session", "the session's agent was removed")
        agent = row
    else:
        current = _admin_hash(request)
        if current is None or not hmac.compare_digest(current, row["session_admin_hash"]):
            raise _refusal("invalid_session", "the admin token has changed; sign in again")
        agent = None
    return Principal(
        role=row["session_role"],
        name=row["session_name"],
        csrf_token=row["session_csrf"],
        expires_at=row["session_expires_at"],
        agent=agent,
    )


def _csrf_ok(request: web.Request, principal: Principal) -> bool:
    sent = request.headers.get(CSRF_HEADER, "")
    return hmac.compare_digest(sent.encode(), principal.csrf_token.encode())


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Resolve the session cookie of an ``/api/`` request that has no ``Authorization``
    header; check the CSRF token of a state-changing one (403 ``csrf_failed``). A cookie
    that signs nobody in is not refused here (signing in again must work): the guards of
    ``router.auth`` answer with its refusal."""
    cookie = request.cookies.get(COOKIE)
    if cookie and request.path.startswith("/api/") and "Authorization" not in request.headers:
        try:
            principal = await resolve(request, cookie)
        except web.HTTPException as refusal:
            request[REFUSAL] = refusal
        else:
            request[PRINCIPAL] = principal
            signing_in = request.method == "POST" and request.path == PATH
            if request.method in UNSAFE and not signing_in and not _csrf_ok(request, principal):
                raise http_error(
                    web.HTTPForbidden,
                    "csrf_failed",
                    f"a call made with the session cookie needs the session's {CSRF_HEADER}",
                )
    return await handler(request)


def _out(principal: Principal) -> SessionOut:
    return SessionOut(
        role=principal.role,
        agent_id=None if principal.agent is None else principal.agent["id"],
        name=principal.name,
        csrf_token=principal.csrf_token,
        expires_at=principal.expires_at,
    )


def _secure(request: web.Request) -> bool:
    # Secure: the browser sends the cookie over https only (MDN, Set-Cookie).
    return request.app[SETTINGS].public_url.scheme == "https"


async def _sign_in_as(
    request: web.Request, conn: Connection, body: SessionCreate
) -> tuple[Principal, str | None]:
    """Who the body's token signs in, and the admin token's hash for a supervisor.
    Raises 401 ``invalid_token``."""
    token = body.token.get_secret_value()
    configured = request.app[SETTINGS].admin_token
    expected = configured.get_secret_value() if configured is not None else ""
    ttl = timedelta(seconds=request.app[SETTINGS].session_ttl)
    csrf = secrets.token_urlsafe(SESSION_BYTES)
    if expected and is_admin_token(token, expected):
        name = body.name or supervisor.DEFAULT_ACTOR
        return Principal("supervisor", name, csrf, utcnow() + ttl), digest(expected)
    agent = await agent_by_token(conn, token)
    if agent is None:
        raise _refusal("invalid_token", "the token is not valid")
    return Principal("agent", body.name or agent["name"], csrf, utcnow() + ttl, agent), None


def refuse_cross_site(request: web.Request) -> None:
    """Login CSRF: a page elsewhere must not sign this browser in as someone else (OWASP
    CSRF Prevention Cheat Sheet, "Login CSRF"). A cross-site HTML form can only post
    urlencoded, multipart or text/plain bodies, and a cross-site fetch of JSON needs a CORS
    preflight this router never grants, so JSON is required; browsers that send Fetch
    Metadata (``Sec-Fetch-Site``, MDN) are also held to same-origin requests."""
    kind = request.content_type
    if kind != "application/json":
        raise http_error(
            web.HTTPUnsupportedMediaType,
            "unsupported_media_type",
            "send the sign-in as application/json",
            headers=NO_STORE,
        )
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        raise http_error(
            web.HTTPForbidden, "cross_site", "sign in from the console itself", headers=NO_STORE
        )


async def sign_in(request: web.Request) -> web.Response:
    refuse_cross_site(request)
    body = await parse_body(request, SessionCreate)
    session_id = secrets.token_urlsafe(SESSION_BYTES)
    now = utcnow()
    try:
        async with request.app[STORE].transaction() as conn:
            principal, admin_hash = await _sign_in_as(request, conn, body)
            await conn.execute(PRUNE, now, PRUNE_BATCH)
            if old := request.cookies.get(COOKIE):  # signing in again replaces the session
                await conn.execute("DELETE FROM console_sessions WHERE id_hash = $1", digest(old))
            agent_id = None if principal.agent is None else principal.agent["id"]
            await conn.execute(
                INSERT,
                digest(session_id),
                principal.role,
                agent_id,
                admin_hash,
                principal.name,
                principal.csrf_token,
                now,
                principal.expires_at,
            )
    except StoreUnavailable:
        raise _store_unavailable() from None
    log.info("session.opened", role=principal.role, agent_id=agent_id and str(agent_id))
    response = web.json_response(_out(principal).model_dump(mode="json"), status=201)
    response.headers.update(NO_STORE)
    response.set_cookie(
        COOKIE,
        session_id,
        # Whole seconds, rounded up: Max-Age=0 would delete the cookie at once.
        max_age=math.ceil(request.app[SETTINGS].session_ttl),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=_secure(request),
    )
    return response


async def show(request: web.Request) -> web.Response:
    principal = session_principal(request)
    if principal is None:
        raise _refusal("unauthorized", "sign in first: POST /api/session")
    return web.json_response(_out(principal).model_dump(mode="json"), headers=NO_STORE)


async def sign_out(request: web.Request) -> web.Response:
    """Idempotent: without a valid session there is nothing to end, and the answer is the
    same (the cookie is cleared either way)."""
    if cookie := request.cookies.get(COOKIE):
        try:
            async with request.app[STORE].transaction() as conn:
                await conn.execute(
                    "DELETE FROM console_sessions WHERE id_hash = $1", digest(cookie)
                )
        except StoreUnavailable:
            raise _store_unavailable() from None
        log.info("session.closed")
    response = web.Response(status=204, headers=NO_STORE)
    response.del_cookie(COOKIE, path="/", httponly=True, samesite="Strict", secure=_secure(request))
    return response


CSRF = Header(
    CSRF_HEADER,
    {"type": "string"},
    "the session's csrf_token: required on POST, PUT, PATCH and DELETE calls made with the"
    " session cookie (403 csrf_failed otherwise)",
)
TAGS = ("session",)
ROUTES = [
    Route(
        "POST",
        PATH,
        sign_in,
        "createSession",
        "Sign in to the console with an agent's token or the admin token: sets the"
        f" {COOKIE} cookie (HttpOnly, SameSite=Strict); 401 invalid_token",
        TAGS,
        None,
        {201: SessionOut},
        errors=(400, 401, 403, 415, 422, 503),
        request=SessionCreate,
    ),
    Route(
        "GET",
        PATH,
        show,
        "getSession",
        "The session the cookie holds (401 unauthorized, invalid_session, session_expired)",
        TAGS,
        "sessionCookie",
        {200: SessionOut},
    ),
    Route(
        "DELETE",
        PATH,
        sign_out,
        "deleteSession",
        "Sign out: the session ends and the cookie is cleared (Max-Age=0)",
        TAGS,
        None,
        {204: "Signed out"},
        errors=(403, 503),
        headers=(CSRF,),
    ),
]
