"""Flatness: the pipeline on a database holding ``conversations`` stored conversations of
history against the same pipeline on an empty one, in the same run.

The history (``bench.history.seed_history``: closed conversations over a year, their
messages, offers, released assignments, fired timers, published outbox rows, surveys;
written with COPY, then ``VACUUM ANALYZE`` since autovacuum may be off) is seeded once into
a template database. Each measurement then runs on both sides, each time on a database and a
vhost of its own: a file copy (``CREATE DATABASE … TEMPLATE … STRATEGY FILE_COPY``) of the
empty migrated database, or one of the seeded template — the same way of making a database
for both sides. With ``rounds`` > 1 the pair is repeated, the side going first alternating,
and each side's best round counts (load from elsewhere on the machine only makes a round
worse). The measurements are the other benchmarks' own harnesses:

* ``bench.stages.measure``: messages per second of each stage alone in its process;
* ``bench.distribution.run_once``: assignments per second for a burst of queued
  conversations (one ``distribute`` replica) — the cost of the distribution cycle;
* ``bench.end_to_end.measure``: webhook → ``conversation.assigned`` p99 at a moderate rate.

Goals (the day-100 issue): each stage's throughput and the burst's ≥ 0.9 × empty; the
end-to-end p99 ≤ 1.2 × empty.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from bench import distribution, end_to_end, stages
from bench.history import seed_history
from bench.infra import BenchInfra, private_vhost
from omniroute.infra.database import drop_database

Measure = Callable[[BenchInfra], Awaitable[dict[str, float]]]


def _with_name(database_url: str, name: str) -> str:
    return urlunsplit(urlsplit(database_url)._replace(path=f"/{name}"))


def _name(database_url: str) -> str:
    return urlsplit(database_url).path.lstrip("/")


async def _clone_database(source_url: str, target: str) -> None:
    admin = await asyncpg.connect(_with_name(source_url, "postgres"))
    try:
        await admin.execute(
            f'CREATE DATABASE "{target}" TEMPLATE "{_name(source_url)}" STRATEGY FILE_COPY'
        )
    finally:
        await admin.close()


@asynccontextmanager
async def _copy_of(source_url: str) -> AsyncIterator[BenchInfra]:
    """A database copied from ``source_url`` and a fresh vhost, dropped afterwards."""
    suffix = uuid.uuid4().hex[:8]
    database_url = _with_name(source_url, f"omniroute_bench_{suffix}")
    await _clone_database(source_url, _name(database_url))
    try:
        async with private_vhost(suffix) as amqp_url:
            yield BenchInfra(amqp_url, database_url)
    finally:
        await drop_database(database_url)


async def _setting(database_url: str, name: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        return str(await conn.fetchval(f"SHOW {name}"))
    finally:
        await conn.close()


LOWER_IS_BETTER = ("p99_ms", "p50_ms")


def _best(old: dict[str, float] | None, new: dict[str, float]) -> dict[str, float]:
    """Per figure, the better of two rounds (more throughput, less latency); conversations
    lost add up (a loss in any round counts)."""
    if old is None:
        return new
    return {
        k: old[k] + new[k]
        if k == "lost"
        else (min if k in LOWER_IS_BETTER else max)(old[k], new[k])
        for k in new
    }


def _figure(name: str, seeded: float, empty: float, goal: str, **extra: Any) -> dict[str, Any]:
    return {
        "figure": name,
        "value": seeded,
        "baseline": "same, empty database",
        "baseline_value": empty,
        "ratio": round(seeded / empty, 3) if empty else None,
        "goal": goal,
        **extra,
    }


async def run(
    infra: BenchInfra,
    *,
    conversations: int,
    stage_count: int = 3000,
    burst: int = 3000,
    e2e_rate: float = 100.0,
    e2e_seconds: float = 30.0,
    rounds: int = 1,
    settle: float = 5.0,
) -> list[dict[str, Any]]:
    """Each measurement on a copy of the empty database and on a copy of the seeded one,
    ``rounds`` times (each side's best round counts: other load on the machine only ever
    makes a round worse)."""

    async def stage_rates(target: BenchInfra) -> dict[str, float]:
        measured = await stages.measure(target, stage_count)
        return {stage: m["rate"] for stage, m in measured.items()}

    async def burst_rate(target: BenchInfra) -> dict[str, float]:
        once = await distribution.run_once(target, 1, float(burst), 1.0)
        return {"throughput": round(once["throughput"], 1), "assigned": once["assigned"]}

    async def latency(target: BenchInfra) -> dict[str, float]:
        m = await end_to_end.measure(target, e2e_rate, e2e_seconds)
        return {"p99_ms": m["p99_ms"], "p50_ms": m["p50_ms"], "lost": m["lost"]}

    measures: dict[str, Measure] = {
        "stages": stage_rates,
        "distribution": burst_rate,
        "end-to-end": latency,
    }
    template = _with_name(infra.database_url, f"{_name(infra.database_url)}_history")
    await _clone_database(infra.database_url, _name(template))  # migrated, empty
    try:
        autovacuum = await _setting(template, "autovacuum")
        started = time.perf_counter()
        # Outbox rows stamped within the last 5 minutes: none reaches the one-hour retention
        # (the pruner would otherwise be measured catching up) during the run.
        counts = await seed_history(template, conversations, outbox_within=300.0)
        seeding = round(time.perf_counter() - started, 1)
        rows = sum(v for k, v in counts.items() if k not in ("agents", "triggers_off"))
        print(
            f"# flatness: {conversations} conversations ({rows} rows) seeded in {seeding} s"
            f" (COPY, then VACUUM ANALYZE of every table: autovacuum is {autovacuum} here)"
        )
        empty: dict[str, dict[str, float]] = {}
        seeded: dict[str, dict[str, float]] = {}
        for name, measure in measures.items():
            for n in range(rounds):
                # Alternate which side goes first; keep each side's best round.
                sides = [("empty", infra.database_url), ("seeded", template)]
                for side, source in sides if n % 2 == 0 else reversed(sides):
                    async with _copy_of(source) as target:
                        await asyncio.sleep(settle)  # the previous run's vhost and database go
                        got = await measure(target)
                    into = empty if side == "empty" else seeded
                    into[name] = _best(into.get(name), got)
    finally:
        await drop_database(template)
    return _figures(conversations, counts, seeding, autovacuum, empty, seeded, e2e_rate)


def _figures(
    conversations: int,
    counts: dict[str, int],
    seeding: float,
    autovacuum: str,
    empty: dict[str, dict[str, float]],
    seeded: dict[str, dict[str, float]],
    e2e_rate: float,
) -> list[dict[str, Any]]:
    stored = f"with {conversations} stored conversations"
    note = f"history written with COPY, then VACUUM ANALYZE (autovacuum {autovacuum})"
    rows = {k: v for k, v in counts.items() if k != "triggers_off"}
    figures = [
        {
            "figure": f"flatness: seeding {conversations} conversations, s",
            "value": seeding,
            "baseline": f"rows written; {note}",
            "baseline_value": sum(v for k, v in rows.items() if k != "agents"),
            "ratio": None,
            "goal": "information",
            "rows": rows,
        }
    ]
    figures += [
        _figure(
            f"flatness: {stage} msgs/s {stored}",
            seeded["stages"][stage],
            rate,
            "ratio >= 0.9",
            note=note,
        )
        for stage, rate in empty["stages"].items()
    ]
    figures.append(
        _figure(
            f"flatness: distribute burst assignments/s {stored}",
            seeded["distribution"]["throughput"],
            empty["distribution"]["throughput"],
            "ratio >= 0.9",
            note=note,
            assigned={"seeded": seeded["distribution"]["assigned"]},
        )
    )
    at = f"at {e2e_rate:.0f}/s"
    figures += [
        _figure(
            f"flatness: webhook→assigned p99 ms {at} {stored}",
            seeded["end-to-end"]["p99_ms"],
            empty["end-to-end"]["p99_ms"],
            "ratio <= 1.2",
            note=note,
        ),
        _figure(
            f"flatness: webhook→assigned p50 ms {at} {stored}",
            seeded["end-to-end"]["p50_ms"],
            empty["end-to-end"]["p50_ms"],
            "information",
            note=note,
        ),
        _figure(
            f"flatness: conversations lost {at} {stored}",
            seeded["end-to-end"]["lost"],
            empty["end-to-end"]["lost"],
            "value 0",
            note=note,
        ),
    ]
    return figures
