"""The transactional outbox, kept as a log, and the one relay of the deployment.

Whatever changes state (a stage's handler, an API call, the agents CLI) writes the events it
causes into ``outbox`` in the same transaction (``add_to_outbox``) and does nothing else:
no publish, no "published" mark. A statement trigger sends ``NOTIFY omniroute_outbox`` on
commit.

One relay publishes the log. Every process runs a candidate; the one holding the session
advisory lock ``OUTBOX_LOCK`` on its own connection is the leader, listens for the NOTIFY
and tails the log in ``(txid, seq)`` order behind the watermark stored in
``outbox_watermark``. It reads only rows written by transactions that ended before it
looked, so no row can later appear below the watermark: nothing is skipped, and the relay
publishes each row once. A row's age therefore counts from its commit, not from the start
of its transaction. Each pass:

1. ``HORIZON``, one statement: the next transaction id not yet assigned (the xmax of the
   statement's snapshot) and the oldest transaction id still running *in this database*
   (``pg_stat_activity.backend_xid``, shown to every role, and prepared transactions).
   Every transaction of this database with a lower id had ended when it was read.
2. ``TAIL``, a later statement with a later snapshot: the rows behind the watermark whose
   ``txid`` is below that horizon; all of them are visible to it, or rolled back.

``pg_current_xact_id()`` (the column's default) returns the top-level xid even in a
subtransaction (PostgreSQL 15, "Transaction ID and Snapshot Information Functions").
Scoping the horizon to this database, instead of the cluster-wide
``pg_snapshot_xmin``, keeps a long transaction of another database on the same cluster
(a batch job, a bulk load) from holding the relay back.

Publishing happens outside any transaction or row lock, in batches with their confirms
awaited together; the watermark moves over the confirmed prefix. When the leader dies
between a confirm and its watermark write, the next leader publishes that batch again; the
stages recognise events by id (at least once, as everywhere on the bus). Rows below the
watermark are pruned after ``outbox_retention`` seconds (the id stays that long so an event
written again by a redelivered cause is recognised and not published twice).

A write transaction left open in this database (an idle ``psql`` session that wrote
something) holds the relay back, as it holds back vacuum: set
``idle_in_transaction_session_timeout``; ``omniroute status`` shows the relay's backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
import orjson
import structlog
from aio_pika import DeliveryMode
from pamqp.commands import Basic

from omniroute.errors import BrokerUnavailable
from omniroute.infra.background import Background
from omniroute.infra.bus import Bus
from omniroute.infra.metrics import OUTBOX_LEADER, OUTBOX_PRUNED, OUTBOX_RELAYED
from omniroute.infra.settings import Settings
from omniroute.infra.store import UNAVAILABLE, Connection, Store
from schemas.events import Envelope

log = structlog.get_logger("omniroute.outbox")

OUTBOX_LOCK = 0x6F757462  # "outb": the one outbox relay of the deployment
CHANNEL = "omniroute_outbox"

HORIZON = """
SELECT pg_snapshot_xmax(pg_current_snapshot()) AS next,
       (SELECT array_agg(backend_xid::text::bigint) FROM pg_stat_activity
         WHERE datid = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND backend_xid IS NOT NULL) AS running,
       (SELECT array_agg(transaction::text::bigint) FROM pg_prepared_xacts
         WHERE database = current_database()) AS prepared
"""

TAIL = """
SELECT o.id, o.routing_key, o.body, o.txid, o.seq
FROM outbox o
WHERE (o.txid, o.seq) > ($1::xid8, $2::bigint)
ORDER BY o.txid, o.seq
LIMIT $3
"""

PRUNE = """
DELETE FROM outbox WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM outbox
    WHERE created_at < now() - make_interval(secs => $1)
      AND (txid, seq) <= ($2::xid8, $3::bigint)
    LIMIT $4))
