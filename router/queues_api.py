"""The supervisor's live view of the queues (admin token, or a supervisor's console session):

- ``GET /api/admin/queues``: each configured queue now: how many conversations wait (queued
  or offered), the oldest one's wait, how many of its agents can take work (available, with
  free capacity), how many are active; its agents (presence, capacity used/total, active
  conversations) and its pending offers (which a supervisor may end).
- ``GET /api/admin/queues/history[?minutes=60]``: each queue's waiting count at the end of
  each of the last ``minutes`` minutes (1 to 180).

Both are read with a few index-driven statements (``omniroute.domain.queue_view``): the
supervisor page polls them every few seconds.
"""

from __future__ import annotations

from aiohttp import web

from omniroute.domain import queue_view
from router.admin_api import TAGS, admin_only
from router.responses import error
from router.routes import Query, Route
from router.state import CONFIG, STORE
from schemas.events import utcnow
from schemas.queue_view import QueuesHistory, QueuesView


def _queues(request: web.Request) -> list[str]:
    return [q.name for q in request.app[CONFIG].current.queues]


@admin_only
async def queues(request: web.Request) -> web.Response:
    async with request.app[STORE].transaction() as conn:
        view = await queue_view.queues_view(conn, _queues(request), utcnow())
    return web.json_response(view.model_dump(mode="json"))


def _minutes(raw: str | None) -> int | None:
    if raw is None:
        return queue_view.DEFAULT_MINUTES
    try:
        minutes = int(raw)
    except ValueError:
        return None
    return minutes if 1 <= minutes <= queue_view.MAX_MINUTES else None


@admin_only
async def history(request: web.Request) -> web.Response:
    minutes = _minutes(request.query.get("minutes"))
    if minutes is None:
        problem = f"an integer from 1 to {queue_view.MAX_MINUTES}"
        return error(
            422,
            "invalid_query",
            "the query does not match the API",
            fields=[{"field": "minutes", "problem": problem}],
        )
    async with request.app[STORE].transaction() as conn:
        found = await queue_view.waiting_history(conn, _queues(request), utcnow(), minutes)
    return web.json_response(found.model_dump(mode="json"))


ROUTES: list[Route] = [
    Route(
        "GET",
        "/api/admin/queues",
        queues,
        "listQueueLoads",
        "Each configured queue now: waiting, longest wait, available agents, active; its"
        " agents and pending offers",
        TAGS,
        "adminToken",
        {200: QueuesView},
    ),
    Route(
        "GET",
        "/api/admin/queues/history",
        history,
        "queueWaitingHistory",
        "Each configured queue's waiting count per minute over the last minutes",
        TAGS,
        "adminToken",
        {200: QueuesHistory},
        errors=(422,),
        query=(
            Query(
                "minutes",
                {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": queue_view.MAX_MINUTES,
                    "default": queue_view.DEFAULT_MINUTES,
                },
                "how many minutes back, one point per minute",
            ),
        ),
    ),
]
