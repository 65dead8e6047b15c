"""``GET /api/openapi.json``: the HTTP API as an OpenAPI 3.1 document.

The document is generated, never written by hand: the operations from the routes the router
serves (each module's ``ROUTES``, ``router.routes.Route``), the schemas from the pydantic
models those routes name (``schemas/``). It is built once per app, when the routes are
added, and served as the same bytes afterwards (no I/O).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from omniroute.domain.idempotency import MAX_KEY_LENGTH
from router.routes import Content, Many, Route
from router.signature import SIGNATURE_HEADER
from schemas.api import ErrorBody

OPENAPI_VERSION = "3.1.0"
API_VERSION = "0.1.0"
PATH = "/api/openapi.json"
REF_TEMPLATE = "#/components/schemas/{model}"
DOCUMENT = web.AppKey("openapi_document", bytes)
TEXT = {"type": "string"}

SECURITY_SCHEMES = {
    "adminToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "the deployment's OMNIROUTE_ADMIN_TOKEN",
    },
    "agentToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "an agent's token, shown once when the agent is created",
    },
    "sessionCookie": {
        "type": "apiKey",
        "in": "cookie",
        "name": "omniroute_session",
        "description": "the console's session (POST /api/session): an agent session wherever"
        " agentToken is accepted, a supervisor's wherever adminToken is; POST, PUT, PATCH and"
        " DELETE calls made with it need the session's X-CSRF-Token (403 csrf_failed)",
    },
}

DESCRIPTIONS = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No content",
    400: "Malformed request: not JSON, or not a form",
    401: "Missing or invalid bearer token",
    403: f"{SIGNATURE_HEADER} does not match the request",
    404: "No such resource, or not the caller's",
    409: "Conflicts with the current state",
    413: "Body too large",
    415: "Not application/x-www-form-urlencoded",
    422: "Well-formed but not valid: details.fields names each problem",
    502: "Twilio could not provide the resource",
    503: "A dependency is unavailable; retry after Retry-After",
}
# What else these statuses mean on a route that takes an Idempotency-Key.
KEY_DESCRIPTIONS = {
    400: "; or an empty or too long Idempotency-Key",
    409: "; or a request with this Idempotency-Key is still in progress",
    422: "; or this Idempotency-Key was used with another request",
}
# What every route with a bearer token may answer besides its own errors: no or a wrong
# token, the admin API disabled or the database away.
AUTH_ERRORS = (401, 503)
# What a route taking the session cookie may answer 403 for.
SESSION_FORBIDDEN = (
    "A POST, PUT, PATCH or DELETE with the session cookie but not its X-CSRF-Token"
    " (csrf_failed), or the other role's session (forbidden)"
)

Refs = dict[tuple[type[BaseModel], JsonSchemaMode], dict[str, Any]]


async def serve(request: web.Request) -> web.Response:
    return web.Response(body=request.app[DOCUMENT], content_type="application/json")


ROUTES = [
    Route(
        "GET",
        PATH,
        serve,
        "getOpenApiDocument",
        "This document",
        ("operations",),
        None,
        {200: Content("application/json", {"type": "object"})},
    ),
]


def _content(answer: type[BaseModel] | Many | Content, refs: Refs) -> dict[str, Any]:
    if isinstance(answer, Many):
        schema = {"type": "array", "items": refs[(answer.model, "serialization")]}
        return {"application/json": {"schema": schema}}
    if isinstance(answer, Content):
        media: dict[str, Any] = {"schema": dict(answer.schema)}
        if answer.example is not None:
            media["example"] = answer.example
        return {answer.media_type: media}
    return {"application/json": {"schema": refs[(answer, "serialization")]}}


def _responses(route: Route, refs: Refs) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, answer in route.responses.items():
        if isinstance(answer, str):
            responses[str(status)] = {"description": answer}
        else:
            responses[str(status)] = {
                "description": DESCRIPTIONS[status],
                "content": _content(answer, refs),
            }
    error = {"application/json": {"schema": refs[(ErrorBody, "serialization")]}}
    auth_errors = (*AUTH_ERRORS, 403) if route.auth else ()
    session = route.auth is not None or route.path.startswith("/api/session")
    for status in sorted({*route.errors, *auth_errors} - set(route.responses)):
        description = DESCRIPTIONS[status]
        if status == 403 and session:
            description = SESSION_FORBIDDEN
        if route.idempotency_key:
            description += KEY_DESCRIPTIONS.get(status, "")
        responses[str(status)] = {"description": description, "content": error}
    return responses


def _parameters(route: Route) -> list[dict[str, Any]]:
    parameters: list[dict[str, Any]] = []
    for name in re.findall(r"\{(\w+)\}", route.path):
        schema: dict[str, Any] = dict(TEXT)
        if name == "n":
            schema = {"type": "integer", "minimum": 0}
        elif name.endswith("_id"):
            schema["format"] = "uuid"
        parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
    optional = [("query", q) for q in route.query] + [("header", h) for h in route.headers]
    for where, parameter in optional:
        parameters.append(
            {
                "name": parameter.name,
                "in": where,
                "required": False,
                "schema": dict(parameter.schema),
                "description": parameter.description,
            }
        )
    if route.idempotency_key:
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH},
                "description": "a retry with the same key and body answers as the first request"
                " did; the same key with another body is a 422 idempotency_key_reused",
            }
        )
    if route.form is not None:
        parameters.append(
            {
                "name": SIGNATURE_HEADER,
                "in": "header",
                "required": True,
                "schema": TEXT,
                "description": "Twilio's signature over the public URL and the form",
            }
        )
    return parameters


def _request_body(route: Route, refs: Refs) -> dict[str, Any] | None:
    if route.request is not None:
        schema = refs[(route.request, "validation")]
        return {
            "required": route.request_required,
            "content": {"application/json": {"schema": schema}},
        }
    if route.form is not None:
        schema = refs[(route.form, "validation")]
        return {
            "required": True,
            "content": {"application/x-www-form-urlencoded": {"schema": schema}},
        }
    return None


def _security(route: Route) -> list[dict[str, list[str]]]:
    """The route's token, or the console's session cookie in its place."""
    if route.auth is None:
        return []
    if route.auth == "sessionCookie":
        return [{route.auth: []}]
    return [{route.auth: []}, {"sessionCookie": []}]


def _operation(route: Route, refs: Refs) -> dict[str, Any]:
    out: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "tags": list(route.tags),
        "security": _security(route),
    }
    if parameters := _parameters(route):
        out["parameters"] = parameters
    if (body := _request_body(route, refs)) is not None:
        out["requestBody"] = body
    out["responses"] = _responses(route, refs)
    return out


def _models(routes: Sequence[Route]) -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [(ErrorBody, "serialization")]
    for route in routes:
        for model in (route.request, route.form):
            if model is not None:
                models.append((model, "validation"))
        for answer in route.responses.values():
            if isinstance(answer, Many):
                models.append((answer.model, "serialization"))
            elif isinstance(answer, type):
                models.append((answer, "serialization"))
    return list(dict.fromkeys(models))


def document(routes: Sequence[Route], server_url: str) -> dict[str, Any]:
    """The OpenAPI document of ``routes``, served at ``server_url``. Pure: no I/O, same
    input, same document. Raises ``ValueError`` for two operations with one id."""
    ids = [route.operation_id for route in routes]
    if repeated := sorted({i for i in ids if ids.count(i) > 1}):
        raise ValueError(f"operationId used twice: {', '.join(repeated)}")
    models = _models(routes)
    schemas, definitions = models_json_schema(models, ref_template=REF_TEMPLATE)
    refs: Refs = {key: schemas[key] for key in models}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, refs)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "omniroute",
            "version": API_VERSION,
            "description": "Routes WhatsApp conversations arriving through Twilio to agents.",
        },
        "servers": [
            {"url": server_url, "description": "this router (OMNIROUTE_PUBLIC_URL)"},
        ],
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": SECURITY_SCHEMES,
        },
    }
