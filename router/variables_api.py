"""Context variables of a conversation, set by the assigned agent or an admin; classification
sets them too. They show on the conversation and fill automated messages' placeholders.
And the survey results for admins."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from router.agent_api import _body, _own_conversation, _uuid
from router.auth import require_admin
from router.responses import error
from router.state import STORE
from schemas.api import SurveyOut, SurveyResults, VariablesOut, VariablesUpdate


async def _apply(request: web.Request, conversation_id: str) -> web.Response:
    update = await _body(request, VariablesUpdate)
    if isinstance(update, web.Response):
        return update
    assert isinstance(update, VariablesUpdate)
    removed = [k for k, v in update.variables.items() if v is None]
    values = {k: v for k, v in update.variables.items() if v is not None}
    async with request.app[STORE].transaction() as conn:
        variables: Any = await conn.fetchval(
            "UPDATE conversations SET variables = (variables || $2::jsonb) - $3::text[],"
            " updated_at = now() WHERE id = $1 RETURNING variables",
            conversation_id,
            values,
            removed,
        )
    if variables is None:
        return error(404, "not_found", "no such conversation")
    out = VariablesOut(conversation_id=uuid.UUID(conversation_id), variables=variables)
    return web.json_response(out.model_dump(mode="json"))


async def agent_variables(request: web.Request) -> web.Response:
    found = await _own_conversation(request)
    if isinstance(found, web.Response):
        return found
    return await _apply(request, str(found[1]["id"]))


async def admin_variables(request: web.Request) -> web.Response:
    require_admin(request)
    conversation_id = _uuid(request.match_info["conversation_id"])
    if conversation_id is None:
        return error(404, "not_found", "no such conversation")
    return await _apply(request, conversation_id)


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


def add_routes(app: web.Application) -> None:
    app.router.add_patch("/api/conversations/{conversation_id}/variables", agent_variables)
    app.router.add_patch("/api/admin/conversations/{conversation_id}/variables", admin_variables)
    app.router.add_get("/api/admin/surveys", surveys)
