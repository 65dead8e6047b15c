"""Fixtures for stage tests: a bus, stage runners started like separate replicas, a tap."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from consumers.conversations import STAGE
from consumers.runtime import Clock, Stage, StageRunner, system_clock
from omniroute.bus import Bus
from omniroute.config_loader import LiveConfig
from omniroute.settings import Settings
from omniroute.store import Store
from router.app import make_bus
from tests.support import EventTap, tap

RunnerFactory = Callable[..., Awaitable[StageRunner]]


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    bus = make_bus(settings)
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
        bus = make_bus(own_settings)
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
