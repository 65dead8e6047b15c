"""Generated events straight onto a stage's queue while the real stage consumes it: every
poison message (not JSON, not an envelope, a payload of the wrong shape) lands in that
stage's dead-letter queue with its reason, and the stage keeps handling valid events."""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage
from hypothesis import example, given
from hypothesis import strategies as st

from consumers import classify, conversations, status
from consumers.runtime import Stage
from omniroute.infra.bus import Bus
from omniroute.infra.settings import Settings
from omniroute.infra.topology import STAGES
from schemas.events import PAYLOADS, ConversationOpened, Envelope, EventType, MessageStatus
from tests.conftest import RunnerFactory
from tests.fuzz.common import STATS, TIMEOUT, fuzz_settings
from tests.fuzz.strategies import json_values
from tests.support import EventTap, about, new_customer, new_sid, received_event, tap

pytestmark = [pytest.mark.fuzz, pytest.mark.integration, TIMEOUT]


def _opened() -> Envelope:
    now = datetime.now(UTC)
    data = ConversationOpened(
        conversation_id=str(uuid.uuid4()),
        contact_id=str(uuid.uuid4()),
        business_number="+5511999990000",
        customer=new_customer(),
        workstream="support-pt",
        first_message_id=str(uuid.uuid4()),
        first_message_sid=new_sid(),
        opened_at=now,
    )
    return Envelope(
        id=str(uuid.uuid4()),
        type=EventType.CONVERSATION_OPENED,
        occurred_at=now,
        account="contoso",
        correlation_id=str(uuid.uuid4()),
        data=data.model_dump(mode="json"),
    )


def _status() -> Envelope:
    now = datetime.now(UTC)
    data = MessageStatus(message_sid=new_sid(), status="delivered", received_at=now)
    return Envelope(
        id=str(uuid.uuid4()),
        type=EventType.MESSAGE_STATUS,
        occurred_at=now,
        account="contoso",
        correlation_id=str(uuid.uuid4()),
        data=data.model_dump(mode="json"),
    )


def _received() -> Envelope:
    event: Envelope = received_event(customer=new_customer())
    return event


_CUSTOMERS = itertools.count(random.randrange(10**8))


def _unique_customer() -> str:
    """A customer no other test (nor an earlier example) used: ``new_customer`` draws 8
    random digits, and thousands of examples would meet the same customer twice (whose
    second message joins the open conversation instead of opening one)."""
    return f"+5521{next(_CUSTOMERS) % 10**9:09d}"


SAMPLES = {"conversations": _received, "classify": _opened, "status": _status}
STAGE_OBJECTS: dict[str, Stage] = {
    "conversations": conversations.STAGE,
    "classify": classify.STAGE,
    "status": status.STAGE,
}

# Values no string or timestamp field accepts.
wrong_types = st.one_of(
    st.none(),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(0, 1000), max_size=2),
)


_DELETE = object()
ENVELOPE_FIELDS = ("id", "type", "occurred_at", "account", "correlation_id")


def _not_json(body: bytes) -> bytes:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    return b"\xff" + body  # never JSON


