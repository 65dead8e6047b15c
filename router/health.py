"""``/healthz`` (the process is alive), ``/readyz`` (broker and database reachable) and
``/metrics`` (Prometheus)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.state import BUS, STORE


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    broker = request.app[BUS].ready
    database = await request.app[STORE].ping()
    ready = broker and database
    return web.json_response(
        {"status": "ready" if ready else "unavailable", "broker": broker, "database": database},
        status=200 if ready else 503,
    )


async def metrics(_request: web.Request) -> web.Response:
    response = web.Response(body=generate_latest())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
