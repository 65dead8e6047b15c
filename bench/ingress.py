"""Ingress: signed inbound webhooks per second and latency at 64 connections.

Four servers, each in its own process, take the same pre-signed requests from a load
generator in another process: omniroute's router (``omniroute serve``), (a) a bare aiohttp
handler that only reads the form, (b) a minimal aiohttp + aio-pika handler that validates
the signature and publishes with confirms, (c) the same on FastAPI + FastStream. (b) and (c)
publish to omniroute's exchange, so the broker does the same work for every candidate.
Rounds rotate the order; each figure is the median over rounds.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from pathlib import Path
from typing import Any

import aio_pika
import orjson

from bench.deployment import CONFIG, INBOUND, SID, TOKEN
from bench.infra import BenchInfra
from bench.processes import free_port, python_process, rss_mib, run_python, wait_port
from omniroute.infra.bus import Bus
from omniroute.infra.settings import Settings
from omniroute.infra.topology import STAGES

PATH = INBOUND
CANDIDATES = ("omniroute", "bare", "minimal", "fast")
LABELS = {
    "omniroute": "omniroute router",
    "bare": "(a) bare aiohttp, reads the form",
    "minimal": "(b) aiohttp + aio-pika, signature + confirmed publish",
    "fast": "(c) FastAPI + FastStream, signature + confirmed publish",
}


async def _declare_topology(infra: BenchInfra) -> None:
    bus = Bus.from_settings(Settings.model_validate({"amqp_url": infra.amqp_url}))
    await bus.start()
    await asyncio.wait_for(bus.wait_ready(), 10)
    await bus.close()


async def _purge(infra: BenchInfra) -> None:
    connection = await aio_pika.connect(infra.amqp_url)
    async with connection:
        channel = await connection.channel()
        for stage in STAGES.values():
            queue = await channel.declare_queue(stage.queue, passive=True)
            await queue.purge()


def _command(candidate: str, port: int, infra: BenchInfra, public: str) -> list[str]:
    if candidate == "omniroute":
        return ["-m", "omniroute", "serve"]
    return [
        "-m",
        f"bench.servers.{candidate}",
        f"--port={port}",
        f"--amqp-url={infra.amqp_url}",
        f"--token={TOKEN}",
        f"--public-url={public}",
    ]


async def one_run(
    infra: BenchInfra, candidate: str, config_path: Path, count: int, concurrency: int
) -> dict[str, Any]:
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    env = {
        "BENCH_TOKEN": TOKEN,
        "OMNIROUTE_AMQP_URL": infra.amqp_url,
        "OMNIROUTE_DATABASE_URL": infra.database_url,
        "OMNIROUTE_CONFIG": str(config_path),
        "OMNIROUTE_PUBLIC_URL": public,
        "OMNIROUTE_HTTP_HOST": "127.0.0.1",
        "OMNIROUTE_HTTP_PORT": str(port),
    }
    async with python_process(_command(candidate, port, infra, public), env) as server:
        await wait_port(port)
        await asyncio.sleep(0.5)  # the broker connection is made in the background
        rss_before = rss_mib(server.pid)
        out = await run_python(
            [
                "-m",
                "bench.loadgen",
                public + PATH,
                TOKEN,
                f"--account-sid={SID}",
                f"--count={count}",
                f"--concurrency={concurrency}",
            ]
        )
        result: dict[str, Any] = orjson.loads(out)
        result["rss_before_mib"] = rss_before
        result["rss_after_mib"] = rss_mib(server.pid)
    await _purge(infra)
    ok = result["statuses"].get("200", 0)
    if ok != result["requests"]:
        raise RuntimeError(f"{candidate}: not every webhook was accepted: {result['statuses']}")
    return result


async def measure(
    infra: BenchInfra,
    count: int,
    rounds: int,
    concurrency: int = 64,
    candidates: tuple[str, ...] = CANDIDATES,
) -> dict[str, dict[str, float]]:
    await _declare_topology(infra)
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in candidates}
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "omniroute.yaml"
        config_path.write_text(CONFIG)
        for candidate in candidates:  # warm-up: imports, page cache, broker queues
            await one_run(infra, candidate, config_path, 500, concurrency)
        for n in range(rounds):
            shift = n % len(candidates)
            order = candidates[shift:] + candidates[:shift]
            for candidate in order:
                runs[candidate].append(
                    await one_run(infra, candidate, config_path, count, concurrency)
                )
    return {
        c: {
            key: statistics.median(r[key] for r in results)
            for key in ("rps", "p50_ms", "p99_ms", "rss_before_mib", "rss_after_mib")
        }
        for c, results in runs.items()
    }


def figure(name: str, value: float, baseline: str, base: float, goal: str) -> dict[str, Any]:
    return {
        "figure": name,
        "value": round(value, 2),
        "baseline": baseline,
        "baseline_value": round(base, 2),
        "ratio": round(value / base, 3) if base else None,
        "goal": goal,
    }


async def run(infra: BenchInfra, count: int = 5000, rounds: int = 3) -> list[dict[str, Any]]:
    m = await measure(infra, count, rounds)
    ours = m["omniroute"]
    return [
        figure(
            "ingress webhooks/s, 64 conns",
            ours["rps"],
            LABELS["minimal"],
            m["minimal"]["rps"],
            ">= 0.9",
        ),
        figure(
            "ingress p99 ms, 64 conns",
            ours["p99_ms"],
            LABELS["minimal"],
            m["minimal"]["p99_ms"],
            "<= 1.5",
        ),
        figure(
            "ingress webhooks/s, 64 conns", ours["rps"], LABELS["fast"], m["fast"]["rps"], ">= 1.5"
        ),
        figure(
            "ingress p99 ms, 64 conns",
            ours["p99_ms"],
            LABELS["fast"],
            m["fast"]["p99_ms"],
            "information",
        ),
        figure(
            "ingress webhooks/s, 64 conns",
            ours["rps"],
            LABELS["bare"],
            m["bare"]["rps"],
            "information",
        ),
        figure(
            "ingress p50 ms, 64 conns",
            ours["p50_ms"],
            LABELS["minimal"],
            m["minimal"]["p50_ms"],
            "information",
        ),
        figure(
            "router RSS MiB after the run",
            ours["rss_after_mib"],
            "router RSS at rest",
            ours["rss_before_mib"],
            "information",
        ),
    ]
