"""The broker topology of DESIGN.md, declared idempotently by every process.

One durable topic exchange for events; one durable quorum queue per stage with a bounded
delivery limit; a dead-letter exchange and one dead-letter queue per stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.events import DEAD_LETTER_EXCHANGE, EXCHANGE, EventType

# The broker's own delivery limit on every stage queue: a backstop for messages that crash
# the consumer process before it can count them. Queue arguments cannot change once the
# queue exists, so this is a constant of the topology; the runner applies the configurable
# (lower) OMNIROUTE_DELIVERY_LIMIT itself from the x-delivery-count header.
BROKER_DELIVERY_LIMIT = 20


@dataclass(frozen=True)
class StageQueue:
    stage: str
    bindings: tuple[str, ...]
    retired: tuple[str, ...] = ()  # keys earlier releases bound: unbound on declare
    # Keys the stage's own runner binds only when the configuration needs them (and unbinds
    # when it does not); every other process declares the queue with the rest.
    optional: tuple[str, ...] = ()

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(k for k in self.bindings if k not in self.optional)

    @property
    def queue(self) -> str:
        return f"omniroute.{self.stage}"

    @property
    def dead_queue(self) -> str:
        return f"omniroute.{self.stage}.dead"


STAGES: dict[str, StageQueue] = {
    stage.stage: stage
    for stage in (
        StageQueue("conversations", (EventType.MESSAGE_RECEIVED,)),
        StageQueue("classify", (EventType.CONVERSATION_OPENED, EventType.CONVERSATION_ESCALATED)),
        StageQueue(
            "distribute",
            (
                EventType.CONVERSATION_QUEUED,
                EventType.CONVERSATION_TRANSFERRED,
                EventType.CONVERSATION_CLOSED,
                EventType.OFFER_DECLINED,
                EventType.OFFER_EXPIRED,
                EventType.AGENT_PRESENCE_CHANGED,
            ),
        ),
        StageQueue("outbound", (EventType.MESSAGE_SEND_REQUESTED,)),
        StageQueue(
            "lifecycle",
            (
                EventType.CONVERSATION_QUEUED,
                EventType.CONVERSATION_ASSIGNED,
                EventType.CONVERSATION_ENDED,
                EventType.CONVERSATION_CLOSED,
                EventType.MESSAGE_RECEIVED,
                EventType.CONVERSATION_OVERFLOWED,
            ),
            # Classified: the greeting waits for the queue message (nothing to do on it).
            retired=(EventType.CONVERSATION_OPENED, EventType.CONVERSATION_CLASSIFIED),
            # Only with automated messages or idle timers configured (lifecycle.needs).
            optional=(
                EventType.CONVERSATION_QUEUED,
                EventType.CONVERSATION_ASSIGNED,
                EventType.MESSAGE_RECEIVED,
                EventType.CONVERSATION_OVERFLOWED,
            ),
        ),
        StageQueue("status", (EventType.MESSAGE_STATUS,)),
        StageQueue(
            "bot",
            (EventType.CONVERSATION_BOT_STARTED, EventType.MESSAGE_RECEIVED),
            # Only with a bot configured in some workstream (bot.needs).
            optional=(EventType.CONVERSATION_BOT_STARTED, EventType.MESSAGE_RECEIVED),
        ),
    )
}

__all__ = ["BROKER_DELIVERY_LIMIT", "DEAD_LETTER_EXCHANGE", "EXCHANGE", "STAGES", "StageQueue"]
