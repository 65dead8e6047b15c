"""``GET /api/openapi.json``: the HTTP API as an OpenAPI 3.1 document.

The document is generated, never written by hand: the schemas come from the pydantic models
(``schemas/`` and the request bodies the handlers validate with), and the operations from
``OPERATIONS`` below, one row per route the router serves. A test walks the app's routes, so
a route added without a row fails the suite. The document is built once per app, when the
routes are added, and served as the same bytes afterwards (no I/O).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from router.admin_api import DEFAULT_LIMIT, MAX_IDEMPOTENCY_KEY, MAX_LIMIT
from router.messages_api import MAX_KEY
from router.responses import EMPTY_TWIML
from router.signature import SIGNATURE_HEADER
from schemas.api import (
    CONVERSATION_STATES,
    AgentCreate,
    AgentCreated,
    AgentOut,
    AgentUpdate,
    CloseRequest,
    ConversationDetail,
    ConversationOut,
    ConversationState,
    ErrorBody,
    Presence,
    PresenceUpdate,
    SurveyResults,
    TransferRequest,
    VariablesOut,
    VariablesUpdate,
)
from schemas.messages import SendMessage
from schemas.twilio import InboundMessageForm, StatusCallbackForm

OPENAPI_VERSION = "3.1.0"
API_VERSION = "0.1.0"
PATH = "/api/openapi.json"
REF_TEMPLATE = "#/components/schemas/{model}"
DOCUMENT = web.AppKey("openapi_document", bytes)

Auth = Literal["adminToken", "agentToken"]


# What the agent API and the health checks answer. The handlers build these bodies as
# dicts; the models state their shape for the document, and tests/router/test_openapi.py
# checks real answers against them. (They belong in schemas/api.py, with the handlers
# serializing through them, so the two cannot drift.)


class Window(BaseModel):
    """WhatsApp's 24-hour customer-service window."""

    open: bool
    closes_at: datetime


class AgentProfile(BaseModel):
    """The calling agent."""

    id: uuid.UUID
    name: str
    language: str | None
    queues: list[str]
    skills: dict[str, int]
    capacity: int
    used: int
    presence: Presence


class Offer(BaseModel):
    """A pending offer of a conversation to the calling agent."""

    id: uuid.UUID
    conversation_id: uuid.UUID
    expires_at: datetime
    created_at: datetime
    queue: str | None
    customer: str
    priority: int
    skills: dict[str, int]


class OfferDecision(BaseModel):
    offer_id: uuid.UUID
    state: Literal["accepted", "declined"]
    conversation_id: uuid.UUID | None


class QueueItem(BaseModel):
    """A conversation waiting in a queue that the calling agent has the skills for."""

    id: uuid.UUID
    queue: str
    priority: int
    queued_at: datetime | None
    skills: dict[str, int]
    customer: str
    workstream: str
    units: int
    fits_capacity: bool


class ConversationMoved(BaseModel):
    """The state a pick, close or transfer left the conversation in."""

    conversation_id: uuid.UUID
    state: ConversationState
    queue: str | None = None


class ConversationSummary(BaseModel):
    id: uuid.UUID
    customer: str
    state: ConversationState
    queue: str | None
    priority: int
    assigned_at: datetime | None
    last_customer_message_at: datetime
    window_closed_at: datetime | None
    window: Window


class TemplateChoice(BaseModel):
    name: str
    languages: list[str]


class AgentConversation(BaseModel):
    """One of the calling agent's conversations, with the templates usable in it."""

    id: uuid.UUID
    account: str
    business_number: str
    customer: str
    workstream: str
    state: ConversationState
    queue: str | None
    agent_id: uuid.UUID
    skills: dict[str, int]
    priority: int
    severity: str
    language: str | None
    variables: dict[str, Any]
    opened_at: datetime
    assigned_at: datetime | None
    last_customer_message_at: datetime
    window_closed_at: datetime | None
    profile_name: str | None
    window: Window
    templates: list[TemplateChoice]


class AgentMessage(BaseModel):
    id: uuid.UUID
    direction: Literal["inbound", "outbound"]
    body: str
    media: list[dict[str, Any]]
    status: str
    received_at: datetime


class MessageAccepted(BaseModel):
    """The message is stored and handed to the outbound stage."""

    id: uuid.UUID
    status: Literal["requested"]
    window: Window


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "degraded", "unavailable"]
    broker: bool
    database: bool


