"""The ``classify`` stage: a new conversation gets its queue, skills and priority.

``conversation.opened`` → run the workstream's rulesets and route-to-queue rules over the
conversation's context → apply the queue's operating hours → persist the outcome and its
trace → ``conversation.classified`` then ``conversation.queued`` (or ``conversation.closed``
when the queue's out-of-hours action says so). Idempotent: a conversation already past
``open`` is left alone. A workstream or queue that no longer exists falls back (workstream's
fallback queue, else the configuration's default queue) with a note, never a drop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import phonenumbers
import structlog

from consumers import overflow
from consumers.hours import is_open, local_fields
from consumers.rules import Classification, CompiledWorkstream, classify, compile_workstream
from consumers.runtime import Stage, StageTx
from omniroute.domain.conversation import Classified, apply_classification
from omniroute.errors import TransientError
from omniroute.infra.store import Connection
from schemas.config import Config
from schemas.events import (
    ConversationClassified,
    ConversationClosed,
    ConversationOpened,
    ConversationOverflowed,
    ConversationQueued,
    Envelope,
    EventType,
    RuleMatch,
)

log = structlog.get_logger("omniroute.classify")

CompiledConfig = dict[str, CompiledWorkstream]


def compile_config(config: Config) -> CompiledConfig:
    """Every workstream's rules, compiled (once per configuration load)."""
    return {w.name: compile_workstream(w) for w in config.workstreams}


def customer_fields(customer: str) -> dict[str, Any]:
    """Calling code and region of a +E164 customer; nothing for business-scoped ids."""
    if not customer.startswith("+"):
        return {}
    try:
        number = phonenumbers.parse(customer)
    except phonenumbers.NumberParseException:
        return {}
    region = phonenumbers.region_code_for_number(number)
    return {"customer.country_code": number.country_code, "customer.region": region}


def build_context(
    config: Config, account: str, opened: ConversationOpened, now: datetime
) -> dict[str, Any]:
    """The flat context rules see (field names as in ``schemas.rules.CONTEXT_FIELDS``)."""
    account_config = config.account(account)
    number = account_config.find_number(opened.business_number) if account_config else None
    workstream = config.workstream(opened.workstream)
    context: dict[str, Any] = {
        "account": account,
        "business_number": opened.business_number,
        "number_name": number.name if number else None,
        "workstream": opened.workstream,
        "sandbox": number.sandbox if number else False,
        "customer": opened.customer,
        "profile_name": opened.profile_name,
        "body": opened.first_message_body,
        "has_media": opened.has_media,
        "media_count": opened.media_count,
        "language": workstream.language if workstream else None,
        **customer_fields(opened.customer),
        **local_fields(workstream.timezone if workstream else "UTC", now),
    }
    return context


@dataclass
class Decision:
    """Classification plus what operating hours and missing config changed."""

    result: Classification
    queue: str
    state: str = "queued"
    out_of_hours: bool = False
    out_of_hours_action: str | None = None
    automated_message: str | None = None
    notes: list[str] = field(default_factory=list)
    close_reason: str = "out_of_hours"
    overflowed: ConversationOverflowed | None = None


async def check_overflow(
    conn: Connection, config: Config, decision: Decision, now: datetime
) -> None:
    """A conversation arriving in an overflowing queue (too many waiting, or nobody of the
    queue available): the queue's overflow action changes the decision."""
    queue = config.queue(decision.queue)
    rule = queue.overflow if queue is not None else None
    if decision.state != "queued" or rule is None:
        return
    load = await overflow.load(conn, decision.queue, rule)
    condition = overflow.on_arrival(rule, load)
    if condition is None:
        return
    decision.overflowed = ConversationOverflowed(
        queue=decision.queue,
        condition=condition,
        action=rule.action,
        to_queue=rule.queue if rule.action == "transfer" else None,
        waiting=load.waiting,
        overflowed_at=now,
    )
    decision.notes.append(f"{decision.queue} overflowed ({condition}): {rule.action}")
    if rule.action == "transfer" and rule.queue is not None:
        decision.queue = rule.queue
    elif rule.action == "end":
        decision.state = "closed"
        decision.close_reason = "overflow"
        decision.automated_message = rule.message


