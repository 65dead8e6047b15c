"""Events caused by API calls: written to the outbox in the caller's transaction, published
after commit. If the broker is away the outbox relay of any stage publishes them later."""

from __future__ import annotations

import contextlib

from aiohttp import web

from omniroute.errors import BrokerUnavailable, StoreUnavailable
from omniroute.store import mark_published
from router.state import BUS, STORE
from schemas.events import Envelope


async def publish_committed(app: web.Application, events: list[Envelope]) -> None:
    """Publish events already committed to the outbox; never raises for the broker."""
    published = []
    for event in events:
        try:
            await app[BUS].publish(event)
        except BrokerUnavailable:
            break
        published.append(event.id)
    with contextlib.suppress(StoreUnavailable):
        await mark_published(app[STORE], published)