def _changed(mapping: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    out = dict(mapping)
    if value is _DELETE:
        out.pop(name, None)
    else:
        out[name] = value
    return out


def poisons(stage: str) -> st.SearchStrategy[bytes]:
    """Messages the stage must refuse: bytes that are not JSON, JSON that is not an
    envelope, an envelope missing a field or with one of the wrong type, or an envelope of
    the stage's own type whose payload lacks a field or has one of the wrong type."""
    valid: dict[str, Any] = orjson.loads(SAMPLES[stage]().model_dump_json())
    model = PAYLOADS[valid["type"]]
    required = sorted(n for n, f in model.model_fields.items() if f.is_required())
    broken = st.one_of(st.just(_DELETE), wrong_types)
    not_objects = json_values().filter(lambda v: not isinstance(v, dict))

    def payload(change: tuple[str, Any, dict[str, Any]]) -> bytes:
        name, value, extra = change
        return orjson.dumps(valid | {"data": {**extra, **_changed(valid["data"], name, value)}})

    return st.one_of(
        st.binary(max_size=200).map(_not_json),
        not_objects.map(orjson.dumps),
        st.tuples(st.sampled_from(ENVELOPE_FIELDS), broken).map(
            lambda change: orjson.dumps(_changed(valid, *change))
        ),
        not_objects.map(lambda data: orjson.dumps(valid | {"data": data})),
        st.tuples(
            st.sampled_from(required),
            broken,
            st.dictionaries(st.text(max_size=8), json_values(), max_size=3),
        ).map(payload),
    )


@dataclass(repr=False)
class DeadLetters:
    """A consumer on a stage's dead-letter queue: message id → the dead letter's headers."""

    seen: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    arrived: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        if message.message_id:
            self.seen[message.message_id] = dict(message.headers or {})
            self.arrived.set()

    async def wait(self, message_id: str, timeout: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while message_id not in self.seen:
                self.arrived.clear()
                await self.arrived.wait()
        return self.seen[message_id]


class Running:
    """A running stage, its dead letters and (for one test) a tap; the repr stays short,
    as hypothesis prints the test's arguments when it reports a failure."""

    def __init__(self, stage: str, bus: Bus, dead: DeadLetters) -> None:
        self.stage = stage
        self.bus = bus
        self.dead = dead
        self.spy: EventTap | None = None

    def __repr__(self) -> str:
        return f"Running({self.stage!r})"


async def _run(
    stage: str, start_runner: RunnerFactory, bus: Bus, settings: Settings
) -> AsyncIterator[Running]:
    """Start the stage, then consume its dead-letter queue."""
    await start_runner(STAGE_OBJECTS[stage])
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        dead = DeadLetters()
        queue = await channel.declare_queue(STAGES[stage].dead_queue, passive=True)
        await queue.consume(dead.on_message)
        yield Running(stage, bus, dead)


@pytest.fixture(params=sorted(SAMPLES))
async def running(
    request: pytest.FixtureRequest, start_runner: RunnerFactory, bus: Bus, settings: Settings
) -> AsyncIterator[Running]:
    async for running in _run(request.param, start_runner, bus, settings):
        yield running


def _routing_key(stage: str) -> str:
    return SAMPLES[stage]().type


@fuzz_settings()
@given(data=st.data())
@example(data=None)  # the fixed cases below, once
async def test_poison_events_are_dead_lettered_with_their_reason(
    running: Running, data: st.DataObject | None
) -> None:
    stage = running.stage
    bodies = [b"{not json", b"[]", b'{"type": "' + _routing_key(stage).encode() + b'"}']
    if data is not None:
        bodies = [data.draw(POISONS[stage], label="poison")]
    for body in bodies:
        message_id = f"poison-{uuid.uuid4()}"
        await running.bus.publish_raw(
            _routing_key(stage), aio_pika.Message(body, message_id=message_id)
        )
        STATS.events += 1
        headers = await running.dead.wait(message_id)
        reason = headers.get("x-omniroute-reason")
        assert isinstance(reason, str) and reason.strip(), headers
        assert headers.get("x-omniroute-stage") == stage
        assert headers.get("x-omniroute-routing-key") == _routing_key(stage)


@pytest.fixture
async def conversations_spy(settings: Settings) -> AsyncIterator[EventTap]:
    async with tap(settings.amqp_url.get_secret_value(), "conversation.opened") as spy:
        yield spy


@pytest.fixture
async def conversations_running(
    start_runner: RunnerFactory, bus: Bus, settings: Settings, conversations_spy: EventTap
) -> AsyncIterator[Running]:
    """The conversations stage with its dead letters and a tap on ``conversation.opened``
    (in one object whose repr stays short, as hypothesis prints it for every example)."""
    async for running in _run("conversations", start_runner, bus, settings):
        running.spy = conversations_spy
        yield running


POISONS = {stage: poisons(stage) for stage in SAMPLES}


@fuzz_settings()
@given(poison=POISONS["conversations"])
async def test_a_valid_event_after_poison_is_still_handled(
    conversations_running: Running, poison: bytes
) -> None:
    """Poison, then a customer's real message: the poison is dead-lettered and the
    conversation still opens (the stage is not stuck behind what it could not read)."""
    running = conversations_running
    message_id = f"poison-{uuid.uuid4()}"
    await running.bus.publish_raw(
        "message.received", aio_pika.Message(poison, message_id=message_id)
    )
    event = received_event(customer=_unique_customer())
    await running.bus.publish(event)
    STATS.events += 2
    headers = await running.dead.wait(message_id)
    assert str(headers.get("x-omniroute-reason") or "").strip(), headers
    customer = event.data["customer"]
    assert running.spy is not None
    opened = await running.spy.next(timeout=10, where=about(customer=customer))
    assert opened["type"] == "conversation.opened"
