"""Shared pieces of the fuzz suite: the scale knob, request statistics, hypothesis settings.

``OMNIROUTE_FUZZ_EXAMPLES`` is the only scale knob: every generated test runs that many
examples (the default keeps the whole suite well under a minute). Every request the fuzzed
router answers is counted by a middleware, so a big run can report what it sent.
"""

from __future__ import annotations

import os
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from hypothesis import HealthCheck, settings

EXAMPLES = max(1, int(os.environ.get("OMNIROUTE_FUZZ_EXAMPLES", "25")))

# Generated tests may run for long with a big OMNIROUTE_FUZZ_EXAMPLES: the per-test timeout
# grows with it (0.1 s per example on top of the project's two minutes).
TIMEOUT = pytest.mark.timeout(120 + EXAMPLES // 10)


def fuzz_settings(examples: int = EXAMPLES) -> settings:
    """Hypothesis settings of the suite: the scale knob, no deadline, no example database."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


@dataclass
class Stats:
    """What the fuzzed routers answered, over the whole session."""

    statuses: Counter[int] = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)
    events: int = 0

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    def summary(self) -> str:
        seen = ", ".join(f"{status}: {n}" for status, n in sorted(self.statuses.items()))
        return (
            f"fuzz: {self.requests} requests, {self.events} events published;"
            f" statuses {{{seen}}}; unhandled exceptions {len(self.crashes)}"
        )


STATS = Stats()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def counting(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every answer by status; remember every exception a handler let escape."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        STATS.statuses[exc.status] += 1
        raise
    except Exception as exc:
        STATS.statuses[500] += 1
        summary = "".join(traceback.format_exception_only(exc)).strip()
        STATS.crashes.append(f"{request.method} {request.path_qs[:200]}: {summary[:500]}")
        raise
    STATS.statuses[response.status] += 1
    return response


class CrashWatch:
    """The unhandled exceptions (answered 500) since the watch started."""

    def __init__(self) -> None:
        self.start = len(STATS.crashes)

    def new(self) -> list[str]:
        return STATS.crashes[self.start :]
