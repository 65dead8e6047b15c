"""``python -m bench``: run the benchmarks, print a table of ratios, write bench/results.json."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from bench import classify_stage, distribution, outbound_stage
from bench.infra import bench_infra
from omniroute.logging import configure_logging


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    # Each benchmark in a database and vhost of its own: none sees another's leftovers.
    if "classify" in args.only:
        async with bench_infra() as infra:
            results += await classify_stage.run(infra, count=args.count)
    if "distribution" in args.only:
        async with bench_infra() as infra:
            results += await distribution.run(infra)
    if "outbound" in args.only:
        async with bench_infra() as infra:
            results += await outbound_stage.run(infra)
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'figure':<56} {'value':>10} {'baseline':>10} {'ratio':>7}  goal  (baseline)"]
    for r in results:
        lines.append(
            f"{r['figure']:<56} {r['value']:>10} {r['baseline_value']:>10} {r['ratio']:>7}  "
            f"{r['goal']}  ({r['baseline']})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--only", nargs="*", default=["classify", "distribution", "outbound"])
    parser.add_argument("--count", type=int, default=3000)
    arguments = parser.parse_args()
    configure_logging("console", "warning")
    output = asyncio.run(main(arguments))
    print(table(output))
    Path(__file__).with_name("results.json").write_text(json.dumps(output, indent=2))
