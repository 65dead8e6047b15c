"""The browser console's session (``/api/session``): an HttpOnly SameSite=Strict cookie
instead of a bearer token, with a CSRF token for state-changing calls. (Being built.)"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from router.routes import Route

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Resolve a session cookie into the request's principal (not yet: passes through)."""
    return await handler(request)


ROUTES: list[Route] = []
