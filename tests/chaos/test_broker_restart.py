"""RabbitMQ stopped for a while as webhooks keep coming: Twilio does not retry a webhook
answered 5xx, so the router must answer every one 200 (kept in the PostgreSQL spool while
the broker is away), and every one is stored exactly once soon after the broker is back."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.chaos.conftest import TEST_TIMEOUT, Chaos
from tests.chaos.harness import SCALE, Sender, metric, wait_until, webhooks

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(TEST_TIMEOUT)]

RATE = 150.0  # webhooks per second
# At least 20 s, so the outage (from a quarter of the stream, plus ~4 s of start_app)
# lands mid-stream with webhooks before and after it.
STREAM = max(20.0, 60 * SCALE)
WEBHOOKS = round(RATE * STREAM)
DOWN_FOR = max(5.0, 30 * SCALE)  # seconds between stop_app and start_app
DRAINED_WITHIN = 30.0  # every webhook stored this long after the broker is back


async def test_broker_stopped_under_webhooks_answers_200_and_loses_nothing(chaos: Chaos) -> None:
    async with asyncio.timeout(TEST_TIMEOUT - 30):
        chaos.add_router()
        chaos.add_stage("conversations")
        await chaos.deployment.start()
        hooks = webhooks(WEBHOOKS, max(1, WEBHOOKS // 5), chaos.public)
        sender = Sender(chaos.deployment.http, chaos.public)

        sending = asyncio.create_task(sender.send(hooks, RATE))
        await wait_until(lambda: sender.sent_at_least(WEBHOOKS / 4), 120, 0.05, "a quarter sent")
        down_at = time.monotonic()
        await chaos.rabbit.stop_app()
        await asyncio.sleep(DOWN_FOR)
        await chaos.rabbit.start_app()
        up_at = time.monotonic()
        # The outage's backlog: what was answered before the broker came back.
        backlog = {sid for sid, code in sender.status.items() if code == 200}
        backlog_drained = asyncio.create_task(_stored_after(chaos, backlog, up_at))
        await sending
        sent_at = time.monotonic()

        answers = dict(sender.answers)
        assert answers == {200: WEBHOOKS}, f"not every webhook answered 200 at once: {answers}"
        ok_during = [t for t, code in sender.log if code == 200 and down_at < t < up_at]
        ok_after = [t for t, code in sender.log if code == 200 and t > up_at]
        assert ok_during and ok_after, "the outage did not land mid-stream"

        # Every webhook stored, exactly once, within DRAINED_WITHIN of the broker's return.
        expected = {h.sid for h in hooks}

        async def all_stored() -> bool:
            return expected <= set(await chaos.db.inbound_sids())

        async def where() -> str:
            spool = await chaos.db.value("SELECT count(*) FROM ingress_spool")
            return f": {await chaos.db.inbound_count()} of {WEBHOOKS} stored, {spool} spooled"

        within = up_at + DRAINED_WITHIN - time.monotonic()
        await wait_until(all_stored, within, 0.2, "every webhook stored", where)
        drained = time.monotonic() - up_at
        backlog_after = await backlog_drained
        await asyncio.sleep(1.0)  # late duplicates, if any, would show now
        stored = await chaos.db.inbound_sids()
        assert set(stored) == expected
        doubled = [sid for sid, n in stored.items() if n > 1]
        assert not doubled, f"{len(doubled)} webhooks stored twice, e.g. {doubled[:3]}"
        conversations = await chaos.db.value("SELECT count(*) FROM conversations")
        assert conversations == len({h.customer for h in hooks})
        assert await chaos.db.value("SELECT count(*) FROM ingress_spool") == 0
        assert all(p.alive for p in chaos.deployment.procs.values())
        router = chaos.deployment.router
        http = chaos.deployment.http
        spooled = await metric(http, router, "omniroute_webhooks_total", outcome="spooled")
        print(
            f"\nbroker stopped: {WEBHOOKS} webhooks at {RATE:.0f}/s over {STREAM:.0f} s,"
            f" answers {answers} ({len(ok_during)} answered 200 while the broker was down,"
            f" {spooled:.0f} spooled), broker down {up_at - down_at:.1f} s,"
            f" the {len(backlog)} answered before its return stored {backlog_after:.1f} s"
            f" after it, stream ended {sent_at - up_at:.1f} s after it, all"
            f" {sum(stored.values())} stored once {drained:.1f} s after it"
        )


async def _stored_after(chaos: Chaos, sids: set[str], since: float) -> float:
    """Seconds from ``since`` until every one of ``sids`` is stored."""

    async def stored() -> bool:
        return sids <= set(await chaos.db.inbound_sids())

    await wait_until(stored, STREAM + DRAINED_WITHIN, 0.2, "the outage's backlog stored")
    return time.monotonic() - since
