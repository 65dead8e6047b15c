"""The shared consumer runtime: dead letters with reasons, bounded redelivery, and replay
from the CLI's functions."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import aio_pika
import asyncpg
from prometheus_client import REGISTRY
from pydantic import BaseModel

from consumers import conversations, lifecycle
from consumers.runtime import NOT_YET_PATIENCE, Stage, StageTx
from omniroute.commands.dead_letters import list_dead, replay_dead
from omniroute.errors import NotYetStored
from omniroute.infra.bus import Bus
from omniroute.infra.config_loader import LiveConfig, parse_config
from omniroute.infra.settings import Settings
from omniroute.infra.topology import STAGES
from schemas.events import Envelope, EventType, MessageReceived
from tests.consumers.conftest import RunnerFactory
from tests.support import (
    CONFIG_YAML,
    ENVIRON,
    EventTap,
    TcpProxy,
    new_customer,
    received_event,
    wait_for,
)


async def _dead_letter(
    settings: Settings, message_id: str, timeout: float = 10.0, stage: str = "conversations"
) -> Any:
    """Wait until a message with this id is on a stage's dead-letter queue."""

    async def find() -> Any:
        letters = await list_dead(settings, stage, 1000)
        return next((d for d in letters if d.message_id == message_id), None)

    return await wait_for(find, timeout=timeout, interval=0.2)


async def test_undecodable_message_is_dead_lettered_with_reason(
    bus: Bus, start_runner: RunnerFactory, settings: Settings
) -> None:
    await start_runner()
    message = aio_pika.Message(b"{not json", message_id="poison-1", content_type="text/plain")
    await bus.publish_raw("message.received", message)
    letter = await _dead_letter(settings, "poison-1")
    assert "not a valid event envelope" in letter.reason
    assert letter.routing_key == "message.received"
    assert letter.body == b"{not json"


async def test_invalid_payload_is_dead_lettered_at_once(
    bus: Bus, start_runner: RunnerFactory, settings: Settings
) -> None:
    await start_runner()
    event = received_event()
    event.data.pop("message_sid")
    await bus.publish(event)
    letter = await _dead_letter(settings, event.id)
    assert "invalid message.received payload" in letter.reason
    assert "message_sid" in letter.reason


async def test_transient_failure_is_retried_then_dead_lettered_at_the_limit(
    bus: Bus, start_runner: RunnerFactory, settings: Settings
) -> None:
    calls: list[str] = []

    async def failing(event: Envelope, payload: BaseModel, tx: StageTx) -> list[Envelope]:
        calls.append(event.id)
        raise RuntimeError("downstream exploded")

    await start_runner(Stage("conversations", {EventType.MESSAGE_RECEIVED: failing}))
    event = received_event()
    await bus.publish(event)
    letter = await _dead_letter(settings, event.id)
    assert calls.count(event.id) == settings.delivery_limit
    assert f"failed {settings.delivery_limit} times" in letter.reason
    assert "downstream exploded" in letter.reason


async def test_a_failure_that_passes_is_handled_on_redelivery(
    bus: Bus, start_runner: RunnerFactory, db: asyncpg.Pool
) -> None:
    attempts: dict[str, int] = {}

    async def flaky(event: Envelope, payload: BaseModel, tx: StageTx) -> list[Envelope]:
        attempts[event.id] = attempts.get(event.id, 0) + 1
        if attempts[event.id] == 1:
            raise RuntimeError("first time unlucky")
        assert isinstance(payload, MessageReceived)
        return await conversations.handle(event, payload, tx)

    await start_runner(Stage("conversations", {EventType.MESSAGE_RECEIVED: flaky}))
    customer = new_customer()
    event = received_event(customer=customer)
    await bus.publish(event)
    await wait_for(
        lambda: db.fetchval("SELECT count(*) FROM conversations WHERE customer = $1", customer)
    )
    assert attempts[event.id] == 2


