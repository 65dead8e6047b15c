"""Operating hours with a fixed clock: ranges, edges, midnight, holidays, DST, time zones."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.hours import is_open, local_fields
from schemas.config import WEEKDAYS, Hours

SP = ZoneInfo("America/Sao_Paulo")
NY = ZoneInfo("America/New_York")
LONDON = ZoneInfo("Europe/London")
ALL_DAYS = WEEKDAYS


def hours(tz: str = "America/Sao_Paulo", **spec: Any) -> Hours:
    return Hours.model_validate({"timezone": tz, **spec})


def sp(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=SP)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def test_fixture_dates_are_the_weekdays_we_think() -> None:
    assert sp(2026, 3, 4).weekday() == 2  # wed
    assert sp(2026, 3, 7).weekday() == 5  # sat
    assert sp(2026, 12, 25).weekday() == 4  # fri
    assert datetime(2026, 3, 8).weekday() == 6  # sun
    assert datetime(2026, 11, 1).weekday() == 6  # sun


WEEKDAY_9_18 = hours(weekly={d: ["09:00-18:00"] for d in ("mon", "tue", "wed", "thu", "fri")})


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        pytest.param(sp(2026, 3, 4, 12, 0), True, id="wed-noon"),
        pytest.param(sp(2026, 3, 4, 9, 0, 0), True, id="start-edge"),
        pytest.param(sp(2026, 3, 4, 8, 59, 59), False, id="just-before"),
        pytest.param(sp(2026, 3, 4, 17, 59, 59), True, id="last-second"),
        pytest.param(sp(2026, 3, 4, 18, 0, 0), False, id="end-edge"),
        pytest.param(sp(2026, 3, 4, 23, 0), False, id="wed-night"),
        pytest.param(sp(2026, 3, 4, 3, 0), False, id="wed-early"),
        pytest.param(sp(2026, 3, 7, 12, 0), False, id="saturday"),
        pytest.param(sp(2026, 3, 8, 12, 0), False, id="sunday"),
        pytest.param(sp(2026, 3, 9, 9, 30), True, id="monday"),
    ],
)
def test_weekday_range(at: datetime, expected: bool) -> None:
    assert is_open(WEEKDAY_9_18, at) is expected


def test_several_ranges_a_day() -> None:
    split = hours(weekly={"wed": ["09:00-12:00", "13:00-18:00"]})
    assert is_open(split, sp(2026, 3, 4, 11, 59))
    assert not is_open(split, sp(2026, 3, 4, 12, 30))
    assert is_open(split, sp(2026, 3, 4, 13, 0))


CROSSING = hours(weekly={"fri": ["22:00-02:00"]})


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        pytest.param(sp(2026, 3, 6, 21, 59, 59), False, id="fri-before"),
        pytest.param(sp(2026, 3, 6, 22, 0), True, id="fri-start"),
        pytest.param(sp(2026, 3, 6, 23, 30), True, id="fri-23:30"),
        pytest.param(sp(2026, 3, 7, 0, 0), True, id="sat-midnight"),
        pytest.param(sp(2026, 3, 7, 1, 30), True, id="sat-01:30"),
        pytest.param(sp(2026, 3, 7, 1, 59, 59), True, id="sat-last-second"),
        pytest.param(sp(2026, 3, 7, 2, 0), False, id="sat-02:00"),
        pytest.param(sp(2026, 3, 7, 23, 0), False, id="sat-night"),
        pytest.param(sp(2026, 3, 6, 1, 30), False, id="fri-early"),  # thursday has no range
    ],
)
def test_range_crossing_midnight(at: datetime, expected: bool) -> None:
    assert is_open(CROSSING, at) is expected


def test_day_without_ranges_is_closed_all_day() -> None:
    only_monday = hours(weekly={"mon": ["00:00-24:00"]})
    tuesday = sp(2026, 3, 3)
    assert not any(is_open(only_monday, tuesday + timedelta(minutes=m)) for m in range(0, 1440, 7))
    assert not is_open(hours(weekly={}), sp(2026, 3, 2, 12))


HOLIDAY_HOURS = hours(
    weekly={d: ["09:00-18:00", "22:00-02:00"] for d in ALL_DAYS},
    holidays=["2026-12-25"],
)


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        pytest.param(sp(2026, 12, 24, 12, 0), True, id="eve-noon"),
        pytest.param(sp(2026, 12, 24, 23, 0), True, id="eve-night"),
        # the eve's 22:00-02:00 belongs to the eve, so it spills into the holiday's morning
        pytest.param(sp(2026, 12, 25, 1, 30), True, id="spill-into-holiday"),
        pytest.param(sp(2026, 12, 25, 2, 0), False, id="spill-end"),
        pytest.param(sp(2026, 12, 25, 12, 0), False, id="holiday-noon"),
        pytest.param(sp(2026, 12, 25, 23, 0), False, id="holiday-night"),
        # the holiday's own 22:00-02:00 does not spill into the next day
        pytest.param(sp(2026, 12, 26, 1, 0), False, id="no-spill-from-holiday"),
        pytest.param(sp(2026, 12, 26, 12, 0), True, id="after-holiday"),
    ],
)
def test_holiday(at: datetime, expected: bool) -> None:
    assert is_open(HOLIDAY_HOURS, at) is expected


def test_the_same_day_next_year_is_not_a_holiday() -> None:
    assert is_open(HOLIDAY_HOURS, sp(2027, 12, 25, 12, 0))


def test_whole_day_range_is_always_open() -> None:
    always = hours(weekly={d: ["00:00-24:00"] for d in ALL_DAYS})
    start = sp(2026, 3, 1)
    assert all(is_open(always, start + timedelta(minutes=m)) for m in range(0, 8 * 1440, 13))
    assert is_open(always, sp(2026, 3, 4, 23, 59, 59))
    assert is_open(always, sp(2026, 3, 4, 0, 0, 0))


def test_whole_day_range_ends_at_midnight() -> None:
    wednesday = hours(weekly={"wed": ["00:00-24:00"]})
    assert is_open(wednesday, sp(2026, 3, 4, 23, 59, 59))
    assert not is_open(wednesday, sp(2026, 3, 5, 0, 0, 0))
    assert not is_open(wednesday, sp(2026, 3, 3, 23, 59, 59))


@pytest.mark.parametrize(
    "at", [utc(2026, 1, 1), utc(2026, 3, 8, 7, 30), sp(2026, 12, 25, 3), utc(1999, 12, 31, 23, 59)]
)
def test_no_hours_is_always_open(at: datetime) -> None:
    assert is_open(None, at) is True


# --- DST: ranges are local wall-clock times ----------------------------------------------------

NY_9_17 = hours("America/New_York", weekly={d: ["09:00-17:00"] for d in ALL_DAYS})
LONDON_9_17 = hours("Europe/London", weekly={d: ["09:00-17:00"] for d in ALL_DAYS})


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        # before spring forward: EST, UTC-5
        pytest.param(utc(2026, 3, 6, 13, 30), False, id="est-08:30"),
        pytest.param(utc(2026, 3, 6, 14, 0), True, id="est-09:00"),
        pytest.param(utc(2026, 3, 6, 21, 59), True, id="est-16:59"),
        # spring-forward day (02:00 EST → 03:00 EDT): EDT, UTC-4, from 07:00Z
        pytest.param(utc(2026, 3, 8, 12, 59, 59), False, id="dst-day-08:59:59"),
        pytest.param(utc(2026, 3, 8, 13, 0), True, id="dst-day-09:00"),
        pytest.param(utc(2026, 3, 8, 13, 30), True, id="dst-day-09:30"),
        pytest.param(utc(2026, 3, 8, 20, 59, 59), True, id="dst-day-16:59:59"),
        pytest.param(utc(2026, 3, 8, 21, 0), False, id="dst-day-17:00"),
        pytest.param(utc(2026, 3, 9, 13, 30), True, id="edt-09:30"),
        pytest.param(utc(2026, 3, 9, 12, 30), False, id="edt-08:30"),
        # fall-back day (02:00 EDT → 01:00 EST): EST, UTC-5, from 06:00Z
        pytest.param(utc(2026, 10, 30, 13, 30), True, id="edt-fri-09:30"),
        pytest.param(utc(2026, 11, 1, 13, 30), False, id="fallback-day-08:30"),
        pytest.param(utc(2026, 11, 1, 14, 0), True, id="fallback-day-09:00"),
        pytest.param(utc(2026, 11, 1, 21, 59), True, id="fallback-day-16:59"),
        pytest.param(utc(2026, 11, 1, 22, 0), False, id="fallback-day-17:00"),
    ],
)
def test_new_york_dst(at: datetime, expected: bool) -> None:
    assert is_open(NY_9_17, at) is expected


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        pytest.param(utc(2026, 3, 28, 8, 30), False, id="gmt-08:30"),
        pytest.param(utc(2026, 3, 28, 16, 30), True, id="gmt-16:30"),
        pytest.param(utc(2026, 3, 29, 8, 30), True, id="spring-day-bst-09:30"),
        pytest.param(utc(2026, 3, 29, 7, 59), False, id="spring-day-bst-08:59"),
        pytest.param(utc(2026, 3, 29, 16, 0), False, id="spring-day-bst-17:00"),
        pytest.param(utc(2026, 10, 24, 16, 30), False, id="bst-17:30"),
        pytest.param(utc(2026, 10, 24, 8, 0), True, id="bst-09:00"),
        pytest.param(utc(2026, 10, 25, 8, 30), False, id="fall-day-gmt-08:30"),
        pytest.param(utc(2026, 10, 25, 9, 0), True, id="fall-day-gmt-09:00"),
        pytest.param(utc(2026, 10, 25, 16, 30), True, id="fall-day-gmt-16:30"),
        pytest.param(utc(2026, 10, 25, 17, 0), False, id="fall-day-gmt-17:00"),
    ],
)
def test_london_dst(at: datetime, expected: bool) -> None:
    assert is_open(LONDON_9_17, at) is expected


def test_repeated_hour_on_fall_back_is_open_both_times() -> None:
    one_am = hours("America/New_York", weekly={"sun": ["01:00-02:00"]})
    assert is_open(one_am, utc(2026, 11, 1, 5, 30))  # 01:30 EDT
    assert is_open(one_am, utc(2026, 11, 1, 6, 30))  # 01:30 EST, one hour later
    assert not is_open(one_am, utc(2026, 11, 1, 7, 0))  # 02:00 EST
    assert not is_open(one_am, utc(2026, 11, 1, 4, 59))  # 00:59 EDT


def test_skipped_hour_on_spring_forward_never_opens() -> None:
    two_am = hours("America/New_York", weekly={d: ["02:00-03:00"] for d in ALL_DAYS})
    assert is_open(two_am, utc(2026, 3, 7, 7, 30))  # the day before: 02:30 EST
    spring = utc(2026, 3, 8, 5, 0)
    assert not any(is_open(two_am, spring + timedelta(minutes=m)) for m in range(0, 240))
    assert is_open(two_am, utc(2026, 3, 9, 6, 30))  # the day after: 02:30 EDT


OTHER_ZONES = [
    UTC,
    ZoneInfo("Asia/Tokyo"),
    ZoneInfo("America/Los_Angeles"),
    ZoneInfo("Australia/Lord_Howe"),
    timezone(timedelta(hours=5, minutes=45)),
    timezone(timedelta(hours=-9, minutes=-30)),
]
INSTANTS = [
    utc(2026, 3, 8, 13, 30),
    utc(2026, 3, 8, 12, 30),
    utc(2026, 11, 1, 13, 30),
    utc(2026, 11, 1, 6, 30),
    utc(2026, 10, 25, 8, 30),
    utc(2026, 3, 29, 8, 30),
    utc(2026, 12, 25, 4, 30),
]


@pytest.mark.parametrize("schedule", [NY_9_17, LONDON_9_17, HOLIDAY_HOURS, CROSSING])
@pytest.mark.parametrize("at", INSTANTS)
def test_same_instant_in_any_zone_gives_the_same_answer(schedule: Hours, at: datetime) -> None:
    expected = is_open(schedule, at)
    for zone in OTHER_ZONES:
        assert is_open(schedule, at.astimezone(zone)) is expected, zone


@settings(max_examples=200, deadline=None, database=None)
@given(
    instant=st.datetimes(
        min_value=datetime(2025, 1, 1), max_value=datetime(2028, 1, 1), timezones=st.just(UTC)
    ),
    zone=st.sampled_from(OTHER_ZONES),
    schedule=st.sampled_from([NY_9_17, LONDON_9_17, HOLIDAY_HOURS, CROSSING, WEEKDAY_9_18]),
)
def test_zone_of_the_instant_does_not_matter(instant: datetime, zone: Any, schedule: Hours) -> None:
    assert is_open(schedule, instant) is is_open(schedule, instant.astimezone(zone))


# --- local_fields ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tz", "at", "expected"),
    [
        pytest.param(
            "America/Sao_Paulo",
            utc(2026, 1, 1, 2, 0),
            {"time": "23:00", "weekday": "wed", "date": "2025-12-31"},
            id="sp-across-midnight",
        ),
        pytest.param(
            "Asia/Tokyo",
            utc(2025, 12, 31, 20, 0),
            {"time": "05:00", "weekday": "thu", "date": "2026-01-01"},
            id="tokyo-ahead",
        ),
        pytest.param(
            "America/New_York",
            utc(2026, 3, 8, 7, 0),
            {"time": "03:00", "weekday": "sun", "date": "2026-03-08"},
            id="ny-spring-forward",
        ),
        pytest.param(
            "America/New_York",
            utc(2026, 3, 8, 6, 59),
            {"time": "01:59", "weekday": "sun", "date": "2026-03-08"},
            id="ny-before-spring-forward",
        ),
        pytest.param(
            "Europe/London",
            utc(2026, 10, 25, 0, 30),
            {"time": "01:30", "weekday": "sun", "date": "2026-10-25"},
            id="london-bst",
        ),
        pytest.param(
            "UTC",
            datetime(2026, 3, 4, 9, 5, tzinfo=SP),
            {"time": "12:05", "weekday": "wed", "date": "2026-03-04"},
            id="from-other-zone",
        ),
    ],
)
def test_local_fields(tz: str, at: datetime, expected: dict[str, str]) -> None:
    assert local_fields(tz, at) == expected
