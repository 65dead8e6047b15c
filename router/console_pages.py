"""The browser console: its two pages (``/console`` for agents, ``/console/supervisor``) and
their static files (``/console/static/<file>``), read from the installed package
(``router/static/console/``, shipped as package data) with ``importlib.resources``.

Plain ES modules, no build step and no CDN: the page's only origin is this router, so the
Content-Security-Policy can be strict (no inline script or style, nothing from elsewhere,
never framed). The pages are in the OpenAPI document like every served route, without
security: they are public; what they show comes from the API, behind the session.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from importlib.resources import files
from importlib.resources.abc import Traversable

from aiohttp import web

from router.auth import http_error
from router.routes import Content, Route

TAGS = ("console",)
STATIC = "/console/static"

# Only these kinds of file are served, each with its type. Module scripts are checked
# strictly: the response must carry a JavaScript MIME type or the browser refuses to run it
# (HTML spec, "fetch a single module script"; https://github.com/whatwg/html/issues/3255);
# text/javascript is the one RFC 9239 and the HTML spec name.
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".woff2": "font/woff2",
}
# A file of the console folder itself: no separators, no dot files, nothing to climb out.
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")

# frame-ancestors only works as a header, never in a <meta> CSP
# (https://developer.mozilla.org/docs/Web/HTTP/Headers/Content-Security-Policy/frame-ancestors).
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "media-src 'self' blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def console_files() -> Traversable:
    """The console's folder inside the installed ``router`` package."""
    return files("router").joinpath("static", "console")


async def _serve(request: web.Request, name: str) -> web.Response:
    """The file ``name`` of the console folder with its type, revalidated on every use
    (``Cache-Control: no-cache`` + ``ETag``) so a new release is never hidden by a cache;
    404 for anything that is not a file of a served kind."""
    suffix = name[name.rfind(".") :] if "." in name else ""
    if not FILE_NAME.fullmatch(name) or suffix not in TYPES:
        raise _missing()
    path = console_files().joinpath(name)
    if not path.is_file():
        raise _missing()
    body = await asyncio.to_thread(path.read_bytes)
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache", "ETag": etag}
    if etag in _tags(request.headers.get("If-None-Match", "")):
        return web.Response(status=304, headers=headers)
    response = web.Response(body=body, headers=headers)
    response.headers["Content-Type"] = TYPES[suffix]
    return response


def _tags(if_none_match: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in if_none_match.split(",") if tag.strip()}


def _missing() -> web.HTTPException:
    return http_error(web.HTTPNotFound, "not_found", "no such console file")


async def agent_page(request: web.Request) -> web.Response:
    return await _serve(request, "agent.html")


async def supervisor_page(request: web.Request) -> web.Response:
    return await _serve(request, "supervisor.html")


async def static_file(request: web.Request) -> web.Response:
    return await _serve(request, request.match_info["name"])


async def home(request: web.Request) -> web.Response:
    raise web.HTTPFound("/console")


HTML = Content("text/html", {"type": "string", "description": "the page"})
NOT_MODIFIED = "Not modified: the ETag sent in If-None-Match is current"
ROUTES = [
    Route(
        "GET",
        "/",
        home,
        "home",
        "Redirects to the agent console",
        TAGS,
        None,
        {302: "Found: the agent console, /console"},
    ),
    Route(
        "GET",
        "/console",
        agent_page,
        "getAgentConsole",
        "The agent workspace (a page)",
        TAGS,
        None,
        {200: HTML, 304: NOT_MODIFIED},
    ),
    Route(
        "GET",
        "/console/supervisor",
        supervisor_page,
        "getSupervisorConsole",
        "The supervisor's view (a page)",
        TAGS,
        None,
        {200: HTML, 304: NOT_MODIFIED},
        errors=(404,),
    ),
    Route(
        "GET",
        STATIC + "/{name}",
        static_file,
        "getConsoleFile",
        "A script, style sheet or image of the console",
        TAGS,
        None,
        {
            200: Content("*/*", {"type": "string", "format": "binary"}),
            304: NOT_MODIFIED,
        },
        errors=(404,),
    ),
]
