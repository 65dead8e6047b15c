"""Fixtures of the chaos suite: a private RabbitMQ node and PostgreSQL cluster for the whole
run (tests kill and restart them; the shared servers other suites use are never touched),
and per test a fresh vhost, database, Twilio emulator and deployment of real processes.

``OMNIROUTE_CHAOS_SCALE`` (default 0.1) sizes every scenario; 1 is the full version.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Generator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from omniroute.infra.database import create_database, drop_database
from omniroute.infra.logging import configure_logging
from omniroute.infra.store import migrate
from omniroute.twilio_emulator import EmulatorState, RunningEmulator, create_emulator_app
from tests.chaos.harness import (
    CONFIG,
    FINAL,
    PIPELINE,
    SCALE,
    TOKEN_ENV,
    Db,
    Deployment,
    PrivatePostgres,
    PrivateRabbit,
    Webhook,
    free_port,
    settle_accepted,
    tail,
)
from tests.support import ACCOUNT_SID, AUTH_TOKEN, BUSINESS

# Every chaos test's time bound (pytest-timeout), generous above its own asyncio.timeout.
TEST_TIMEOUT = 240 + 900 * SCALE


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[FAILED] = report.failed
    return report


FAILED = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
async def private_rabbit() -> AsyncIterator[PrivateRabbit]:
    configure_logging("console", os.environ.get("OMNIROUTE_TEST_LOG_LEVEL", "warning"))
    base = Path(tempfile.mkdtemp(prefix="omniroute-chaos-rabbit-"))
    rabbit = PrivateRabbit(base)
    await rabbit.start()
    try:
        yield rabbit
    finally:
        await rabbit.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
async def private_postgres() -> AsyncIterator[PrivatePostgres]:
    postgres = PrivatePostgres()
    await postgres.init()
    await postgres.start()
    try:
        yield postgres
    finally:
        if await postgres.running():
            await postgres.stop("immediate")
        shutil.rmtree(postgres.base, ignore_errors=True)


@dataclass
class TwilioLatency:
    """How long the emulated Messages API takes to answer a send (Twilio: ~0.1-0.5 s)."""

    seconds: float = 0.1


async def _emulator(latency: TwilioLatency) -> RunningEmulator:
    """The emulator, its message creation slowed by ``latency`` so that sends are in flight
    when a process or the database goes away."""

    @web.middleware
    async def slow_sends(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST" and request.path.endswith("/Messages.json"):
            await asyncio.sleep(latency.seconds)
        return await handler(request)

    state = EmulatorState(accounts={ACCOUNT_SID: AUTH_TOKEN})
    app = create_emulator_app(state)
    app.middlewares.insert(0, slow_sends)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return RunningEmulator(state, runner, f"http://{host}:{port}")


@dataclass
class Chaos:
    """One test's world: its vhost and database on the private servers, the emulator, and
    the deployment (router and stages as separate processes)."""

    rabbit: PrivateRabbit
    postgres: PrivatePostgres
    amqp_url: str
    db: Db
    emulator: RunningEmulator
    deployment: Deployment
    public: str
    twilio_latency: TwilioLatency

    def add_router(self) -> None:
        port = int(self.public.rsplit(":", 1)[1])
        self.deployment.add("router", ["serve"], port=port)

    def add_stage(self, stage: str, name: str | None = None) -> None:
        self.deployment.add(name or stage, ["consume", stage])

    def customers_wrote(self, hooks: Iterable[Webhook]) -> None:
        """Webhooks posted straight to the router: tell the emulator the customers wrote, so
        its 24-hour window check lets the replies through (as when it posts them itself)."""
        for hook in hooks:
            self.emulator.state.record_customer_message(
                ACCOUNT_SID, f"whatsapp:{BUSINESS}", f"whatsapp:{hook.customer}"
            )

    async def settle(
        self,
        accepted: set[str],
        hooks: Sequence[Webhook],
        within: float,
        refused: set[str] | frozenset[str] = frozenset(),
        final: Sequence[str] = FINAL,
        allow_unknown: bool = False,
    ) -> dict[str, int]:
        """``settle_accepted`` on this test's database and emulator."""
        return await settle_accepted(
            self.db,
            self.emulator.state,
            accepted,
            hooks,
            within,
            refused=refused,
            final=final,
            allow_unknown=allow_unknown,
        )

    async def start_pipeline(self, customers: int, agents: int = 10) -> None:
        """Agents with room for every conversation, then the router and every stage."""
        await self.db.seed_agents(agents, capacity=customers // agents + 2)
        self.add_router()
        for stage in PIPELINE:
            self.add_stage(stage)
        await self.deployment.start()


@pytest.fixture
async def chaos(
    request: pytest.FixtureRequest,
    private_rabbit: PrivateRabbit,
    private_postgres: PrivatePostgres,
    tmp_path: Path,
) -> AsyncIterator[Chaos]:
    # A previous test may have failed with a server down: bring it back first.
    if not await private_postgres.running():
        await private_postgres.start()
    if not await private_rabbit.running():
        await private_rabbit.start_app()
    suffix = uuid.uuid4().hex[:10]
    vhost = f"chaos-{suffix}"
    dsn = private_postgres.dsn(f"omniroute_chaos_{suffix}")
    await private_rabbit.add_vhost(vhost)
    await create_database(dsn)
    await migrate(dsn)
    config = tmp_path / "omniroute.yaml"
    config.write_text(CONFIG)
    latency = TwilioLatency()
    emulator = await _emulator(latency)
    public = f"http://127.0.0.1:{free_port()}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OMNIROUTE_")},
        TOKEN_ENV: AUTH_TOKEN,
        "OMNIROUTE_AMQP_URL": private_rabbit.url(vhost),
        "OMNIROUTE_DATABASE_URL": dsn,
        "OMNIROUTE_CONFIG": str(config),
        "OMNIROUTE_PUBLIC_URL": public,
        "OMNIROUTE_HTTP_HOST": "127.0.0.1",
        "OMNIROUTE_TWILIO_API_URL": emulator.url,
        "OMNIROUTE_LOG_LEVEL": "warning",
        "OMNIROUTE_LOG_FORMAT": "console",
        "OMNIROUTE_SHUTDOWN_GRACE": "5",
        "OMNIROUTE_SEND_INTERVAL": "0",
        "OMNIROUTE_BROKER_RETRY_MAX": "2",
        "OMNIROUTE_RETRY_BACKOFF_MAX": "2",
        "OMNIROUTE_OUTBOX_RELAY_INTERVAL": "0.5",
        "OMNIROUTE_DB_POOL_MAX": "5",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=200, force_close=False)
    ) as http:
        deployment = Deployment(env, logs, http)
        world = Chaos(
            private_rabbit,
            private_postgres,
            private_rabbit.url(vhost),
            Db(dsn),
            emulator,
            deployment,
            public,
            latency,
        )
        try:
            yield world
        finally:
            await deployment.close()
            await emulator.close()
            if request.node.stash.get(FAILED, False):
                print(deployment.tails())
                print(f"----- private PostgreSQL log\n{tail(private_postgres.log(), 1500)}")
            if not await private_postgres.running():
                await private_postgres.start()
            if not await private_rabbit.running():
                await private_rabbit.start_app()
            await private_rabbit.delete_vhost(vhost)
            await drop_database(dsn)
