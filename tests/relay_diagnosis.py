"""What holds the outbox relay back, attached to a failing test's report.

Twice a CI run failed with every later event-waiting test timing out: the relay of the run's
database had stopped publishing (a leader that no longer publishes, or a transaction left
open that keeps the horizon down), and the report could not say which. This reads, from a
connection of its own in a thread (the session's event loop is not running between tests),
who leads, which transactions are open in the database, and the unpublished backlog.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import asyncpg

from omniroute.infra.outbox import OUTBOX_LOCK

SESSIONS = """
SELECT a.pid, a.application_name, a.state, a.backend_xid::text AS xid,
       now() - a.xact_start AS in_transaction, now() - a.backend_start AS connected,
       left(regexp_replace(a.query, '\\s+', ' ', 'g'), 140) AS query,
       EXISTS (SELECT 1 FROM pg_locks l
               WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.granted
                 AND l.classid = 0 AND l.objid = $1 AND l.objsubid = 1) AS leader
FROM pg_stat_activity a
WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
ORDER BY leader DESC, a.xact_start NULLS LAST
"""
BACKLOG = """
SELECT count(*) FROM outbox o, outbox_watermark w WHERE (o.txid, o.seq) > (w.txid, w.seq)
"""


async def _describe(database_url: str) -> str:
    conn = await asyncpg.connect(database_url, timeout=3, command_timeout=5)
    try:
        rows = await conn.fetch(SESSIONS, OUTBOX_LOCK)
        backlog = await conn.fetchval(BACKLOG)
    finally:
        await conn.close()
    lines = [f"unpublished outbox rows: {backlog}; sessions of the test database: {len(rows)}"]
    for r in rows:
        if r["leader"] or r["xid"] is not None or r["state"] not in ("idle", None):
            lines.append(
                f"  pid {r['pid']}{' LEADER' if r['leader'] else ''} {r['state']}"
                f" xid={r['xid']} in_tx={r['in_transaction']} connected={r['connected']}"
                f" app={r['application_name']!r} query={r['query']!r}"
            )
    if not any(r["leader"] for r in rows):
        lines.append("  no session holds the outbox lock: no relay is leading")
    return "\n".join(lines)


def describe_relay(database_url: str) -> str:
    """A few lines on the relay's state; never raises (a report must still be written)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            return pool.submit(asyncio.run, _describe(database_url)).result(timeout=15)
        except Exception as exc:
            return f"could not read the relay's state: {type(exc).__name__}: {exc}"