@dataclass(frozen=True)
class Operation:
    """One route: who may call it, what it takes and what it answers."""

    method: str
    path: str
    summary: str
    auth: Auth | None
    answer: type[BaseModel] | None = None  # JSON body of the success answer
    many: bool = False  # the answer is a JSON array of ``answer``
    media_type: str | None = None  # a success answer that is not JSON
    status: tuple[int, ...] = (200,)  # statuses answered with the success body
    body: type[BaseModel] | None = None  # JSON request body
    body_required: bool = True
    form: type[BaseModel] | None = None  # a Twilio webhook's url-encoded form
    errors: tuple[int, ...] = ()  # statuses answered with ``ErrorBody``
    idempotency_key: int | None = None  # longest Idempotency-Key, when the call takes one
    query: tuple[tuple[str, dict[str, Any], str], ...] = ()  # name, schema, description


WEBHOOK_ERRORS = (400, 403, 404, 413, 415, 503)
TEXT = {"type": "string"}

OPERATIONS: tuple[Operation, ...] = (
    # Twilio webhooks: signed with the account's auth token, no bearer token.
    Operation(
        "POST",
        "/twilio/{account}/inbound",
        "A customer's WhatsApp message (Twilio's inbound webhook)",
        None,
        media_type="text/xml",
        form=InboundMessageForm,
        errors=WEBHOOK_ERRORS,
    ),
    Operation(
        "POST",
        "/twilio/{account}/status",
        "A message's delivery status (Twilio's status callback)",
        None,
        media_type="text/xml",
        form=StatusCallbackForm,
        errors=WEBHOOK_ERRORS,
    ),
    # Operations.
    Operation("GET", "/healthz", "The process is alive", None, Health),
    Operation(
        "GET",
        "/readyz",
        "Can keep webhooks (broker or database reachable)",
        None,
        Readiness,
        status=(200, 503),
    ),
    Operation("GET", "/metrics", "Prometheus metrics", None, media_type="text/plain"),
    Operation("GET", PATH, "This document", None, media_type="application/json"),
    # Admin API.
    Operation(
        "POST",
        "/api/admin/agents",
        "Create an agent; the answer holds its token, shown only this once",
        "adminToken",
        AgentCreated,
        status=(201,),
        body=AgentCreate,
        errors=(400, 409, 422),
        idempotency_key=MAX_IDEMPOTENCY_KEY,
    ),
    Operation(
        "GET",
        "/api/admin/agents",
        "List agents",
        "adminToken",
        AgentOut,
        many=True,
        query=(("queue", TEXT, "only the agents in this queue"),),
    ),
    Operation(
        "GET", "/api/admin/agents/{agent_id}", "An agent", "adminToken", AgentOut, errors=(404,)
    ),
    Operation(
        "PATCH",
        "/api/admin/agents/{agent_id}",
        "Change an agent: only the fields sent change",
        "adminToken",
        AgentOut,
        body=AgentUpdate,
        errors=(400, 404, 422),
    ),
    Operation(
        "DELETE",
        "/api/admin/agents/{agent_id}",
        "Remove an agent",
        "adminToken",
        status=(204,),
        errors=(404,),
    ),
    Operation(
        "GET",
        "/api/admin/conversations",
        "List conversations, newest first",
        "adminToken",
        ConversationOut,
        many=True,
        errors=(422,),
        query=(
            ("state", {"enum": list(CONVERSATION_STATES)}, "only conversations in this state"),
            ("queue", TEXT, "only conversations of this queue"),
            (
                "limit",
                {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
                "how many at most",
            ),
        ),
    ),
    Operation(
        "GET",
        "/api/admin/conversations/{conversation_id}",
        "A conversation with its classification trace and messages",
        "adminToken",
        ConversationDetail,
        errors=(404,),
    ),
    Operation(
        "PATCH",
        "/api/admin/conversations/{conversation_id}/variables",
        "Set or remove a conversation's context variables",
        "adminToken",
        VariablesOut,
        body=VariablesUpdate,
        errors=(400, 404, 422),
    ),
    Operation(
        "GET",
        "/api/admin/surveys",
        "Post-conversation survey answers and their summary",
        "adminToken",
        SurveyResults,
        query=(("workstream", TEXT, "only this workstream's surveys"),),
    ),
    Operation(
        "PATCH",
        "/api/conversations/{conversation_id}/variables",
        "Set or remove context variables of one of my conversations",
        "agentToken",
        VariablesOut,
        body=VariablesUpdate,
        errors=(400, 404, 422),
    ),
    Operation(
        "POST",
        "/api/conversations/{conversation_id}/wait",
        "Park my active conversation until the customer writes (capacity released)",
        "agentToken",
        None,
        errors=(404, 409),
    ),
    # Agent API: an agent reaches its own offers and conversations only.
    Operation("GET", "/api/me", "The calling agent", "agentToken", AgentProfile),
    Operation(
        "PUT",
        "/api/me/presence",
        "Set the calling agent's presence",
        "agentToken",
        AgentProfile,
        body=PresenceUpdate,
        errors=(400, 422),
    ),
    Operation(
        "GET",
        "/api/me/offers",
        "The calling agent's pending offers",
        "agentToken",
        Offer,
        many=True,
    ),
    Operation(
        "POST",
        "/api/offers/{offer_id}/accept",
        "Accept an offer",
        "agentToken",
        OfferDecision,
        errors=(404, 409),
    ),
    Operation(
        "POST",
        "/api/offers/{offer_id}/decline",
        "Decline an offer",
        "agentToken",
        OfferDecision,
        errors=(404, 409),
    ),
    Operation(
        "GET",
        "/api/queues/{queue}/items",
        "Pick mode: the conversations waiting in one of the agent's queues",
        "agentToken",
        QueueItem,
        many=True,
        errors=(404,),
    ),
    Operation(
        "POST",
        "/api/queue-items/{item_id}/pick",
        "Pick mode: take a waiting conversation",
        "agentToken",
        ConversationMoved,
        errors=(404, 409),
    ),
    Operation(
        "GET",
        "/api/me/conversations",
        "The calling agent's conversations",
        "agentToken",
        ConversationSummary,
        many=True,
    ),
    Operation(
        "GET",
        "/api/conversations/{conversation_id}",
        "A conversation, its window and the templates usable now",
        "agentToken",
        AgentConversation,
        errors=(404,),
    ),
    Operation(
        "GET",
        "/api/conversations/{conversation_id}/messages",
        "A conversation's messages, oldest first",
        "agentToken",
        AgentMessage,
        many=True,
        errors=(404,),
    ),
    Operation(
        "POST",
        "/api/conversations/{conversation_id}/messages",
        "Send text, media or a template; outside the window only a template (422 otherwise)",
        "agentToken",
        MessageAccepted,
        status=(202,),
        body=SendMessage,
        errors=(400, 404, 422),
        idempotency_key=MAX_KEY,
    ),
    Operation(
        "GET",
        "/api/conversations/{conversation_id}/messages/{message_id}/media/{n}",
        "A customer's attachment, fetched from Twilio",
        "agentToken",
        media_type="application/octet-stream",
        errors=(404, 502),
    ),
    Operation(
        "POST",
        "/api/conversations/{conversation_id}/close",
        "End a conversation",
        "agentToken",
        ConversationMoved,
        body=CloseRequest,
        body_required=False,
        errors=(400, 404, 409, 422),
    ),
    Operation(
        "POST",
        "/api/conversations/{conversation_id}/transfer",
        "Transfer a conversation to a queue",
        "agentToken",
        ConversationMoved,
        body=TransferRequest,
        errors=(400, 404, 422),
    ),
    Operation(
        "GET",
        "/api/me/events",
        "Server-Sent Events: offers, assignments, customer messages, delivery updates",
        "agentToken",
        media_type="text/event-stream",
    ),
)

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
}

