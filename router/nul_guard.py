"""U+0000 is refused at the API's door: PostgreSQL cannot store it in text or jsonb, so a
NUL in a path, a query or a JSON body would otherwise fail deep inside as a 500."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from router.responses import error

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


async def _where(request: web.Request) -> str | None:
    if "\x00" in request.path:
        return "path"
    if any(_has_nul(k) or _has_nul(v) for k, v in request.query.items()):
        return "query"
    if request.body_exists:  # handlers read JSON whatever the declared type
        try:
            body = orjson.loads(await request.read())  # aiohttp keeps it for the handler
        except orjson.JSONDecodeError:
            return None  # the handler says what is wrong with it
        if _has_nul(body):
            return "body"
    return None


@web.middleware
async def refuse_nul(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/api/"):
        where = await _where(request)
        if where is not None:
            return error(422, "invalid_character", "text may not contain U+0000 (NUL)", where=where)
    return await handler(request)
