"""The AMQP bus: a connection that survives broker restarts, the topology, and a publisher
with confirms.

The router must start and answer while the broker is down, so connecting is a background
supervisor: ``publish`` fails fast with ``BrokerUnavailable`` until the connection is up,
and aio-pika's robust connection takes over reconnection once it has been established.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any, cast

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    DeliveryMode,
)
from pamqp.commands import Basic

from omniroute.errors import BrokerUnavailable
from omniroute.infra.settings import Settings
from omniroute.infra.topology import (
    BROKER_DELIVERY_LIMIT,
    DEAD_LETTER_EXCHANGE,
    EXCHANGE,
    STAGES,
    StageQueue,
)
from schemas.events import Envelope

log = structlog.get_logger("omniroute.bus")


def encode(event: Envelope) -> bytes:
    """The event as JSON bytes, serialised by pydantic-core in one pass."""
    return event.__pydantic_serializer__.to_json(event)


def event_properties(event: Envelope) -> Basic.Properties:
    """AMQP properties of an event: persistent, JSON, its id, correlation and type."""
    return Basic.Properties(
        content_type="application/json",
        delivery_mode=DeliveryMode.PERSISTENT.value,
        message_id=event.id,
        correlation_id=event.correlation_id,
        message_type=event.type,
        timestamp=event.occurred_at,
        headers={},
    )


def copy_message(message: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    """A persistent copy of a received message with other headers (dead-lettering, replay)."""
    return aio_pika.Message(
        body=message.body,
        headers=headers,
        content_type=message.content_type,
        delivery_mode=DeliveryMode.PERSISTENT,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        type=message.type,
        timestamp=message.timestamp,
    )


async def declare_stage(
    channel: AbstractChannel, stage: StageQueue, keys: Sequence[str] | None = None
) -> AbstractQueue:
    """Declare a stage's quorum queue, its bindings (``keys``, by default the ones it always
    needs) and its dead-letter queue (idempotent)."""
    events = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    dead = await channel.declare_exchange(
        DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    dead_queue = await channel.declare_queue(
        stage.dead_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead_queue.bind(dead, routing_key=stage.stage)
    queue = await channel.declare_queue(
        stage.queue,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": BROKER_DELIVERY_LIMIT,
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-dead-letter-routing-key": stage.stage,
        },
    )
    for key in stage.required if keys is None else keys:
        await queue.bind(events, routing_key=key)
    for key in stage.retired:
        await queue.unbind(events, routing_key=key)  # idempotent when never bound
    return queue


# The routing keys to bind a stage's queue to when a process declares it.
DeclareKeys = Callable[[StageQueue], Sequence[str]]


class Bus:
    """One robust connection and one confirming publisher channel per process."""

    def __init__(
        self,
        url: str,
        *,
        publish_timeout: float,
        connect_timeout: float,
        retry_max: float,
        reconnect_interval: float = 1.0,
        declare_stages: tuple[str, ...] = tuple(STAGES),
        declare_keys: DeclareKeys | None = None,
    ) -> None:
        self._url = url
        self._publish_timeout = publish_timeout
        self._connect_timeout = connect_timeout
        self._retry_max = retry_max
        self._reconnect_interval = reconnect_interval
        self._declare_stages = declare_stages
        # The keys each stage's queue is bound to on connect (default: those it always
        # needs); never fewer than the stage's runner binds, so nothing waits for it to start.
        self._declare_keys = declare_keys
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._ready = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings, declare_keys: DeclareKeys | None = None) -> Bus:
        return cls(
            settings.amqp_url.get_secret_value(),
            publish_timeout=settings.publish_timeout,
            connect_timeout=settings.broker_connect_timeout,
            retry_max=settings.broker_retry_max,
            reconnect_interval=settings.broker_reconnect_interval,
            declare_keys=declare_keys,
        )

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise BrokerUnavailable("not connected to the broker")
        return self._connection

    @property
    def ready(self) -> bool:
        return (
            self._ready.is_set()
            and self._connection is not None
            and not self._connection.is_closed
            and self._channel is not None
            and not self._channel.is_closed
        )

    async def start(self) -> None:
        """Begin connecting in the background; returns at once."""
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._connect_forever(), name="bus-connect")

    async def wait_ready(self) -> None:
        """Wait until the first connection is up (bound it with ``asyncio.timeout``)."""
        await self._ready.wait()

    async def _connect_forever(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._connect()
                return
            except asyncio.CancelledError:
                raise
            except aio_pika.exceptions.ChannelPreconditionFailed as exc:
                # Retrying cannot help until an operator acts: say so loudly.
                log.error(
                    "bus.topology_mismatch",
                    detail=str(exc)[:300],
                    hint="a queue exists with other arguments; delete it or migrate it",
                    retry_in=self._retry_max,
                )
                await self._close_connection()
                await asyncio.sleep(self._retry_max)
            except Exception as exc:
                log.warning(
                    "bus.connect_failed",
                    error=type(exc).__name__,
                    detail=str(exc)[:300],
                    retry_in=delay,
                )
                await self._close_connection()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)

    async def _connect(self) -> None:
        # aio-pika's RobustConnection keeps reconnecting in a task of its own when the
        # first connect is cancelled, and nothing but close() on that object stops it
        # (mosquito/aio-pika#414): a process closing while the broker is unreachable never
        # exited. Keep the object from its construction, and close it if connecting fails.
        made: list[aio_pika.RobustConnection] = []

        def tracked(*args: Any, **kwargs: Any) -> aio_pika.RobustConnection:
            made.append(aio_pika.RobustConnection(*args, **kwargs))
            return made[-1]

        try:
            connection = await aio_pika.connect_robust(
                self._url,
                timeout=self._connect_timeout,
                client_properties={"connection_name": "omniroute"},
                reconnect_interval=self._reconnect_interval,
                connection_class=cast(type[aio_pika.RobustConnection], tracked),
            )
        except BaseException:
            for pending in made:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pending.close())
            raise
        self._connection = connection
        channel = await connection.channel(publisher_confirms=True)
        for name in self._declare_stages:
            stage = STAGES[name]
            keys = self._declare_keys(stage) if self._declare_keys is not None else None
            await declare_stage(channel, stage, keys)
        self._channel = channel
        self._ready.set()
        log.info("bus.connected", stages=list(self._declare_stages))

    async def channel(self, prefetch: int) -> AbstractChannel:
        """A new channel on the shared connection (consumers use one each)."""
        channel = await self.connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=prefetch)
        return channel

    async def publish(
        self,
        event: Envelope,
        routing_key: str | None = None,
        *,
        confirm_within: float | None = None,
    ) -> None:
        """Publish persistently (routed by the event's type unless told otherwise) and wait
        for the broker's confirm.

        Raises BrokerUnavailable when not connected, on a nack, or when no confirm arrives
        within ``confirm_within`` (default ``publish_timeout``); the caller must then not report
        success.
        """
        key = routing_key or event.type
        await self._publish(EXCHANGE, key, encode(event), event_properties(event), confirm_within)

    async def publish_all(self, events: Sequence[Envelope]) -> list[bool]:
        """Publish ``events`` (frames leave in order on one channel) and await their confirms
        together; for each, whether the broker confirmed it. Never raises BrokerUnavailable:
        the caller keeps what was not confirmed for a later try."""
        return await self.publish_encoded(
            [(event.type, encode(event), event_properties(event)) for event in events]
        )

    async def publish_encoded(
        self,
        messages: Sequence[tuple[str, bytes, Basic.Properties]],
        *,
        confirm_within: float | None = None,
    ) -> list[bool]:
        """``publish_all`` for messages already encoded: (routing key, body, properties)."""
        results = await asyncio.gather(
            *(
                self._publish(EXCHANGE, key, body, props, confirm_within)
                for key, body, props in messages
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, BrokerUnavailable):
                raise result
        return [result is None for result in results]

    async def publish_dead(self, stage: str, message: aio_pika.Message) -> None:
        """Put a message on a stage's dead-letter queue, confirmed."""
        await self._publish(DEAD_LETTER_EXCHANGE, stage, message.body, message.properties)

    async def publish_raw(self, routing_key: str, message: aio_pika.Message) -> None:
        await self._publish(EXCHANGE, routing_key, message.body, message.properties)

    async def _publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Basic.Properties,
        confirm_within: float | None = None,
    ) -> None:
        # Straight to the aiormq channel under aio-pika's robust one: the same frames and
        # confirm, without building an aio_pika.Message per event (a tenth of the router's
        # time per webhook went there).
        channel = self._channel
        if channel is None or not self.ready:
            raise BrokerUnavailable("not connected to the broker")
        try:
            # No extra task per publish.
            async with asyncio.timeout(confirm_within or self._publish_timeout):
                underlay = await channel.get_underlay_channel()
                await underlay.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=False,
                )
        except TimeoutError as exc:
            raise BrokerUnavailable("the broker did not confirm the publish in time") from exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise BrokerUnavailable(f"publish failed: {type(exc).__name__}") from exc

    async def _close_connection(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        self._ready.clear()
        await self._close_connection()