DESCRIPTIONS = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No content",
    400: "Malformed request: not JSON, not a form, or a bad Idempotency-Key",
    401: "Missing or invalid bearer token",
    403: f"{SIGNATURE_HEADER} does not match the request",
    404: "No such resource, or not the caller's",
    409: "Conflicts with the current state (or a request with this key is in progress)",
    413: "Body too large",
    415: "Not application/x-www-form-urlencoded",
    422: "Well-formed but not valid: details.fields names each problem",
    502: "Twilio could not provide the resource",
    503: "A dependency is unavailable; retry after Retry-After",
}

STREAM_DESCRIPTION = (
    "One frame per event: `id:` (the event id), `event:` (its type), `data:` (the event "
    "envelope as JSON), then a blank line; `: keep-alive` comments in between."
)


Refs = dict[tuple[type[BaseModel], JsonSchemaMode], dict[str, Any]]


def _success(operation: Operation, refs: Refs) -> dict[str, Any]:
    """The content of the success answer."""
    if operation.answer is not None:
        schema = refs[(operation.answer, "serialization")]
        if operation.many:
            schema = {"type": "array", "items": schema}
        return {"application/json": {"schema": schema}}
    match operation.media_type:
        case None:
            return {}
        case "text/xml":
            return {"text/xml": {"schema": TEXT, "example": EMPTY_TWIML}}
        case "text/event-stream":
            return {"text/event-stream": {"schema": {**TEXT, "description": STREAM_DESCRIPTION}}}
        case "application/json":
            return {"application/json": {"schema": {"type": "object"}}}
        case other:
            return {other: {"schema": {"type": "string", "format": "binary"}}}


