"""The consumer runtime every stage shares: decode → handle → commit → ack.

Read top to bottom:

- ``Stage`` names a stage and its handler per event type (the payload model of each type
  is the event contract's, ``schemas.events.PAYLOADS``; the keys its queue is bound to are
  the topology's, ``omniroute.infra.topology.STAGES``, and a test holds the three
  together). A coalescing stage names the events that only wake its tick instead. A
  handler runs inside one database transaction and returns the events it causes; the
  runner writes them to the outbox in that same transaction, so effects and events commit
  together, and acks once committed. The deployment's one outbox relay publishes them
  (``omniroute.infra.outbox``): a stage never waits for a broker confirm.
- An undecodable or invalid payload (or ``InvalidEvent``) is dead-lettered at once, with
  the reason in its headers. Any other failure is redelivered with backoff, and
  dead-lettered with its reason when the delivery limit is reached.
- When the database is unreachable the message is held and retried in place: the stage
  pauses instead of burning through the delivery limit, and resumes when it returns.
- ``NotYetStored`` (what the event needs is not there yet: a row another stage stores, as a
  customer message the conversations stage is behind on) is held and retried in place the
  same way, with the same backoff, and is never counted toward the delivery limit: a
  restart or backlog of the stage that stores it only delays the message. It is bounded by
  the event's age (``NOT_YET_PATIENCE`` since it occurred, wall clock): past that, what it
  waits for is taken as lost and the message is dead-lettered with the reason. Held rather
  than nacked because a nack is a delivery the broker counts (``x-delivery-count``, and a
  quorum queue's own limit) and would put the message behind the queue's backlog; a held
  message takes one prefetch slot, as a database outage does, and goes back to the queue
  (requeued) if the process stops meanwhile.
- SIGTERM (``stop``) cancels the consumer, lets in-flight messages finish within the grace
  period and closes; what was prefetched but not started goes back to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeAlias, TypeVar

import orjson
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from pydantic import BaseModel, ValidationError

from consumers.group_commit import GroupCommit
from omniroute.errors import (
    BrokerUnavailable,
    InvalidEvent,
    NotYetStored,
    StoreUnavailable,
    TransientError,
)
from omniroute.infra.bus import Bus, copy_message, declare_stage
from omniroute.infra.config_loader import LiveConfig
from omniroute.infra.metrics import STAGE_DURATION, STAGE_MESSAGES, STAGE_QUEUE_WAIT
from omniroute.infra.outbox import OutboxRelay, add_to_outbox
from omniroute.infra.settings import Settings
from omniroute.infra.store import Connection, Store
from omniroute.infra.topology import EXCHANGE, STAGES
from schemas.config import Config
from schemas.events import PAYLOADS, Envelope

log = structlog.get_logger("omniroute.consumer")
ROUTINE = frozenset({"handled", "skipped", "coalesced"})
# How long (since the event occurred) a message waits for what ``NotYetStored`` says is
# not there yet before it is dead-lettered: far beyond a stage's restart or backlog.
NOT_YET_PATIENCE = 600.0

Clock = Callable[[], datetime]
T = TypeVar("T")


def system_clock() -> datetime:
    return datetime.now(UTC)


@dataclass
class StageTx:
    """What a handler gets: the open transaction, the live configuration and the clock.

    ``after_commit`` takes work that must not run inside the transaction (a call to
    Twilio): each callable runs once the transaction committed, does its own transactions
    through ``store``, and returns events it already wrote to the outbox. ``resources``
    is what the stage's ``resources`` context manager yielded (e.g. Twilio clients).
    """

    conn: Connection
    config: LiveConfig
    now: datetime
    settings: Settings
    store: Store | None = None
    resources: Any = None
    after_commit: list[Callable[[], Awaitable[list[Envelope]]]] = field(default_factory=list)
    # Runs a unit of database work again until the database is back (after-commit work
    # whose outside effect already happened, e.g. a Twilio send, must not lose its record).
    until_stored: Callable[[Callable[[], Awaitable[list[Envelope]]]], Awaitable[list[Envelope]]] = (
        field(default=lambda work: work())
    )


P = TypeVar("P", bound=BaseModel)
# What a stage does with one event of a type: its effects in ``tx``, the events they cause.
Handler: TypeAlias = Callable[[Envelope, P, StageTx], Awaitable[list[Envelope]]]
Handled = tuple[list[Envelope], StageTx]  # follow-up events added to the outbox, and the tx
Ticker = Callable[[StageTx], Awaitable[list[Envelope]]]
Wants = Callable[[Envelope, BaseModel, Config], bool]
Needs = Callable[[Config], frozenset[str]]
Resources = Callable[[Settings, LiveConfig], AbstractAsyncContextManager[Any]]


@dataclass(frozen=True)
class Stage:
    """A stage: a handler per event type it takes, and optional periodic work.

    ``tick`` runs every ``settings.tick_interval`` in its own transaction in every replica
    (durable timers, sweeps); it must be safe to run concurrently (``SKIP LOCKED``).
    ``wakes`` makes a coalescing stage: those events are triggers for work already kept
    in the database, and only wake this replica's tick.
    """

    name: str
    handlers: Mapping[str, Handler[Any]] = field(default_factory=dict)  # event type → handler
    tick: Ticker | None = None
    resources: Resources | None = None
    wakes: frozenset[str] = frozenset()
    # Whether an event can lead to anything under the current configuration; the others
    # are acknowledged without a transaction.
    wants: Wants | None = None
    # The routing keys (of the topology's bindings) the current configuration needs: the
    # queue is bound to those only, so the broker does not route what would be skipped.
    needs: Needs | None = None
    # Whether deliveries may share a transaction (group commit). A stage whose events about
    # one row must be published in the order their transactions took its lock says False:
    # the relay publishes in transaction-id order, and a batch takes its id at its first
    # write, before it waits for that row's lock behind a transaction with a later id.
    batch: bool = True

    @property
    def takes(self) -> frozenset[str]:
        """Every event type the stage takes: the keys its queue must be bound to."""
        return frozenset(self.handlers) | self.wakes

    @property
    def coalesce(self) -> bool:
        return bool(self.wakes)


@dataclass
class Outcome:
    name: str
    reason: str | None = None
    published: list[str] = field(default_factory=list)


def delivery_count(message: AbstractIncomingMessage) -> int:
    """How many times the broker delivered this message before (quorum queues count)."""
    value = (message.headers or {}).get("x-delivery-count", 0)
    return int(value) if isinstance(value, int | str) and str(value).isdigit() else 0


def decode(stage: Stage, body: bytes) -> tuple[Envelope, BaseModel]:
    """Raise InvalidEvent with a readable reason if the body is not a valid event."""
    try:
        event = Envelope.model_validate(orjson.loads(body))
    except (orjson.JSONDecodeError, ValidationError) as exc:
        raise InvalidEvent(f"not a valid event envelope: {_short(exc)}") from None
    if event.type not in stage.takes:
        raise NotForThisStage(event.type)
    model = PAYLOADS[event.type]
    try:
        payload = model.model_validate(event.data)
    except ValidationError as exc:
        raise InvalidEvent(f"invalid {event.type} payload: {_short(exc)}") from None
    return event, payload


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
        )[:500]
    return str(exc)[:500]


class StageRunner:
    """Consumes one stage's queue until stopped."""

    def __init__(
        self,
        stage: Stage,
        *,
        bus: Bus,
        store: Store,
        config: LiveConfig,
        settings: Settings,
        clock: Clock = system_clock,
        relay: OutboxRelay | None = None,
    ) -> None:
        self.stage = stage
        self._bus = bus
        self._store = store
        self._config = config
        self._settings = settings
        self._clock = clock
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._queue_wait = STAGE_QUEUE_WAIT.labels(stage.name)
        # The process's candidate for the outbox relay; a runner started alone runs its own.
        self._own_relay = relay is None
        self._relay = relay or OutboxRelay(bus=bus, store=store, settings=settings)
        self._commits: GroupCommit[tuple[Envelope, BaseModel], Handled] = GroupCommit(
            self._until_stored,
            self._handle_alone,
            max_batch=settings.prefetch if stage.batch else 1,
            max_concurrent=2,  # two transactions in flight: one fills while one commits
            fatal=(_Stopping,),
        )
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self._draining = False  # the consumer is cancelled: deliveries no longer start
        self._ticker: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self._bound_for: Config | None = None
        self._binding = asyncio.Lock()
        self._wake = asyncio.Event()
        self._resources: Any = None
        self._exit_stack: contextlib.AsyncExitStack | None = None

    async def start(self) -> None:
        """Declare the stage's topology, open its resources and start consuming."""
        if self.stage.resources is not None:
            self._exit_stack = contextlib.AsyncExitStack()
            self._resources = await self._exit_stack.enter_async_context(
                self.stage.resources(self._settings, self._config)
            )
        if self._own_relay:
            await self._relay.start()
        channel = await self._bus.channel(self._settings.prefetch)
        topology = STAGES[self.stage.name]
        # With ``needs``, the optional keys are bound (or unbound) by ``_bind_for`` alone.
        keys = topology.bindings if self.stage.needs is None else topology.required
        self._queue = await declare_stage(channel, topology, keys)
        if self.stage.needs is not None:
            await self._bind_for(self._config.current)
            self._follower = asyncio.create_task(self._follow_config(), name="bindings")
        self._consumer_tag = await self._queue.consume(self._on_message)
        if self.stage.tick is not None:
            self._ticker = asyncio.create_task(self._tick_forever(self.stage.tick))
        log.info("stage.started", stage=self.stage.name, prefetch=self._settings.prefetch)

    async def _tick_forever(self, tick: Ticker) -> None:
        """Run the tick every ``tick_interval``, at once when a trigger woke it, and again
        straight away while it keeps making progress."""
        while not self._stopping.is_set():
            self._wake.clear()
            progress = False
            try:
                async with self._store.transaction() as conn:
                    tx = self._tx(conn)
                    added = await add_to_outbox(conn, await tick(tx))
                progress = bool(added)
                await self._run_after_commit(tx)
            except StoreUnavailable:
                pass
            except Exception as exc:
                log.error("stage.tick_failed", stage=self.stage.name, error=f"{exc!r}"[:300])
            if progress:
                continue
            waits = {
                asyncio.ensure_future(self._stopping.wait()),
                asyncio.ensure_future(self._wake.wait()),
            }
            _, pending = await asyncio.wait(
                waits, timeout=self._settings.tick_interval, return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in pending:
                waiter.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _bind_for(self, config: Config) -> None:
        """Bind the stage's optional keys ``config`` needs, unbind the others."""
        assert self.stage.needs is not None and self._queue is not None
        needed = self.stage.needs(config)
        for key in STAGES[self.stage.name].optional:
            if key in needed:
                await self._queue.bind(EXCHANGE, routing_key=key)
            else:
                await self._queue.unbind(EXCHANGE, routing_key=key)
        self._bound_for = config
        log.info("stage.bound", stage=self.stage.name, keys=sorted(needed))

    async def follow_config(self) -> None:
        """Bind the queue for the current configuration now, if a reload changed it (a no-op
        otherwise, and for a stage without ``needs``). The process calls it after a reload,
        before answering that it applied: once it says so, the broker already routes here
        what the new configuration needs (a bot or a greeting added at runtime does not miss
        the first message after the reload). Raises what binding raised."""
        if self.stage.needs is None or self._queue is None:
            return
        async with self._binding:
            config = self._config.current
            if config is not self._bound_for:
                await self._bind_for(config)

    async def _follow_config(self) -> None:
        """Rebind after a reload the process did not hand over (``follow_config``), or
        whose binding failed (the channel was away): checked every second."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 1.0)
            if self._stopping.is_set():
                break
            try:
                await self.follow_config()
            except Exception as exc:  # the channel is away: next round
                log.warning("stage.bind_failed", error=f"{type(exc).__name__}: {exc}"[:200])

    async def stop(self) -> None:
        """Stop intake, let in-flight messages finish within the grace period, close."""
        self._stopping.set()
        if self._follower is not None:
            await asyncio.wait({self._follower}, timeout=2.0)
        if self._ticker is not None:
            await asyncio.wait({self._ticker}, timeout=self._settings.shutdown_grace)
        if self._queue is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._consumer_tag)
        self._draining = True
        await self._drain()
        if self._queue is not None:
            with contextlib.suppress(Exception):
                await self._queue.channel.close()
        if self._own_relay:
            await self._relay.stop()
        if self._exit_stack is not None:
            await self._exit_stack.aclose()
        log.info("stage.stopped", stage=self.stage.name)

    async def _drain(self) -> None:
        """Let the deliveries in flight finish within the grace period, then cancel the rest
        (each nacks itself back to the queue). The set is read again until it is empty: a
        delivery the client had buffered before the consumer was cancelled may have started
        meanwhile, and closing the channel under it after its commit would leave it both
        stored and redelivered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.shutdown_grace
        while self._in_flight and (left := deadline - loop.time()) > 0:
            await asyncio.wait(set(self._in_flight), timeout=left)
        if self._in_flight:
            pending = set(self._in_flight)
            log.warning("stage.drain_timed_out", stage=self.stage.name, cancelled=len(pending))
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=2.0)  # their nacks go out before the close

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._draining:
            # Buffered by the client before the consumer was cancelled and dispatched after:
            # not started, so it goes back to the queue for the next process untouched.
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            return
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        try:
            await self.process(message)
        finally:
            if task is not None:
                self._in_flight.discard(task)

    async def process(self, message: AbstractIncomingMessage) -> None:
        started = time.perf_counter()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            stage=self.stage.name, routing_key=message.routing_key, message_id=message.message_id
        )
        try:
            outcome = await self._process(message)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            raise
        elapsed = time.perf_counter() - started
        STAGE_MESSAGES.labels(self.stage.name, outcome.name).inc()
        STAGE_DURATION.labels(self.stage.name).observe(elapsed)
        # Routine outcomes are in the metrics; logging each at info costs throughput, so
        # they log at debug and only the unusual ones (redelivered, dead-lettered) at info.
        log.log(
            logging.DEBUG if outcome.name in ROUTINE else logging.INFO,
            "stage.handled",
            outcome=outcome.name,
            reason=outcome.reason,
            published=outcome.published,
            duration_ms=round(elapsed * 1000, 2),
        )

    async def _process(self, message: AbstractIncomingMessage) -> Outcome:
        previous = delivery_count(message)
        if previous >= self._settings.delivery_limit:
            # Delivered that often without an ack: the consumer died handling it each time.
            return await self._dead_letter(
                message, f"delivered {previous} times without being acknowledged"
            )
        try:
            event, payload = decode(self.stage, message.body)
        except InvalidEvent as exc:
            return await self._dead_letter(message, str(exc))
        except NotForThisStage as exc:
            await message.ack()
            return Outcome("skipped", f"not a {self.stage.name} event: {exc}")
        self._queue_wait.observe(max(0.0, time.time() - event.occurred_at.timestamp()))
        if self.stage.wants is not None and not self.stage.wants(
            event, payload, self._config.current
        ):
            await message.ack()
            return Outcome("skipped", "nothing to do under the current configuration")
        if self.stage.coalesce:
            # A trigger: the work it asks for is already durable (rows in the database);
            # wake this replica's tick, which serves every trigger that came meanwhile.
            self._wake.set()
            await message.ack()
            return Outcome("coalesced")
        structlog.contextvars.bind_contextvars(
            event_id=event.id,
            event_type=event.type,
            conversation_id=event.conversation_id,
            correlation_id=event.correlation_id,
        )
        try:
            added, tx = await self._handle_when_ready(event, payload)
        except (InvalidEvent, _NeverReady) as exc:
            return await self._dead_letter(message, str(exc))
        except _Stopping:
            await message.nack(requeue=True)
            return Outcome("requeued", "shutting down while waiting for the database or a row")
        except Exception as exc:
            reason = f"{type(exc).__name__}: {str(exc)[:300]}"
            deliveries = delivery_count(message) + 1
            if deliveries >= self._settings.delivery_limit:
                return await self._dead_letter(
                    message, f"failed {deliveries} times, last error {reason}"
                )
            # Expected waits (a row not stored yet) are information; anything else a warning.
            level = log.info if isinstance(exc, TransientError) else log.warning
            level("stage.retry", error=reason, delivery=deliveries)
            await asyncio.sleep(self._backoff(deliveries))
            await message.nack(requeue=True)
            return Outcome("redelivered", reason)
        published = [e.type for e in added]  # in the outbox: the relay publishes them
        # Effects outside the transaction (a Twilio call) run before the ack: if the
        # process dies in between, the redelivery finds the state the first phase stored.
        try:
            published += await self._run_after_commit(tx)
        except Exception as exc:  # never leave a delivery unacknowledged (it holds a slot)
            # As a failure inside the transaction: backoff, and dead-lettered with its
            # reason at the delivery limit (e.g. a bot that keeps failing, consumers.bot).
            reason = f"after commit: {type(exc).__name__}: {str(exc)[:300]}"
            deliveries = delivery_count(message) + 1
            if deliveries >= self._settings.delivery_limit:
                return await self._dead_letter(
                    message, f"failed {deliveries} times, last error {reason}"
                )
            log.warning("stage.retry", error=reason, delivery=deliveries)
            await asyncio.sleep(self._backoff(deliveries))
            await message.nack(requeue=True)
            return Outcome("redelivered", reason)
        await message.ack()
        return Outcome("handled", published=published)

    def _tx(self, conn: Connection) -> StageTx:
        return StageTx(
            conn,
            self._config,
            self._clock(),
            self._settings,
            self._store,
            self._resources,
            until_stored=self._retry_until_stored,
        )

    async def _retry_until_stored(
        self, work: Callable[[], Awaitable[list[Envelope]]]
    ) -> list[Envelope]:
        """``work`` again and again while the database is unavailable. Not given up on
        shutdown: the grace period bounds it, and what it records already happened."""
        return await self._through_outages(work, give_up_on_shutdown=False)

    async def _through_outages(
        self, work: Callable[[], Awaitable[T]], *, give_up_on_shutdown: bool
    ) -> T:
        """``work``, run again after a backoff each time the database is unavailable."""
        attempt = 0
        while True:
            try:
                return await work()
            except StoreUnavailable as exc:
                attempt += 1
                delay = self._backoff(attempt)
                log.warning("stage.store_unavailable", error=str(exc), retry_in=round(delay, 2))
                if not give_up_on_shutdown:
                    await asyncio.sleep(delay)
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                if self._stopping.is_set():
                    raise _Stopping from exc

    async def _run_after_commit(self, tx: StageTx) -> list[str]:
        """Run after-commit work; the types of the events it wrote to the outbox."""
        published: list[str] = []
        for work in tx.after_commit:
            published += [e.type for e in await work()]
        return published

    async def _handle_when_ready(
        self, event: Envelope, payload: BaseModel
    ) -> tuple[list[Envelope], StageTx]:
        """Handle the event, held and retried in place (not counted as a delivery) while the
        handler says what it needs is not stored yet, up to ``NOT_YET_PATIENCE`` since the
        event occurred; raises ``_NeverReady`` past that, ``_Stopping`` on shutdown."""
        attempt = 0
        while True:
            try:
                return await self._handle_until_stored(event, payload)
            except NotYetStored as exc:
                age = time.time() - event.occurred_at.timestamp()
                if age >= NOT_YET_PATIENCE:
                    raise _NeverReady(
                        f"not ready {age:.0f} s after the event (waits up to"
                        f" {NOT_YET_PATIENCE:g} s): {type(exc).__name__}: {str(exc)[:300]}"
                    ) from exc
                attempt += 1
                delay = min(self._backoff(attempt), NOT_YET_PATIENCE - age)
                # Expected while the storing stage catches up: information, not a warning.
                log.info("stage.not_yet", error=str(exc)[:300], retry_in=round(delay, 2))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                if self._stopping.is_set():
                    raise _Stopping from exc

    async def _handle_until_stored(
        self, event: Envelope, payload: BaseModel
    ) -> tuple[list[Envelope], StageTx]:
        """Handle the event and store its effects and follow-up events (committed together
        with whatever other messages are being handled at the same time)."""
        return await self._commits.submit((event, payload))

    async def _handle_alone(self, item: tuple[Envelope, BaseModel]) -> Handled:
        [handled] = await self._until_stored([item])
        return handled

    async def _until_stored(self, items: list[tuple[Envelope, BaseModel]]) -> list[Handled]:
        """One transaction for ``items``; waits out database outages (until shutdown)."""
        return await self._through_outages(
            lambda: self._handle_in_one_transaction(items), give_up_on_shutdown=True
        )

    async def _handle_in_one_transaction(
        self, items: list[tuple[Envelope, BaseModel]]
    ) -> list[Handled]:
        outputs: list[tuple[list[Envelope], StageTx]] = []
        async with self._store.transaction() as conn:
            for event, payload in items:
                tx = self._tx(conn)
                with structlog.contextvars.bound_contextvars(
                    event_id=event.id, conversation_id=event.conversation_id
                ):
                    handler = self.stage.handlers[event.type]
                    outputs.append((await handler(event, payload, tx), tx))
            added = await add_to_outbox(conn, [e for events, _ in outputs for e in events])
        fresh = {e.id for e in added}
        handled: list[Handled] = []
        for events, tx in outputs:
            mine = [e for e in events if e.id in fresh]
            fresh.difference_update(e.id for e in mine)
            handled.append((mine, tx))
        return handled

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> Outcome:
        headers = dict(message.headers or {})
        headers.update(
            {
                "x-omniroute-stage": self.stage.name,
                "x-omniroute-reason": reason,
                "x-omniroute-routing-key": message.routing_key or "",
                "x-omniroute-dead-at": datetime.now(UTC).isoformat(),
            }
        )
        dead = copy_message(message, headers)
        try:
            await self._bus.publish_dead(self.stage.name, dead)
        except BrokerUnavailable:
            # Not confirmed: leave it to the broker (it dead-letters at the delivery limit).
            await message.nack(requeue=True)
            return Outcome("requeued", f"dead-letter publish failed; {reason}")
        await message.ack()
        log.error("stage.dead_lettered", reason=reason)
        return Outcome("dead-lettered", reason)

    def _backoff(self, attempt: int) -> float:
        base = self._settings.retry_backoff_base * (2 ** min(attempt - 1, 16))
        capped: float = min(self._settings.retry_backoff_max, base)
        return capped * random.uniform(0.5, 1.0)


class NotForThisStage(Exception):
    """A valid event of a type the stage does not take (e.g. a binding an older release
    declared): acknowledged and skipped; its real consumers received their own copy."""


class _NeverReady(Exception):
    """What a ``NotYetStored`` message waited for did not come within ``NOT_YET_PATIENCE``."""


class _Stopping(Exception):
    """Raised inside the runner when shutdown interrupts a wait for the database."""
