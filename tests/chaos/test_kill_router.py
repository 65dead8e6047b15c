"""``kill -9`` of the router mid-stream, restarted at once, the stream going on: webhooks that
met the dead router got connection errors (refused: Twilio retries that once, and the retry
may reach the restarted router; broken mid-request: final), and every webhook answered 200
is stored exactly once."""

from __future__ import annotations

import asyncio
import time
from functools import partial

import pytest

from tests.chaos.conftest import TEST_TIMEOUT, Chaos
from tests.chaos.harness import SCALE, Sender, wait_until, webhooks

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(TEST_TIMEOUT)]

RATE = 100.0  # webhooks per second
STREAM = max(15.0, 60 * SCALE)  # seconds
WEBHOOKS = round(RATE * STREAM)
KILLS = 3 if SCALE >= 0.5 else 1


async def test_kill_9_router_mid_stream(chaos: Chaos) -> None:
    async with asyncio.timeout(TEST_TIMEOUT - 30):
        chaos.add_router()
        chaos.add_stage("conversations")
        await chaos.deployment.start()
        hooks = webhooks(WEBHOOKS, max(1, WEBHOOKS // 5), chaos.public)
        sender = Sender(chaos.deployment.http, chaos.public)
        router = chaos.deployment.router
        http = chaos.deployment.http

        sending = asyncio.create_task(sender.send(hooks, RATE))
        outages: list[tuple[float, float]] = []
        for n in range(KILLS):
            # Kills spread over the first two thirds of the stream.
            sent = partial(sender.sent_at_least, WEBHOOKS * (n + 1) / (KILLS + 2))
            await wait_until(sent, 120, 0.05, f"kill {n + 1}'s share sent")
            killed_at = time.monotonic()
            await router.kill()
            await router.start()
            await router.wait_ready(http)
            outages.append((killed_at, time.monotonic()))
        await sending

        finals = sender.finals()
        assert finals.keys() <= {0, 200}, f"answers other than 200 or none: {dict(finals)}"
        assert sender.refused, "no webhook met the dead router"
        during = [
            t
            for t, code in sender.log
            if code == 0 and any(start <= t <= end + 0.5 for start, end in outages)
        ]
        assert len(during) == sender.answers[0], "a failed attempt while the router was up"
        ok_after = [t for t, code in sender.log if code == 200 and t > outages[-1][1]]
        assert ok_after, "the last restart came after the stream"

        # Every webhook answered 200 is stored, exactly once; a refused one never is.
        accepted = sender.accepted()

        async def all_stored() -> bool:
            return accepted <= set(await chaos.db.inbound_sids())

        await wait_until(all_stored, 30 + 60 * SCALE, 0.2, "every accepted webhook stored")
        await asyncio.sleep(1.0)  # late duplicates, if any, would show now
        stored = await chaos.db.inbound_sids()
        doubled = [sid for sid, n in stored.items() if n > 1]
        assert not doubled, f"{len(doubled)} webhooks stored twice, e.g. {doubled[:3]}"
        assert set(stored) <= {h.sid for h in hooks}
        assert not sender.refused & set(stored), "a webhook whose connection was refused is stored"
        ghosts = set(stored) - accepted  # stored, but the router died before answering
        broken = finals[0] - len(sender.refused)  # connection broken mid-request: no retry
        assert len(ghosts) <= broken
        customers = {h.customer for h in hooks if h.sid in stored}
        conversations = await chaos.db.value("SELECT count(*) FROM conversations")
        assert conversations == len(customers), "a customer's messages in two conversations"
        rescued = len(sender.retried & accepted)  # Twilio's retry reached the restarted router
        print(
            f"\nkill -9 router: {WEBHOOKS} webhooks at {RATE:.0f}/s, {KILLS} kills, router"
            f" down {[round(end - start, 1) for start, end in outages]} s; webhooks"
            f" {dict(finals)}: {len(accepted)} answered 200 and stored once,"
            f" {len(sender.refused)} refused twice (Twilio gives up: 11200),"
            f" {broken} broken mid-request ({len(ghosts)} of them stored anyway),"
            f" {rescued} answered on Twilio's retry; attempts {dict(sender.answers)}"
        )
