"""Identifiers of stored rows: UUIDv7 (RFC 9562), time-ordered.

A random UUIDv4 primary key puts every insert on a random leaf of its index: once the
indexes outgrow memory (a year of conversations and messages), each insert reads and
dirties a page nobody touched lately. UUIDv7 starts with the millisecond, so new rows land
at the right edge of the primary key (and of indexes that lead with a conversation id),
where the pages are hot. They are still ``uuid`` in PostgreSQL and in the event contract.
Event ids stay UUIDv5 (derived from their cause, so a redelivery makes the same id).

Monotonic within a process by RFC 9562's "fixed bit-length dedicated counter" (section
6.2, method 1), laid out as the LiosK/uuidv7 implementations do: after the 48-bit
millisecond, a 42-bit counter (``rand_a`` and the top 30 bits of ``rand_b``) that starts
at a random value with its top bit clear whenever the millisecond changes and counts up
within it, then 32 random bits. The timestamp stays the clock's: the ``uuid6`` package
used before kept order by adding a millisecond per id made in the same millisecond, so a
burst of 5 000 ids ran five seconds ahead of the clock. Only a clock that steps back (or
2^41 ids in one millisecond) holds the timestamp at the last one used.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid

_COUNTER_BITS = 42
_COUNTER_MAX = (1 << _COUNTER_BITS) - 1


class Ids:
    """A UUIDv7 source: the (millisecond, counter) state behind the ids of one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._counter = 0

    def _next(self, now_ms: int) -> tuple[int, int]:
        with self._lock:
            if now_ms > self._last_ms:
                self._last_ms, self._counter = now_ms, secrets.randbits(_COUNTER_BITS - 1)
            elif self._counter < _COUNTER_MAX:
                self._counter += 1
            else:  # the counter is spent within this millisecond: borrow the next one
                self._last_ms += 1
                self._counter = secrets.randbits(_COUNTER_BITS - 1)
            return self._last_ms, self._counter

    def new(self, now_ms: int | None = None) -> uuid.UUID:
        """The next id (``now_ms``: the clock, for tests)."""
        ms, counter = self._next(time.time_ns() // 1_000_000 if now_ms is None else now_ms)
        rand_a = counter >> 30  # 12 bits
        rand_b = ((counter & ((1 << 30) - 1)) << 32) | secrets.randbits(32)  # 62 bits
        value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
        return uuid.UUID(int=value)


_IDS = Ids()


def new_id() -> uuid.UUID:
    """A new time-ordered identifier for a stored row."""
    return _IDS.new()
