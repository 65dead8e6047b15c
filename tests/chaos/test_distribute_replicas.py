"""Three ``distribute`` replicas, one of them stopped with SIGTERM during the run: no agent
over capacity, no conversation assigned twice, every conversation assigned (capacity is
exactly enough), and the stopped replica drains within its grace period."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from omniroute.infra.bus import Bus
from omniroute.infra.settings import Settings
from schemas.events import ConversationQueued, EventType, new_event
from tests.chaos.conftest import TEST_TIMEOUT, Chaos
from tests.chaos.harness import SCALE, capacity_problems, scaled, wait_until
from tests.support import new_agents

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(TEST_TIMEOUT)]

AGENTS = 25
CONVERSATIONS = scaled(5_000, 500) // AGENTS * AGENTS
CAPACITY = CONVERSATIONS // AGENTS  # exactly enough: any leak or double count shows
WAVES = 10
GRACE = 5.0


async def _queue_wave(conn: asyncpg.Connection, wave: int, size: int) -> list[str]:
    """Queued conversations as classify leaves them (priorities mixed, oldest first)."""
    now = datetime.now(UTC)
    contact = uuid.uuid4()
    await conn.execute(
        "INSERT INTO contacts (id, account, address) VALUES ($1, 'chaos', $2)",
        contact,
        f"+1555{wave:03d}0000",
    )
    ids = [str(uuid.uuid4()) for _ in range(size)]
    await conn.executemany(
        "INSERT INTO conversations (id, account, business_number, customer, contact_id,"
        " workstream, state, opened_at, last_customer_message_at, queue, queued_at, priority)"
        " VALUES ($1, 'chaos', '+5511999990000', $2, $3, 'main', 'queued', $4, $4, 'general',"
        " $5, $6)",
        [
            (cid, f"+1555{wave:03d}{n:05d}", contact, now, now - timedelta(milliseconds=n), n % 3)
            for n, cid in enumerate(ids)
        ],
    )
    return ids


async def test_three_distribute_replicas_one_stopped_mid_run(chaos: Chaos) -> None:
    async with asyncio.timeout(TEST_TIMEOUT - 30):
        for n in range(3):
            chaos.add_stage("distribute", f"distribute-{n + 1}")
        for proc in chaos.deployment.procs.values():
            proc.env["OMNIROUTE_TICK_INTERVAL"] = "1"
            proc.env["OMNIROUTE_SHUTDOWN_GRACE"] = str(GRACE)
        await chaos.deployment.start()
        settings = Settings.model_validate(
            {"amqp_url": chaos.amqp_url, "database_url": chaos.db.dsn}
        )
        bus = Bus.from_settings(settings)
        await bus.start()
        conn = await asyncpg.connect(chaos.db.dsn)
        ids: list[str] = []
        try:
            async with asyncio.timeout(20):
                await bus.wait_ready()
            await new_agents(conn, AGENTS, queues=["general"], capacity=CAPACITY)
            stopped: tuple[int | None, float] | None = None
            assigned_at_stop = 0
            started = time.monotonic()
            for wave in range(WAVES):
                batch = await _queue_wave(conn, wave, CONVERSATIONS // WAVES)
                ids += batch
                now = datetime.now(UTC)
                await asyncio.gather(
                    *(
                        bus.publish(
                            new_event(
                                EventType.CONVERSATION_QUEUED,
                                account="chaos",
                                key=(cid, "chaos"),
                                conversation_id=cid,
                                occurred_at=now,
                                data=ConversationQueued(
                                    queue="general", workstream="main", language="en", queued_at=now
                                ).model_dump(mode="json"),
                            )
                        )
                        for cid in batch
                    )
                )
                if wave == WAVES // 2:
                    assigned_at_stop = await _assigned(conn, ids)
                    victim = chaos.deployment.procs["distribute-2"]
                    stopped = await victim.terminate(GRACE * 3)
                await asyncio.sleep(0.3 + 2 * SCALE)

            async def all_active() -> bool:
                return await _assigned(conn, ids) == len(ids)

            async def where() -> str:
                rows = await conn.fetch(
                    "SELECT state, count(*) FROM conversations GROUP BY 1 ORDER BY 1"
                )
                return f": {[tuple(r) for r in rows]}"

            await wait_until(all_active, 60 + 200 * SCALE, 0.25, "all assigned", where)
            elapsed = time.monotonic() - started
        finally:
            await bus.close()

        try:
            assert stopped is not None
            code, drain = stopped
            assert code == 0, f"the SIGTERM'd replica exited {code}"
            assert drain <= GRACE + 2, f"the SIGTERM'd replica took {drain:.1f} s to drain"
            assert 0 < assigned_at_stop < CONVERSATIONS, "the SIGTERM did not land mid-run"
            survivors = [p for n, p in chaos.deployment.procs.items() if n != "distribute-2"]
            assert all(p.alive for p in survivors)

            assignments = await conn.fetch(
                "SELECT conversation_id, agent_id FROM assignments WHERE released_at IS NULL"
            )
            assert len(assignments) == CONVERSATIONS, "a conversation assigned twice (or never)"
            assert len({a["conversation_id"] for a in assignments}) == CONVERSATIONS
            problems = await capacity_problems(chaos.db)
            assert not problems, problems
            mismatched = await conn.fetchval(
                "SELECT count(*) FROM conversations c JOIN assignments s"
                " ON s.conversation_id = c.id AND s.released_at IS NULL"
                " WHERE c.agent_id <> s.agent_id"
            )
            assert mismatched == 0
            pending = await conn.fetchval("SELECT count(*) FROM offers WHERE state = 'pending'")
            assert pending == 0, f"{pending} offers left pending with auto-accept"
        finally:
            await conn.close()
        print(
            f"\ndistribute: {CONVERSATIONS} conversations, {AGENTS} agents x {CAPACITY},"
            f" SIGTERM at {assigned_at_stop} assigned, drained in {drain:.2f} s (exit {code}),"
            f" all assigned in {elapsed:.1f} s, 0 double assignments, 0 over capacity"
        )


async def _assigned(conn: asyncpg.Connection, ids: list[str]) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM conversations WHERE id = ANY($1::uuid[]) AND state = 'active'",
            ids,
        )
    )
