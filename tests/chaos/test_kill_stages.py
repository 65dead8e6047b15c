"""``kill -9`` of each consumer stage mid-stream while the emulator delivers the webhooks
(Twilio's rules) and replays 10 % of them: every webhook answered 200 at once, zero duplicate
messages, zero duplicate Twilio sends, nothing lost."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from tests.chaos.conftest import TEST_TIMEOUT, Chaos
from tests.chaos.harness import (
    PIPELINE,
    SCALE,
    Customers,
    dead_letters,
    progress,
    scaled,
    verify_pipeline,
    wait_settled,
    webhooks,
)

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(TEST_TIMEOUT)]

WEBHOOKS = scaled(10_000, 600)
CUSTOMERS = WEBHOOKS // 5
RATE = max(60.0, 150 * SCALE)
ROUNDS = 2 if SCALE >= 0.5 else 1  # kills per stage


async def test_kill_9_each_stage_mid_stream(chaos: Chaos) -> None:
    async with asyncio.timeout(TEST_TIMEOUT - 30):
        await chaos.start_pipeline(CUSTOMERS)
        hooks = webhooks(WEBHOOKS, CUSTOMERS, chaos.public)
        replayed = {h.sid for h in random.sample(hooks, len(hooks) // 10)}
        customers = Customers(chaos.deployment.http, chaos.emulator.url, chaos.public)
        started = time.monotonic()
        sending = asyncio.create_task(customers.send(hooks, RATE, replayed))

        # Kill every stage (round robin) while the stream runs, restart it at once.
        kills: list[tuple[str, float, dict[str, int] | None]] = []
        interval = (WEBHOOKS / RATE) / (len(PIPELINE) * ROUNDS + 1)
        for stage in list(PIPELINE) * ROUNDS:
            await asyncio.sleep(interval)
            proc = chaos.deployment.procs[stage]
            await proc.kill()
            kills.append((stage, time.monotonic() - started, await progress(chaos.db)))
            await proc.start()
        await sending
        await asyncio.gather(
            *(p.wait_ready(chaos.deployment.http) for p in chaos.deployment.procs.values())
        )
        last = kills[-1][2]
        assert last is not None and (
            last["inbound"] < WEBHOOKS or last["outbound"] < 2 * CUSTOMERS or last["unsettled"]
        ), f"the last kill came after the work was done: {kills[-1]}"
        # The router and the broker stayed up: every delivery, replays too, was answered 200
        # at once (Twilio would not have retried anything else).
        assert customers.finals() == {200: WEBHOOKS}, f"answers: {dict(customers.finals())}"
        assert customers.attempts == customers.posts, "a delivery needed Twilio's retry"

        await wait_settled(chaos.db, WEBHOOKS, CUSTOMERS, 90 + 400 * SCALE)
        await asyncio.sleep(1.0)  # late duplicates, if any, would show now
        figures = await verify_pipeline(
            chaos.db, chaos.emulator.state.messages.values(), hooks, allow_unknown=True
        )
        dead = await dead_letters(chaos.amqp_url)
        status_dead = dead.pop("omniroute.status.dead", 0)
        assert not dead, f"dead-lettered: {dead}"
        # Only the callbacks of sends whose sid was never recorded ('unknown') may die.
        assert status_dead <= 3 * figures["unknown_but_sent"], status_dead
        print(
            f"\nkill -9: {figures} posts={customers.posts} replayed={len(replayed)}"
            f" kills={[(s, round(t, 1)) for s, t, _ in kills]}"
            f" settled after {time.monotonic() - started:.1f} s, status dead letters"
            f" {status_dead}"
        )
