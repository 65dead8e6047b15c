"""Twilio's webhook connection overrides: the ``#ct=…&rt=…&tt=…&rc=…&rp=…`` URL fragment.

Documented at https://www.twilio.com/docs/usage/webhooks/webhooks-connection-overrides:
a webhook URL may end in a fragment that overrides how Twilio connects, waits and retries.
Twilio strips the fragment before the request (a server never sees it) and signs the URL
without it. Without a fragment Twilio sends a webhook once, retries once only when the
connection fails, and gives every attempt together 15 s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl

import aiohttp

MS = 1000.0

DEFAULT_CONNECT_TIMEOUT_MS = 5_000
CONNECT_TIMEOUT_RANGE_MS = (100, 10_000)
DEFAULT_READ_TIMEOUT_MS = 15_000
READ_TIMEOUT_RANGE_MS = (100, 15_000)
DEFAULT_TOTAL_TIME_MS = 15_000
TOTAL_TIME_RANGE_MS = (100, 15_000)
DEFAULT_RETRY_COUNT = 1
RETRY_COUNT_RANGE = (0, 5)

#: What a failed attempt was, in the retry policy's words: ``ct`` the TCP connection failed
#: or timed out, ``rt`` the answer did not come within the read timeout, ``4xx``/``5xx`` an
#: HTTP answer of that class. ``other`` (e.g. the server closed the connection without an
#: answer) has no word of its own: only ``all`` retries it.
FailureClass = Literal["ct", "rt", "4xx", "5xx", "other"]
RETRY_CONDITIONS: frozenset[FailureClass] = frozenset({"ct", "rt", "4xx", "5xx"})
RETRY_ALL = "all"
DEFAULT_RETRY_POLICY: frozenset[FailureClass] = frozenset({"ct"})


@dataclass(frozen=True)
class ConnectionOverrides:
    """How one webhook is delivered; times in milliseconds, as the fragment spells them."""

    connect_timeout_ms: int = DEFAULT_CONNECT_TIMEOUT_MS
    read_timeout_ms: int = DEFAULT_READ_TIMEOUT_MS
    total_time_ms: int = DEFAULT_TOTAL_TIME_MS
    retry_count: int = DEFAULT_RETRY_COUNT
    retry_policy: frozenset[FailureClass] = DEFAULT_RETRY_POLICY

    @property
    def total_time(self) -> float:
        """The budget of all attempts together, in seconds."""
        return self.total_time_ms / MS

    def retries(self, failure: FailureClass) -> bool:
        """Whether the policy retries an attempt that failed this way."""
        return failure in self.retry_policy

    def client_timeout(self, remaining: float) -> aiohttp.ClientTimeout:
        """aiohttp's timeout for one attempt, given ``remaining`` seconds of the budget."""
        return aiohttp.ClientTimeout(
            total=remaining,
            sock_connect=self.connect_timeout_ms / MS,
            sock_read=self.read_timeout_ms / MS,
        )


DEFAULT_OVERRIDES = ConnectionOverrides()


def _clamped(raw: str, bounds: tuple[int, int], default: int) -> int:
    # Twilio does not document what it does with a bad value. Here a value that is not an
    # integer is ignored (the default applies) and an integer out of range is clamped into
    # it, so "#rc=9" still means "as many retries as Twilio allows".
    try:
        value = int(raw)
    except ValueError:
        return default
    low, high = bounds
    return min(max(value, low), high)


def _policy(raw: str) -> frozenset[FailureClass]:
    # Unknown words are ignored; a policy with no known word keeps the default (``ct``).
    words = {word.strip().lower() for word in raw.split(",")}
    if RETRY_ALL in words:
        return frozenset({*RETRY_CONDITIONS, "other"})
    chosen = frozenset(c for c in RETRY_CONDITIONS if c in words)
    return chosen or DEFAULT_RETRY_POLICY


def parse_overrides(fragment: str) -> ConnectionOverrides:
    """Read a URL fragment (without ``#``).

    ``e`` (egress edge) and ``sni`` are accepted and change nothing here; other unknown keys
    are ignored too; bad values fall back as ``_clamped`` and ``_policy`` say.
    """
    values = dict(parse_qsl(fragment, keep_blank_values=True))
    defaults = DEFAULT_OVERRIDES
    return ConnectionOverrides(
        connect_timeout_ms=_clamped(
            values.get("ct", ""), CONNECT_TIMEOUT_RANGE_MS, defaults.connect_timeout_ms
        ),
        read_timeout_ms=_clamped(
            values.get("rt", ""), READ_TIMEOUT_RANGE_MS, defaults.read_timeout_ms
        ),
        total_time_ms=_clamped(values.get("tt", ""), TOTAL_TIME_RANGE_MS, defaults.total_time_ms),
        retry_count=_clamped(values.get("rc", ""), RETRY_COUNT_RANGE, defaults.retry_count),
        retry_policy=_policy(values["rp"]) if "rp" in values else defaults.retry_policy,
    )


def split_webhook_url(url: str) -> tuple[str, ConnectionOverrides]:
    """Return the URL Twilio requests (and signs), without its fragment, and the overrides.

    Only the first ``#`` counts; the URL before it is returned byte for byte, so the
    signature covers exactly what the server will rebuild.
    """
    target, hashmark, fragment = url.partition("#")
    return target, parse_overrides(fragment) if hashmark else DEFAULT_OVERRIDES
