"""Queue overflow, as unified routing defines it: when a queue has more than N waiting, or
no agent of the queue is available, when work arrives, or a conversation has waited longer
than T, an action applies: transfer to another queue, send an automated message and keep
waiting, or end with a message.

Pure decisions here (``on_arrival``, ``waited_too_long``, ``describe``); ``classify``
checks arrivals with the counts it reads (``load``), and ``distribute``'s tick sweeps the
waits (``sweep``). A conversation overflows once: the transition records ``overflowed_at``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from omniroute.domain.conversation import overflow
from omniroute.infra.store import Connection
from schemas.config import Config, Overflow
from schemas.events import ConversationOverflowed, Envelope


@dataclass(frozen=True)
class QueueLoad:
    """What an arrival sees: conversations waiting (counted up to ``max_waiting`` + 1)
    and agents of the queue who are available."""

    waiting: int
    available: int


Arrival = Literal["max_waiting", "no_agents"]


def on_arrival(rule: Overflow | None, load: QueueLoad) -> Arrival | None:
    """The condition a conversation arriving in the queue meets, if any."""
    if rule is None:
        return None
    if rule.max_waiting is not None and load.waiting >= rule.max_waiting + 1:
        return "max_waiting"
    if rule.no_agents and load.available == 0:
        return "no_agents"
    return None


def waited_too_long(rule: Overflow | None, queued_at: datetime, now: datetime) -> bool:
    return (
        rule is not None
        and rule.max_wait is not None
        and (now - queued_at).total_seconds() > rule.max_wait
    )


def describe(rule: Overflow) -> str:
    """The rule in one line, for ``omniroute classify`` and the docs."""
    when = []
    if rule.max_waiting is not None:
        when.append(f"more than {rule.max_waiting} waiting when one arrives")
    if rule.no_agents:
        when.append("no agent of the queue available when one arrives")
    if rule.max_wait is not None:
        when.append(f"a conversation waited over {rule.max_wait:g}s")
    then = {
        "transfer": f"transfer to {rule.queue}",
        "message": "send the message and keep waiting",
        "end": "end the conversation with the message",
    }[rule.action]
    message = f" (message: {rule.message})" if rule.message else ""
    return f"overflow when {' or '.join(when)}: {then}{message}"


# Waiting in the queue, up to a cap, on ``conversations_queue``; and its available agents.
LOAD = """
SELECT (SELECT count(*) FROM (SELECT 1 FROM conversations
            WHERE state = 'queued' AND queue = $1 LIMIT $2) w) AS waiting,
       (SELECT count(*) FROM agents WHERE presence = 'available' AND deleted_at IS NULL
            AND $1 = ANY(queues)) AS available
"""

# The queue's conversations waiting since before the cutoff that have not overflowed yet:
# the head of ``conversations_queue`` (the backlog of one queue, never the history).
WAITED = """
SELECT id, queued_at FROM conversations
WHERE state = 'queued' AND queue = $1 AND overflowed_at IS NULL AND queued_at <= $2
ORDER BY priority DESC, queued_at
LIMIT $3
FOR UPDATE SKIP LOCKED
"""


async def load(conn: Connection, queue: str, rule: Overflow) -> QueueLoad:
    cap = (rule.max_waiting + 1) if rule.max_waiting is not None else 0
    row: Any = await conn.fetchrow(LOAD, queue, cap)
    return QueueLoad(waiting=row["waiting"], available=row["available"])


async def sweep(
    conn: Connection, config: Config, now: datetime, limit: int = 100
) -> list[Envelope]:
    """Apply each queue's ``max_wait`` rule to the conversations that waited too long."""
    events: list[Envelope] = []
    for queue in config.queues:
        rule = queue.overflow
        if rule is None or rule.max_wait is None:
            continue
        cutoff = now - timedelta(seconds=rule.max_wait)
        for row in await conn.fetch(WAITED, queue.name, cutoff, limit):
            data = ConversationOverflowed(
                queue=queue.name,
                condition="max_wait",
                action=rule.action,
                to_queue=rule.queue if rule.action == "transfer" else None,
                waited_seconds=round((now - row["queued_at"]).total_seconds(), 3),
                overflowed_at=now,
            )
            events += await overflow(conn, str(row["id"]), data, rule.message, now)
    return events
