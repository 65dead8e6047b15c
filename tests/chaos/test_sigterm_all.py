"""SIGTERM of every process under load: each drains and exits within its grace period; what
was accepted is either done or still queued. Restarted while the stream goes on: webhooks
that met the stopped router were refused (Twilio retries that once, then gives up: the
reconciler's work, ``test_reconcile_outage``), and every webhook answered 200, before the
stop or after the restart, is handled exactly once."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.chaos.conftest import TEST_TIMEOUT, Chaos
from tests.chaos.harness import (
    SCALE,
    SENT,
    Sender,
    dead_letters,
    queue_depths,
    scaled,
    wait_until,
    webhooks,
)

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(TEST_TIMEOUT)]

# A stream long enough to go on after the restart (seven processes take a few seconds).
WEBHOOKS = scaled(10_000, 900)
CUSTOMERS = WEBHOOKS // 5
RATE = max(60.0, 150 * SCALE)
GRACE = 5.0  # OMNIROUTE_SHUTDOWN_GRACE of every process
SLACK = 2.0  # interpreter and connection teardown after the drain


async def test_sigterm_every_process_under_load(chaos: Chaos) -> None:
    async with asyncio.timeout(TEST_TIMEOUT - 30):
        await chaos.start_pipeline(CUSTOMERS)
        hooks = webhooks(WEBHOOKS, CUSTOMERS, chaos.public)
        chaos.customers_wrote(hooks)
        sender = Sender(chaos.deployment.http, chaos.public)
        started = time.monotonic()
        sending = asyncio.create_task(sender.send(hooks, RATE))
        await wait_until(lambda: sender.sent_at_least(0.3 * WEBHOOKS), 120, 0.05, "30 % sent")

        procs = list(chaos.deployment.procs.values())
        results = await asyncio.gather(*(p.terminate(GRACE * 4) for p in procs))
        stopped_at = time.monotonic()
        drains = {
            p.name: (code, round(took, 2)) for p, (code, took) in zip(procs, results, strict=True)
        }
        assert all(code == 0 for code, _ in drains.values()), f"exit codes: {drains}"
        slow = {n: t for n, (_, t) in drains.items() if t > GRACE + SLACK}
        assert not slow, f"took longer than the grace period ({GRACE} s) to exit: {slow}"

        # Everything stopped: each accepted webhook is stored or still waits in the queue.
        accepted_at_stop = sender.accepted()
        stored = await chaos.db.inbound_sids()
        waiting = (await queue_depths(chaos.amqp_url, ["omniroute.conversations"]))[
            "omniroute.conversations"
        ]
        spooled = int(await chaos.db.value("SELECT count(*) FROM ingress_spool"))
        assert len(accepted_at_stop - set(stored)) <= waiting + spooled, (
            f"{len(accepted_at_stop - set(stored))} accepted webhooks neither stored nor queued"
            f" ({waiting} queued, {spooled} spooled)"
        )
        in_flight = await chaos.db.value(
            "SELECT count(*) FROM messages WHERE direction = 'outbound' AND status = 'sending'"
        )
        assert in_flight == 0, f"{in_flight} sends left in 'sending' by a drained outbound stage"

        await chaos.deployment.start()
        up_at = time.monotonic()
        await sending
        assert sender.answers.keys() <= {0, 200}, f"answers: {dict(sender.answers)}"
        assert [t for t, code in sender.log if code == 0 and t > stopped_at], "nothing refused"
        assert [t for t, code in sender.log if code == 200 and t > up_at], (
            "the restart came after the stream: nothing reached the restarted router"
        )

        # Status callbacks posted while the router was stopped are lost (Twilio does not
        # retry them): a message sent then may stay 'queued', 'sent' or 'delivered'.
        figures = await chaos.settle(
            sender.accepted(), hooks, 90 + 400 * SCALE, sender.refused, final=SENT
        )
        dead = await dead_letters(chaos.amqp_url)
        assert not dead, f"dead-lettered: {dead}"
        print(
            f"\nsigterm all: {figures} drains (exit, s)={drains} accepted before stop"
            f" {len(accepted_at_stop)}, stored {sum(stored.values())}, queued {waiting},"
            f" spooled {spooled}, webhooks {dict(sender.finals())} (attempts"
            f" {dict(sender.answers)}, retried {len(sender.retried)}), restarted in"
            f" {up_at - stopped_at:.1f} s, settled after {time.monotonic() - started:.1f} s"
        )
