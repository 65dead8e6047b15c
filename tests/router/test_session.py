"""The console's session (``/api/session``) over HTTP against the real database: signing in
with an agent's token or the admin token, the cookie's flags, the session standing in for
the bearer token on the agent and admin APIs, CSRF on state-changing calls, sign-out, expiry,
a removed agent, a rotated admin token, and no secret in the logs."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg
import pytest
import structlog
from aiohttp.test_utils import TestClient, TestServer

from omniroute.infra.config_loader import LiveConfig
from omniroute.infra.logging import configure_logging
from router.app import create_app
from router.session import COOKIE, CSRF_HEADER
from router.state import BUS
from tests.conftest import Infra, make_settings
from tests.support import new_agent, wait_for

Client = TestClient[Any, Any]
ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SESSION = "/api/session"


@contextlib.asynccontextmanager
async def _router(
    infra: Infra, config: LiveConfig, *, admin_token: str | None = ADMIN_TOKEN, **settings: Any
) -> AsyncIterator[Client]:
    """A router whose client keeps no cookies: each test sends the cookie it means to."""
    app = create_app(make_settings(infra, admin_token=admin_token, **settings), config)
    async with TestClient(TestServer(app), cookie_jar=aiohttp.DummyCookieJar()) as client:
        async with asyncio.timeout(10):
            await app[BUS].wait_ready()
        yield client


@pytest.fixture
async def router(infra: Infra, config: LiveConfig) -> AsyncIterator[Client]:
    async with _router(infra, config) as client:
        yield client


class Session:
    """A signed-in browser: the cookie it holds and the CSRF token the page keeps."""

    def __init__(self, body: dict[str, Any], cookie: str) -> None:
        self.body = body
        self.cookie = {"Cookie": f"{COOKIE}={cookie}"}
        self.csrf = {**self.cookie, CSRF_HEADER: body["csrf_token"]}


async def _sign_in(client: Client, token: str, name: str | None = None) -> Session:
    body: dict[str, Any] = {"token": token} | ({"name": name} if name else {})
    response = await client.post(SESSION, json=body)
    assert response.status == 201, await response.text()
    return Session(await response.json(), response.cookies[COOKIE].value)


def _token(auth: dict[str, str]) -> str:
    return auth["Authorization"].removeprefix("Bearer ")


async def _error(response: aiohttp.ClientResponse, status: int) -> str:
    assert response.status == status, await response.text()
    code: str = (await response.json())["error"]["code"]
    return code


async def test_an_agent_signs_in_and_the_cookie_stands_in_for_its_token(
    router: Client, db: asyncpg.Pool
) -> None:
    agent_id, auth = await new_agent(db, name="Ana")
    response = await router.post(SESSION, json={"token": _token(auth)})
    assert response.status == 201
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert body["role"] == "agent"
    assert body["agent_id"] == agent_id
    assert body["name"] == "Ana"
    assert len(body["csrf_token"]) >= 32
    assert datetime.fromisoformat(body["expires_at"]) > datetime.now().astimezone()

    # HttpOnly (no script reads it), SameSite=Strict, the whole site, Secure on https.
    [header] = response.headers.getall("Set-Cookie")
    attributes = {a.strip().split("=")[0].lower() for a in header.split(";")[1:]}
    assert {"httponly", "samesite", "path", "secure", "max-age"} <= attributes
    assert "SameSite=Strict" in header and "Path=/" in header
    cookie = response.cookies[COOKIE].value
    assert len(cookie) >= 40 and cookie not in await response.text()
    session = Session(body, cookie)

    shown = await router.get(SESSION, headers=session.cookie)
    assert shown.status == 200
    assert shown.headers["Cache-Control"] == "no-store"
    assert await shown.json() == body
    me = await router.get("/api/me", headers=session.cookie)
    assert me.status == 200
    assert (await me.json())["id"] == agent_id
    # The session is stored hashed: the table does not hold the cookie.
    assert not await db.fetchval(
        "SELECT count(*) FROM console_sessions WHERE id_hash = $1 OR csrf_token = $1", cookie
    )


async def test_state_changing_calls_with_the_cookie_need_the_csrf_token(
    router: Client, db: asyncpg.Pool
) -> None:
    _, auth = await new_agent(db)
    session = await _sign_in(router, _token(auth))
    busy = {"presence": "busy"}
    refused = await router.put("/api/me/presence", json=busy, headers=session.cookie)
    assert await _error(refused, 403) == "csrf_failed"
    wrong = {**session.cookie, CSRF_HEADER: session.body["csrf_token"][:-1] + "x"}
    refused = await router.put("/api/me/presence", json=busy, headers=wrong)
    assert await _error(refused, 403) == "csrf_failed"
    assert (await (await router.get("/api/me", headers=session.cookie)).json())[
        "presence"
    ] == "offline"

    done = await router.put("/api/me/presence", json=busy, headers=session.csrf)
    assert done.status == 200, await done.text()
    assert (await done.json())["presence"] == "busy"
    # A bearer caller is judged by its token alone: no CSRF token, even with a cookie.
    bearer = await router.put(
        "/api/me/presence", json={"presence": "away"}, headers={**auth, **session.cookie}
    )
    assert bearer.status == 200


async def test_a_supervisor_session_works_where_the_admin_token_does(
    router: Client, db: asyncpg.Pool
) -> None:
    agent_id, auth = await new_agent(db)
    session = await _sign_in(router, ADMIN_TOKEN, name="Sofia")
    assert session.body["role"] == "supervisor"
    assert session.body["agent_id"] is None
    assert session.body["name"] == "Sofia"
    listed = await router.get("/api/admin/agents", headers=session.cookie)
    assert listed.status == 200
    assert agent_id in {a["id"] for a in await listed.json()}

    # A supervisor's action is audited under the session's name.
    path = f"/api/admin/agents/{agent_id}/presence"
    refused = await router.put(path, json={"presence": "away"}, headers=session.cookie)
    assert await _error(refused, 403) == "csrf_failed"
    # The session's name is bound at sign-in: a header naming someone else does not win.
    impostor = {**session.csrf, "X-Omniroute-Actor": "Someone Else"}
    acted = await router.put(path, json={"presence": "away"}, headers=impostor)
    assert acted.status == 200, await acted.text()
    actors = await db.fetch(
        "SELECT body->'data'->>'actor' AS actor FROM outbox WHERE routing_key ="
        " 'supervisor.acted' AND body->'data'->>'agent_id' = $1",
        agent_id,
    )
    assert [r["actor"] for r in actors] == ["Sofia"]

    # Each role stays its own: a supervisor is not an agent, an agent not a supervisor.
    assert await _error(await router.get("/api/me", headers=session.cookie), 403) == "forbidden"
    agent_session = await _sign_in(router, _token(auth))
    denied = await router.get("/api/admin/agents", headers=agent_session.cookie)
    assert await _error(denied, 403) == "forbidden"


async def test_a_wrong_token_is_refused_without_being_echoed(router: Client) -> None:
    for token in ("omr_" + uuid.uuid4().hex, ADMIN_TOKEN + "x", "x" * 500):
        response = await router.post(SESSION, json={"token": token})
        assert await _error(response, 401) == "invalid_token"
        assert token not in await response.text()
        assert COOKIE not in response.cookies
    bad = await router.post(SESSION, json={"token": "omr_x", "role": "supervisor"})
    assert await _error(bad, 422) == "invalid_body"
    assert "omr_x" not in await bad.text()
    assert await _error(await router.get(SESSION), 401) == "unauthorized"


async def test_sign_out_ends_the_session_and_clears_the_cookie(
    router: Client, db: asyncpg.Pool
) -> None:
    _, auth = await new_agent(db)
    session = await _sign_in(router, _token(auth))
    refused = await router.delete(SESSION, headers=session.cookie)
    assert await _error(refused, 403) == "csrf_failed"
    assert (await router.get(SESSION, headers=session.cookie)).status == 200

    out = await router.delete(SESSION, headers=session.csrf)
    assert out.status == 204
    [header] = out.headers.getall("Set-Cookie")
    assert header.startswith(f'{COOKIE}="";') and "Max-Age=0" in header
    assert "SameSite=Strict" in header and "Path=/" in header

    for path in (SESSION, "/api/me", "/api/me/offers"):
        gone = await router.get(path, headers=session.cookie)
        assert await _error(gone, 401) == "invalid_session", path
    # Signing in again with the stale cookie still in the browser works.
    again = await router.post(SESSION, json={"token": _token(auth)}, headers=session.cookie)
    assert again.status == 201
    # Signing out twice is not an error.
    assert (await router.delete(SESSION, headers=session.cookie)).status == 204


async def test_a_session_expires(infra: Infra, config: LiveConfig, db: asyncpg.Pool) -> None:
    _, auth = await new_agent(db)
    async with _router(infra, config, session_ttl=0.5) as client:
        response = await client.post(SESSION, json={"token": _token(auth)})
        [header] = response.headers.getall("Set-Cookie")
        assert "Max-Age=1" in header  # whole seconds, rounded up: 0 would delete it
        session = Session(await response.json(), response.cookies[COOKIE].value)
        assert (await client.get("/api/me", headers=session.cookie)).status == 200

        async def expired() -> bool:
            answer = await client.get("/api/me", headers=session.cookie)
            return answer.status == 401 and (await answer.json())["error"]["code"] == (
                "session_expired"
            )

        await wait_for(expired, timeout=5)
        assert await _error(await client.get(SESSION, headers=session.cookie), 401) == (
            "session_expired"
        )
        # Signing in again prunes the expired row.
        await client.post(SESSION, json={"token": _token(auth)})
        assert not await db.fetchval(
            "SELECT count(*) FROM console_sessions WHERE csrf_token = $1",
            session.body["csrf_token"],
        )


async def test_a_removed_agent_is_signed_out(router: Client, db: asyncpg.Pool) -> None:
    agent_id, auth = await new_agent(db)
    session = await _sign_in(router, _token(auth))
    removed = await router.delete(f"/api/admin/agents/{agent_id}", headers=ADMIN)
    assert removed.status == 204
    assert await _error(await router.get("/api/me", headers=session.cookie), 401) == (
        "invalid_session"
    )


async def test_a_new_admin_token_signs_supervisors_out(
    infra: Infra, config: LiveConfig, router: Client
) -> None:
    session = await _sign_in(router, ADMIN_TOKEN)
    async with _router(infra, config, admin_token="rotated-" + uuid.uuid4().hex) as rotated:
        stale = await rotated.get("/api/admin/agents", headers=session.cookie)
        assert await _error(stale, 401) == "invalid_session"
    async with _router(infra, config, admin_token=None) as disabled:
        stale = await disabled.get("/api/admin/agents", headers=session.cookie)
        assert await _error(stale, 503) == "admin_disabled"
        assert await _error(await disabled.post(SESSION, json={"token": ADMIN_TOKEN}), 401) == (
            "invalid_token"
        )


async def test_no_secure_flag_on_plain_http(
    infra: Infra, config: LiveConfig, db: asyncpg.Pool
) -> None:
    _, auth = await new_agent(db)
    async with _router(infra, config, public_url="http://127.0.0.1:8080") as client:
        response = await client.post(SESSION, json={"token": _token(auth)})
        [header] = response.headers.getall("Set-Cookie")
        assert "HttpOnly" in header and "Secure" not in header


@pytest.fixture
def rendered_logs() -> Iterator[io.BytesIO]:
    """Every structlog line rendered as the service renders it (JSON, debug level), into a
    buffer."""
    previous = structlog.get_config()
    buffer = io.BytesIO()
    configure_logging("json", "debug")
    structlog.configure(logger_factory=structlog.BytesLoggerFactory(file=buffer))
    try:
        yield buffer
    finally:
        configure_logging("console", "warning")  # takes the JSON root handler off again
        structlog.configure(**previous)


async def test_no_token_cookie_or_csrf_token_in_the_logs(
    router: Client,
    db: asyncpg.Pool,
    rendered_logs: io.BytesIO,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    _, auth = await new_agent(db)
    token = _token(auth)
    session = await _sign_in(router, token)
    await router.post(SESSION, json={"token": token + "x"})
    await router.get("/api/me", headers=session.cookie)
    await router.put("/api/me/presence", json={"presence": "busy"}, headers=session.csrf)
    await router.put("/api/me/presence", json={"presence": "away"}, headers=session.cookie)
    await router.delete(SESSION, headers=session.csrf)
    written = rendered_logs.getvalue().decode() + caplog.text
    assert "session.opened" in written and "session.closed" in written
    cookie = session.cookie["Cookie"].split("=", 1)[1]
    for secret in (token, cookie, session.body["csrf_token"]):
        assert secret not in written


async def test_a_page_elsewhere_cannot_sign_this_browser_in(
    router: Client, db: asyncpg.Pool
) -> None:
    """Login CSRF: a cross-site form posts text/plain (a JSON-looking body) or urlencoded."""
    _, auth = await new_agent(db, name="Mallory")
    forged = f'{{"token": "{_token(auth)}", "name": "a="}}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        response = await router.post(SESSION, data=forged, headers={"Content-Type": content_type})
        assert response.status == 415, content_type
        assert "Set-Cookie" not in response.headers
    cross = await router.post(
        SESSION, json={"token": _token(auth)}, headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert cross.status == 403
    assert (await cross.json())["error"]["code"] == "cross_site"
    assert "Set-Cookie" not in cross.headers
    same = await router.post(
        SESSION, json={"token": _token(auth)}, headers={"Sec-Fetch-Site": "same-origin"}
    )
    assert same.status == 201
