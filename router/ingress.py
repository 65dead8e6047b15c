"""Where an accepted webhook's event goes: the broker, or the PostgreSQL spool.

Twilio does not retry a webhook answered 5xx (its default retries once, on a failed TCP
connection only; twilio.com/docs/usage/webhooks/webhooks-connection-overrides), so the
router answers 200 as soon as the event is durable in either place:

1. Broker connected: publish, and wait ``ingress_spool_after`` for the confirm. Confirmed →
   done. Refused (nack, channel closed) → spool it now.
2. Still unconfirmed after that short wait (a slow or flow-controlled broker): spool it with
   ``relay_after`` set past the confirm budget, so the relay leaves it to its own publish; if
   that confirm comes after all, the spooled copy is forgotten (in batches).
3. Broker not connected: spool it at once.
4. PostgreSQL away too: wait for the confirm up to ``ingress_confirm_timeout``; only when
   neither can take the event is the answer 503 (``IngressUnavailable``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Literal

import structlog

from omniroute.errors import BrokerUnavailable, IngressUnavailable, StoreUnavailable
from omniroute.infra.bus import Bus
from omniroute.infra.metrics import SPOOL_CONFIRMED_LATE, SPOOLED
from omniroute.infra.settings import Settings
from omniroute.infra.spool import SpoolRelay, forget, spool
from omniroute.infra.store import PublishedMarks, Store
from schemas.events import Envelope

log = structlog.get_logger("omniroute.router")

Kept = Literal["published", "spooled"]


class Ingress:
    """Makes a webhook's event durable: confirmed by the broker or written to the spool."""

    def __init__(self, *, bus: Bus, store: Store, settings: Settings) -> None:
        self._bus = bus
        self._store = store
        self._spool_after = settings.ingress_spool_after
        self._budget = settings.ingress_confirm_timeout
        self.relay = SpoolRelay(bus=bus, store=store, settings=settings)
        self._late = PublishedMarks(store, mark=forget)
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.relay.start()
        await self._late.start()

    async def stop(self) -> None:
        # Confirms still on their way get their budget; then their marks are flushed.
        if self._pending:
            await asyncio.wait(self._pending, timeout=self._budget)
        await self.relay.stop()
        await self._late.stop()

    async def keep(self, event: Envelope, webhook: str) -> Kept:
        """Make ``event`` durable; raises IngressUnavailable when neither place can take it."""
        publish: asyncio.Task[None] | None = None
        if self._bus.ready:
            publish = asyncio.ensure_future(self._bus.publish(event, confirm_within=self._budget))
            done, _ = await asyncio.wait({publish}, timeout=self._spool_after)
            if done:
                if publish.exception() is None:
                    return "published"
                publish = None  # refused: nothing is still on its way
        reason = "broker_slow" if publish is not None else "broker_unavailable"
        delay = self._budget if publish is not None else 0.0
        try:
            await spool(self._store, event, relay_after=delay)
        except StoreUnavailable:
            if publish is not None:
                with contextlib.suppress(BrokerUnavailable):
                    await publish
                    return "published"
            raise IngressUnavailable("neither the broker nor the database took the event") from None
        SPOOLED.labels(webhook, reason).inc()
        if publish is None:
            self.relay.wake()
        else:
            self._settle_later(publish, event.id)
        return "spooled"

    def _settle_later(self, publish: asyncio.Task[None], event_id: str) -> None:
        async def settle() -> None:
            with contextlib.suppress(BrokerUnavailable):
                await publish
                SPOOL_CONFIRMED_LATE.inc()
                self._late.add([event_id])

        task = asyncio.ensure_future(settle())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


@contextlib.asynccontextmanager
async def running_ingress(bus: Bus, store: Store, settings: Settings) -> AsyncIterator[Ingress]:
    """An Ingress with its spool relay running for as long as the context is open."""
    ingress = Ingress(bus=bus, store=store, settings=settings)
    await ingress.start()
    try:
        yield ingress
    finally:
        await ingress.stop()
