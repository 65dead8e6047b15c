"""Durable timers on the real database: one pending per conversation and kind, moved by
rescheduling, never pulled back by ``later_only``, never set again for a moment that already
fired, and taken (fired) once even by replicas racing for them.

Each test has an epoch of its own, in the past and a year before the previous test's:
``take_due`` at a moment of that epoch sees no timer of any other test (nor file)."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from omniroute.domain import timers
from tests.support import BUSINESS, new_customer

_EPOCHS = itertools.count()


@pytest.fixture
def t0() -> datetime:
    return datetime(1990, 1, 1, tzinfo=UTC) - timedelta(days=366 * next(_EPOCHS))


async def _conversation(db: asyncpg.Pool, t0: datetime) -> str:
    contact_id, conversation_id, customer = uuid.uuid4(), uuid.uuid4(), new_customer()
    await db.execute(
        "INSERT INTO contacts (id, account, address) VALUES ($1, 'contoso', $2)",
        contact_id,
        customer,
    )
    await db.execute(
        "INSERT INTO conversations (id, account, business_number, customer, contact_id,"
        " workstream, state, opened_at, last_customer_message_at)"
        " VALUES ($1, 'contoso', $2, $3, $4, 'support-pt', 'active', $5, $5)",
        conversation_id,
        BUSINESS,
        customer,
        contact_id,
        t0,
    )
    return str(conversation_id)


async def _pending(db: asyncpg.Pool, conversation_id: str) -> dict[str, datetime]:
    rows = await db.fetch(
        "SELECT kind, due_at FROM timers WHERE conversation_id = $1 AND fired_at IS NULL",
        uuid.UUID(conversation_id),
    )
    return {r["kind"]: r["due_at"] for r in rows}


async def test_rescheduling_moves_the_one_pending_timer_of_a_kind(
    db: asyncpg.Pool, t0: datetime
) -> None:
    cid = await _conversation(db, t0)
    async with db.acquire() as conn:
        await timers.schedule(conn, cid, "idle", t0 + timedelta(minutes=10))
        await timers.schedule(conn, cid, "idle", t0 + timedelta(minutes=5))  # earlier: moved
        await timers.schedule(conn, cid, "close", t0 + timedelta(hours=1))
    assert await _pending(db, cid) == {
        "idle": t0 + timedelta(minutes=5),
        "close": t0 + timedelta(hours=1),
    }


async def test_later_only_never_pulls_a_timer_back(db: asyncpg.Pool, t0: datetime) -> None:
    cid = await _conversation(db, t0)
    async with db.acquire() as conn:
        await timers.schedule(conn, cid, "idle", t0 + timedelta(minutes=10), later_only=True)
        await timers.schedule(conn, cid, "idle", t0 + timedelta(minutes=3), later_only=True)
        assert (await _pending(db, cid))["idle"] == t0 + timedelta(minutes=10)
        await timers.schedule(conn, cid, "idle", t0 + timedelta(minutes=20), later_only=True)
    assert (await _pending(db, cid))["idle"] == t0 + timedelta(minutes=20)


async def test_a_moment_that_already_fired_is_not_set_again(db: asyncpg.Pool, t0: datetime) -> None:
    cid = await _conversation(db, t0)
    due = t0 + timedelta(minutes=1)
    async with db.acquire() as conn:  # autocommit: each step is seen by the next
        await timers.schedule(conn, cid, "remind", due, later_only=True)
        fired = await timers.take_due(conn, t0 + timedelta(minutes=2))
        assert [(str(r["conversation_id"]), r["kind"]) for r in fired] == [(cid, "remind")]
        # A redelivered customer message asks for the same reminder (or an earlier one) again.
        await timers.schedule(conn, cid, "remind", due, later_only=True)
        await timers.schedule(conn, cid, "remind", due - timedelta(seconds=30), later_only=True)
        assert await _pending(db, cid) == {}
        # A later moment is new activity: that one is set.
        await timers.schedule(conn, cid, "remind", due + timedelta(minutes=5), later_only=True)
    assert await _pending(db, cid) == {"remind": due + timedelta(minutes=5)}


async def test_cancel_removes_only_the_pending_timers_of_the_kinds_named(
    db: asyncpg.Pool, t0: datetime
) -> None:
    cid = await _conversation(db, t0)
    async with db.acquire() as conn:
        for kind in ("idle", "close", "survey"):
            await timers.schedule(conn, cid, kind, t0 + timedelta(days=3))
        await timers.cancel(conn, cid, ["idle", "survey", "never-set"])
    assert set(await _pending(db, cid)) == {"close"}


async def test_due_timers_are_taken_once_in_due_order(db: asyncpg.Pool, t0: datetime) -> None:
    cids = [await _conversation(db, t0) for _ in range(3)]
    now = t0 + timedelta(days=10)
    async with db.acquire() as conn:
        for n, cid in enumerate(cids):
            await timers.schedule(conn, cid, "tick", now - timedelta(minutes=n))
        await timers.schedule(conn, cids[0], "later", now + timedelta(seconds=1))  # not yet
        async with conn.transaction():
            taken = await timers.take_due(conn, now, limit=2)
        assert [str(r["conversation_id"]) for r in taken] == [cids[2], cids[1]]  # oldest first
        async with conn.transaction():
            rest = await timers.take_due(conn, now)
        async with conn.transaction():
            again = await timers.take_due(conn, now)
    assert [(str(r["conversation_id"]), r["kind"]) for r in rest] == [(cids[0], "tick")]
    assert again == []
    assert set(await _pending(db, cids[0])) == {"later"}


async def test_replicas_taking_at_once_never_fire_a_timer_twice(
    db: asyncpg.Pool, t0: datetime
) -> None:
    cids = [await _conversation(db, t0) for _ in range(20)]
    now = t0 + timedelta(days=20)
    async with db.acquire() as conn:
        for cid in cids:
            await timers.schedule(conn, cid, "race", now - timedelta(seconds=1))
    holding = asyncio.Event()

    async def replica(first: bool) -> list[str]:
        async with db.acquire() as conn, conn.transaction():
            if first:  # takes some and holds their locks while the other replica looks
                taken = await timers.take_due(conn, now, limit=5)
                holding.set()
                await released.wait()
            else:
                await holding.wait()
                taken = await timers.take_due(conn, now, limit=100)
                released.set()
        return [str(r["conversation_id"]) for r in taken if r["kind"] == "race"]

    released = asyncio.Event()
    async with asyncio.timeout(10):
        first, second = await asyncio.gather(replica(True), replica(False))
    assert len(first) == 5
    assert not set(first) & set(second)
    assert sorted(first + second) == sorted(cids)
