"""The router's application factory: Twilio webhooks, health and metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from aiohttp import web

from omniroute.infra.bus import Bus
from omniroute.infra.config_loader import LiveConfig
from omniroute.infra.outbox import OutboxRelay
from omniroute.infra.settings import Settings
from omniroute.infra.store import Store
from router import (
    admin_api,
    agent_api,
    agent_events,
    console_pages,
    directory_api,
    health,
    messages_api,
    nul_guard,
    openapi,
    queues_api,
    session,
    supervisor_api,
    twilio_webhooks,
    variables_api,
)
from router.ingress import running_ingress
from router.routes import Route, add_routes
from router.state import BUS, CONFIG, INGRESS, SETTINGS, STORE

# Every route the router serves, declared once: served from here, documented from here.
ROUTES: list[Route] = [
    *twilio_webhooks.ROUTES,
    *health.ROUTES,
    *admin_api.ROUTES,
    *supervisor_api.ROUTES,
    *agent_api.ROUTES,
    *agent_events.ROUTES,
    *messages_api.ROUTES,
    *variables_api.ROUTES,
    *openapi.ROUTES,
    *session.ROUTES,
    *directory_api.ROUTES,
    *queues_api.ROUTES,
    *console_pages.ROUTES,
]


def create_app(
    settings: Settings, config: LiveConfig, *, bus: Bus | None = None, store: Store | None = None
) -> web.Application:
    """Build the router. Resources given by the caller (``omniroute run`` shares one bus and
    store with the stages) are used as they are and not closed here."""
    # The body limit is enforced by the webhook handlers themselves (413 with a JSON error).
    app = web.Application(
        client_max_size=settings.max_body_bytes + 1,
        middlewares=[nul_guard.refuse_nul, session.authenticate],
    )
    app[SETTINGS] = settings
    app[CONFIG] = config

    async def resources(app: web.Application) -> AsyncIterator[None]:
        own_bus = bus is None
        own_store = store is None
        app[BUS] = bus if bus is not None else Bus.from_settings(settings)
        app[STORE] = (
            store if store is not None else Store.from_settings(settings, "omniroute router")
        )
        await app[BUS].start()
        # A router on its own is a candidate for the outbox relay (API calls write events
        # there); under ``omniroute run``/``serve`` the service runs the process's candidate.
        relay = OutboxRelay(bus=app[BUS], store=app[STORE], settings=settings)
        if own_store:
            await relay.start()
        async with running_ingress(app[BUS], app[STORE], settings) as ingress:
            app[INGRESS] = ingress
            yield
        await relay.stop()
        if own_bus:
            await app[BUS].close()
        if own_store:
            await app[STORE].close()

    app.cleanup_ctx.append(resources)
    app.cleanup_ctx.append(agent_events.hub_ctx)
    app.cleanup_ctx.append(messages_api.media_session_ctx)
    # Long-lived responses end on shutdown (aiohttp's documented use of on_shutdown).
    app.on_shutdown.append(agent_events.end_streams)
    add_routes(app, ROUTES)
    app[openapi.DOCUMENT] = orjson.dumps(openapi.document(ROUTES, settings.public_base()))
    return app


def create_ops_app(bus: Bus, store: Store) -> web.Application:
    """What a consume-only process serves: ``/healthz``, ``/readyz`` and ``/metrics``."""
    app = web.Application()
    app[BUS] = bus
    app[STORE] = store
    add_routes(app, health.ROUTES)
    return app
