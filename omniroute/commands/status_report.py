"""``omniroute status``: each stage's backlog, consumers, rates and dead letters at a glance,
and each running process with the configuration hash it runs.

Depth and consumers come over AMQP (passive declares), sampled twice ``interval`` apart to
tell a backlog that drains from one that grows. When RabbitMQ's management API answers
(``OMNIROUTE_RABBITMQ_API_URL``, by default the broker's host on port 15672 with the AMQP
credentials), its per-queue publish and deliver rates and the in-flight (unacknowledged)
count are shown too. The processes come from the registry (``omniroute.infra.processes``):
when they run different configurations, a reload is half-applied and status says so.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aio_pika
import aiohttp
import asyncpg
from aio_pika.exceptions import ChannelClosed

from omniroute.infra.processes import LIVE_WITHIN, ProcessRow, live_processes
from omniroute.infra.settings import Settings
from omniroute.infra.topology import STAGES


@dataclass(frozen=True)
class StageStatus:
    stage: str
    queue: str
    ready: int | None
    consumers: int | None
    dead_letters: int | None
    drain_per_s: float | None = None  # positive: the backlog shrinks; negative: it grows
    in_per_s: float | None = None  # management API only
    out_per_s: float | None = None  # delivered per second (management API only)
    in_flight: int | None = None  # delivered, not yet acknowledged (management API only)

    def hints(self) -> list[str]:
        out = []
        if self.consumers == 0 and (self.ready or 0) > 0:
            out.append(f"no consumer: start `omniroute consume {self.stage}`")
        elif (self.drain_per_s or 0) < 0 and (self.ready or 0) > 0:
            out.append(f"growing: add replicas (`docker compose up -d --scale {self.stage}=N`)")
        if self.dead_letters:
            out.append(f"inspect: `omniroute dead-letters list {self.stage}`")
        return out


async def _depth(connection: aio_pika.abc.AbstractConnection, name: str) -> tuple[int, int] | None:
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        result = queue.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)
    except ChannelClosed:
        return None  # not declared yet: no process of that stage ever started
    finally:
        if not channel.is_closed:
            await channel.close()


Depths = dict[str, tuple[int, int] | None]


async def _depths(connection: aio_pika.abc.AbstractConnection) -> Depths:
    depths: Depths = {}
    for stage in STAGES.values():
        depths[stage.queue] = await _depth(connection, stage.queue)
        depths[stage.dead_queue] = await _depth(connection, stage.dead_queue)
    return depths


def management_url(settings: Settings) -> tuple[str, str, str, str]:
    """(API base URL, vhost, user, password) for the broker's management API."""
    amqp = urlsplit(settings.amqp_url.get_secret_value())
    vhost = unquote(amqp.path[1:]) if len(amqp.path) > 1 else "/"
    user, password = unquote(amqp.username or "guest"), unquote(amqp.password or "guest")
    if settings.rabbitmq_api_url is not None:
        base = str(settings.rabbitmq_api_url).rstrip("/")
    else:
        base = f"http://{amqp.hostname or '127.0.0.1'}:15672"
    return base, vhost, user, password


async def management_rates(settings: Settings) -> dict[str, dict[str, Any]] | None:
    """Per-queue figures from the management API, or None when it does not answer."""
    base, vhost, user, password = management_url(settings)
    url = f"{base}/api/queues/{quote(vhost, safe='')}"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
            http.get(url, headers={"Authorization": _basic(user, password)}) as response,
        ):
            if response.status != 200:
                return None
            queues = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    return {q["name"]: q for q in queues if isinstance(q, dict) and "name" in q}


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _rate(queue: dict[str, Any] | None, key: str) -> float | None:
    if queue is None:
        return None
    details = (queue.get("message_stats") or {}).get(f"{key}_details") or {}
    return float(details.get("rate", 0.0))


async def collect(settings: Settings, interval: float = 1.0) -> list[StageStatus]:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=5)
    async with connection:
        first = await _depths(connection)
        if interval > 0:
            await asyncio.sleep(interval)
        second = await _depths(connection) if interval > 0 else first
    api = await management_rates(settings)
    rows = []
    for stage in STAGES.values():
        main, dead, before = second[stage.queue], second[stage.dead_queue], first[stage.queue]
        drain = None
        if interval > 0 and main is not None and before is not None:
            drain = round((before[0] - main[0]) / interval, 1)
        queue = (api or {}).get(stage.queue)
        rows.append(
            StageStatus(
                stage.stage,
                stage.queue,
                main[0] if main else None,
                main[1] if main else None,
                dead[0] if dead else None,
                drain_per_s=drain,
                in_per_s=_rate(queue, "publish"),
                out_per_s=_rate(queue, "deliver_get"),
                in_flight=int(queue["messages_unacknowledged"])
                if queue and "messages_unacknowledged" in queue
                else None,
            )
        )
    return rows


