"""Operating hours of a queue: open or closed at a given instant. Pure; the clock is an
argument.

Ranges are local wall-clock times in the queue's time zone (so they follow DST changes);
``22:00-02:00`` crosses midnight and belongs to the day it starts on; a holiday closes the
ranges that start on that day.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from schemas.config import WEEKDAYS, Hours


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def _ranges(hours: Hours, day: datetime) -> list[tuple[int, int]]:
    if day.date() in hours.holidays:
        return []
    weekday = WEEKDAYS[day.weekday()]
    spans = []
    for text in hours.weekly.get(weekday, []):  # type: ignore[call-overload, unused-ignore]
        start, end = (_minutes(part) for part in text.split("-"))
        spans.append((start, end))
    return spans


def is_open(hours: Hours | None, at: datetime) -> bool:
    """Whether a queue with these hours is open at the aware instant ``at``.

    No hours configured means always open.
    """
    if hours is None:
        return True
    local = at.astimezone(ZoneInfo(hours.timezone))
    now = local.hour * 60 + local.minute + local.second / 60
    for start, end in _ranges(hours, local):
        if start < end and start <= now < end:
            return True
        if end < start and now >= start:  # crosses midnight: today's part
            return True
    yesterday = local - timedelta(days=1)
    return any(end < start and now < end for start, end in _ranges(hours, yesterday))


def local_fields(timezone: str, at: datetime) -> dict[str, str]:
    """``time`` (HH:MM), ``weekday`` (mon … sun) and ``date`` of ``at`` in ``timezone``."""
    local = at.astimezone(ZoneInfo(timezone))
    return {
        "time": local.strftime("%H:%M"),
        "weekday": WEEKDAYS[local.weekday()],
        "date": local.date().isoformat(),
    }
