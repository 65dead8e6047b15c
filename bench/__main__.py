"""``python -m bench`` (``make bench``): run the benchmarks, print a table of ratios, write
``bench/results.json``.

Every figure is printed next to a baseline measured in the same run on the same machine;
each benchmark gets a database and a vhost of its own. ``--quick`` is a short smoke run;
``--soak SECONDS`` adds the long soak run (the issue's: ``--soak 1800``), ``--soak-quick``
a 60-second one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import (
    bot_stage,
    classify_stage,
    distribution,
    end_to_end,
    flatness,
    ingress,
    outbound_stage,
    overload,
    stages,
)
from bench.infra import BenchInfra, bench_infra
from omniroute.infra.logging import configure_logging

Bench = Callable[[BenchInfra], Awaitable[list[dict[str, Any]]]]
ALL = (
    "ingress",
    "stages",
    "end-to-end",
    "overload",
    "classify",
    "distribution",
    "outbound",
    "flatness",
    "bot",
)


def benchmarks(args: argparse.Namespace) -> dict[str, Bench]:
    quick = args.quick
    return {
        "ingress": lambda i: ingress.run(
            i, count=2000 if quick else 5000, rounds=1 if quick else 3
        ),
        "stages": lambda i: stages.run(i, count=1000 if quick else 3000),
        "end-to-end": lambda i: end_to_end.run(
            i, rate=args.rate, seconds=5 if quick else 60, also_at=args.calm_rate
        ),
        "overload": lambda i: overload.run(
            i,
            probe_seconds=3 if quick else 10,
            overload_seconds=10 if quick else 60,
            calm_seconds=30 if quick else 120,
        ),
        "classify": lambda i: classify_stage.run(i, count=1000 if quick else 3000),
        "distribution": lambda i: distribution.run(i, seconds=3 if quick else 10),
        "outbound": lambda i: outbound_stage.run(i, count=300 if quick else 1000),
        "flatness": lambda i: flatness.run(
            i,
            conversations=args.history or (100_000 if quick else 1_000_000),
            stage_count=1000 if quick else 3000,
            e2e_seconds=5 if quick else 30,
            rounds=1 if quick else 2,
        ),
        "bot": lambda i: bot_stage.run(
            i,
            count=500 if quick else 2000,
            history=args.history or (10_000 if quick else 100_000),
        ),
    }


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    chosen = benchmarks(args)
    for name in args.only:
        started = time.perf_counter()
        async with bench_infra() as infra:
            figures = await chosen[name](infra)
        for figure in figures:
            figure["benchmark"] = name
        results += figures
        print(f"# {name}: {len(figures)} figure(s) in {time.perf_counter() - started:.0f} s")
    soak_seconds = args.soak or (60.0 if args.soak_quick else 0.0)
    if soak_seconds:
        started = time.perf_counter()
        async with bench_infra() as infra:
            figures = await end_to_end.soak(infra, rate=args.soak_rate, seconds=soak_seconds)
        results += [{**f, "benchmark": "soak"} for f in figures]
        print(f"# soak: {len(figures)} figure(s) in {time.perf_counter() - started:.0f} s")
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'figure':<62} {'value':>10} {'baseline':>10} {'ratio':>7}  goal  (baseline)"]
    for r in results:
        lines.append(
            f"{r['figure']:<62} {r['value']:>10} {r['baseline_value']:>10} {r['ratio']!s:>7}  "
            f"{r['goal']}  ({r['baseline']})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--only", nargs="*", choices=ALL, default=list(ALL))
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--rate", type=float, default=300.0, help="end-to-end arrivals/s")
    parser.add_argument(
        "--calm-rate", type=float, default=100.0, help="a second end-to-end run (0: none)"
    )
    parser.add_argument("--soak", type=float, default=0.0, help="soak run length, seconds")
    parser.add_argument("--soak-rate", type=float, default=100.0)
    parser.add_argument("--soak-quick", action="store_true", help="a 60-second soak run")
    parser.add_argument("--history", type=int, default=0, help="flatness: stored conversations")
    arguments = parser.parse_args()
    configure_logging("console", "warning")
    output = asyncio.run(main(arguments))
    print(table(output))
    meta = {
        "machine": platform.node(),
        "python": platform.python_version(),
        "args": vars(arguments),
    }
    Path(__file__).with_name("results.json").write_text(
        json.dumps({"run": meta, "figures": output}, indent=2)
    )
