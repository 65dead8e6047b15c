"""Shared fixtures: a private PostgreSQL database and RabbitMQ vhost per test run, the
settings and configuration pointing at them, and a running router.

Every run creates ``omniroute_test_<random>`` and vhost ``omniroute-test-<random>`` and drops
them afterwards, so runs (and CI next to a developer) never collide.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from consumers.conversations import STAGE
from consumers.runtime import Clock, Stage, StageRunner, system_clock
from omniroute.infra.bus import Bus
from omniroute.infra.config_loader import LiveConfig, parse_config
from omniroute.infra.database import create_database, drop_database
from omniroute.infra.logging import configure_logging
from omniroute.infra.settings import Settings
from omniroute.infra.store import Store, init_connection, migrate
from router.app import create_app
from router.state import BUS
from tests.relay_diagnosis import describe_relay
from tests.support import CONFIG_YAML, ENVIRON, PUBLIC_URL, EventTap, tap

BASE_AMQP = os.environ.get("OMNIROUTE_TEST_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")
BASE_DB = os.environ.get("OMNIROUTE_TEST_DATABASE_BASE", "postgresql://127.0.0.1:5432")


# pytest-timeout interrupts a hung test from a signal handler: the test's coroutine is left
# pending in the session's event loop with its ``finally`` blocks never run, so a relay it
# started keeps the outbox leadership and every later test waits for events in vain (seen in
# CI: one hung test, fourteen failures after it). Each async test is therefore cancelled
# first, CANCEL_MARGIN seconds before pytest-timeout would fire, so its cleanup runs.
CANCEL_MARGIN = 15.0


def _bounded(
    test: Callable[..., Awaitable[None]], seconds: float, name: str
) -> Callable[..., Awaitable[None]]:
    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> None:
        bound = asyncio.timeout(seconds)
        try:
            async with bound:
                await test(*args, **kwargs)
        except TimeoutError as exc:
            if not bound.expired():
                raise  # the test's own wait timed out (an event that never came): its error
            raise TimeoutError(f"{name} did not finish within {seconds:.0f} s") from exc

    return run


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    default = float(config.getini("timeout") or 0)
    for item in items:
        if not isinstance(item, pytest.Function) or not inspect.iscoroutinefunction(item.obj):
            continue
        marker = item.get_closest_marker("timeout")
        limit = float(marker.args[0]) if marker and marker.args else default
        if limit > CANCEL_MARGIN * 2:
            item.obj = _bounded(item.obj, limit - CANCEL_MARGIN, item.nodeid)


# The run's database, once the session created it: a failing test's report says what the
# outbox relay is doing there (tests/relay_diagnosis.py).
_RUN_DATABASE: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and _RUN_DATABASE:
        report.sections.append(("outbox relay", describe_relay(_RUN_DATABASE[0])))


@dataclass(frozen=True)
class Infra:
    amqp_url: str
    database_url: str
    vhost: str


async def _rabbitmqctl(*args: str) -> None:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        pytest.exit("rabbitmqctl is needed to create a private vhost for the test run", 3)
    proc = await asyncio.create_subprocess_exec(
        ctl, *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {err.decode()[:300]}")


@pytest.fixture(scope="session")
async def infra() -> AsyncIterator[Infra]:
    configure_logging("console", os.environ.get("OMNIROUTE_TEST_LOG_LEVEL", "warning"))
    suffix = uuid.uuid4().hex[:10]
    vhost = f"omniroute-test-{suffix}"
    database_url = f"{BASE_DB}/omniroute_test_{suffix}"
    await create_database(database_url)
    await migrate(database_url)
    # As the README advises for production: a transaction a test leaves open (a connection
    # abandoned mid-transaction) would hold the outbox relay back for the rest of the run.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            f'ALTER DATABASE "omniroute_test_{suffix}"'
            " SET idle_in_transaction_session_timeout = 60000"
        )
    finally:
        await conn.close()
    await _rabbitmqctl("add_vhost", vhost)
    await _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    _RUN_DATABASE.append(database_url)
    try:
        yield Infra(f"{BASE_AMQP}/{quote(vhost, safe='')}", database_url, vhost)
    finally:
        _RUN_DATABASE.clear()
        await _rabbitmqctl("delete_vhost", vhost)
        await drop_database(database_url)


def make_settings(infra: Infra, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "amqp_url": infra.amqp_url,
        "database_url": infra.database_url,
        "public_url": PUBLIC_URL,
        # Loopback only (a refused port): a test that starts reconciliation or a send without
        # an emulator must not reach for api.twilio.com (seen: reconcile.number_failed, DNS).
        "twilio_api_url": "http://127.0.0.1:9",
        "delivery_limit": 3,
        "retry_backoff_base": 0.01,
        "retry_backoff_max": 0.2,
        "shutdown_grace": 5.0,
        "outbox_relay_interval": 0.2,
        "db_pool_max": 5,
    }
    values.update(overrides)
    return Settings.model_validate(values)


@pytest.fixture
def settings(infra: Infra) -> Settings:
    return make_settings(infra)


@pytest.fixture
def config() -> LiveConfig:
    return LiveConfig(parse_config(CONFIG_YAML, "test-config.yaml", ENVIRON))


@pytest.fixture
async def router(settings: Settings, config: LiveConfig) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(settings, config)
    async with TestClient(TestServer(app)) as client:
        async with asyncio.timeout(10):
            await app[BUS].wait_ready()
        yield client


@pytest.fixture(scope="session")
async def db(infra: Infra) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(
        infra.database_url, min_size=1, max_size=4, init=init_connection
    )
    yield pool
    await pool.close()


@pytest.fixture
async def store(infra: Infra) -> AsyncIterator[Store]:
    store = Store(infra.database_url, max_size=5)
    yield store
    await store.close()


RunnerFactory = Callable[..., Awaitable[StageRunner]]


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    bus = Bus.from_settings(settings)
    await bus.start()
    async with asyncio.timeout(10):
        await bus.wait_ready()
    yield bus
    await bus.close()


@pytest.fixture
async def start_runner(
    settings: Settings, config: LiveConfig, infra: Any
) -> AsyncIterator[RunnerFactory]:
    """Start stage runners, each on its own bus and store like a separate replica."""
    started: list[tuple[StageRunner, Bus, Store]] = []

    async def start(
        stage: Stage = STAGE, *, clock: Clock = system_clock, **overrides: Any
    ) -> StageRunner:
        own_settings = Settings.model_validate({**settings.model_dump(), **overrides})
        bus = Bus.from_settings(own_settings)
        await bus.start()
        async with asyncio.timeout(10):
            await bus.wait_ready()
        store = Store(infra.database_url, max_size=4)
        runner = StageRunner(
            stage, bus=bus, store=store, config=config, settings=own_settings, clock=clock
        )
        await runner.start()
        started.append((runner, bus, store))
        return runner

    yield start
    for runner, bus, store in started:
        await runner.stop()
        await bus.close()
        await store.close()


@pytest.fixture
async def spy(settings: Settings) -> AsyncIterator[EventTap]:
    async with tap(settings.amqp_url.get_secret_value(), "conversation.*") as events:
        yield events
