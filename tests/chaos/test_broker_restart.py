"""RabbitMQ restarted while webhooks are being sent: every webhook answered 200 is stored
exactly once, the rest got 503 — and once Twilio retries those, nothing is missing."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from tests.chaos.conftest import TEST_TIMEOUT, Chaos
from tests.chaos.harness import SCALE, Sender, scaled, wait_until, webhooks

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(TEST_TIMEOUT)]

WEBHOOKS = scaled(10_000, 1_000)
# Webhooks per second: a stream of at least 25 s, so the restart (stop at 30 %, about 5 s
# down) lands mid-stream with plenty sent after the broker is back, even on a slow machine.
RATE = min(250.0, WEBHOOKS / 25)
DOWN_FOR = 1.0  # seconds between stop_app and start_app (start_app itself takes ~4 s)


async def test_broker_restart_under_webhooks_loses_nothing_accepted(chaos: Chaos) -> None:
    async with asyncio.timeout(TEST_TIMEOUT - 30):
        chaos.add_router()
        chaos.add_stage("conversations")
        await chaos.deployment.start()
        hooks = webhooks(WEBHOOKS, max(1, WEBHOOKS // 5), chaos.public)
        sender = Sender(chaos.deployment.http, chaos.public)

        sending = asyncio.create_task(sender.send(hooks, RATE))
        await wait_until(lambda: _sent(sender, 0.3 * WEBHOOKS), 120, 0.05, "30 % sent")
        down_at = time.monotonic()
        await chaos.rabbit.stop_app()
        await asyncio.sleep(DOWN_FOR)
        await chaos.rabbit.start_app()
        up_at = time.monotonic()
        await sending
        first_pass = Counter(sender.status.values())
        answers = dict(sender.answers)

        assert set(answers) <= {200, 503}, f"answers other than 200/503: {answers}"
        assert answers.get(503, 0) > 0, "the broker restart produced no 503: nothing was tested"
        ok_before = [t for t, code in sender.log if code == 200 and t < down_at]
        ok_after = [t for t, code in sender.log if code == 200 and t > up_at]
        assert ok_before and ok_after, "the restart did not land mid-stream"
        recovery = min(ok_after) - up_at
        accepted = sender.accepted()

        # Every accepted webhook is stored, exactly once, by the conversations stage.
        async def all_accepted_stored() -> bool:
            stored = await chaos.db.inbound_sids()
            return accepted <= set(stored)

        await wait_until(all_accepted_stored, 60 + 120 * SCALE, what="accepted webhooks stored")
        stored = await chaos.db.inbound_sids()
        assert all(n == 1 for n in stored.values())
        assert set(stored) <= {h.sid for h in hooks}
        ghosts = len(set(stored) - accepted)  # answered 503, published anyway: Twilio retries

        # Twilio retries the 503s: then every webhook is stored, each exactly once.
        await sender.retry_until_accepted(hooks, 60 + 60 * SCALE)
        await wait_until(
            lambda: _stored_all(chaos, len(hooks)), 60 + 120 * SCALE, what="all webhooks stored"
        )
        stored = await chaos.db.inbound_sids()
        assert set(stored) == {h.sid for h in hooks}
        assert all(n == 1 for n in stored.values()), "a webhook stored twice"
        conversations = await chaos.db.value("SELECT count(*) FROM conversations")
        assert conversations == len({h.customer for h in hooks})
        assert all(p.alive for p in chaos.deployment.procs.values())
        print(
            f"\nbroker restart: {WEBHOOKS} webhooks, first pass 200={first_pass[200]}"
            f" 503={first_pass[503]} (answers {answers}), 503-but-stored={ghosts},"
            f" broker down {up_at - down_at:.1f} s, first 200 after {recovery:.2f} s,"
            f" after retries stored={sum(stored.values())} duplicates=0"
        )


async def _sent(sender: Sender, count: float) -> bool:
    return len(sender.log) >= count


async def _stored_all(chaos: Chaos, count: int) -> bool:
    return (await chaos.db.inbound_count() or 0) >= count
