"""PostgreSQL restarted under load: the stages pause (no crash, nothing dead-lettered),
recover by themselves and finish; nothing is lost, nothing is sent twice."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.chaos.conftest import TEST_TIMEOUT, Chaos
from tests.chaos.harness import (
    SCALE,
    Sender,
    dead_letters,
    progress,
    scaled,
    verify_pipeline,
    wait_settled,
    wait_until,
    webhooks,
)

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(TEST_TIMEOUT)]

WEBHOOKS = scaled(10_000, 600)
CUSTOMERS = WEBHOOKS // 5
RATE = max(60.0, 150 * SCALE)
DOWN_FOR = 3.0  # seconds PostgreSQL stays down
_IN_FLIGHT = "SELECT count(*) FROM messages WHERE direction = 'outbound' AND status = 'sending'"


async def test_postgres_restart_under_load(chaos: Chaos) -> None:
    async with asyncio.timeout(TEST_TIMEOUT - 30):
        await chaos.start_pipeline(CUSTOMERS)
        hooks = webhooks(WEBHOOKS, CUSTOMERS, chaos.public)
        chaos.customers_wrote(hooks)
        chaos.twilio_latency.seconds = 0.5  # sends in flight when the database dies
        sender = Sender(chaos.deployment.http, chaos.public)
        started = time.monotonic()
        sending = asyncio.create_task(sender.send(hooks, RATE))
        await wait_until(
            lambda: _stored_at_least(chaos, WEBHOOKS // 4), 120, 0.2, "a quarter stored"
        )
        await wait_until(
            lambda: chaos.db.maybe(_IN_FLIGHT), 60, 0.05, "a Twilio send in flight"
        )  # so the database dies between a send and the recording of its sid
        before = await progress(chaos.db)
        down_at = time.monotonic()
        await chaos.postgres.stop("immediate")  # a crash, not a polite shutdown
        await asyncio.sleep(DOWN_FOR)
        await chaos.postgres.start()
        up_at = time.monotonic()

        async def moved() -> bool:
            now = await progress(chaos.db)
            return now is not None and before is not None and now["inbound"] > before["inbound"]

        await wait_until(moved, 60, 0.1, "progress after the restart")
        recovery = time.monotonic() - up_at
        await sending
        # The broker stayed up: every webhook was confirmed and answered 200 (a 5xx would be
        # final: Twilio does not retry it).
        assert sender.finals() == {200: WEBHOOKS}, f"answers: {dict(sender.answers)}"
        await wait_settled(chaos.db, WEBHOOKS, CUSTOMERS, 90 + 400 * SCALE)
        crashed = [n for n, p in chaos.deployment.procs.items() if not p.alive]
        assert not crashed, f"processes died instead of pausing: {crashed}"
        await asyncio.sleep(1.0)
        figures = await verify_pipeline(
            chaos.db, chaos.emulator.state.messages.values(), hooks, allow_unknown=False
        )
        dead = await dead_letters(chaos.amqp_url)
        assert not dead, f"dead-lettered while the database was away: {dead}"
        print(
            f"\npostgres restart: {figures} answers={dict(sender.answers)}"
            f" down {up_at - down_at:.1f} s (at {before}), progress {recovery:.2f} s after it"
            f" returned, settled after {time.monotonic() - started:.1f} s"
        )


async def _stored_at_least(chaos: Chaos, count: int) -> bool:
    return (await chaos.db.inbound_count() or 0) >= count
