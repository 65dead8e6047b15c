"""The outbox as a log: one elected relay, commit order, no row skipped behind a slow
transaction, nothing published twice, pruning behind the watermark."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg

from omniroute.infra.bus import Bus
from omniroute.infra.outbox import OutboxRelay, add_to_outbox, horizon_of
from omniroute.infra.settings import Settings
from omniroute.infra.store import Store, init_connection
from schemas.events import Envelope, EventType
from tests.support import EventTap, received_event, tap, wait_for


def _event(label: str) -> Envelope:
    event: Envelope = received_event().caused(EventType.CONVERSATION_OPENED, {"label": label})
    return event


def _fast(settings: Settings) -> Settings:
    return Settings.model_validate(
        {**settings.model_dump(), "outbox_leader_poll": 0.1, "outbox_relay_interval": 0.2}
    )


async def _published(spy: EventTap, ids: set[str], count: int) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    while len(seen) < count:
        seen.append(await spy.next(timeout=5, where=lambda e: e["id"] in ids))
    return seen


async def _below_watermark(db: asyncpg.Pool, event_id: str) -> bool:
    return bool(
        await db.fetchval(
            "SELECT (o.txid, o.seq) <= (w.txid, w.seq) FROM outbox o, outbox_watermark w"
            " WHERE o.id = $1",
            event_id,
        )
    )


async def test_a_row_of_a_slower_transaction_is_published_first_and_nothing_twice(
    bus: Bus, store: Store, settings: Settings, db: asyncpg.Pool, infra: Any
) -> None:
    slow, fast = _event("slow"), _event("fast")
    relay = OutboxRelay(bus=bus, store=store, settings=_fast(settings))
    async with tap(settings.amqp_url.get_secret_value(), "conversation.opened") as spy:
        await relay.start()
        try:
            async with store.transaction() as slower:
                await add_to_outbox(slower, [slow])  # the older transaction id, still running
                async with store.transaction() as other:
                    await add_to_outbox(other, [fast])  # a newer one, committed first
                # The relay must not move past the slow transaction's place in the log.
                await spy.expect_none(0.6, where=lambda e: e["id"] in {slow.id, fast.id})
            seen = await _published(spy, {slow.id, fast.id}, 2)
            assert [e["id"] for e in seen] == [slow.id, fast.id]
            await spy.expect_none(0.6, where=lambda e: e["id"] in {slow.id, fast.id})
            await wait_for(lambda: _below_watermark(db, fast.id))
        finally:
            await relay.stop()


async def test_one_relay_leads_and_another_takes_over_when_it_goes(
    bus: Bus, store: Store, settings: Settings, db: asyncpg.Pool
) -> None:
    fast = _fast(settings)
    relays = [OutboxRelay(bus=bus, store=store, settings=fast) for _ in range(2)]
    for relay in relays:
        await relay.start()
    try:
        await wait_for(lambda: _one_leads(relays))
        assert sum(r.leading for r in relays) == 1
        leader = next(r for r in relays if r.leading)
        standby = next(r for r in relays if not r.leading)
        before, after = _event("before"), _event("after")
        async with tap(settings.amqp_url.get_secret_value(), "conversation.opened") as spy:
            async with store.transaction() as conn:
                await add_to_outbox(conn, [before])
            await _published(spy, {before.id}, 1)
            await leader.stop()
            async with store.transaction() as conn:
                await add_to_outbox(conn, [after])
            await _published(spy, {after.id}, 1)
            assert standby.leading
            await spy.expect_none(0.5, where=lambda e: e["id"] in {before.id, after.id})
    finally:
        for relay in relays:
            await relay.stop()


async def _one_leads(relays: list[OutboxRelay]) -> bool:
    return any(r.leading for r in relays)


async def test_a_leader_that_loses_its_broker_hands_the_lead_to_one_that_has_it(
    bus: Bus, store: Store, settings: Settings
) -> None:
    """A leader whose bus is gone published nothing and kept the lock forever (every other
    process's relay stood by): it steps down after ``outbox_leader_step_down``, and a
    candidate without a broker does not take the lead."""
    fast = Settings.model_validate({**_fast(settings).model_dump(), "outbox_leader_step_down": 0.5})
    lost = Bus.from_settings(fast)
    await lost.start()
    await lost.wait_ready()
    first = OutboxRelay(bus=lost, store=store, settings=fast)
    await first.start()
    second = OutboxRelay(bus=bus, store=store, settings=fast)
    try:
        await wait_for(lambda: _one_leads([first]))
        await second.start()
        await lost.close()  # the leader's broker connection is gone for good
        event = _event("after the broker went")
        async with tap(settings.amqp_url.get_secret_value(), "conversation.opened") as spy:
            async with store.transaction() as conn:
                await add_to_outbox(conn, [event])
            await _published(spy, {event.id}, 1)
        assert second.leading and not first.leading
        await asyncio.sleep(0.5)  # the bus-less candidate keeps standing by
        assert not first.leading
    finally:
        await first.stop()
        await second.stop()


async def test_an_event_written_twice_is_recorded_once(store: Store) -> None:
    event = _event("twice")
    async with store.transaction() as conn:
        assert await add_to_outbox(conn, [event]) == [event]
    async with store.transaction() as conn:
        assert await add_to_outbox(conn, [event]) == []


async def test_prune_deletes_only_published_rows_past_the_retention(
    bus: Bus, store: Store, settings: Settings, db: asyncpg.Pool, infra: Any
) -> None:
    old_published, recent, old_unpublished = _event("a"), _event("b"), _event("c")
    async with store.transaction() as conn:
        await add_to_outbox(conn, [old_published, recent])
    relay = OutboxRelay(bus=bus, store=store, settings=_fast(settings))
    lead = await asyncpg.connect(infra.database_url)
    await init_connection(lead)
    try:
        # Publish everything there is (other tests' rows too), then add one row after it.
        while (await relay.relay_once(lead))[0]:
            pass
        async with store.transaction() as other:
            await add_to_outbox(other, [old_unpublished])
        await db.execute(
            "UPDATE outbox SET created_at = now() - interval '2 hours' WHERE id = ANY($1::uuid[])",
            [old_published.id, old_unpublished.id],
        )
        assert await relay.prune(lead) >= 1
        left = {
            str(r["id"])
            for r in await db.fetch(
                "SELECT id FROM outbox WHERE id = ANY($1::uuid[])",
                [old_published.id, recent.id, old_unpublished.id],
            )
        }
        assert left == {recent.id, old_unpublished.id}
    finally:
        await lead.close()


def test_the_horizon_widens_32_bit_xids_by_the_epoch_and_ignores_newer_ones() -> None:
    epoch = 5 << 32
    assert horizon_of(epoch + 1000, []) == epoch + 1000
    assert horizon_of(epoch + 1000, [990, 995]) == epoch + 990
    assert horizon_of(epoch + 1000, [1000, 1005]) == epoch + 1000  # assigned after the look
    # Just past a wraparound of the 32-bit counter: 0xFFFFFFF0 is in the previous epoch.
    assert horizon_of(epoch + 5, [0xFFFFFFF0, 3]) == epoch - 16


async def test_a_long_transaction_in_another_database_does_not_hold_the_relay(
    bus: Bus, store: Store, settings: Settings, infra: Any
) -> None:
    other = f"omniroute_other_{uuid.uuid4().hex[:8]}"
    # Every statement bounded: the test's cleanup must run even if the cluster is slow.
    admin = await asyncpg.connect(infra.database_url, command_timeout=30)
    await admin.execute(f'CREATE DATABASE "{other}"')
    elsewhere = await asyncpg.connect(
        infra.database_url.rsplit("/", 1)[0] + "/" + other, command_timeout=30
    )
    relay = OutboxRelay(bus=bus, store=store, settings=_fast(settings))
    event = _event("elsewhere")
    try:
        transaction = elsewhere.transaction()
        await transaction.start()
        await elsewhere.execute("CREATE TABLE batch (n int)")  # holds an xid, stays open
        async with tap(settings.amqp_url.get_secret_value(), "conversation.opened") as spy:
            await relay.start()
            async with store.transaction() as conn:
                await add_to_outbox(conn, [event])
            await _published(spy, {event.id}, 1)
        await transaction.rollback()
    finally:
        await relay.stop()
        elsewhere.terminate()
        # WITH (FORCE) (PostgreSQL 13+) ends the other database's session if it lingers.
        await admin.execute(f'DROP DATABASE IF EXISTS "{other}" WITH (FORCE)')
        await admin.close()
