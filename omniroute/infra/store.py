"""PostgreSQL: the asyncpg pool and plain SQL migrations (outbox: ``omniroute.infra.outbox``)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import TypeAlias

import asyncpg
import orjson
import structlog
from asyncpg.pool import PoolConnectionProxy

from omniroute.errors import StoreUnavailable
from omniroute.infra.settings import Settings

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


async def _keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Nothing to reset when a connection goes back to the pool.

    asyncpg's default reset runs ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL`` (a round trip) on every release. Pooled connections here never take session-level
    locks, LISTEN, open cursors outside a transaction or SET session state (the migrator
    uses a connection of its own), so that query is skipped.
    """


class Store:
    """A lazily connected pool: processes start while PostgreSQL is down and recover."""

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 3.0,
        application_name: str = "omniroute",
    ) -> None:
        self._dsn = dsn
        # Shown in pg_stat_activity, so an operator (and a failing test's report) can tell
        # which process holds a lock or a transaction; PostgreSQL keeps 63 bytes of it.
        self._server_settings = {"application_name": application_name[:63]}
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, application_name: str = "omniroute") -> Store:
        return cls(
            settings.database_url.get_secret_value(),
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            connect_timeout=settings.db_connect_timeout,
            application_name=application_name,
        )

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
                        reset=_keep_session,
                        server_settings=self._server_settings,
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

    async def connect(self, purpose: str = "") -> asyncpg.Connection[asyncpg.Record]:
        """A connection of its own, outside the pool (session state: locks, LISTEN)."""
        name = f"{self._server_settings['application_name']} {purpose}".strip()[:63]
        conn: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(
            self._dsn, timeout=self._connect_timeout, server_settings={"application_name": name}
        )
        await init_connection(conn)
        return conn

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
    folder = resources.files("omniroute.infra").joinpath("migrations")
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


class PublishedMarks:
    """ "This one is done" writes in batches: one statement per ``interval`` for every id
    marked meanwhile, instead of a transaction each (the ingress spool forgets webhooks
    whose own publish was confirmed late this way).

    A mark that never lands (the process died, the database was away) only means the work
    is done again later (the spool relay publishes that webhook again; consumers take events
    at least once and recognise them by id), so the guarantee is unchanged.
    """

    def __init__(
        self,
        store: Store,
        interval: float = 0.1,
        batch: int = 500,
        *,
        mark: Callable[[Store, Sequence[str]], Awaitable[None]],
    ) -> None:
        self._store = store
        self._mark = mark
        self._interval = interval
        self._batch = batch
        self._pending: list[str] = []
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add(self, ids: Sequence[str]) -> None:
        self._pending.extend(ids)
        if len(self._pending) >= self._batch:
            self._full.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-marks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(StoreUnavailable):
            await self.flush()

    async def flush(self) -> None:
        ids, self._pending = self._pending, []
        self._full.clear()
        try:
            await self._mark(self._store, ids)
        except StoreUnavailable:
            self._pending[:0] = ids[-10 * self._batch :]  # try again; the relay covers the rest
            raise

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self._interval)
            if self._pending:
                with contextlib.suppress(StoreUnavailable):
                    await self.flush()
