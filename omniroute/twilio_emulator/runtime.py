"""Typed app keys and the background-task registry shared by the emulator's handlers."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from twilio.request_validator import RequestValidator

from omniroute.twilio_emulator.connection_overrides import DEFAULT_OVERRIDES
from omniroute.twilio_emulator.state import EmulatorState

STATE_KEY = web.AppKey("emulator_state", EmulatorState)
SESSION_KEY = web.AppKey("emulator_http_session", aiohttp.ClientSession)
TASKS_KEY: web.AppKey[set[asyncio.Task[None]]] = web.AppKey("emulator_background_tasks")

#: The session's default: Twilio's default connect, read and total times. Each webhook
#: attempt passes its own (see ``webhooks.deliver``), so a URL's overrides win.
WEBHOOK_TIMEOUT = DEFAULT_OVERRIDES.client_timeout(DEFAULT_OVERRIDES.total_time)

log = structlog.get_logger("omniroute.twilio_emulator")


def spawn(app: web.Application, coro: Coroutine[Any, Any, None], name: str) -> None:
    """Run ``coro`` in the background, tracked so app cleanup (or a reset) can cancel it."""
    tasks = app[TASKS_KEY]
    task = asyncio.get_running_loop().create_task(coro, name=name)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def cancel_background_tasks(app: web.Application) -> None:
    """Cancel every pending background task and wait for them to finish."""
    pending: set[asyncio.Task[None]] = app[TASKS_KEY]
    tasks = list(pending)
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


async def runtime_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: one HTTP client session per app; background tasks cancelled on cleanup."""
    app[TASKS_KEY] = set()
    app[SESSION_KEY] = aiohttp.ClientSession(timeout=WEBHOOK_TIMEOUT)
    try:
        yield
    finally:
        await cancel_background_tasks(app)
        await app[SESSION_KEY].close()


def sign(token: str, url: str, params: dict[str, str]) -> str:
    """Return the ``X-Twilio-Signature`` Twilio would send for this URL and form."""
    signature: str = RequestValidator(token).compute_signature(url, params)
    return signature


def token_matches(expected: str, given: str) -> bool:
    """Compare two secrets in constant time."""
    return hmac.compare_digest(expected.encode(), given.encode())


def bad_request(message: str) -> web.HTTPBadRequest:
    """Return a 400 for the emulator's own control endpoints, ``{"error": message}``."""
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")