def _responses(operation: Operation, refs: Refs) -> dict[str, Any]:
    content = _success(operation, refs)
    responses: dict[str, Any] = {}
    for status in operation.status:
        responses[str(status)] = {"description": DESCRIPTIONS[status]}
        if content:
            responses[str(status)]["content"] = content
    auth_errors = (401, 503) if operation.auth else ()
    error = {"application/json": {"schema": refs[(ErrorBody, "serialization")]}}
    for status in sorted({*operation.errors, *auth_errors} - set(operation.status)):
        responses[str(status)] = {"description": DESCRIPTIONS[status], "content": error}
    return responses


def _parameters(operation: Operation) -> list[dict[str, Any]]:
    parameters: list[dict[str, Any]] = []
    for name in re.findall(r"\{(\w+)\}", operation.path):
        schema: dict[str, Any] = dict(TEXT)
        if name == "n":
            schema = {"type": "integer", "minimum": 0}
        elif name.endswith("_id"):
            schema["format"] = "uuid"
        parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
    for name, schema, description in operation.query:
        parameters.append(
            {
                "name": name,
                "in": "query",
                "required": False,
                "schema": schema,
                "description": description,
            }
        )
    if operation.idempotency_key is not None:
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": operation.idempotency_key,
                },
                "description": "a retry with the same key answers as the first request did",
            }
        )
    if operation.form is not None:
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


def _request_body(operation: Operation, refs: Refs) -> dict[str, Any] | None:
    if operation.body is not None:
        schema = refs[(operation.body, "validation")]
        return {
            "required": operation.body_required,
            "content": {"application/json": {"schema": schema}},
        }
    if operation.form is not None:
        schema = refs[(operation.form, "validation")]
        return {
            "required": True,
            "content": {"application/x-www-form-urlencoded": {"schema": schema}},
        }
    return None


def _tag(path: str) -> str:
    if path.startswith("/twilio/"):
        return "twilio"
    if path.startswith("/api/admin/"):
        return "admin"
    if path.startswith("/api/") and path != PATH:
        return "agent"
    return "operations"


def _operation(operation: Operation, refs: Refs) -> dict[str, Any]:
    out: dict[str, Any] = {
        "summary": operation.summary,
        "tags": [_tag(operation.path)],
        "security": [{operation.auth: []}] if operation.auth else [],
    }
    if parameters := _parameters(operation):
        out["parameters"] = parameters
    if (body := _request_body(operation, refs)) is not None:
        out["requestBody"] = body
    out["responses"] = _responses(operation, refs)
    return out


def _models() -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [(ErrorBody, "serialization")]
    for operation in OPERATIONS:
        for model in (operation.body, operation.form):
            if model is not None:
                models.append((model, "validation"))
        if operation.answer is not None:
            models.append((operation.answer, "serialization"))
    return list(dict.fromkeys(models))


def document() -> dict[str, Any]:
    """The OpenAPI document of ``OPERATIONS``. Pure: no I/O, same input, same document."""
    models = _models()
    schemas, definitions = models_json_schema(models, ref_template=REF_TEMPLATE)
    refs: Refs = {key: schemas[key] for key in models}
    paths: dict[str, dict[str, Any]] = {}
    for operation in OPERATIONS:
        paths.setdefault(operation.path, {})[operation.method.lower()] = _operation(operation, refs)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "omniroute",
            "version": API_VERSION,
            "description": "Routes WhatsApp conversations arriving through Twilio to agents.",
        },
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


async def serve(request: web.Request) -> web.Response:
    return web.Response(body=request.app[DOCUMENT], content_type="application/json")


def add_routes(app: web.Application) -> None:
    app[DOCUMENT] = orjson.dumps(document())
    app.router.add_get(PATH, serve)