async def test_dead_letters_replay_to_the_stage_once_it_is_fixed(
    bus: Bus, start_runner: RunnerFactory, settings: Settings, db: asyncpg.Pool
) -> None:
    async def broken(event: Envelope, payload: BaseModel, tx: StageTx) -> list[Envelope]:
        raise RuntimeError("bug in this release")

    broken_runner = await start_runner(Stage("conversations", {EventType.MESSAGE_RECEIVED: broken}))
    customer = new_customer()
    event = received_event(customer=customer)
    await bus.publish(event)
    await _dead_letter(settings, event.id)
    await broken_runner.stop()

    await start_runner()  # the fixed release
    assert await replay_dead(settings, "conversations", 1000) >= 1
    await wait_for(
        lambda: db.fetchval("SELECT count(*) FROM conversations WHERE customer = $1", customer)
    )
    letters = await list_dead(settings, "conversations", 1000)
    assert all(d.message_id != event.id for d in letters)


async def _next_with_id(spy: EventTap, event_id: str) -> dict[str, Any]:
    async with asyncio.timeout(5):
        while True:
            event = await spy.next()
            if event["id"] == event_id:
                return event


def test_payload_model_keeps_unknown_fields() -> None:
    event = received_event()
    data = dict(event.data, brand_new_field="x")
    assert MessageReceived.model_validate(data).model_extra == {"brand_new_field": "x"}


async def test_stage_resumes_after_the_broker_connection_drops(
    bus: Bus, start_runner: RunnerFactory, settings: Settings, db: asyncpg.Pool
) -> None:
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    vhost = settings.amqp_url.get_secret_value().rsplit("/", 1)[1]
    await start_runner(amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}")
    first, second = new_customer(), new_customer()
    count = "SELECT count(*) FROM conversations WHERE customer = $1"
    await bus.publish(received_event(customer=first))
    await wait_for(lambda: db.fetchval(count, first))

    port = proxy.port
    await proxy.cut()  # the broker goes away under the running stage …
    await bus.publish(received_event(customer=second))  # … while work keeps arriving
    await asyncio.sleep(0.5)
    assert await db.fetchval(count, second) == 0
    proxy.port = port
    await proxy.start()  # … and comes back: the stage reconnects and consumes by itself
    await wait_for(lambda: db.fetchval(count, second), timeout=20)
    await proxy.cut()


def _lifecycle_taken() -> float:
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "omniroute_stage_messages"
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels.get("stage") == "lifecycle"
    )


async def test_a_stage_is_bound_only_to_the_keys_its_configuration_needs(
    start_runner: RunnerFactory, bus: Bus, settings: Settings, config: LiveConfig
) -> None:
    # The shared test configuration has no automated message and no idle timer: lifecycle
    # needs the ends of conversations only, so the broker must not route it the rest.
    assert lifecycle.needs(config.current) == {"conversation.ended", "conversation.closed"}
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(STAGES["lifecycle"].queue, passive=True)
        await queue.purge()
    await start_runner(lifecycle.STAGE)
    before = _lifecycle_taken()
    queued = received_event().caused(EventType.CONVERSATION_QUEUED, {"queue": "general"})
    closed = received_event().caused(EventType.CONVERSATION_CLOSED, {"not": "a closed event"})
    await bus.publish(queued)
    await bus.publish(closed)  # invalid: dead-lettered, which proves it was routed here
    await _dead_letter(settings, closed.id, stage="lifecycle")

    async def counted() -> bool:
        return _lifecycle_taken() - before >= 1

    # Queued before it, the other event would have been taken first had it been routed here.
    await wait_for(counted)
    assert _lifecycle_taken() - before == 1  # the closed event only


GREETING = '    automated_messages:\n      greeting: {text: {en: "Hi, you are in line"}}\n'


