"""Row ids are UUIDv7: valid RFC 9562 version 7, unique, and in creation order, so new rows
land at the right edge of their primary key."""

from __future__ import annotations

import time
import uuid

from omniroute.infra.ids import new_id


def test_an_id_is_an_rfc_9562_version_7_uuid() -> None:
    value = new_id()
    assert isinstance(value, uuid.UUID)
    assert value.version == 7
    assert value.variant == uuid.RFC_4122
    assert uuid.UUID(str(value)) == value  # what PostgreSQL's uuid type reads back


def test_the_id_starts_with_a_millisecond_no_earlier_than_the_clock() -> None:
    # Not "<= the clock" as well: uuid6 moves the millisecond one ahead for each id made
    # within the same millisecond, so a burst runs ahead of the clock (reported, issue 15).
    before = time.time_ns() // 1_000_000
    assert new_id().int >> 80 >= before


def test_ids_sort_in_the_order_they_were_made_and_never_repeat() -> None:
    made = [new_id() for _ in range(5000)]  # many within the same millisecond
    assert sorted(made) == made
    assert sorted(made, key=str) == made  # text order too (what an index on text would use)
    assert len(set(made)) == len(made)


def test_ids_made_later_sort_after_earlier_ones_even_across_milliseconds() -> None:
    first = new_id()
    time.sleep(0.002)  # a later millisecond, not ordering tasks: the clock must move on
    second = new_id()
    assert first.int >> 80 < second.int >> 80
    assert first < second
