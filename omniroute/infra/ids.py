"""Identifiers of stored rows: UUIDv7 (RFC 9562), time-ordered.

A random UUIDv4 primary key puts every insert on a random leaf of its index: once the
indexes outgrow memory (a year of conversations and messages), each insert reads and
dirties a page nobody touched lately. UUIDv7 starts with the millisecond, so new rows land
at the right edge of the primary key (and of indexes that lead with a conversation id),
where the pages are hot. They stay unique and unguessable (74 random bits) and are still
``uuid`` in PostgreSQL and in the event contract. Event ids stay UUIDv5 (derived from their
cause, so a redelivery makes the same id).
"""

from __future__ import annotations

import uuid

from uuid6 import uuid7


def new_id() -> uuid.UUID:
    """A new time-ordered identifier for a stored row."""
    return uuid.UUID(int=uuid7().int)
