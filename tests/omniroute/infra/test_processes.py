"""The process registry on the real database: heartbeats, who counts as live, the prune, a
clean stop leaving no row, and the registry's statements going through the heartbeat index
even when it holds many dead rows."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from omniroute.infra.processes import (
    LIVE_WITHIN,
    PRUNE_AFTER,
    ProcessHeartbeat,
    ProcessIdentity,
    beat,
    forget,
    live_processes,
    live_sql,
    prune,
    prune_sql,
)
from omniroute.infra.store import Store
from tests.support import wait_for

pytestmark = pytest.mark.integration


def _identity(role: str = "consume", stages: tuple[str, ...] = ("classify",)) -> ProcessIdentity:
    # A host of its own per test: other tests' processes share the database.
    return ProcessIdentity(host=f"test-{uuid.uuid4().hex[:8]}", pid=4242, role=role, stages=stages)


@pytest.fixture
async def conn(db: asyncpg.Pool) -> AsyncIterator[Any]:
    async with db.acquire() as connection:
        yield connection


def test_an_identity_is_unique_per_start_and_reads_host_pid_role() -> None:
    first = ProcessIdentity.this_process("serve", [])
    second = ProcessIdentity.this_process("serve", [])
    assert first.id != second.id  # two services in one process, or a reused pid
    assert first.label == second.label
    host, pid, role = first.label.split(":")
    assert (int(pid), role) == (first.pid, "serve") and host == first.host
    assert first.id.startswith(f"{first.host}:{first.pid}:")


async def test_a_beat_registers_and_updates_and_old_heartbeats_do_not_count(conn: Any) -> None:
    me, gone = _identity(), _identity("serve", ())
    await beat(conn, me, "aaaaaaaaaaaa")
    await beat(conn, gone, "bbbbbbbbbbbb")
    await beat(conn, me, "cccccccccccc")  # after a reload: same row, new hash
    await conn.execute(
        "UPDATE processes SET heartbeat_at = now() - make_interval(secs => $1) WHERE id = $2",
        LIVE_WITHIN + 1,
        gone.id,
    )
    try:
        live = {
            row.id: row for row in await live_processes(conn) if row.host in (me.host, gone.host)
        }
        assert list(live) == [me.id]
        row = live[me.id]
        assert (row.role, row.stages, row.config_hash, row.pid) == (
            "consume",
            ("classify",),
            "cccccccccccc",
            4242,
        )
        assert row.label == me.label and 0 <= row.heartbeat_age < 5
        assert await conn.fetchval("SELECT count(*) FROM processes WHERE id = $1", gone.id) == 1

        await conn.execute(
            "UPDATE processes SET heartbeat_at = now() - make_interval(secs => $1) WHERE id = $2",
            PRUNE_AFTER + 1,
            gone.id,
        )
        assert await prune(conn) >= 1
        assert await conn.fetchval("SELECT count(*) FROM processes WHERE id = $1", gone.id) == 0
        assert await conn.fetchval("SELECT count(*) FROM processes WHERE id = $1", me.id) == 1
    finally:
        await forget(conn, me)
        await forget(conn, gone)


async def test_the_heartbeat_keeps_the_row_fresh_shows_a_new_hash_at_once_and_leaves(
    store: Store, conn: Any
) -> None:
    current = ["111111111111"]
    me = _identity()
    heartbeat = ProcessHeartbeat(store, me, lambda: current[0], interval=60.0)
    await heartbeat.start()
    try:

        async def stored() -> str | None:
            value: str | None = await conn.fetchval(
                "SELECT config_hash FROM processes WHERE id = $1", me.id
            )
            return value

        assert await wait_for(stored, timeout=5) == "111111111111"
        current[0] = "222222222222"
        heartbeat.wake()  # a reload: not at the next beat, a minute away
        await wait_for(lambda: _is(stored, "222222222222"), timeout=5)
    finally:
        await heartbeat.stop()
    assert await conn.fetchval("SELECT count(*) FROM processes WHERE id = $1", me.id) == 0


async def _is(read: Any, expected: str) -> bool:
    return bool(await read() == expected)


def _scans(node: dict[str, Any]) -> list[tuple[str, str | None, str | None]]:
    found = [(node["Node Type"], node.get("Relation Name"), node.get("Index Name"))]
    for child in node.get("Plans", []):
        found += _scans(child)
    return found


async def test_the_registry_statements_use_the_heartbeat_index_among_many_dead_rows(
    conn: Any,
) -> None:
    """A crash-looping supervisor can leave thousands of rows within the prune's minute:
    the live list and the prune still read only through ``processes_heartbeat``. Seeded and
    explained in a transaction that is rolled back (ANALYZE's statistics with it)."""
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute(
            "INSERT INTO processes (id, host, pid, role, stages, config_hash, started_at,"
            " heartbeat_at)"
            " SELECT 'dead:' || g, 'dead', g, 'consume', '{classify}', 'abcdefabcdef',"
            "  now() - interval '1 hour',"
            "  now() - make_interval(secs => $1 + 1 + (g % 1000) * ($2 - $1 - 2) / 1000.0)"
            " FROM generate_series(1, 50000) g",
            LIVE_WITHIN,
            PRUNE_AFTER,
        )
        for n in range(5):
            await beat(conn, _identity(), f"{n:012d}")
        await conn.execute("ANALYZE processes")
        for sql in (live_sql(), prune_sql()):
            plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}")
            plan = json.loads(plan) if isinstance(plan, str) else plan  # the pool decodes json
            scans = _scans(plan[0]["Plan"])
            on_processes = [
                s for s in scans if s[1] == "processes" or s[2] == "processes_heartbeat"
            ]
            assert on_processes, scans
            assert not any(s[0] == "Seq Scan" for s in on_processes), (sql, scans)
            assert any(s[2] == "processes_heartbeat" for s in scans), (sql, scans)
        assert len([r for r in await live_processes(conn) if r.host == "dead"]) == 0
    finally:
        await tx.rollback()


async def test_a_stop_during_a_beat_still_leaves_no_row(store: Store, conn: Any) -> None:
    """A reload wakes the heartbeat, and the process may stop at that very moment (a test's
    teardown, a deploy): the beat in flight must not land after the row was deleted, or a
    stopped process would count as live for LIVE_WITHIN seconds."""
    for attempt in range(20):
        me = _identity()
        heartbeat = ProcessHeartbeat(store, me, lambda: "333333333333", interval=60.0)
        await heartbeat.start()
        count = "SELECT count(*) FROM processes WHERE id = $1"
        await wait_for(lambda: conn.fetchval(count, me.id), 5)  # noqa: B023 - awaited here
        heartbeat.wake()
        for _ in range(attempt % 4):
            await asyncio.sleep(0)  # stop at different points of the beat
        await heartbeat.stop()
        left = await conn.fetchval("SELECT count(*) FROM processes WHERE id = $1", me.id)
        assert left == 0, f"attempt {attempt}: the row outlived the stop"
