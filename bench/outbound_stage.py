"""Outbound: messages sent per second through the stage to the Twilio emulator (official
client, HTTP on loopback), with the 24-hour gate vs the same stage with the gate bypassed."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from bench.deployment import CONFIG, SID, TOKEN
from bench.infra import BenchInfra
from consumers import outbound
from consumers.runtime import StageRunner
from omniroute.domain.window import Verdict
from omniroute.infra.bus import Bus
from omniroute.infra.config_loader import LiveConfig, parse_config
from omniroute.infra.settings import Settings
from omniroute.infra.store import Store
from omniroute.twilio_emulator import EmulatorState, start_emulator
from schemas.events import EventType, MessageSendRequested, new_event


@contextmanager
def gate_bypassed(enabled: bool) -> Iterator[None]:
    namespace = vars(outbound)
    original = namespace["gate"]
    if enabled:
        namespace["gate"] = lambda *args, **kwargs: Verdict(True)
    try:
        yield
    finally:
        namespace["gate"] = original


async def _seed(store: Store, count: int) -> list[str]:
    pool = await store.pool()
    now = datetime.now(UTC)
    contact, conversation = uuid.uuid4(), uuid.uuid4()
    customer = f"+55119{uuid.uuid4().int % 10**8:08d}"
    await pool.execute(
        "INSERT INTO contacts (id, account, address) VALUES ($1, 'bench', $2)", contact, customer
    )
    await pool.execute(
        "INSERT INTO conversations (id, account, business_number, customer, contact_id,"
        " workstream, state, opened_at, last_customer_message_at)"
        " VALUES ($1, 'bench', '+5511999990000', $2, $3, 'main', 'active', $4, $4)",
        conversation,
        customer,
        contact,
        now,
    )
    ids = [uuid.uuid4() for _ in range(count)]
    await pool.executemany(
        "INSERT INTO messages (id, conversation_id, direction, body, status, received_at)"
        " VALUES ($1, $2, 'outbound', 'olá', 'requested', $3)",
        [(i, conversation, now) for i in ids],
    )
    return [str(i) for i in ids]


async def throughput(infra: BenchInfra, count: int, bypass: bool) -> float:
    emulator = await start_emulator(EmulatorState(accounts={SID: TOKEN}, callback_delay=3600))
    settings = Settings.model_validate(
        {
            "amqp_url": infra.amqp_url,
            "database_url": infra.database_url,
            "prefetch": 64,
            "twilio_api_url": emulator.url,
            "send_interval": 0,
            "public_url": "http://127.0.0.1:9",
        }
    )
    config = LiveConfig(parse_config(CONFIG, "bench.yaml", {"BENCH_TOKEN": TOKEN}))
    store = Store(infra.database_url, max_size=10)
    bus = Bus.from_settings(settings)
    await bus.start()
    await bus.wait_ready()
    ids = await _seed(store, count)
    now = datetime.now(UTC)
    events = [
        new_event(
            EventType.MESSAGE_SEND_REQUESTED,
            account="bench",
            key=(i,),
            occurred_at=now,
            data=MessageSendRequested(message_id=i, kind="text", requested_at=now).model_dump(
                mode="json"
            ),
        )
        for i in ids
    ]
    await asyncio.gather(*(bus.publish(e) for e in events))
    pool = await store.pool()
    query = "SELECT count(*) FROM messages WHERE id = ANY($1::uuid[]) AND twilio_sid IS NOT NULL"
    with gate_bypassed(bypass):
        runner = StageRunner(outbound.STAGE, bus=bus, store=store, config=config, settings=settings)
        started = time.perf_counter()
        await runner.start()
        while True:
            if await pool.fetchval(query, ids) >= count:
                break
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
        await runner.stop()
    sent = len(emulator.state.messages)
    await bus.close()
    await store.close()
    await emulator.close()
    assert sent == count, f"the emulator got {sent} sends for {count} messages"
    return count / elapsed


async def run(infra: BenchInfra, count: int = 1000) -> list[dict[str, Any]]:
    await throughput(infra, 100, bypass=False)  # warm-up
    # Interleaved, best of two each: the machine's noise is larger than the gate's cost.
    without = gated = 0.0
    for _ in range(2):
        without = max(without, await throughput(infra, count, bypass=True))
        gated = max(gated, await throughput(infra, count, bypass=False))
    return [
        {
            "figure": "outbound sends/s to the emulator, with the gate",
            "value": round(gated, 1),
            "baseline": "same stage, gate bypassed",
            "baseline_value": round(without, 1),
            "ratio": round(gated / without, 3),
            "goal": "~1 (gate is cheap)",
        },
    ]
