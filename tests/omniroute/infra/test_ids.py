"""Row ids are UUIDv7: valid RFC 9562 version 7, unique, and in creation order, so new rows
land at the right edge of their primary key."""

from __future__ import annotations

import time
import uuid

from omniroute.infra.ids import Ids, new_id


def test_an_id_is_an_rfc_9562_version_7_uuid() -> None:
    value = new_id()
    assert isinstance(value, uuid.UUID)
    assert value.version == 7
    assert value.variant == uuid.RFC_4122
    assert uuid.UUID(str(value)) == value  # what PostgreSQL's uuid type reads back


def test_the_id_starts_with_the_clocks_millisecond_even_in_a_burst() -> None:
    """A burst does not run ahead of the clock (the uuid6 package moved the millisecond one
    ahead per id made within the same millisecond: 5 000 ids, five seconds ahead)."""
    before = time.time_ns() // 1_000_000
    burst = [new_id() for _ in range(5000)]
    after = time.time_ns() // 1_000_000
    assert before <= burst[0].int >> 80 <= burst[-1].int >> 80 <= after


def test_within_one_millisecond_the_counter_keeps_the_order() -> None:
    ids, ms = Ids(), time.time_ns() // 1_000_000
    same = [ids.new(ms) for _ in range(1000)]
    assert {u.int >> 80 for u in same} == {ms}
    assert sorted(same) == same and len(set(same)) == len(same)
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in same)
    # A clock that steps back keeps the last millisecond, and the order.
    assert ids.new(ms - 5) > same[-1]
    assert ids.new(ms + 1).int >> 80 == ms + 1


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
