"""The registry of running processes: who runs, in which role, on which configuration.

Each process upserts its row in ``processes`` every ``HEARTBEAT_INTERVAL`` seconds (and at
once after a reload), so ``omniroute config reload`` knows whose answers to wait for and
``omniroute status`` can show each process's configuration hash. Nothing has to deregister
for the registry to stay true: a row whose heartbeat is older than ``LIVE_WITHIN`` belongs
to a process that is gone (killed, its host lost) and is ignored; after ``PRUNE_AFTER`` any
process's heartbeat deletes it. A process that stops cleanly deletes its own row.

A process registers once it listens for reload requests (``Service``), so every live row is
a process that can answer one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeAlias

import asyncpg
import structlog

from omniroute.errors import StoreUnavailable
from omniroute.infra.background import Background
from omniroute.infra.store import Connection, Store
from schemas.events import utcnow

log = structlog.get_logger("omniroute.processes")

# A pooled connection (the running process) or one of its own (the one-shot commands).
Conn: TypeAlias = "Connection | asyncpg.Connection[asyncpg.Record]"

HEARTBEAT_INTERVAL = 5.0  # seconds between upserts of a running process's row
LIVE_WITHIN = 4 * HEARTBEAT_INTERVAL  # a heartbeat older than this: the process is gone
PRUNE_AFTER = 60.0  # seconds after its last heartbeat a row is deleted


@dataclass(frozen=True)
class ProcessIdentity:
    """Who this process is: ``id`` is unique per process start (a pid is reused, and tests
    start several services in one process), ``label`` is what an operator reads."""

    host: str
    pid: int
    role: str
    stages: tuple[str, ...]
    started_at: datetime = field(default_factory=utcnow)
    nonce: str = field(default_factory=lambda: f"{time.time_ns():x}")

    @classmethod
    def this_process(cls, role: str, stages: Sequence[str]) -> ProcessIdentity:
        return cls(host=socket.gethostname(), pid=os.getpid(), role=role, stages=tuple(stages))

    @property
    def id(self) -> str:
        return f"{self.host}:{self.pid}:{self.nonce}"

    @property
    def label(self) -> str:
        return f"{self.host}:{self.pid}:{self.role}"


@dataclass(frozen=True)
class ProcessRow:
    """A live process as the registry has it."""

    id: str
    host: str
    pid: int
    role: str
    stages: tuple[str, ...]
    config_hash: str
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age: float  # seconds, by the database's clock

    @property
    def label(self) -> str:
        return f"{self.host}:{self.pid}:{self.role}"


async def beat(conn: Conn, identity: ProcessIdentity, config_hash: str) -> None:
    """Upsert this process's row with the configuration hash it runs now."""
    await conn.execute(
        "INSERT INTO processes"
        " (id, host, pid, role, stages, config_hash, started_at, heartbeat_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, now())"
        " ON CONFLICT (id) DO UPDATE"
        " SET config_hash = EXCLUDED.config_hash, heartbeat_at = EXCLUDED.heartbeat_at",
        identity.id,
        identity.host,
        identity.pid,
        identity.role,
        list(identity.stages),
        config_hash,
        identity.started_at,
    )


def _ago(seconds: float) -> str:
    """``now() - <seconds>`` as SQL, the number written in: the planner folds it to a value
    when estimating, so the heartbeat index is used even in a generic plan (a bound
    parameter there would be estimated as a third of the table)."""
    return f"now() - make_interval(secs => {float(seconds)!r})"


def prune_sql(older_than: float = PRUNE_AFTER) -> str:
    return f"DELETE FROM processes WHERE heartbeat_at < {_ago(older_than)}"


def live_sql(within: float = LIVE_WITHIN) -> str:
    return (
        "SELECT id, host, pid, role, stages, config_hash, started_at, heartbeat_at,"
        " extract(epoch FROM now() - heartbeat_at)::float8 AS age"
        f" FROM processes WHERE heartbeat_at > {_ago(within)}"
        " ORDER BY host, pid, id"
    )


async def prune(conn: Conn, older_than: float = PRUNE_AFTER) -> int:
    """Delete rows whose heartbeat is older than ``older_than`` seconds; how many."""
    result = await conn.execute(prune_sql(older_than))
    return int(result.split()[-1])


async def live_processes(conn: Conn, within: float = LIVE_WITHIN) -> list[ProcessRow]:
    """The processes whose heartbeat is at most ``within`` seconds old, by label."""
    rows = await conn.fetch(live_sql(within))
    return [
        ProcessRow(
            id=r["id"],
            host=r["host"],
            pid=r["pid"],
            role=r["role"],
            stages=tuple(r["stages"]),
            config_hash=r["config_hash"],
            started_at=r["started_at"],
            heartbeat_at=r["heartbeat_at"],
            heartbeat_age=max(0.0, float(r["age"])),
        )
        for r in rows
    ]


async def forget(conn: Conn, identity: ProcessIdentity) -> None:
    await conn.execute("DELETE FROM processes WHERE id = $1", identity.id)


class ProcessHeartbeat(Background):
    """Keeps this process's row fresh; ``wake()`` after a reload publishes the new hash now."""

    task_name = "process-heartbeat"

    def __init__(
        self,
        store: Store,
        identity: ProcessIdentity,
        current_hash: Callable[[], str],
        *,
        interval: float = HEARTBEAT_INTERVAL,
        prune_after: float = PRUNE_AFTER,
    ) -> None:
        super().__init__()
        self._store = store
        self.identity = identity
        self._current_hash = current_hash
        self._interval = interval
        self._prune_after = prune_after
        self._stopping = False

    async def beat_once(self) -> None:
        """One upsert and prune. Raises StoreUnavailable."""
        async with self._store.transaction() as conn:
            await beat(conn, self.identity, self._current_hash())
            await prune(conn, self._prune_after)

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                await self.beat_once()
            except StoreUnavailable as exc:
                log.warning("processes.heartbeat_failed", error=str(exc))
            if self._stopping:
                return
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result when it
            # is cancelled just as the wake arrives, swallowing the cancellation (fixed in
            # 3.12, python/cpython#86296); this loop then outlived its process's stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()

    async def stop(self, within: float = 10.0) -> None:
        """Stop beating, then delete this process's row (best effort: a row left behind
        stops counting as live after ``LIVE_WITHIN`` anyway).

        A beat in flight is let finish, not cancelled: cancelled mid-transaction, its upsert
        could land after the delete and show a stopped process as live. Only a beat stuck
        on an unreachable database is cancelled, after ``within`` seconds."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        done, _ = await asyncio.wait({task}, timeout=within)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
            log.warning("background.stop_timed_out", task=self.task_name)
        try:
            async with asyncio.timeout(within):
                async with self._store.transaction() as conn:
                    await forget(conn, self.identity)
        except (StoreUnavailable, TimeoutError):
            log.warning("processes.forget_failed", process=self.identity.label)
