"""What a supervisor watches: each queue's waiting work, its agents and its pending offers
now, and how many conversations waited in it minute by minute over the last hours.

Read often (the supervisor page polls every few seconds) on a database holding a year of
closed conversations, so every statement reads only live rows or a time range through an
index (checked with EXPLAIN in ``tests/omniroute/test_hot_queries.py``):

- ``WAITING``: queued, offered and active conversations through ``conversations_state``
  (state first): a few hundred rows, never the closed history;
- ``AGENTS``: the small ``agents`` table, each agent's active conversations counted through
  the partial index ``conversations_agent`` (rows an agent holds);
- ``OFFERS``: pending offers through the partial ``offers_due`` (pending only);
- ``SPANS``: the open conversations (``conversations_one_open``, partial: not closed) and
  those closed since the window began (``conversations_closed``, migration 0015).

The minute-by-minute history is derived from what each conversation row already keeps
(``queued_at``, ``assigned_at``, ``closed_at``) rather than from samples written by a
background task: it exists from the first request, survives restarts and needs no writer.
A conversation waited from ``queued_at`` until ``assigned_at`` (when assigned after it was
queued) or ``closed_at`` (closed while waiting), or is waiting still. ``queued_at`` is what
the live view counts from too: where routing keeps a first queue time (an agent's work
requeued ahead of others, a transfer to an agent) both count from it; an earlier wait in the
same hour of a conversation whose queue time was restarted (transferred to a queue, resumed
from waiting) is not in the series.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from omniroute.infra.store import Connection
from schemas.queue_view import (
    AgentLoad,
    PendingOffer,
    QueueLoad,
    QueueSeries,
    QueuesHistory,
    QueuesView,
    WaitingPoint,
)

DEFAULT_MINUTES = 60
MAX_MINUTES = 180
STEP = timedelta(minutes=1)

# Waiting: in a queue, not yet an agent's (an offer is not an assignment).
WAITING = """
SELECT queue,
       count(*) FILTER (WHERE state IN ('queued', 'offered')) AS waiting,
       min(queued_at) FILTER (WHERE state IN ('queued', 'offered')) AS oldest,
       count(*) FILTER (WHERE state = 'active') AS active
FROM conversations
WHERE state IN ('queued', 'offered', 'active') AND queue = ANY($1::text[])
GROUP BY queue
"""

# The state list is the predicate of conversations_agent, so the count is read there.
AGENTS = """
SELECT a.id, a.name, a.presence, a.used_units, a.capacity_units, a.queues,
       (SELECT count(*) FILTER (WHERE c.state = 'active') FROM conversations c
        WHERE c.agent_id = a.id AND c.state IN ('offered', 'active', 'waiting', 'wrap-up'))
           AS active_conversations
