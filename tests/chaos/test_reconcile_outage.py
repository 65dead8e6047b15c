"""The router and every stage down for a while as customers keep writing, some with media:
Twilio (the emulator) gives up on each webhook as it would (connection refused, one retry,
error 11200) and on the status callbacks of the messages in flight, but keeps them all in
its message log. Restarted with a short reconcile interval, omniroute recovers from that log
every message, exactly once, in its conversation, with its media, within one interval (plus
the pipeline's time), and the final status ('read') of every automated message."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.chaos.conftest import TEST_TIMEOUT, Chaos
from tests.chaos.harness import (
    SCALE,
    Customers,
    Media,
    dead_letters,
    metric,
    scaled,
    verify_pipeline,
    wait_settled,
    wait_until,
    webhooks,
)

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(TEST_TIMEOUT)]

RATE = max(20.0, 50 * SCALE)  # customer messages per second
BEFORE = max(5.0, 20 * SCALE)  # seconds of stream before the outage
DOWN_FOR = max(10.0, 60 * SCALE)  # seconds the router and the stages stay down
AFTER = max(8.0, 20 * SCALE)  # seconds of stream after the outage (the restart takes ~3)
WEBHOOKS = round(RATE * (BEFORE + DOWN_FOR + AFTER))
CUSTOMERS = max(10, WEBHOOKS // 5)
MEDIA_EVERY = 7  # one message in seven carries an image
IMAGE: Media = ("image/png", b"\x89PNG\r\n\x1a\n" + bytes(range(64)))
RECONCILE_INTERVAL = 5.0
STATUS_AGE = 2.0  # an outbound message without status news this long is asked about
PIPELINE_TIME = scaled(60, 15)  # after the reconcile pass, until every message is stored
# Each status callback a second apart (sent, delivered, read): the automated messages sent
# in the seconds before the outage have callbacks due while the router is down.
CALLBACK_DELAY = 1.0


async def test_outage_of_everything_recovered_by_reconciliation(chaos: Chaos) -> None:
    async with asyncio.timeout(TEST_TIMEOUT - 30):
        chaos.deployment.env |= {
            "OMNIROUTE_RECONCILE_INTERVAL": str(RECONCILE_INTERVAL),
            "OMNIROUTE_RECONCILE_STATUS_AGE": str(STATUS_AGE),
        }
        chaos.emulator.state.callback_delay = CALLBACK_DELAY
        await chaos.start_pipeline(CUSTOMERS)
        hooks = webhooks(WEBHOOKS, CUSTOMERS, chaos.public)
        media = {h.sid: [IMAGE] for h in hooks[::MEDIA_EVERY]}
        customers = Customers(chaos.deployment.http, chaos.emulator.url, chaos.public)
        sending = asyncio.create_task(customers.send(hooks, RATE, media=media))

        await asyncio.sleep(BEFORE)
        # The router crashes; the stages are stopped (a stage killed mid-send may leave a
        # send 'unknown', which no callback can settle: test_kill_stages covers that).
        procs = list(chaos.deployment.procs.values())
        down_at = time.monotonic()
        await asyncio.gather(
            chaos.deployment.router.kill(),
            *(p.terminate(10) for p in procs if p.name != "router"),
        )
        await asyncio.sleep(DOWN_FOR)
        await chaos.deployment.start()
        up_at = time.monotonic()
        await sending

        # What the emulator gave up on, as Twilio would (error 11200): a refused webhook was
        # tried twice; one broken mid-request (in flight when the router died, or sent on a
        # kept-alive connection it had left) once, since Twilio retries only failed connects.
        assert customers.finals().keys() <= {0, 200}, dict(customers.finals())
        lost = set(customers.status) - customers.accepted()
        refused = customers.refused
        assert refused, "no customer message met the outage"
        failures = await _failures(chaos, "inbound")
        assert {f["error_code"] for f in failures} == {11200}
        attempts = {(f["message_sid"], f["attempt"], f["final"], f["error"]) for f in failures}
        connect = "ClientConnectorError"
        assert {a for a in attempts if a[0] in refused} == {
            (sid, n, n == 2, connect) for sid in refused for n in (1, 2)
        }
        broken = {a for a in attempts if a[0] in lost - refused}
        assert {(sid, n, final) for sid, n, final, _ in broken} == {
            (sid, 1, True) for sid in lost - refused
        }
        rescued = {a for a in attempts if a[0] not in lost}  # the retry met the new router
        assert all(a[1:] == (1, False, connect) for a in rescued), rescued
        status_failures = await _failures(chaos, "status")
        assert status_failures, "no status callback met the outage"

        # Within one reconcile interval (and the pipeline's time) every message is stored.
        expected = {h.sid for h in hooks}

        async def all_stored() -> bool:
            return expected <= set(await chaos.db.inbound_sids())

        within = up_at + RECONCILE_INTERVAL + PIPELINE_TIME - time.monotonic()
        await wait_until(all_stored, within, 0.25, f"the {len(lost)} lost messages stored")
        recovered = time.monotonic() - up_at

        # And the pipeline settles: every conversation assigned, every automated message
        # 'read', those whose callbacks were lost too (the reconciler asked Twilio).
        await wait_settled(chaos.db, WEBHOOKS, CUSTOMERS, 90 + 300 * SCALE)
        settled = time.monotonic() - up_at
        await asyncio.sleep(1.0)  # late duplicates, if any, would show now
        figures = await verify_pipeline(
            chaos.db, chaos.emulator.state.messages.values(), hooks, allow_unknown=False
        )
        await _check_conversations_of(chaos, hooks)
        await _check_media(chaos, media)
        callbacks_lost = {f["message_sid"] for f in status_failures}
        unread = await chaos.db.value(
            "SELECT count(*) FROM messages WHERE twilio_sid = ANY($1::text[]) AND status <> 'read'",
            list(callbacks_lost),
        )
        assert unread == 0, f"{unread} messages whose callbacks were lost are not 'read'"
        dead = await dead_letters(chaos.amqp_url)
        assert not dead, f"dead-lettered: {dead}"
        injected = await _injected(chaos)
        print(
            f"\nreconcile outage: {figures}; down {up_at - down_at:.1f} s, {len(lost)} of"
            f" {WEBHOOKS} customer messages given up by Twilio ({len(refused)} refused twice,"
            f" {len(broken)} broken mid-request {sorted({a[3] for a in broken})},"
            f" {len(rescued)} delivered on Twilio's retry;"
            f" {len(failures)} failed attempts,"
            f" 11200), {len(lost & set(media))} of them with media,"
            f" {len(callbacks_lost)} messages' status callbacks given up"
            f" ({len(status_failures)} failed attempts); {injected:.0f} reinjected by"
            f" reconciliation; every message stored {recovered:.1f} s after the restart"
            f" (interval {RECONCILE_INTERVAL:.0f} s), settled (all 'read') {settled:.1f} s"
            f" after it"
        )


async def _failures(chaos: Chaos, kind: str) -> list[dict[str, Any]]:
    """The emulator's failed webhook attempts of ``kind`` (Twilio's debugger: 11200)."""
    url = f"{chaos.emulator.url}/_emulator/webhook-failures"
    async with chaos.deployment.http.get(url, params={"kind": kind}) as response:
        failures: list[dict[str, Any]] = await response.json()
    return failures


async def _check_conversations_of(chaos: Chaos, hooks: list[Any]) -> None:
    """Each message in its customer's conversation."""
    rows = await chaos.db.fetch(
        "SELECT m.twilio_sid, c.customer FROM messages m"
        " JOIN conversations c ON c.id = m.conversation_id WHERE m.direction = 'inbound'"
    )
    where = {r["twilio_sid"]: r["customer"] for r in rows}
    wrong = [h.sid for h in hooks if where.get(h.sid) != h.customer]
    assert not wrong, f"{len(wrong)} messages not in their customer's conversation: {wrong[:3]}"


async def _check_media(chaos: Chaos, media: dict[str, list[Media]]) -> None:
    """Each message stored with as many attachments as the customer sent."""
    rows = await chaos.db.fetch(
        "SELECT twilio_sid, jsonb_array_length(media) AS n FROM messages"
        " WHERE twilio_sid = ANY($1::text[])",
        list(media),
    )
    counts = {r["twilio_sid"]: r["n"] for r in rows}
    wrong = {sid: counts.get(sid) for sid, items in media.items() if counts.get(sid) != len(items)}
    assert not wrong, f"{len(wrong)} messages stored without their media: {list(wrong.items())[:3]}"


async def _injected(chaos: Chaos) -> float:
    """Customer messages the reconcilers of every process published (their metrics)."""
    total = 0.0
    for proc in chaos.deployment.procs.values():
        total += await metric(
            chaos.deployment.http, proc, "omniroute_reconcile_injected_total", kind="inbound"
        )
    return total