"""


async def add_to_outbox(conn: Connection, events: Sequence[Envelope]) -> list[Envelope]:
    """Record events in the outbox within the caller's transaction (one statement).

    Returns the events actually added: an event whose id is already there (the same cause
    handled twice within the retention) is not added again.
    """
    if not events:
        return []
    rows = await conn.fetch(
        "INSERT INTO outbox (id, routing_key, body)"
        " SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[])"
        " ON CONFLICT (id) DO NOTHING RETURNING id",
        [e.id for e in events],
        [e.type for e in events],
        [e.model_dump(mode="json") for e in events],
    )
    added = {str(r["id"]) for r in rows}
    return [e for e in events if e.id in added]


def _properties(body: dict[str, Any]) -> Basic.Properties:
    """The AMQP properties ``omniroute.infra.bus.event_properties`` gives the same event, read from
    its stored JSON without rebuilding the model."""
    return Basic.Properties(
        content_type="application/json",
        delivery_mode=DeliveryMode.PERSISTENT.value,
        message_id=body["id"],
        correlation_id=body.get("correlation_id"),
        message_type=body["type"],
        timestamp=datetime.fromisoformat(body["occurred_at"]),
        headers={},
    )


def horizon_of(next_xid: int, running: Sequence[int]) -> int:
    """The lowest of ``next_xid`` (a 64-bit ``xid8``) and the running transactions' 32-bit
    xids, each widened to 64 bits by the epoch of ``next_xid`` (an older one is at most 2³¹
    behind: PostgreSQL stops assigning ids before wraparound). An xid assigned after the
    snapshot (at or past ``next_xid``) is ignored: its rows are above the horizon anyway."""
    low = next_xid & 0xFFFFFFFF
    behind = [(low - xid) % 2**32 for xid in running]
    return min([next_xid, *(next_xid - b for b in behind if 0 < b < 2**31)])


async def _release(conn: asyncpg.Connection[Any]) -> None:
    """Close the leader's connection, and abort it when a graceful close does not finish:
    the session advisory lock is the leadership, and it is released only when the server
    sees the connection end. A socket left open by a close that timed out would keep every
    other candidate standing by for as long as this process lives."""
    try:
        await asyncio.wait_for(conn.close(), 2.0)
    except asyncio.CancelledError:
        conn.terminate()
        raise
    except Exception:
        conn.terminate()


class _SteppedDown(Exception):
    """The leader could not publish for ``outbox_leader_step_down`` seconds."""


class OutboxRelay(Background):
    """A candidate for the deployment's outbox relay; the elected one tails the log."""

    task_name = "outbox-relay"

    def __init__(self, *, bus: Bus, store: Store, settings: Settings) -> None:
        super().__init__()
        self._bus = bus
        self._store = store
        self._settings = settings
        self._watermark: tuple[int, int] = (0, 0)
        self._stored: tuple[int, int] = (0, 0)  # what outbox_watermark holds
        self._stored_at = 0.0
        self.leading = False

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                conn = await self._store.connect("outbox-relay")
            except UNAVAILABLE:
                attempt += 1
                await asyncio.sleep(min(5.0, 0.2 * attempt))
                continue
            attempt = 0
            stepped_down = False
            try:
                await self._lead(conn)
            except _SteppedDown:
                stepped_down = True
            except UNAVAILABLE as exc:
                log.info("outbox.relay_interrupted", error=f"{type(exc).__name__}: {exc}"[:200])
            except Exception as exc:
                log.error("outbox.relay_failed", error=f"{type(exc).__name__}: {exc}"[:300])
                await asyncio.sleep(1.0)
            finally:
                self._leave()
                await _release(conn)
            if stepped_down:
                # Let a standby with a broker take the lock before standing again.
                await asyncio.sleep(2 * self._settings.outbox_leader_poll)

    def _leave(self) -> None:
        if self.leading:
            OUTBOX_LEADER.set(0)
        self.leading = False

    async def _lead(self, conn: asyncpg.Connection[Any]) -> None:
        """Wait for the lock on ``conn`` (held for as long as the connection lives), then
        relay until the connection, the broker or the process goes away."""
        # Only a candidate that reaches the broker stands: a leader without one would hold
        # the lock and publish nothing while the other processes' relays wait.
        while not (  # noqa: ASYNC110 (polling another process's lock)
            self._bus.ready and await conn.fetchval("SELECT pg_try_advisory_lock($1)", OUTBOX_LOCK)
        ):
            await asyncio.sleep(self._settings.outbox_leader_poll)
        self.leading = True
        OUTBOX_LEADER.set(1)
        # The watermark is a position to resume from: losing its latest writes in a crash of
        # PostgreSQL only publishes those events again, so its commits do not wait for disk.
        await conn.execute("SET synchronous_commit = off")
        await conn.add_listener(CHANNEL, self._notified)
        row = await conn.fetchrow("SELECT txid, seq FROM outbox_watermark")
        self._watermark = (int(row["txid"]), row["seq"]) if row else (0, 0)
        self._stored = self._watermark
        log.info("outbox.relay_leading", watermark=self._watermark)
        loop = asyncio.get_running_loop()
        next_prune = loop.time() + self._settings.outbox_prune_interval
        stalled_since: float | None = None
        while True:
            try:
                relayed, blocked = await self.relay_once(conn)
                stalled = not self._bus.ready
            except BrokerUnavailable:
                relayed, blocked, stalled = 0, False, True  # look again after the interval
            if not stalled:
                stalled_since = None
            elif stalled_since is None:
                stalled_since = loop.time()
            elif loop.time() - stalled_since >= self._settings.outbox_leader_step_down:
                # This process lost the broker (or closed its bus without stopping the
                # relay): hand the lead to a process that can publish.
                log.warning("outbox.relay_stepping_down", reason="broker unreachable")
                raise _SteppedDown
            if loop.time() >= next_prune:
                await self.prune(conn)
                next_prune = loop.time() + self._settings.outbox_prune_interval
            if relayed >= self._settings.outbox_relay_batch:
                continue
            await self.store_watermark(conn)  # caught up: write where it stands
            # Rows written by a transaction that an older, still running one precedes:
            # look again shortly (that older transaction may end without a NOTIFY).
            timeout = 0.002 if blocked else self._settings.outbox_relay_interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()

    def _notified(self, *_: object) -> None:
        self._wake.set()

    async def relay_once(self, conn: asyncpg.Connection[Any]) -> tuple[int, bool]:
        """Publish the next settled stretch of the log; (how many, whether unsettled rows
        wait behind a transaction still running)."""
        if not self._bus.ready:
            return 0, False
        txid, seq = self._watermark
        horizon = await self.horizon(conn)
        rows = await conn.fetch(TAIL, txid, seq, self._settings.outbox_relay_batch)
        settled = []
        for row in rows:
            if int(row["txid"]) >= horizon:
                break
            settled.append(row)
        if not settled:
            return 0, bool(rows)
        # A confirm that is only slow must not make the relay publish the batch again.
        results = await self._bus.publish_encoded(
            [(r["routing_key"], orjson.dumps(r["body"]), _properties(r["body"])) for r in settled],
            confirm_within=self._settings.outbox_confirm_timeout,
        )
        confirmed = 0
        for ok in results:
            if not ok:
                break
            confirmed += 1
        if confirmed:
            last = settled[confirmed - 1]
            self._watermark = (int(last["txid"]), last["seq"])
            OUTBOX_RELAYED.inc(confirmed)
            await self.store_watermark(conn, at_most_every=0.1)
        if confirmed < len(settled):
            raise BrokerUnavailable("the broker did not confirm every outbox event")
        return confirmed, len(settled) < len(rows)

    async def store_watermark(
        self, conn: asyncpg.Connection[Any], at_most_every: float = 0.0
    ) -> None:
        """Write the watermark (under load at most every ``at_most_every`` seconds: a leader
        that dies between two writes makes the next one publish those events again)."""
        now = asyncio.get_running_loop().time()
        if self._stored == self._watermark or now - self._stored_at < at_most_every:
            return
        txid, seq = self._watermark
        await conn.execute("UPDATE outbox_watermark SET txid = $1::xid8, seq = $2", txid, seq)
        self._stored, self._stored_at = (txid, seq), now

    @staticmethod
    async def horizon(conn: asyncpg.Connection[Any]) -> int:
        """The lowest transaction id (64-bit) that may still write to the outbox of this
        database; run before the statement that reads the log."""
        row = await conn.fetchrow(HORIZON)
        assert row is not None
        return horizon_of(int(row["next"]), [*(row["running"] or []), *(row["prepared"] or [])])

    async def prune(self, conn: asyncpg.Connection[Any]) -> int:
        """Delete published rows older than the retention, in batches."""
        total = 0
        txid, seq = self._watermark
        while True:
            status = await conn.execute(PRUNE, self._settings.outbox_retention, txid, seq, 5000)
            count = int(status.split()[-1])
            total += count
            if count < 5000:
                break
        if total:
            OUTBOX_PRUNED.inc(total)
            log.info("outbox.pruned", count=total)
        return total
