"""Distribution: time from ``conversation.queued`` to ``conversation.assigned`` (p50/p99) at a
sustained arrival rate, and the throughput of one vs two ``distribute`` replicas (each its
own ``omniroute consume distribute`` process)."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson

from bench.deployment import deployment
from bench.infra import CONVERSATION_COLUMNS, BenchInfra
from omniroute.infra.bus import Bus
from omniroute.infra.settings import Settings
from omniroute.infra.store import Store
from schemas.events import EXCHANGE, ConversationQueued, EventType, new_event

CONFIG = """
accounts:
  - name: bench
    account_sid: AC00000000000000000000000000000009
    auth_token_env: BENCH_TOKEN
    numbers: [{name: Main, number: "+5511999990000", workstream: main}]
workstreams:
  - name: main
    fallback_queue: general
    distribution: {mode: push, auto_accept: true, units: 1}
queues: [{name: general}]
"""


async def _seed(store: Store, agents: int, conversations: int) -> list[str]:
    pool = await store.pool()
    now = datetime.now(UTC)
    contact = uuid.uuid4()
    await pool.execute("UPDATE agents SET presence = 'offline'")  # earlier runs' agents
    await pool.execute(
        "INSERT INTO contacts (id, account, address) VALUES ($1, 'bench', $2)",
        contact,
        f"+55{uuid.uuid4().int % 10**10:010d}",
    )
    await pool.executemany(
        "INSERT INTO agents (id, name, queues, capacity_units, presence, token_hash)"
        " VALUES ($1, $2, '{general}', $3, 'available', $4)",
        [(uuid.uuid4(), f"a{n}", conversations, uuid.uuid4().hex) for n in range(agents)],
    )
    ids = [uuid.uuid4() for _ in range(conversations)]
    await pool.copy_records_to_table(
        "conversations",
        records=[
            (
                cid,
                "bench",
                "+5511999990000",
                f"+{cid.int % 10**14:014d}",
                contact,
                "main",
                "open",
                now,
                now,
            )
            for cid in ids
        ],
        columns=CONVERSATION_COLUMNS,
    )
    return [str(i) for i in ids]


async def run_once(infra: BenchInfra, replicas: int, rate: float, seconds: float) -> dict[str, Any]:
    """Queue ``rate`` conversations per second for ``seconds``; measure queued → assigned."""
    settings = Settings.model_validate({"amqp_url": infra.amqp_url})
    count = int(rate * seconds)
    seed_store = Store(infra.database_url, max_size=2)
    ids = await _seed(seed_store, 50, count)
    pool = await seed_store.pool()
    # Replicas are processes of their own, as operators scale them.
    async with deployment(
        infra, ["distribute"] * replicas, router=False, prefetch="32", tick_interval="0.5"
    ):
        publisher = Bus.from_settings(settings)
        await publisher.start()
        await publisher.wait_ready()
        assigned: dict[str, float] = {}
        queued: dict[str, float] = {}
        done = asyncio.Event()
        connection = await aio_pika.connect(infra.amqp_url)
        channel = await connection.channel()
        tap = await channel.declare_queue(exclusive=True)
        await tap.bind(await channel.get_exchange(EXCHANGE), EventType.CONVERSATION_ASSIGNED)

        async def on_assigned(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            cid = orjson.loads(message.body)["conversation_id"]
            assigned.setdefault(cid, time.perf_counter())
            if len(assigned) >= count:
                done.set()

        await tap.consume(on_assigned)
        publishes: list[asyncio.Future[None]] = []
        started = time.perf_counter()
        for n, cid in enumerate(ids):
            due = started + n / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            now = datetime.now(UTC)
            await pool.execute(
                "UPDATE conversations SET state = 'queued', queue = 'general', queued_at = $2"
                " WHERE id = $1",
                uuid.UUID(cid),
                now,
            )
            queued[cid] = time.perf_counter()
            publishes.append(
                asyncio.ensure_future(
                    publisher.publish(
                        new_event(
                            EventType.CONVERSATION_QUEUED,
                            account="bench",
                            key=(cid,),
                            conversation_id=cid,
                            occurred_at=now,
                            data=ConversationQueued(
                                queue="general", workstream="main", language="en", queued_at=now
                            ).model_dump(mode="json"),
                        )
                    )
                )
            )
        await asyncio.gather(*publishes)
        try:
            async with asyncio.timeout(seconds + 60):
                await done.wait()
        except TimeoutError:
            pass
        elapsed = time.perf_counter() - started
        latencies = sorted((assigned[c] - queued[c]) * 1000 for c in assigned if c in queued)
    await publisher.close()
    await connection.close()
    await seed_store.close()
    return {
        "assigned": len(assigned),
        "expected": count,
        "throughput": len(assigned) / elapsed,
        "p50_ms": statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan"),
    }


async def run(
    infra: BenchInfra, rate: float = 300.0, seconds: float = 10.0
) -> list[dict[str, Any]]:
    one = await run_once(infra, 1, rate, seconds)
    two = await run_once(infra, 2, rate, seconds)
    flood_one = await run_once(infra, 1, 3000.0, 1.0)
    flood_two = await run_once(infra, 2, 3000.0, 1.0)
    return [
        {
            "figure": f"queued→assigned p50 ms at {rate:.0f}/s, 2 replicas",
            "value": round(two["p50_ms"], 1),
            "baseline": "1 replica",
            "baseline_value": round(one["p50_ms"], 1),
            "ratio": round(two["p50_ms"] / one["p50_ms"], 3),
            "goal": "information",
        },
        {
            "figure": f"queued→assigned p99 ms at {rate:.0f}/s, 2 replicas",
            "value": round(two["p99_ms"], 1),
            "baseline": "1 replica",
            "baseline_value": round(one["p99_ms"], 1),
            "ratio": round(two["p99_ms"] / one["p99_ms"], 3),
            "goal": "information",
        },
        {
            "figure": f"assigned at {rate:.0f}/s (of {one['expected']}), 2 replicas",
            "value": two["assigned"],
            "baseline": "1 replica",
            "baseline_value": one["assigned"],
            "ratio": round(two["assigned"] / max(one["assigned"], 1), 3),
            "goal": "all",
        },
        {
            "figure": "burst of 3000 queued: assignments/s, 2 replicas",
            "value": round(flood_two["throughput"], 1),
            "baseline": "1 replica",
            "baseline_value": round(flood_one["throughput"], 1),
            "ratio": round(flood_two["throughput"] / flood_one["throughput"], 3),
            "goal": "information",
        },
    ]
