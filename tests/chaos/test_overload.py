"""Webhooks offered at twice the rate the pipeline drains: the router still answers (nearly)
every one 200 within Twilio's 15 s, since Twilio retries no 5xx and no timeout; nothing
answered 200 is lost, and the backlog drains once the stream ends."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.chaos.conftest import TEST_TIMEOUT, Chaos
from tests.chaos.harness import (
    SCALE,
    Sender,
    Webhook,
    queue_depths,
    scaled,
    wait_until,
    webhooks,
)

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(TEST_TIMEOUT)]

STAGES = ("conversations", "classify", "distribute")
QUEUES = [f"omniroute.{stage}" for stage in STAGES]
PROBE = scaled(5_000, 1_000)  # webhooks queued first, to measure the drain rate
STREAM = max(10.0, 60 * SCALE)  # seconds of overload
OVERLOAD = 2.0  # offered rate / drain rate
ANSWERED = 0.999  # at least this share answered 200
MESSAGES_PER_CUSTOMER = 5
CONCURRENCY = 200  # webhooks in flight at most (the fixture's connection limit)
# On two cores the three stages, batching 32 messages a transaction, drain about as fast as
# one router takes webhooks: one message at a time they drain at half of that or less.
PREFETCH = 1


async def test_twice_the_drain_rate_answers_200_and_loses_nothing(chaos: Chaos) -> None:
    async with asyncio.timeout(TEST_TIMEOUT - 30):
        chaos.add_router()
        for stage in STAGES:
            chaos.add_stage(stage)
            chaos.deployment.procs[stage].env["OMNIROUTE_PREFETCH"] = str(PREFETCH)
        await chaos.deployment.start(["router"])
        # The drain rate: a backlog queued with the stages stopped, drained once they start.
        probe = webhooks(PROBE, PROBE // MESSAGES_PER_CUSTOMER, chaos.public)
        rate = await _drain_rate(chaos, probe)

        offered = OVERLOAD * rate
        count = round(offered * STREAM)
        hooks = webhooks(count, max(1, count // MESSAGES_PER_CUSTOMER), chaos.public)
        sender = Sender(chaos.deployment.http, chaos.public, keep_alive=True)
        started = time.monotonic()
        await sender.send(hooks, offered, CONCURRENCY)
        ended = time.monotonic()
        took = ended - started
        stored_at_end = await chaos.db.inbound_count() or 0
        backlog = sum((await queue_depths(chaos.amqp_url, QUEUES)).values())
        spooled = await chaos.db.value("SELECT count(*) FROM ingress_spool")

        finals = sender.finals()
        assert finals[200] >= ANSWERED * count, f"answered 200: {dict(finals)} of {count}"
        assert took < STREAM * 1.2, f"offered {count / took:.0f}/s, not {offered:.0f}/s"
        assert stored_at_end - PROBE < 0.8 * count, "no overload: the pipeline kept up"

        # Every webhook answered 200 stored exactly once, every conversation assigned.
        accepted = sender.accepted() | {h.sid for h in probe}
        customers = {h.customer for h in [*probe, *hooks] if h.sid in accepted}

        async def drained() -> bool:
            stored = await chaos.db.inbound_sids()
            active = await chaos.db.value(
                "SELECT count(*) FROM conversations WHERE state = 'active'"
            )
            return accepted <= set(stored) and active >= len(customers)

        async def where() -> str:
            depths = await queue_depths(chaos.amqp_url, QUEUES)
            return f": {await chaos.db.inbound_count()} stored of {len(accepted)}, {depths}"

        await wait_until(drained, 60 + 300 * SCALE, 0.5, "the backlog drained", where)
        drain = time.monotonic() - ended
        await asyncio.sleep(1.0)  # late duplicates, if any, would show now
        stored = await chaos.db.inbound_sids()
        doubled = [sid for sid, n in stored.items() if n > 1]
        assert not doubled, f"{len(doubled)} webhooks stored twice, e.g. {doubled[:3]}"
        assert set(stored) <= {h.sid for h in [*probe, *hooks]}
        conversations = await chaos.db.value("SELECT count(*) FROM conversations")
        assert conversations == len(customers), "a customer's messages in two conversations"
        depths = await queue_depths(chaos.amqp_url, QUEUES)
        assert not any(depths.values()), f"still queued: {depths}"
        assert all(p.alive for p in chaos.deployment.procs.values())
        print(
            f"\noverload: drain rate {rate:.0f} webhooks/s (a {PROBE} backlog), offered"
            f" {count} at {count / took:.0f}/s for {took:.1f} s, answers {dict(finals)}"
            f" ({finals[200] / count:.2%} 200; p50 {sender.latency(0.5) * 1000:.0f} ms,"
            f" p99 {sender.latency(0.99) * 1000:.0f} ms, max {max(sender.took):.2f} s),"
            f" at the stream's end {stored_at_end - PROBE}"
            f" stored ({(stored_at_end - PROBE) / took:.0f}/s while it ran), {backlog} queued,"
            f" {spooled} spooled; backlog drained {drain:.1f} s"
            f" after the stream, {sum(stored.values())} stored once"
        )


async def _drain_rate(chaos: Chaos, probe: list[Webhook]) -> float:
    """Webhooks per second the stages store and assign, from a backlog of ``probe``."""
    sender = Sender(chaos.deployment.http, chaos.public, keep_alive=True)
    await sender.send(probe, 1000, CONCURRENCY)
    assert sender.finals() == {200: len(probe)}, f"probe answers {dict(sender.finals())}"
    customers = len({h.customer for h in probe})
    await chaos.db.seed_agents(10, capacity=100_000)  # room for every conversation
    await chaos.deployment.start(STAGES)
    started = time.monotonic()

    async def drained() -> bool:
        stored = await chaos.db.inbound_count()
        active = await chaos.db.value("SELECT count(*) FROM conversations WHERE state = 'active'")
        return stored == len(probe) and active == customers

    await wait_until(drained, 120, 0.1, "the probe backlog drained")
    return len(probe) / (time.monotonic() - started)
