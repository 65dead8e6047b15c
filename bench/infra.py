"""A private database and vhost for one benchmark run, dropped afterwards."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import quote

from omniroute.infra.database import create_database, drop_database
from omniroute.infra.store import migrate

BASE_AMQP = os.environ.get("OMNIROUTE_BENCH_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")
BASE_DB = os.environ.get("OMNIROUTE_BENCH_DATABASE_BASE", "postgresql://127.0.0.1:5432")


@dataclass(frozen=True)
class BenchInfra:
    amqp_url: str
    database_url: str


async def _ctl(*args: str) -> None:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        raise RuntimeError("rabbitmqctl is needed to create the benchmark's vhost")
    proc = await asyncio.create_subprocess_exec(
        ctl, *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    await proc.wait()


@asynccontextmanager
async def bench_infra() -> AsyncIterator[BenchInfra]:
    suffix = uuid.uuid4().hex[:8]
    database_url = f"{BASE_DB}/omniroute_bench_{suffix}"
    await create_database(database_url)
    await migrate(database_url)
    try:
        async with private_vhost(suffix) as amqp_url:
            yield BenchInfra(amqp_url, database_url)
    finally:
        await drop_database(database_url)


@asynccontextmanager
async def private_vhost(suffix: str) -> AsyncIterator[str]:
    """A RabbitMQ vhost of a benchmark's own (its AMQP URL), deleted afterwards."""
    vhost = f"omniroute-bench-{suffix}"
    await _ctl("add_vhost", vhost)
    await _ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield f"{BASE_AMQP}/{quote(vhost, safe='')}"
    finally:
        await _ctl("delete_vhost", vhost)


# The columns the benchmarks fill when they seed open conversations with COPY.
CONVERSATION_COLUMNS = [
    "id",
    "account",
    "business_number",
    "customer",
    "contact_id",
    "workstream",
    "state",
    "opened_at",
    "last_customer_message_at",
]