FROM agents a
WHERE a.deleted_at IS NULL AND a.queues && $1::text[]
ORDER BY a.name, a.id
"""

OFFERS = """
SELECT o.id, o.conversation_id, c.customer, o.agent_id, o.created_at, o.expires_at, c.queue
FROM offers o JOIN conversations c ON c.id = o.conversation_id
WHERE o.state = 'pending' AND c.queue = ANY($1::text[])
ORDER BY o.created_at, o.id
"""

# When each conversation that may have waited since $2 started and stopped waiting (null:
# waiting still). Two branches, each with the predicate of its partial index.
SPANS = """
SELECT queue, queued_at, left_at FROM (
    SELECT queue, queued_at,
           CASE WHEN state IN ('queued', 'offered') THEN NULL
                WHEN assigned_at >= queued_at THEN assigned_at
                ELSE closed_at END AS left_at
    FROM conversations
    WHERE state <> 'closed' AND queue = ANY($1::text[]) AND queued_at IS NOT NULL
    UNION ALL
    SELECT queue, queued_at,
           CASE WHEN assigned_at >= queued_at THEN assigned_at ELSE closed_at END
    FROM conversations
    WHERE state = 'closed' AND closed_at >= $2 AND queue = ANY($1::text[])
      AND queued_at IS NOT NULL
) spans
WHERE left_at IS NULL OR left_at > $2
"""


def _wait_seconds(oldest: datetime | None, now: datetime) -> float | None:
    return None if oldest is None else round(max((now - oldest).total_seconds(), 0.0), 3)


async def queues_view(conn: Connection, queues: Sequence[str], now: datetime) -> QueuesView:
    """Each of ``queues`` (in that order) now: waiting, longest wait, active, its agents
    (an agent of several queues is listed in each) and its pending offers."""
    names = list(queues)
    counts = {row["queue"]: row for row in await conn.fetch(WAITING, names)}
    agents = await conn.fetch(AGENTS, names)
    offers = await conn.fetch(OFFERS, names)
    loads: list[QueueLoad] = []
    for queue in names:
        members = [
            AgentLoad(
                id=a["id"],
                name=a["name"],
                presence=a["presence"],
                used=a["used_units"],
                capacity=a["capacity_units"],
                active_conversations=a["active_conversations"],
                available=a["presence"] == "available" and a["used_units"] < a["capacity_units"],
            )
            for a in agents
            if queue in a["queues"]
        ]
        row = counts.get(queue)
        loads.append(
            QueueLoad(
                queue=queue,
                waiting=row["waiting"] if row else 0,
                longest_wait_seconds=_wait_seconds(row["oldest"] if row else None, now),
                available_agents=sum(1 for m in members if m.available),
                active=row["active"] if row else 0,
                agents=members,
                offers=[
                    PendingOffer.model_validate(dict(o)) for o in offers if o["queue"] == queue
                ],
            )
        )
    return QueuesView(at=now, queues=loads)


@dataclass(frozen=True)
class Span:
    """A conversation waited in ``queue`` from ``since`` until ``until`` (None: still)."""

    queue: str
    since: datetime
    until: datetime | None


def minute_marks(now: datetime, minutes: int) -> list[datetime]:
    """The ends of the last ``minutes`` minutes, oldest first; the last one is ``now``."""
    return [now - STEP * k for k in range(minutes - 1, -1, -1)]


def waiting_series(
    spans: Iterable[Span], queues: Sequence[str], marks: Sequence[datetime]
) -> dict[str, list[int]]:
    """How many of ``spans`` were waiting in each queue at each of ``marks``: started at or
    before the mark and not stopped by then. Pure; O((spans + marks) log spans)."""
    starts: dict[str, list[datetime]] = {q: [] for q in queues}
    stops: dict[str, list[datetime]] = {q: [] for q in queues}
    for span in spans:
        if span.queue not in starts or (span.until is not None and span.until <= span.since):
            continue
        starts[span.queue].append(span.since)
        if span.until is not None:
            stops[span.queue].append(span.until)
    series: dict[str, list[int]] = {}
    for queue in queues:
        started, stopped = sorted(starts[queue]), sorted(stops[queue])
        series[queue] = [
            bisect.bisect_right(started, mark) - bisect.bisect_right(stopped, mark)
            for mark in marks
        ]
    return series


async def waiting_history(
    conn: Connection, queues: Sequence[str], now: datetime, minutes: int = DEFAULT_MINUTES
) -> QueuesHistory:
    """Each of ``queues``' waiting count at the end of each of the last ``minutes`` minutes
    (1 to ``MAX_MINUTES``; raises ValueError otherwise), the last point being ``now``."""
    if not 1 <= minutes <= MAX_MINUTES:
        raise ValueError(f"minutes: 1 to {MAX_MINUTES}")
    names = list(queues)
    marks = minute_marks(now, minutes)
    rows = await conn.fetch(SPANS, names, marks[0])
    spans = [Span(r["queue"], r["queued_at"], r["left_at"]) for r in rows]
    counts = waiting_series(spans, names, marks)
    return QueuesHistory(
        at=now,
        minutes=minutes,
        queues=[
            QueueSeries(
                queue=queue,
                points=[
                    WaitingPoint(at=mark, waiting=n)
                    for mark, n in zip(marks, counts[queue], strict=True)
                ],
            )
            for queue in names
        ],
    )
