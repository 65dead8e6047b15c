"""Context variables of a conversation, set by the assigned agent or an admin; classification
sets them too. They show on the conversation and fill automated messages' placeholders.
And the survey results for admins."""

from __future__ import annotations

import uuid

from aiohttp import web

from omniroute.domain.conversation import set_variables
from router.auth import require_admin
from router.requests import not_found, own_conversation, parse_body, path_id
from router.routes import Query, Route
from router.state import STORE
from schemas.api import SurveyOut, SurveyResults, VariablesOut, VariablesUpdate


async def _apply(request: web.Request, conversation_id: str) -> web.Response:
    update = await parse_body(request, VariablesUpdate)
    removed = [k for k, v in update.variables.items() if v is None]
    values = {k: v for k, v in update.variables.items() if v is not None}
    async with request.app[STORE].transaction() as conn:
        variables = await set_variables(conn, conversation_id, values, removed)
    if variables is None:
        raise not_found("conversation")
    out = VariablesOut(conversation_id=uuid.UUID(conversation_id), variables=variables)
    return web.json_response(out.model_dump(mode="json"))


async def agent_variables(request: web.Request) -> web.Response:
    _, row = await own_conversation(request)
    return await _apply(request, str(row["id"]))


async def admin_variables(request: web.Request) -> web.Response:
    require_admin(request)
    return await _apply(request, path_id(request, "conversation_id", "conversation"))


async def surveys(request: web.Request) -> web.Response:
    require_admin(request)
    workstream = request.query.get("workstream") or None
    pool = await request.app[STORE].pool()
    rows = await pool.fetch(
        "SELECT conversation_id, workstream, customer, asked_at, expires_at, rating, comment,"
        " answered_at FROM surveys WHERE ($1::text IS NULL OR workstream = $1::text)"
        " ORDER BY asked_at DESC LIMIT 500",
        workstream,
    )
    listed = [SurveyOut.model_validate(dict(r)) for r in rows]
    ratings = [s.rating for s in listed if s.rating is not None]
    results = SurveyResults(
        asked=len(listed),
        answered=len(ratings),
        average_rating=round(sum(ratings) / len(ratings), 2) if ratings else None,
        surveys=listed,
    )
    return web.json_response(results.model_dump(mode="json"))


ROUTES = [
    Route(
        "PATCH",
        "/api/conversations/{conversation_id}/variables",
        agent_variables,
        "setMyConversationVariables",
        "Set or remove context variables of one of my conversations",
        ("agent",),
        "agentToken",
        {200: VariablesOut},
        errors=(400, 404, 422),
        request=VariablesUpdate,
    ),
    Route(
        "PATCH",
        "/api/admin/conversations/{conversation_id}/variables",
        admin_variables,
        "setConversationVariables",
        "Set or remove a conversation's context variables",
        ("admin",),
        "adminToken",
        {200: VariablesOut},
        errors=(400, 404, 422),
        request=VariablesUpdate,
    ),
    Route(
        "GET",
        "/api/admin/surveys",
        surveys,
        "listSurveys",
        "Post-conversation survey answers and their summary",
        ("admin",),
        "adminToken",
        {200: SurveyResults},
        query=(Query("workstream", {"type": "string"}, "only this workstream's surveys"),),
    ),
]