async def test_a_reload_rebinds_the_stage_before_the_process_says_it_applied(
    start_runner: RunnerFactory, bus: Bus, settings: Settings, config: LiveConfig
) -> None:
    # A greeting added at runtime: lifecycle must take conversation.queued from the moment
    # the reload is answered (follow_config), not a poll later, or the first conversations
    # after the reload get no greeting; removed again, the broker stops routing it here.
    plain = config.current
    greeted = parse_config(
        CONFIG_YAML.replace(
            "  - name: support-en\n    language: en\n",
            "  - name: support-en\n    language: en\n" + GREETING,
        ),
        "greeted.yaml",
        ENVIRON,
    )
    assert EventType.CONVERSATION_QUEUED in lifecycle.needs(greeted)
    assert EventType.CONVERSATION_QUEUED not in lifecycle.needs(plain)
    runner = await start_runner(lifecycle.STAGE)

    config.apply(greeted)
    await runner.follow_config()
    routed = received_event().caused(EventType.CONVERSATION_QUEUED, {"not": "a queued event"})
    await bus.publish(routed)  # invalid: dead-lettered, which proves it was routed here
    await _dead_letter(settings, routed.id, stage="lifecycle")

    config.apply(plain)
    await runner.follow_config()
    dropped = received_event().caused(EventType.CONVERSATION_QUEUED, {"not": "a queued event"})
    closed = received_event().caused(EventType.CONVERSATION_CLOSED, {"not": "a closed event"})
    await bus.publish(dropped)
    await bus.publish(closed)
    await _dead_letter(settings, closed.id, stage="lifecycle")
    letters = await list_dead(settings, "lifecycle", 1000)
    assert dropped.id not in {letter.message_id for letter in letters}


async def test_a_row_not_stored_yet_is_waited_for_past_the_delivery_limit(
    bus: Bus, start_runner: RunnerFactory, settings: Settings
) -> None:
    """``NotYetStored`` (another stage is behind) is held and retried in place, never
    counted as a delivery: a lag longer than the delivery limit's backoff loses nothing."""
    attempts: list[int] = []
    done = asyncio.Event()

    async def waiting(event: Envelope, payload: BaseModel, tx: StageTx) -> list[Envelope]:
        attempts.append(1)
        if len(attempts) <= settings.delivery_limit * 2:
            raise NotYetStored("the message is not stored (yet)")
        done.set()
        return []

    await start_runner(
        Stage("conversations", {EventType.MESSAGE_RECEIVED: waiting}),
        retry_backoff_base=0.01,
        retry_backoff_max=0.02,
    )
    event = received_event()
    await bus.publish(event)
    async with asyncio.timeout(10):
        await done.wait()
    assert len(attempts) == settings.delivery_limit * 2 + 1
    letters = await list_dead(settings, "conversations", 1000)
    assert all(d.message_id != event.id for d in letters)


async def test_a_row_never_stored_is_dead_lettered_once_the_event_is_too_old(
    bus: Bus, start_runner: RunnerFactory, settings: Settings
) -> None:
    async def waiting(event: Envelope, payload: BaseModel, tx: StageTx) -> list[Envelope]:
        raise NotYetStored("message SMx is not stored (yet)")

    await start_runner(Stage("conversations", {EventType.MESSAGE_RECEIVED: waiting}))
    event = received_event()
    event.occurred_at -= timedelta(seconds=NOT_YET_PATIENCE + 1)
    await bus.publish(event)
    letter = await _dead_letter(settings, event.id)
    assert "not ready" in letter.reason and "SMx is not stored" in letter.reason


class _Buffered:
    """A delivery the client had buffered: only what the runner may call on it."""

    def __init__(self) -> None:
        self.nacked: list[bool] = []
        self.acked = False
        self.body = received_event().model_dump_json().encode()
        self.headers: dict[str, Any] = {}
        self.routing_key = "message.received"
        self.message_id = "buffered"

    async def nack(self, requeue: bool = True) -> None:
        self.nacked.append(requeue)

    async def ack(self) -> None:
        self.acked = True


async def test_a_delivery_dispatched_after_the_consumer_was_cancelled_goes_back_untouched(
    start_runner: RunnerFactory,
) -> None:
    """A delivery whose task first ran after the drain began was neither waited for nor
    refused: it was handled, committed, and its ack lost with the closed channel (seen under
    load: one message both stored and back in the queue after a clean SIGTERM)."""
    handled: list[str] = []

    async def record(event: Envelope, payload: BaseModel, tx: StageTx) -> list[Envelope]:
        handled.append(event.id)
        return []

    runner = await start_runner(Stage("conversations", {EventType.MESSAGE_RECEIVED: record}))
    await runner.stop()
    late = _Buffered()
    await runner._on_message(late)  # type: ignore[arg-type]
    assert late.nacked == [True] and not late.acked
    assert handled == []
