"""``bench.history.seed_history`` on a private database: the rows it promises, consistent
with each other and with what the pipeline would have left (released assignments, the
contact's latest agent, the outbox at or below the relay's watermark)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from bench.history import CUSTOMER_PREFIX, seed_history
from omniroute.infra.database import create_database, drop_database
from omniroute.infra.store import migrate
from tests.conftest import Infra

CONVERSATIONS = 2000


@pytest.fixture
async def database(infra: Infra) -> AsyncIterator[str]:
    """A migrated database of this test's own (the session's is shared with other tests)."""
    name = f"omniroute_test_history_{uuid.uuid4().hex[:10]}"
    dsn = urlunsplit(urlsplit(infra.database_url)._replace(path=f"/{name}"))
    await create_database(dsn)
    try:
        await migrate(dsn)
        yield dsn
    finally:
        await drop_database(dsn)


async def _count(conn: asyncpg.Connection[asyncpg.Record], sql: str) -> int:
    return int(await conn.fetchval(sql))


async def _watermark(conn: asyncpg.Connection[asyncpg.Record]) -> tuple[str, int]:
    row = await conn.fetchrow("SELECT txid::text AS txid, seq FROM outbox_watermark")
    assert row is not None
    return row["txid"], row["seq"]


async def test_seeded_history_is_consistent(database: str) -> None:
    now = datetime.now(UTC)
    counts = await seed_history(database, CONVERSATIONS, agents=7, chunk=700, now=now, seed=1)
    expected = {
        "agents": 7,
        "contacts": CONVERSATIONS // 3,
        "contact_agents": CONVERSATIONS // 3,
        "conversations": CONVERSATIONS,
        "messages": 3 * CONVERSATIONS,
        "offers": CONVERSATIONS,
        "assignments": CONVERSATIONS,
        "timers": 2 * CONVERSATIONS,
        "outbox": CONVERSATIONS,
        "surveys": CONVERSATIONS // 4,
    }
    assert {k: v for k, v in counts.items() if k != "triggers_off"} == expected
    conn = await asyncpg.connect(database)
    try:
        for table, count in expected.items():
            assert await _count(conn, f"SELECT count(*) FROM {table}") == count, table
        # Closed history only, all of it in the past, none of it on today's partial indexes.
        assert await _count(conn, "SELECT count(*) FROM conversations WHERE state <> 'closed'") == 0
        span = await conn.fetchrow("SELECT min(opened_at), max(closed_at) FROM conversations")
        assert span is not None
        oldest, newest = span
        assert now - timedelta(days=366) < oldest and newest < now
        recent = "SELECT count(*) FROM messages WHERE created_at > now() - '1 hour'::interval"
        assert await _count(conn, recent) == 0
        assert await _count(conn, "SELECT count(*) FROM timers WHERE fired_at IS NULL") == 0
        assert await _count(conn, "SELECT count(*) FROM offers WHERE state <> 'accepted'") == 0
        assert await _count(conn, "SELECT count(*) FROM agents WHERE presence <> 'offline'") == 0
        # Written with triggers off: the foreign keys hold all the same.
        for child, parent, column in (
            ("conversations", "contacts", "contact_id"),
            ("conversations", "agents", "agent_id"),
            ("messages", "conversations", "conversation_id"),
            ("assignments", "conversations", "conversation_id"),
            ("offers", "conversations", "conversation_id"),
            ("timers", "conversations", "conversation_id"),
            ("surveys", "conversations", "conversation_id"),
            ("contact_agents", "contacts", "contact_id"),
            ("contact_agents", "agents", "agent_id"),
        ):
            orphans = await _count(
                conn,
                f"SELECT count(*) FROM {child} c LEFT JOIN {parent} p ON p.id = c.{column}"
                " WHERE p.id IS NULL",
            )
            assert orphans == 0, f"{child}.{column}"
        # Every closed conversation has exactly one assignment, released when it closed.
        assert (
            await _count(
                conn,
                "SELECT count(*) FROM conversations c WHERE NOT EXISTS (SELECT 1 FROM assignments"
                " a WHERE a.conversation_id = c.id AND a.released_at = c.closed_at"
                " AND a.agent_id = c.agent_id)",
            )
            == 0
        )
        assert await _count(conn, "SELECT count(*) FROM assignments WHERE released_at IS NULL") == 0
        # Returning customers; each contact's affinity is its latest assignment.
        assert (
            await _count(conn, "SELECT count(DISTINCT contact_id) FROM conversations")
            == (expected["contacts"])
        )
        mismatched = await _count(
            conn,
            """
            SELECT count(*) FROM contacts ct
            LEFT JOIN contact_agents ca ON ca.contact_id = ct.id
            LEFT JOIN (
                SELECT DISTINCT ON (p.contact_id) p.contact_id, s.agent_id, s.assigned_at
                FROM assignments s JOIN conversations p ON p.id = s.conversation_id
                ORDER BY p.contact_id, s.assigned_at DESC
            ) latest ON latest.contact_id = ct.id
            WHERE (ca.agent_id, ca.assigned_at)
                IS DISTINCT FROM (latest.agent_id, latest.assigned_at)
            """,
        )
        assert mismatched == 0
        # The outbox history is published as far as the relay knows: at or below its watermark.
        above = await _count(
            conn,
            "SELECT count(*) FROM outbox o, outbox_watermark w"
            " WHERE (o.txid, o.seq) > (w.txid, w.seq)",
        )
        assert above == 0
        assert await _watermark(conn) == ("1", CONVERSATIONS)
        # Analyzed (autovacuum may be off): the planner knows the table's size.
        reltuples = await conn.fetchval(
            "SELECT reltuples FROM pg_class WHERE relname = 'conversations'"
        )
        assert reltuples == CONVERSATIONS

        # Seeding again appends: new customers, the watermark only moves forward.
        more = await seed_history(database, 30, vacuum=False)
        assert more["agents"] == 7 and more["contacts"] == more["contact_agents"] == 10
        assert await _count(conn, "SELECT count(*) FROM contacts") == expected["contacts"] + 10
        assert (
            await _count(
                conn, f"SELECT count(*) FROM contacts WHERE address NOT LIKE '{CUSTOMER_PREFIX}%'"
            )
            == 0
        )
        assert await _watermark(conn) == ("1", CONVERSATIONS + 30)
    finally:
        await conn.close()
