"""The ``classify`` stage: a new conversation gets its queue, skills and priority.

``conversation.opened`` (or ``conversation.escalated``: its bot handed it off, with the
variables it collected and its hints) → run the workstream's rulesets and route-to-queue
rules over the conversation's context → apply the queue's operating hours → persist the
outcome and its trace → ``conversation.classified`` then ``conversation.queued`` (or
``conversation.closed`` when the queue's out-of-hours action says so). Idempotent: a
conversation not ``open`` (classified already, or still its bot's) is left alone. A
workstream or queue that no longer exists falls back (workstream's fallback queue, else the
configuration's default queue) with a note, never a drop.
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
    ConversationEscalated,
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
    *,
    variables: dict[str, Any] | None = None,
    bot: dict[str, Any] | None = None,
) -> Decision:
    """Pure: which queue, skills and priority, and what the queue's hours say, at ``now``.

    ``variables`` are the conversation's context variables so far (what its bot collected),
    seen by the rules as ``variables.<name>``; ``bot`` the bot's hand-off hint (skills,
    priority, queue), applied over the rules' outcome (``apply_bot``)."""
    notes: list[str] = []
    workstream = compiled.get(opened.workstream)
    if workstream is None:
        default = config.default_queue() or "general"
        notes.append(f"workstream {opened.workstream!r} no longer exists; default queue used")
        result = Classification(queue=default, fallback=True, language="en")
    else:
        context = build_context(config, account, opened, now)
        context |= {f"variables.{k}": v for k, v in (variables or {}).items()}
        context |= {f"skills.{k}": v for k, v in ((bot or {}).get("skills") or {}).items()}
        result = classify(workstream, context)
    if bot is not None:
        notes += apply_bot(config, result, bot)
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


def apply_bot(config: Config, result: Classification, bot: dict[str, Any]) -> list[str]:
    """The bot's hand-off hint over the rules' outcome: its skills merge in (the higher
    proficiency of the two), its priority wins when higher, its queue (when configured)
    replaces the routing decision. The notes say what changed, for the trace."""
    notes = [f"escalated by the bot ({bot.get('reason')})"]
    for skill, level in (bot.get("skills") or {}).items():
        result.skills[skill] = max(int(level), result.skills.get(skill, 0))
    if bot.get("skills"):
        notes.append(f"bot's skills merged: {bot['skills']}")
    priority = bot.get("priority")
    if priority is not None and int(priority) > result.priority:
        result.priority = int(priority)
        notes.append(f"bot's priority {priority} is higher: used")
    queue = bot.get("queue")
    if queue is not None:
        if config.queue(queue) is None:
            notes.append(f"bot's queue {queue!r} is not configured; the rules' queue kept")
        else:
            result.queue, result.fallback, result.route = queue, False, None
            notes.append(f"bot's queue {queue!r} replaces the routing decision")
    return notes


# The conversation, locked, its contact's name and its first customer message, in one
# round trip (by primary keys and ``messages_conversation``).
_CONVERSATION = """
SELECT c.id, c.state, c.contact_id, c.business_number, c.customer, c.workstream, c.opened_at,
       c.variables, c.bot_handoff, ct.profile_name,
       m.found, m.id AS message_id, m.twilio_sid, m.body, m.media
FROM conversations c
JOIN contacts ct ON ct.id = c.contact_id
LEFT JOIN LATERAL (
    SELECT true AS found, id, twilio_sid, body, media FROM messages
    WHERE conversation_id = c.id AND direction = 'inbound'
    ORDER BY received_at, id LIMIT 1
) m ON true
WHERE c.id = $1
FOR UPDATE OF c
"""


async def handle(event: Envelope, payload: ConversationOpened, tx: StageTx) -> list[Envelope]:
    # The earliest message by receipt time is the first one, whichever replica committed
    # first (two messages sent a moment apart can be stored in either order).
    row = await tx.conn.fetchrow(_CONVERSATION, payload.conversation_id)
    if row is None:
        raise TransientError(f"conversation {payload.conversation_id} is not stored (yet)")
    if row["state"] != "open":
        return []  # classified already (a redelivery), or its bot's until it escalates
    if row["found"]:
        payload = payload.model_copy(
            update={
                "first_message_body": row["body"],
                "has_media": bool(row["media"]),
                "media_count": len(row["media"]),
            }
        )
    return await _classify(event, payload, row, tx)


async def on_escalated(
    event: Envelope, payload: ConversationEscalated, tx: StageTx
) -> list[Envelope]:
    """The bot handed the conversation off: classified as a new one (the same decision
    as ``handle``), with the variables it collected and its hints."""
    assert event.conversation_id is not None
    row = await tx.conn.fetchrow(_CONVERSATION, event.conversation_id)
    if row is None:
        raise TransientError(f"conversation {event.conversation_id} is not stored (yet)")
    if row["state"] != "open":
        return []  # classified already: this is a redelivery
    opened = ConversationOpened(
        conversation_id=str(row["id"]),
        contact_id=str(row["contact_id"]),
        business_number=row["business_number"],
        customer=row["customer"],
        workstream=row["workstream"],
        profile_name=row["profile_name"],
        first_message_id=str(row["message_id"] or ""),
        first_message_sid=row["twilio_sid"] or "",
        first_message_body=row["body"] or "",
        has_media=bool(row["media"]),
        media_count=len(row["media"] or []),
        opened_at=row["opened_at"],
    )
    return await _classify(event, opened, row, tx)


async def _classify(
    event: Envelope, payload: ConversationOpened, row: Any, tx: StageTx
) -> list[Envelope]:
    config = tx.config.current
    stored_variables: dict[str, Any] = row["variables"] or {}
    decision = decide(
        config,
        tx.config.derive("classify", compile_config),
        event.account,
        payload,
        tx.now,
        variables=stored_variables,
        bot=row["bot_handoff"],
    )
    await check_overflow(tx.conn, config, decision, tx.now)
    result = decision.result
    result.variables = {**stored_variables, **result.variables}
    trace = {**result.trace(), "notes": decision.notes, "out_of_hours": decision.out_of_hours}
    if row["bot_handoff"] is not None:
        trace["bot"] = row["bot_handoff"]
    for note in decision.notes:
        log.info("classify.note", note=note)  # routine: also in the trace and the event
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
    handlers={
        EventType.CONVERSATION_OPENED: handle,
        EventType.CONVERSATION_ESCALATED: on_escalated,
    },
)
