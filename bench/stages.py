"""Stages: messages per second of each stage, alone in its own process, against a raw
aio-pika consumer that only acks (same prefetch, same broker, same message sizes).

The pipeline is driven stage by stage: ``count`` new customers' ``message.received`` events
are published, then ``conversations`` drains its queue alone; what it published fills the
next stages' queues, which drain in turn (``classify``, ``lifecycle``, ``distribute``,
``outbound``, ``status``).
A stage's rate is the messages it finished (its ``/metrics``) over the time it took. With a
greeting configured, lifecycle queues a send per conversation for ``outbound`` (to the
Twilio emulator, unpaced), whose status callbacks go through a router to ``status``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiohttp
import orjson

from bench.deployment import CONFIG_WITH_GREETING, SID, TOKEN, deployment, seed_agents
from bench.infra import BenchInfra
from bench.processes import run_python
from omniroute.infra.bus import Bus
from omniroute.infra.settings import Settings
from omniroute.infra.topology import STAGES
from omniroute.twilio_emulator import EmulatorState, start_emulator
from schemas.events import Envelope, EventType, MessageReceived, event_id

ORDER = ("conversations", "classify", "lifecycle", "distribute", "outbound", "status")


def received(n: int) -> Envelope:
    sid = "SM" + uuid.uuid4().hex
    customer = f"+55119{n % 10**8:08d}"
    now = datetime.now(UTC)
    payload = MessageReceived(
        message_sid=sid,
        account_sid=SID,
        business_number="+5511999990000",
        number_name="Main",
        workstream="main",
        customer=customer,
        customer_wa_id=customer.lstrip("+"),
        profile_name="Maria",
        body="Olá, meu pedido não chegou",
        received_at=now,
        form={"MessageSid": sid, "Body": "Olá, meu pedido não chegou"},
    )
    eid = event_id(EventType.MESSAGE_RECEIVED, "bench", sid)
    return Envelope(
        id=eid,
        type=EventType.MESSAGE_RECEIVED,
        occurred_at=now,
        account="bench",
        correlation_id=eid,
        data=payload.model_dump(mode="json"),
    )


async def _depth(channel: aio_pika.abc.AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    return int(declared.declaration_result.message_count or 0)


async def raw_baseline(infra: BenchInfra, count: int, prefetch: int, body: bytes) -> float:
    """Messages per second of the ack-only consumer on a quorum queue of ``count``."""
    name = f"bench.raw.{uuid.uuid4().hex[:6]}"
    connection = await aio_pika.connect(infra.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        for start in range(0, count, 500):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(message, routing_key=name)
                    for _ in range(min(500, count - start))
                )
            )
        out = await run_python(
            [
                "-m",
                "bench.servers.ack_consumer",
                f"--amqp-url={infra.amqp_url}",
                f"--queue={name}",
                f"--count={count}",
                f"--prefetch={prefetch}",
            ]
        )
        await channel.queue_delete(name)
    return float(orjson.loads(out)["rate"])


async def measure(infra: BenchInfra, count: int) -> dict[str, dict[str, float]]:
    prefetch = Settings().prefetch
    await seed_agents(infra.database_url, agents=50, capacity=count // 25 + 10)
    bus = Bus.from_settings(Settings.model_validate({"amqp_url": infra.amqp_url}))
    await bus.start()
    await asyncio.wait_for(bus.wait_ready(), 10)
    events = [received(n) for n in range(count)]
    sample = events[0].__pydantic_serializer__.to_json(events[0])
    for start in range(0, count, 500):
        await asyncio.gather(*(bus.publish(e) for e in events[start : start + 500]))
    await bus.close()
    baseline = await raw_baseline(infra, count, prefetch, sample)
    results: dict[str, dict[str, float]] = {}
    # Outbound sends to the emulator (no pacing: the per-sender 80/s limit is Twilio's,
    # not the stage's); its status callbacks reach a router, which feeds the status stage.
    emulator = await start_emulator(EmulatorState(accounts={SID: TOKEN}, callback_delay=0.01))
    connection = await aio_pika.connect(infra.amqp_url)
    try:
        async with (
            connection,
            aiohttp.ClientSession() as http,
            deployment(infra, [], config_text=CONFIG_WITH_GREETING) as edge,
        ):
            channel = await connection.channel()
            for stage in ORDER:
                if stage == "status":
                    await _settled(channel, STAGES[stage].queue)  # callbacks still arriving
                backlog = await _depth(channel, STAGES[stage].queue)
                async with deployment(
                    infra,
                    [stage],
                    router=False,
                    config_text=CONFIG_WITH_GREETING,
                    public_url=edge.router_url,
                    twilio_api_url=emulator.url,
                    send_interval="0",
                ) as deployed:
                    started = time.perf_counter()
                    first = done = await deployed.processed(http, stage)  # began before ready
                    while done < backlog:
                        await asyncio.sleep(0.05)
                        done = await deployed.processed(http, stage)
                        if time.perf_counter() - started > 300:
                            raise TimeoutError(f"{stage}: {done} of {backlog} after 300 s")
                    elapsed = time.perf_counter() - started
                results[stage] = {
                    "messages": backlog,
                    "rate": round((backlog - first) / elapsed, 1),
                    "baseline": baseline,
                }
    finally:
        await emulator.close()
    return results


async def _settled(channel: aio_pika.abc.AbstractChannel, queue: str) -> None:
    """Wait until a queue stops growing (for a second)."""
    last = -1
    while (depth := await _depth(channel, queue)) != last:
        last = depth
        await asyncio.sleep(1.0)


async def run(infra: BenchInfra, count: int = 3000) -> list[dict[str, Any]]:
    measured = await measure(infra, count)
    goals = {"conversations": ">= 0.5"}
    return [
        {
            "figure": f"stage {stage} (messages/s, own process)",
            "value": m["rate"],
            "baseline": "raw aio-pika consumer that only acks, same prefetch",
            "baseline_value": m["baseline"],
            "ratio": round(m["rate"] / m["baseline"], 3),
            "goal": goals.get(stage, "information"),
        }
        for stage, m in measured.items()
    ]
