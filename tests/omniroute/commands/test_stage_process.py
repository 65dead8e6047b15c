"""SIGTERM while messages are in flight: the stage drains and exits, nothing is lost or
stored twice, and the rest is handled by the next process."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aio_pika
import asyncpg

from omniroute.infra.bus import Bus
from omniroute.infra.settings import Settings
from tests.conftest import Infra
from tests.support import CONFIG_YAML, ENVIRON, new_customer, received_event, wait_for

TOTAL = 1500


def _env(infra: Infra, config: Path) -> dict[str, str]:
    return {
        **os.environ,
        **ENVIRON,
        "OMNIROUTE_AMQP_URL": infra.amqp_url,
        "OMNIROUTE_DATABASE_URL": infra.database_url,
        "OMNIROUTE_CONFIG": str(config),
        "OMNIROUTE_TWILIO_API_URL": "http://127.0.0.1:9",  # loopback only
        "OMNIROUTE_RECONCILE_INTERVAL": "0",
        "OMNIROUTE_LOG_LEVEL": "warning",
        "OMNIROUTE_PREFETCH": "64",
        "OMNIROUTE_SHUTDOWN_GRACE": "10",
        "OMNIROUTE_HTTP_PORT": "0",  # health and metrics on a port of its own
    }


async def _stored(db: asyncpg.Pool, customers: list[str]) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " WHERE c.customer = ANY($1::text[])",
            customers,
        )
    )


async def _ready_in_queue(amqp_url: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("omniroute.conversations", passive=True)
        return int(queue.declaration_result.message_count or 0)


async def _consume(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    # Logs go to a file: a pipe nobody reads would fill up and block the child.
    with log.open("ab") as stderr:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "omniroute",
            "consume",
            "conversations",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )


async def test_sigterm_drains_in_flight_work_and_loses_nothing(
    infra: Infra, settings: Settings, db: asyncpg.Pool, tmp_path: Path
) -> None:
    config = tmp_path / "omniroute.yaml"
    config.write_text(CONFIG_YAML)
    env = _env(infra, config)
    customers = [new_customer() for _ in range(50)]
    bus: Bus = Bus.from_settings(settings)
    await bus.start()
    async with asyncio.timeout(10):
        await bus.wait_ready()
    events = [received_event(customer=customers[n % len(customers)]) for n in range(TOTAL)]
    for start in range(0, TOTAL, 250):
        await asyncio.gather(*(bus.publish(e) for e in events[start : start + 250]))
    await bus.close()

    log = tmp_path / "consume.log"
    first = await _consume(env, log)
    await wait_for(lambda: _at_least(db, customers, 100), timeout=30)
    first.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):
        await first.wait()
    assert first.returncode == 0, log.read_text()[-2000:]

    stored = await _stored(db, customers)
    waiting = await _ready_in_queue(infra.amqp_url)
    assert stored < TOTAL, "stopped too late to test anything: everything was done"
    # A clean drain: every message is either stored (and acked) or back in the queue. Only
    # work cancelled at the end of the grace period (said in the log) may be both.
    assert stored + waiting >= TOTAL, "lost"
    drained = "stage.drain_timed_out" not in log.read_text()
    assert stored + waiting == TOTAL or not drained, (stored, waiting)

    second = await _consume(env, log)
    try:
        await wait_for(lambda: _at_least(db, customers, TOTAL), timeout=60)
    finally:
        second.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await second.wait()
    assert await _stored(db, customers) == TOTAL
    sids = await db.fetchval(
        "SELECT count(DISTINCT twilio_sid) FROM messages m"
        " JOIN conversations c ON c.id = m.conversation_id WHERE c.customer = ANY($1::text[])",
        customers,
    )
    assert sids == TOTAL
    conversations = await db.fetchval(
        "SELECT count(*) FROM conversations WHERE customer = ANY($1::text[])", customers
    )
    assert conversations == len(customers)
    assert second.returncode == 0


async def _at_least(db: asyncpg.Pool, customers: list[str], count: int) -> bool:
    return await _stored(db, customers) >= count