def decide(
    config: Config,
    compiled: CompiledConfig,
    account: str,
    opened: ConversationOpened,
    now: datetime,
) -> Decision:
    """Pure: which queue, skills and priority, and what the queue's hours say, at ``now``."""
    notes: list[str] = []
    workstream = compiled.get(opened.workstream)
    if workstream is None:
        default = config.default_queue() or "general"
        notes.append(f"workstream {opened.workstream!r} no longer exists; default queue used")
        result = Classification(queue=default, fallback=True, language="en")
    else:
        result = classify(workstream, build_context(config, account, opened, now))
    queue_name = result.queue
    if config.queue(queue_name) is None:
        fallback = workstream.fallback_queue if workstream else None
        if fallback is None or config.queue(fallback) is None:
            fallback = config.default_queue() or queue_name
        notes.append(f"queue {queue_name!r} no longer exists; {fallback!r} used")
        queue_name = fallback
    decision = Decision(result=result, queue=queue_name, notes=notes + result.errors)
    queue = config.queue(queue_name)
    if queue is not None and queue.hours is not None and not is_open(queue.hours, now):
        action = queue.hours.out_of_hours
        decision.out_of_hours = True
        decision.out_of_hours_action = action.action
        decision.automated_message = action.message
        if action.action == "transfer" and action.queue is not None:
            decision.notes.append(f"{queue_name} is closed; transferred to {action.queue}")
            decision.queue = action.queue
        elif action.action == "close":
            decision.state = "closed"
    return decision


# The conversation, locked, and its first customer message, in one round trip.
_STATE_AND_FIRST_MESSAGE = """
SELECT c.state, m.found, m.body, m.media
FROM conversations c
LEFT JOIN LATERAL (
    SELECT true AS found, body, media FROM messages
    WHERE conversation_id = c.id AND direction = 'inbound'
    ORDER BY received_at, id LIMIT 1
) m ON true
WHERE c.id = $1
FOR UPDATE OF c
"""


async def handle(event: Envelope, payload: ConversationOpened, tx: StageTx) -> list[Envelope]:
    # The earliest message by receipt time is the first one, whichever replica committed
    # first (two messages sent a moment apart can be stored in either order).
    first = await tx.conn.fetchrow(_STATE_AND_FIRST_MESSAGE, payload.conversation_id)
    if first is None:
        raise TransientError(f"conversation {payload.conversation_id} is not stored (yet)")
    if first["state"] != "open":
        return []  # classified already: this is a redelivery
    if first["found"]:
        payload = payload.model_copy(
            update={
                "first_message_body": first["body"],
                "has_media": bool(first["media"]),
                "media_count": len(first["media"]),
            }
        )
    config = tx.config.current
    decision = decide(
        config, tx.config.derive("classify", compile_config), event.account, payload, tx.now
    )
    await check_overflow(tx.conn, config, decision, tx.now)
    result = decision.result
    trace = {**result.trace(), "notes": decision.notes, "out_of_hours": decision.out_of_hours}
    for note in decision.notes:
        log.warning("classify.note", note=note)
    classified = ConversationClassified(
        workstream=payload.workstream,
        queue=decision.queue,
        skills=result.skills,
        priority=result.priority,
        severity=result.severity,
        language=result.language,
        variables=result.variables,
        matched=[RuleMatch(**m.__dict__) for m in result.matched],
        route=RuleMatch(**result.route.__dict__) if result.route else None,
        fallback=result.fallback,
        out_of_hours=decision.out_of_hours,
        out_of_hours_action=decision.out_of_hours_action,
        notes=decision.notes,
        classified_at=tx.now,
    )
    events = [event.caused(EventType.CONVERSATION_CLASSIFIED, classified.model_dump(mode="json"))]
    if decision.overflowed is not None:
        events.append(
            event.caused(
                EventType.CONVERSATION_OVERFLOWED, decision.overflowed.model_dump(mode="json")
            )
        )
    if decision.state == "closed":
        closed = ConversationClosed(
            reason=decision.close_reason,
            workstream=payload.workstream,
            automated_message=decision.automated_message,
            closed_at=tx.now,
        )
        events.append(event.caused(EventType.CONVERSATION_CLOSED, closed.model_dump(mode="json")))
    else:
        queued = ConversationQueued(
            queue=decision.queue,
            workstream=payload.workstream,
            skills=result.skills,
            priority=result.priority,
            language=result.language,
            out_of_hours=decision.out_of_hours,
            queued_at=tx.now,
        )
        events.append(event.caused(EventType.CONVERSATION_QUEUED, queued.model_dump(mode="json")))
    await apply_classification(
        tx.conn,
        payload.conversation_id,
        Classified(
            state=decision.state,
            queue=decision.queue,
            skills=result.skills,
            priority=result.priority,
            severity=result.severity,
            language=result.language,
            variables=result.variables,
            trace=trace,
            out_of_hours=decision.out_of_hours,
            close_reason=decision.close_reason,
            overflowed=decision.overflowed is not None,
        ),
        tx.now,
        events[-1].id,
    )
    return events


STAGE = Stage(
    name="classify",
    handlers={EventType.CONVERSATION_OPENED: handle},
)
