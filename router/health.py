"""``/healthz`` (the process is alive), ``/readyz`` (can do its work) and ``/metrics``.

A router is ready while it can keep a webhook: the broker *or* the database (its spool)
takes it. Reporting "not ready" when only the broker is away would make a load balancer
refuse the webhooks the spool would keep, and Twilio does not retry what was refused. Such a
router answers 200 with status "degraded". A stage process needs both.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.routes import Content, Route
from router.state import BUS, INGRESS, STORE
from schemas.api import Health, Readiness

TAGS = ("operations",)


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response(Health(status="ok").model_dump(mode="json"))


async def readyz(request: web.Request) -> web.Response:
    broker = request.app[BUS].ready
    database = await request.app[STORE].ping()
    ready = (broker or database) if INGRESS in request.app else (broker and database)
    readiness = Readiness(
        status="ready" if broker and database else "degraded" if ready else "unavailable",
        broker=broker,
        database=database,
    )
    return web.json_response(readiness.model_dump(mode="json"), status=200 if ready else 503)


async def metrics(_request: web.Request) -> web.Response:
    response = web.Response(body=generate_latest())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


ROUTES = [
    Route(
        "GET", "/healthz", healthz, "getHealth", "The process is alive", TAGS, None, {200: Health}
    ),
    Route(
        "GET",
        "/readyz",
        readyz,
        "getReadiness",
        "Can keep webhooks (broker or database reachable)",
        TAGS,
        None,
        {200: Readiness, 503: Readiness},
    ),
    Route(
        "GET",
        "/metrics",
        metrics,
        "getMetrics",
        "Prometheus metrics",
        TAGS,
        None,
        {200: Content("text/plain", {"type": "string", "format": "binary"})},
    ),
]
