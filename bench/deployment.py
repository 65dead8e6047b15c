"""A deployment as operators run it, on loopback: the router and each stage in a process of
its own (``omniroute serve`` / ``omniroute consume STAGE``), configured by environment."""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.infra import BenchInfra
from bench.processes import cpu_seconds, free_port, python_process, rss_mib, tail, wait_port
from omniroute.infra.store import Store

SID = "AC0000000000000000000000000000000e"
TOKEN = "bench-pipeline-token"
CONFIG = f"""
accounts:
  - name: bench
    account_sid: {SID}
    auth_token_env: BENCH_TOKEN
    numbers: [{{name: Main, number: "+5511999990000", workstream: main}}]
workstreams:
  - name: main
    fallback_queue: general
    distribution: {{mode: push, auto_accept: true, units: 1}}
queues: [{{name: general}}]
"""
# The same, with a greeting: each new conversation also makes lifecycle queue a send for
# outbound, whose status callbacks feed the status stage.
CONFIG_WITH_GREETING = CONFIG.replace(
    "    fallback_queue: general\n",
    "    fallback_queue: general\n"
    "    automated_messages: {greeting: {text: {pt-BR: 'Olá! Já vamos atender.'}}}\n",
)
INBOUND = "/twilio/bench/inbound"


@dataclass
class Deployment:
    router_url: str
    router_pid: int
    stage_urls: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    def rss(self) -> dict[str, float]:
        return {name: rss_mib(pid) for name, pid in self.pids.items()}

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    async def processed(self, http: aiohttp.ClientSession, stage: str) -> int:
        """Messages the stage has finished with (any outcome), from its /metrics."""
        async with http.get(self.stage_urls[stage] + "/metrics") as response:
            text = await response.text()
        pattern = rf'^omniroute_stage_messages_total{{[^}}]*stage="{stage}"[^}}]*}} (\S+)$'
        return int(sum(float(v) for v in re.findall(pattern, text, re.MULTILINE)))


async def seed_agents(database_url: str, agents: int, capacity: int) -> None:
    store = Store(database_url, max_size=2)
    try:
        pool = await store.pool()
        await pool.executemany(
            "INSERT INTO agents (id, name, queues, capacity_units, presence, token_hash)"
            " VALUES ($1, $2, '{general}', $3, 'available', $4)",
            [(uuid.uuid4(), f"agent{n}", capacity, uuid.uuid4().hex) for n in range(agents)],
        )
    finally:
        await store.close()


async def _ready(http: aiohttp.ClientSession, url: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            async with http.get(url + "/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {within} s")
        await asyncio.sleep(0.1)


@asynccontextmanager
async def deployment(
    infra: BenchInfra,
    stages: Sequence[str],
    router: bool = True,
    config_text: str = CONFIG,
    public_url: str | None = None,
    **settings: str,
) -> AsyncIterator[Deployment]:
    """Start the router (if asked) and one process per stage named (a stage named twice gets
    two replicas, ``distribute#0`` and ``distribute#1``); SIGTERM them on the way out.
    ``public_url`` points the stages at a router started elsewhere (status callbacks)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "omniroute.yaml"
        config.write_text(config_text)
        base = {
            "BENCH_TOKEN": TOKEN,
            "OMNIROUTE_AMQP_URL": infra.amqp_url,
            "OMNIROUTE_DATABASE_URL": infra.database_url,
            "OMNIROUTE_CONFIG": str(config),
            "OMNIROUTE_HTTP_HOST": "127.0.0.1",
            # Loopback only: no reconciliation pass unless a benchmark asks for one, and
            # never Twilio's real API.
            "OMNIROUTE_RECONCILE_INTERVAL": "0",
            "OMNIROUTE_TWILIO_API_URL": "http://127.0.0.1:9",
            **{f"OMNIROUTE_{k.upper()}": v for k, v in settings.items()},
        }
        async with AsyncExitStack() as stack, aiohttp.ClientSession() as http:
            port = free_port()
            public = public_url or f"http://127.0.0.1:{port}"
            env = {**base, "OMNIROUTE_PUBLIC_URL": public, "OMNIROUTE_HTTP_PORT": str(port)}
            deployed = Deployment(router_url=public, router_pid=0)
            if router:
                log = Path(tmp) / "router.log"
                proc = await stack.enter_async_context(
                    python_process(["-m", "omniroute", "serve"], env, log=log)
                )
                deployed.router_pid = proc.pid
                deployed.pids["router"] = proc.pid
                try:
                    await wait_port(port)
                    await _ready(http, public)
                except TimeoutError as exc:
                    raise RuntimeError(f"the router did not start:\n{tail(log)}") from exc
            for n, stage in enumerate(stages):
                name = stage if stages.count(stage) == 1 else f"{stage}#{n}"
                stage_port = free_port()
                stage_env = {
                    **base,
                    "OMNIROUTE_PUBLIC_URL": public,
                    "OMNIROUTE_HTTP_PORT": str(stage_port),
                }
                proc = await stack.enter_async_context(
                    python_process(
                        ["-m", "omniroute", "consume", stage],
                        stage_env,
                        log=Path(tmp) / f"{name}.log",
                    )
                )
                deployed.pids[name] = proc.pid
                deployed.stage_urls[name] = f"http://127.0.0.1:{stage_port}"
            for name, url in deployed.stage_urls.items():
                try:
                    await _ready(http, url)
                except TimeoutError as exc:
                    log_tail = tail(Path(tmp) / f"{name}.log")
                    raise RuntimeError(f"{name} did not start:\n{log_tail}") from exc
            yield deployed
