"""The waiting history's arithmetic (``omniroute.domain.queue_view``), without a database:
which spans count at which minute marks. The statements themselves are exercised through
the API (``tests/router/test_queues_api.py``) and their plans checked in
``tests/omniroute/test_hot_queries.py``."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from omniroute.domain.queue_view import MAX_MINUTES, Span, minute_marks, waiting_series

NOW = datetime(2026, 5, 4, 12, 0, 30, tzinfo=UTC)
MIN = timedelta(minutes=1)


def test_marks_end_at_now_one_minute_apart_oldest_first() -> None:
    marks = minute_marks(NOW, 60)
    assert len(marks) == 60 and marks[-1] == NOW and marks[0] == NOW - 59 * MIN
    assert all(b - a == MIN for a, b in itertools.pairwise(marks))
    assert minute_marks(NOW, 1) == [NOW]


def test_a_span_counts_from_its_start_until_it_stops() -> None:
    marks = [NOW - 3 * MIN, NOW - 2 * MIN, NOW - MIN, NOW]
    spans = [
        Span("general", NOW - 2 * MIN, NOW - MIN),  # in at -2 (inclusive), out at -1
        Span("general", NOW - 10 * MIN, None),  # waiting still
        Span("billing", NOW - MIN, None),
    ]
    series = waiting_series(spans, ["general", "billing", "vip"], marks)
    assert series == {"general": [1, 2, 1, 1], "billing": [0, 0, 1, 1], "vip": [0, 0, 0, 0]}


@pytest.mark.parametrize(
    "span",
    [
        Span("elsewhere", NOW - 5 * MIN, None),  # not a queue asked for
        Span("general", NOW - MIN, NOW - MIN),  # stopped as it started
        Span("general", NOW - MIN, NOW - 2 * MIN),  # stopped before it started (clock skew)
        Span("general", NOW + MIN, None),  # not started yet at any mark
    ],
)
def test_what_never_waited_at_a_mark_is_not_counted(span: Span) -> None:
    series = waiting_series([span], ["general"], minute_marks(NOW, MAX_MINUTES))
    assert series == {"general": [0] * MAX_MINUTES}


def test_many_spans_agree_with_counting_one_by_one() -> None:
    marks = minute_marks(NOW, 30)
    spans = [
        Span("general", NOW - (n % 40) * MIN, None if n % 3 else NOW - (n % 7) * MIN)
        for n in range(200)
    ]
    expected = [
        sum(1 for s in spans if s.since <= m and (s.until is None or s.until > m) and (
            s.until is None or s.until > s.since))
        for m in marks
    ]  # fmt: skip
    assert waiting_series(spans, ["general"], marks)["general"] == expected
