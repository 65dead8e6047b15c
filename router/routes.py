"""A route, declared once: what aiohttp serves and what the OpenAPI document says about it.

Each router module lists its routes in ``ROUTES`` beside their handlers; ``router.app`` adds
them to the application and ``router.openapi`` builds the document from the same lists, so a
route cannot be served without being documented, nor documented without being served.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel

Auth = Literal["adminToken", "agentToken", "sessionCookie"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Many:
    """A JSON array of ``model``."""

    model: type[BaseModel]


@dataclass(frozen=True)
class Content:
    """A body that is not a model's JSON: TwiML, metrics text, a file, an event stream."""

    media_type: str
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})
    example: str | None = None


# A model (its JSON), a list of a model, another content, or a bodiless answer's description.
Answer = type[BaseModel] | Many | Content | str


@dataclass(frozen=True)
class Query:
    """An optional query parameter."""

    name: str
    schema: Mapping[str, Any]
    description: str


@dataclass(frozen=True)
class Header:
    """An optional request header the operation reads."""

    name: str
    schema: Mapping[str, Any]
    description: str


@dataclass(frozen=True)
class Route:
    """One operation: where it is served, who may call it, what it takes and answers.

    ``responses`` are the answers a handler gives on purpose (success, and a model answered
    with an error status such as ``/readyz``'s 503); ``errors`` the statuses answered with
    the API's error body. A route with ``auth`` also answers 401 and 503 (no token, the
    admin API disabled or the database away) without saying so here.
    """

    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    tags: tuple[str, ...]
    auth: Auth | None
    responses: Mapping[int, Answer]
    errors: tuple[int, ...] = ()
    request: type[BaseModel] | None = None  # JSON request body
    request_required: bool = True
    form: type[BaseModel] | None = None  # a Twilio webhook's signed url-encoded form
    query: tuple[Query, ...] = ()
    headers: tuple[Header, ...] = ()
    idempotency_key: bool = False  # takes ``Idempotency-Key`` (omniroute.domain.idempotency)


def add_routes(app: web.Application, routes: Iterable[Route]) -> None:
    """Serve ``routes`` (a GET answers HEAD too, as aiohttp's ``add_get`` does)."""
    for route in routes:
        if route.method == "GET":
            app.router.add_get(route.path, route.handler)
        else:
            app.router.add_route(route.method, route.path, route.handler)
