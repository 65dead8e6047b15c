"""Delivery status rules: statuses only move forward, terminal ones never change. Pure."""

from __future__ import annotations

from schemas.events import EventType

# Twilio's message statuses in the order a message goes through them.
RANK: dict[str, int] = {
    "accepted": 0,
    "scheduled": 0,
    "queued": 1,
    "sending": 2,
    "sent": 3,
    "delivered": 4,
    "read": 5,
}
TERMINAL = frozenset({"failed", "undelivered", "canceled"})
# A failure reported after these is late news about an earlier attempt (WhatsApp sends a
# stray failed/undelivered after the receipt): the customer has the message, it stays so.
REACHED = frozenset({"delivered", "read"})
# The events a step publishes; skipped steps are published too, in order, so downstream
# services always see sent → delivered → read even when callbacks come shuffled.
STEP_EVENTS: dict[str, str] = {
    "sent": EventType.MESSAGE_SENT,
    "delivered": EventType.MESSAGE_DELIVERED,
    "read": EventType.MESSAGE_READ,
}


def advance(current: str, incoming: str) -> tuple[str, list[str]]:
    """The new status and the step events to publish, given the stored and the received one.

    Unknown statuses never change the stored status, nor does a failure after ``delivered``
    or ``read`` (they are recorded in the history by the caller).
    """
    if current in TERMINAL:
        return current, []
    if incoming in TERMINAL and current in REACHED:
        return current, []
    if incoming in TERMINAL:
        return incoming, [EventType.MESSAGE_FAILED]
    if incoming not in RANK:
        return current, []
    now, new = RANK.get(current, -1), RANK[incoming]
    if new <= now:
        return current, []
    steps = [
        STEP_EVENTS[status]
        for status, rank in sorted(RANK.items(), key=lambda kv: kv[1])
        if now < rank <= new and status in STEP_EVENTS
    ]
    return incoming, steps
