"""The ingress spool: webhooks kept in PostgreSQL when the broker cannot confirm them in time,
and the relay that publishes them once it can.

Twilio does not retry a webhook answered 5xx (by default it retries once, and only when the
TCP connection fails: "Webhooks connection overrides", twilio.com/docs/usage/webhooks/
webhooks-connection-overrides). So the router answers 200 once a webhook is durable in either
place. A spooled webhook keeps its event id; the relay publishes it with that id, so a webhook
that reached the broker *and* the spool (a confirm that came late) is still handled once:
the stages recognise events by id and messages by MessageSid.

One relay works at a time in the whole deployment: each pass takes a transaction-level
advisory lock and skips when another process holds it. It publishes a batch in arrival
order with pipelined confirms, outside any row lock, and deletes what was confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import structlog

from omniroute.errors import BrokerUnavailable, StoreUnavailable
from omniroute.infra.background import Background
from omniroute.infra.bus import Bus
from omniroute.infra.metrics import SPOOL_RELAYED
from omniroute.infra.settings import Settings
from omniroute.infra.store import UNAVAILABLE, Connection, Store
from schemas.events import Envelope

log = structlog.get_logger("omniroute.spool")

SPOOL_LOCK = 0x73706F6F  # "spoo": the one relay of the deployment


async def spool(store: Store, event: Envelope, *, relay_after: float = 0.0) -> None:
    """Keep ``event`` durably until the relay publishes it (committed when this returns).

    ``relay_after``: seconds before the relay may take it (a publish still waiting for its
    confirm gets that long to settle). Idempotent per event id. Raises StoreUnavailable.
    """
    try:
        pool = await store.pool()
        await pool.execute(
            "INSERT INTO ingress_spool (event_id, routing_key, body, relay_after)"
            " VALUES ($1, $2, $3, clock_timestamp() + make_interval(secs => $4))"
            " ON CONFLICT (event_id) DO NOTHING",
            event.id,
            event.type,
            event.model_dump(mode="json"),
            relay_after,
        )
    except UNAVAILABLE as exc:
        raise StoreUnavailable(f"database unavailable: {type(exc).__name__}") from exc


async def forget(store: Store, event_ids: Sequence[str]) -> None:
    """Drop spooled webhooks whose own publish was confirmed after all."""
    if not event_ids:
        return
    try:
        pool = await store.pool()
        await pool.execute(
            "DELETE FROM ingress_spool WHERE event_id = ANY($1::uuid[])", list(event_ids)
        )
    except UNAVAILABLE as exc:
        raise StoreUnavailable(f"database unavailable: {type(exc).__name__}") from exc


async def depth(conn: Connection) -> int:
    """How many webhooks wait in the spool."""
    return int(await conn.fetchval("SELECT count(*) FROM ingress_spool"))


class SpoolRelay(Background):
    """Publishes spooled webhooks to the broker in arrival order, once each, then drops them."""

    task_name = "spool-relay"

    def __init__(self, *, bus: Bus, store: Store, settings: Settings) -> None:
        super().__init__()
        self._bus = bus
        self._store = store
        self._interval = settings.spool_relay_interval
        self._batch = settings.spool_relay_batch

    async def relay_once(self) -> int:
        """Publish one batch of due spooled webhooks; return how many were published.

        Returns 0 without doing anything when another process's relay holds the lock.
        Raises StoreUnavailable when the database is away.
        """
        async with self._store.transaction() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", SPOOL_LOCK):
                return 0
            rows = await conn.fetch(
                "SELECT seq, body FROM ingress_spool"
                " WHERE relay_after <= clock_timestamp() ORDER BY seq LIMIT $1",
                self._batch,
            )
            if not rows:
                return 0
            # In seq order; spooled rows are routed by their event's type.
            events = [Envelope.model_validate(r["body"]) for r in rows]
            results = await self._bus.publish_all(events)
            confirmed = [r["seq"] for r, ok in zip(rows, results, strict=True) if ok]
            if confirmed:
                await conn.execute(
                    "DELETE FROM ingress_spool WHERE seq = ANY($1::bigint[])", confirmed
                )
        SPOOL_RELAYED.inc(len(confirmed))
        log.info("spool.relayed", count=len(confirmed), unconfirmed=len(rows) - len(confirmed))
        if len(confirmed) < len(rows):
            raise BrokerUnavailable("the broker did not confirm every spooled webhook")
        return len(confirmed)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            if not self._bus.ready:
                continue
            try:
                while await self.relay_once() >= self._batch:
                    pass
            except (StoreUnavailable, BrokerUnavailable):
                continue
            except Exception as exc:
                log.error("spool.relay_failed", error=f"{type(exc).__name__}: {exc}")
