"""PostgreSQL: the asyncpg pool, plain SQL migrations, and the transactional outbox."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, TypeAlias

import asyncpg
import orjson
import structlog
from asyncpg.pool import PoolConnectionProxy

from omniroute.errors import StoreUnavailable
from schemas.events import Envelope

log = structlog.get_logger("omniroute.store")

# Connection-level failures that mean "the database is not there right now", as opposed to
# a bug or bad data. Work hitting them waits for the database instead of being dead-lettered.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.ConnectionFailureError,
    TimeoutError,
)
# What handlers get from ``Store.transaction``: a pooled connection inside a transaction.
Connection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"
_MIGRATION_LOCK = 0x6F6D6E69  # "omni": one migrator at a time


async def init_connection(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name,
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


class Store:
    """A lazily connected pool: processes start while PostgreSQL is down and recover."""

    def __init__(
        self, dsn: str, *, min_size: int = 1, max_size: int = 10, connect_timeout: float = 3.0
    ) -> None:
        self._dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._lock:
            if self._pool is None:
                try:
                    self._pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=self._min_size,
                        max_size=self._max_size,
                        timeout=self._connect_timeout,
                        init=init_connection,
                    )
                except UNAVAILABLE as exc:
                    raise StoreUnavailable(f"database unreachable: {type(exc).__name__}") from exc
            return self._pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """A connection inside a transaction; connection failures become StoreUnavailable."""
        pool = await self.pool()
        try:
            async with pool.acquire() as conn, conn.transaction():
                yield conn
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"database unavailable: {type(exc).__name__}") from exc

    async def ping(self) -> bool:
        try:
            pool = await self.pool()
            async with pool.acquire(timeout=self._connect_timeout) as conn:
                await conn.fetchval("SELECT 1")
            return True
        except Exception:
            return False

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()


def migration_files() -> list[tuple[str, str]]:
    """(name, sql) of every bundled migration, in order."""
    folder = resources.files("omniroute").joinpath("migrations")
    files = sorted((p for p in folder.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name)
    return [(p.name, p.read_text(encoding="utf-8")) for p in files]


async def migrate(dsn: str) -> list[str]:
    """Apply pending migrations in order, each in its own transaction; return their names.

    Idempotent and safe to run from several processes at once (advisory lock). A migration
    whose file changed after it was applied is an error, not silently skipped.
    """
    conn = await asyncpg.connect(dsn)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {
            r["name"]: r["checksum"] for r in await conn.fetch("SELECT * FROM schema_migrations")
        }
        for name, sql in migration_files():
            checksum = hashlib.sha256(sql.encode()).hexdigest()
            if name in done:
                if done[name] != checksum:
                    raise RuntimeError(f"migration {name} changed after it was applied")
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (name, checksum) VALUES ($1, $2)",
                    name,
                    checksum,
                )
            applied.append(name)
            log.info("store.migrated", migration=name)
    finally:
        await conn.close()
    return applied


async def add_to_outbox(conn: Connection, events: Sequence[Envelope]) -> list[Envelope]:
    """Record events in the outbox within the caller's transaction.

    Returns the events actually added: an event whose id is already there (the same cause
    handled twice) is not added again.
    """
    added: list[Envelope] = []
    for event in events:
        row = await conn.fetchval(
            "INSERT INTO outbox (id, routing_key, body) VALUES ($1, $2, $3)"
            " ON CONFLICT (id) DO NOTHING RETURNING id",
            event.id,
            event.type,
            event.model_dump(mode="json"),
        )
        if row is not None:
            added.append(event)
    return added


async def mark_published(store: Store, ids: Sequence[str]) -> None:
    if not ids:
        return
    async with store.transaction() as conn:
        await conn.execute(
            "UPDATE outbox SET published_at = now() WHERE id = ANY($1::uuid[])", list(ids)
        )


async def claim_unpublished(
    conn: Connection, older_than: float, limit: int = 100
) -> list[dict[str, Any]]:
    """Lock a batch of outbox rows nobody published (the relay's work), skipping locked ones."""
    rows = await conn.fetch(
        "SELECT id, routing_key, body FROM outbox"
        " WHERE published_at IS NULL AND created_at < now() - make_interval(secs => $1)"
        " ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        older_than,
        limit,
    )
    return [dict(r) for r in rows]