def render(rows: list[StageStatus]) -> str:
    def show(value: float | int | None) -> str:
        return "-" if value is None else f"{value:g}"

    lines = [
        f"{'stage':<14} {'waiting':>8} {'in flight':>9} {'consumers':>9} {'in/s':>8} "
        f"{'out/s':>8} {'drain/s':>8} {'dead':>6}"
    ]
    for r in rows:
        hints = "  ← " + "; ".join(r.hints()) if r.hints() else ""
        lines.append(
            f"{r.stage:<14} {show(r.ready):>8} {show(r.in_flight):>9} {show(r.consumers):>9} "
            f"{show(r.in_per_s):>8} {show(r.out_per_s):>8} {show(r.drain_per_s):>8} "
            f"{show(r.dead_letters):>6}{hints}"
        )
    if all(r.in_per_s is None for r in rows):
        lines.append(
            "(in/s, out/s and in flight need RabbitMQ's management API; drain/s is sampled)"
        )
    return "\n".join(lines)


async def database_notes(settings: Settings) -> list[str]:
    """What the database says about the pipeline: the outbox relay's backlog, the ingress
    spool, and a warning when autovacuum is off (dead rows then pile up on the hot tables)."""
    try:
        conn = await asyncpg.connect(
            settings.database_url.get_secret_value(), timeout=settings.db_connect_timeout
        )
    except Exception as exc:
        return [f"database: unreachable ({type(exc).__name__})"]
    try:
        notes = []
        waiting = await conn.fetchrow(
            "SELECT count(*) AS n, extract(epoch FROM now() - min(o.created_at)) AS age"
            " FROM outbox o, outbox_watermark w WHERE (o.txid, o.seq) > (w.txid, w.seq)"
        )
        assert waiting is not None  # an aggregate always returns a row
        age = f", oldest {float(waiting['age']):.1f} s" if waiting["n"] else ""
        notes.append(f"outbox: {waiting['n']} event(s) waiting for the relay{age}")
        spooled = await conn.fetchval("SELECT count(*) FROM ingress_spool")
        notes.append(f"ingress spool: {spooled} webhook(s) waiting for the broker")
        if await conn.fetchval("SHOW autovacuum") != "on":
            notes.append(
                "warning: PostgreSQL runs with autovacuum = off: dead rows of conversations,"
                " offers, timers and the outbox pile up and the hot queries slow down; turn it"
                " on, or run VACUUM ANALYZE regularly"
            )
        return notes
    except asyncpg.PostgresError as exc:
        return [f"database: {type(exc).__name__}: {exc}"[:300]]
    finally:
        await conn.close()


def render_processes(processes: list[ProcessRow]) -> list[str]:
    """One line per live process and its configuration hash; a warning when they differ."""
    if not processes:
        return [f"processes: none with a heartbeat in the last {LIVE_WITHIN:g} s"]
    hashes = Counter(p.config_hash for p in processes)
    majority = hashes.most_common(1)[0][0]
    lines = [f"{'process':<40} {'config':<12} {'heartbeat':>9}  stages"]
    for p in processes:
        odd = "  ← differs" if len(hashes) > 1 and p.config_hash != majority else ""
        lines.append(
            f"{p.label:<40} {p.config_hash:<12} {p.heartbeat_age:>7.0f} s"
            f"  {', '.join(p.stages) or '-'}{odd}"
        )
    if len(hashes) > 1:
        spread = ", ".join(f"{h} on {n}" for h, n in hashes.most_common())
        lines.append(
            f"warning: half-applied configuration change: the processes run {len(hashes)}"
            f" configurations ({spread}); `omniroute config reload` says which refused and why"
        )
    return lines


async def process_notes(settings: Settings) -> list[str]:
    """The live processes from the registry, rendered (or why they cannot be read)."""
    try:
        conn = await asyncpg.connect(
            settings.database_url.get_secret_value(), timeout=settings.db_connect_timeout
        )
    except Exception as exc:
        return [f"processes: database unreachable ({type(exc).__name__})"]
    try:
        return render_processes(await live_processes(conn))
    except asyncpg.PostgresError as exc:
        return [f"processes: {type(exc).__name__}: {exc}"[:300]]
    finally:
        await conn.close()


async def run_status(settings: Settings, as_json: bool, interval: float = 1.0) -> int:
    rows = await collect(settings, interval)
    notes = await database_notes(settings)
    notes += ["", *await process_notes(settings)]
    if as_json:
        print(json.dumps([{**asdict(r), "hints": r.hints()} for r in rows], indent=2))
        for note in notes:  # the JSON keeps its shape; the notes go to stderr
            print(note, file=sys.stderr)
    else:
        print(render(rows))
        print("\n".join(notes))
    return 0
