"""The ``lifecycle`` stage: automated messages at each step, idle reminders and auto-close,
the end of wrap-up, and the post-conversation survey.

Events it reacts to: ``conversation.classified`` (greeting, in the language classification
chose), ``conversation.queued`` (waiting
in queue; out of hours), ``conversation.assigned`` (agent joined), ``conversation.ended``
(agent ended: wrap-up timer), ``conversation.closed`` (closed message, survey) and
``message.received`` (customer activity moves the idle timers). Its tick fires due timers
(``omniroute.domain.timers``): idle reminder, auto-close, end of wrap-up, and the bot stage's
``bot_idle`` (one sweep for every conversation timer: a second sweeper over the same table
would take the other's timers and mark them fired). Every automated message goes through
``consumers.automated`` and the outbound gate.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from consumers.automated import queue_automated
from consumers.conversations import SANDBOX_JOIN
from consumers.runtime import Stage, StageTx
from omniroute.domain.conversation import close_at_bot, close_conversation
from omniroute.domain.timers import BOT_IDLE, cancel, schedule, take_due
from omniroute.domain.window import window
from omniroute.errors import InvalidEvent, NotYetStored, TransientError
from omniroute.infra.store import Connection
from schemas.config import Config, Workstream
from schemas.events import (
    ConversationAssigned,
    ConversationClosed,
    ConversationEnded,
    ConversationOverflowed,
    ConversationQueued,
    Envelope,
    EventType,
    MessageReceived,
)

IDLE_TIMERS = ("idle_reminder", "auto_close")
OPEN_STATES = ("open", "queued", "offered", "active", "waiting")
# Idleness is the customer's silence while an agent waits on them. While the customer waits
# on us (open, queued, offered) nobody is idle: the idle timers do not fire, and the
# assignment starts them again from its own time.
AGENT_WAITS = ("active", "waiting")

_CONVERSATION = """
SELECT c.id, c.account, c.workstream, c.state, c.language, c.queue, c.queued_at, c.priority,
       c.last_customer_message_at, c.window_closed_at, c.business_number, c.customer,
       c.variables, c.assigned_at,
       ct.profile_name, a.name AS agent_name
FROM conversations c JOIN contacts ct ON ct.id = c.contact_id
LEFT JOIN agents a ON a.id = c.agent_id
WHERE c.id = $1
"""


async def _conversation(conn: Connection, conversation_id: str) -> Any:
    row = await conn.fetchrow(_CONVERSATION, conversation_id)
    if row is None:
        raise TransientError(f"conversation {conversation_id} is not stored (yet)")
    return row


async def automated(
    tx: StageTx,
    row: Any,
    kind: str,
    key: str,
    extra: dict[str, str] | None = None,
    *,
    later: bool = False,
) -> list[Envelope]:
    """The workstream's automated message of this kind for the conversation, if any."""
    workstream = tx.config.current.workstream(row["workstream"])
    if workstream is None:
        return []
    current = window(row["last_customer_message_at"], tx.now, row["window_closed_at"])
    values = {str(k): str(v) for k, v in (row["variables"] or {}).items()}
    values |= {"customer_name": row["profile_name"] or "", "agent_name": row["agent_name"] or ""}
    return await queue_automated(
        tx.conn,
        account=row["account"],
        conversation_id=str(row["id"]),
        workstream=workstream,
        kind=kind,
        language=row["language"] or workstream.language,
        window_open=current.open,
        now=tx.now + timedelta(milliseconds=1 if later else 0),  # keep the order shown
        key=key,
        placeholders=values | (extra or {}),
    )


def _configured(tx: StageTx, kinds: tuple[str, ...], workstream: str | None = None) -> bool:
    """Whether a workstream (this one, or any) has an automated message of these kinds."""
    return _has_messages(tx.config.current, kinds, workstream)


def _has_messages(config: Config, kinds: tuple[str, ...], workstream: str | None = None) -> bool:
    candidates = [config.workstream(workstream)] if workstream else config.workstreams
    return any(ws is not None and set(kinds) & set(ws.automated_messages) for ws in candidates)


def needs(config: Config) -> frozenset[str]:
    """The events this configuration can act on; the stage's queue is bound to these only
    (with no automated message and no idle timer, to the ends of conversations alone)."""
    keys = {EventType.CONVERSATION_ENDED, EventType.CONVERSATION_CLOSED}
    timed = any(
        ws.lifecycle.idle_reminder_after is not None or ws.lifecycle.auto_close_after is not None
        for ws in config.workstreams
    )
    if timed:
        keys.add(EventType.MESSAGE_RECEIVED)
    if _has_messages(config, ("greeting", "queued", "out_of_hours")):
        keys.add(EventType.CONVERSATION_QUEUED)
    if timed or _has_messages(config, ("agent_joined",)):
        keys.add(EventType.CONVERSATION_ASSIGNED)
    if any(q.overflow is not None and q.overflow.message for q in config.queues):
        keys.add(EventType.CONVERSATION_OVERFLOWED)
    return frozenset(keys)


def _timed(workstream: Workstream | None) -> bool:
    if workstream is None:
        return False
    life = workstream.lifecycle
    return life.idle_reminder_after is not None or life.auto_close_after is not None


def wants(event: Envelope, payload: BaseModel, config: Config) -> bool:
    """Whether the event can lead to anything under this configuration; the runner acks
    the others without opening a transaction (most events, when no automated message or
    idle timer is configured)."""
    if isinstance(payload, MessageReceived):
        timed = _timed(config.workstream(payload.workstream))
        return timed and not (payload.sandbox and SANDBOX_JOIN.match(payload.body))
    if isinstance(payload, ConversationQueued):
        return _has_messages(config, ("greeting", "queued", "out_of_hours"), payload.workstream)
    if isinstance(payload, ConversationAssigned):
        return any(_timed(ws) for ws in config.workstreams) or _has_messages(
            config, ("agent_joined",)
        )
    if isinstance(payload, ConversationOverflowed):
        return payload.action != "end" and bool(_overflow_message(config, payload.queue))
    return True


def _overflow_message(config: Config, queue: str) -> str | None:
    found = config.queue(queue)
    return found.overflow.message if found and found.overflow else None


# Conversations ahead in the order distribution serves (priority, then time queued), each
# part a range of ``conversations_queue`` counted up to a cap: the cost follows the position
# (at most the cap), never the length of the backlog.
AHEAD = """
SELECT (SELECT count(*) FROM (SELECT 1 FROM conversations
            WHERE state = 'queued' AND queue = $1 AND priority > $3 LIMIT $4) higher)
     + (SELECT count(*) FROM (SELECT 1 FROM conversations
            WHERE state = 'queued' AND queue = $1 AND priority = $3 AND queued_at <= $2
            LIMIT $4) same)
"""
POSITION_CAP = 500


async def _queue_position(conn: Connection, row: Any) -> str:
    """The customer's place in the queue, counting themselves; ``500+`` beyond the cap."""
    ahead = await conn.fetchval(
        AHEAD, row["queue"], row["queued_at"], row["priority"], POSITION_CAP
    )
    position = max(int(ahead or 0), 1)
    return f"{POSITION_CAP}+" if position > POSITION_CAP else str(position)


async def _survey(tx: StageTx, row: Any, workstream: Workstream) -> list[Envelope]:
    survey = workstream.survey
    if survey is None:
        return []
    language = row["language"] or workstream.language
    current = window(row["last_customer_message_at"], tx.now, row["window_closed_at"])
    events = await _send_survey(tx, row, workstream, language, current.open)
    if not events:
        return []  # not asked (skipped, or asked before): no answer to wait for
    expires = tx.now + timedelta(seconds=survey.expires_after)
    await tx.conn.execute(
        "INSERT INTO surveys (conversation_id, account, business_number, customer, workstream,"
        " asked_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        " ON CONFLICT (conversation_id) DO NOTHING",
        row["id"],
        row["account"],
        row["business_number"],
        row["customer"],
        row["workstream"],
        tx.now,
        expires,
    )
    return events


async def _send_survey(
    tx: StageTx, row: Any, workstream: Workstream, language: str, window_open: bool
) -> list[Envelope]:
    """The survey question, sent like an automated message (its template outside the
    window, else skipped), just after the closing message it follows."""
    return await queue_automated(
        tx.conn,
        account=row["account"],
        conversation_id=str(row["id"]),
        workstream=workstream,
        kind="survey",
        language=language,
        window_open=window_open,
        now=tx.now + timedelta(milliseconds=1),
        key=str(row["id"]),
        message=workstream.survey_question_message(),
    )


async def on_message(event: Envelope, payload: MessageReceived, tx: StageTx) -> list[Envelope]:
    """The customer wrote: the idle timers start again from this message."""
    if not wants(event, payload, tx.config.current):
        return []
    return await _customer_activity(payload, event.account, tx)


async def on_queued(event: Envelope, payload: ConversationQueued, tx: StageTx) -> list[Envelope]:
    """The greeting, once per conversation (a reopen queues it again), then the queue
    message with the customer's position, or the out-of-hours message."""
    if not wants(event, payload, tx.config.current):
        return []  # nothing to say: no need to read the conversation
    row = await _conversation(tx.conn, _id(event))
    events = await automated(tx, row, "greeting", f"greeting:{row['id']}")
    if payload.out_of_hours:
        return events + await automated(tx, row, "out_of_hours", event.id, later=bool(events))
    position = await _queue_position(tx.conn, row) if _configured(tx, ("queued",)) else "1"
    return events + await automated(
        tx, row, "queued", event.id, {"queue_position": position}, later=bool(events)
    )


async def on_assigned(
    event: Envelope, payload: ConversationAssigned, tx: StageTx
) -> list[Envelope]:
    if not wants(event, payload, tx.config.current):
        return []
    row = await _conversation(tx.conn, _id(event))
    await _start_idle_timers(tx, row, payload.assigned_at)
    return await automated(tx, row, "agent_joined", event.id)


async def on_ended(event: Envelope, payload: ConversationEnded, tx: StageTx) -> list[Envelope]:
    """The agent ended it: wrap-up runs until its timer."""
    row = await _conversation(tx.conn, _id(event))
    await schedule(tx.conn, str(row["id"]), "wrap_up_end", payload.until)
    return await automated(tx, row, "agent_ended", event.id)


async def on_closed(event: Envelope, payload: ConversationClosed, tx: StageTx) -> list[Envelope]:
    """Timers cancelled; the closing message, and the survey where the workstream asks."""
    row = await _conversation(tx.conn, _id(event))
    await cancel(tx.conn, str(row["id"]), [*IDLE_TIMERS, "wrap_up_end", BOT_IDLE])
    if payload.reason in ("out_of_hours", "overflow"):
        # Closed without reaching an agent: the reason's own message, and no survey.
        kind = payload.automated_message or payload.reason
        return await automated(tx, row, kind, event.id)
    events = await automated(tx, row, "closed", event.id)
    workstream = tx.config.current.workstream(row["workstream"])
    if workstream is not None and row["assigned_at"] is not None:
        # Only a conversation an agent served is asked about its service.
        events += await _survey(tx, row, workstream)
    return events


async def on_overflowed(
    event: Envelope, payload: ConversationOverflowed, tx: StageTx
) -> list[Envelope]:
    """The queue overflowed: tell the customer (transferred, or still waiting); an overflow
    that ends the conversation says it with the closing event."""
    kind = _overflow_message(tx.config.current, payload.queue)
    if payload.action == "end" or kind is None:
        return []
    row = await _conversation(tx.conn, _id(event))
    # The greeting first, as for any new conversation (once per conversation: the queued
    # event's handler finds it sent), then the overflow message.
    events = await automated(tx, row, "greeting", f"greeting:{row['id']}")
    return events + await automated(tx, row, kind, event.id, later=bool(events))


def _id(event: Envelope) -> str:
    if event.conversation_id is None:
        raise InvalidEvent(f"{event.type} without a conversation_id")
    return event.conversation_id


async def _start_idle_timers(tx: StageTx, row: Any, assigned_at: datetime) -> None:
    """An agent took the conversation: the customer's silence counts from the later of
    their last message and the assignment."""
    workstream = tx.config.current.workstream(row["workstream"])
    if workstream is None:
        return
    since = max(row["last_customer_message_at"], assigned_at)
    life = workstream.lifecycle
    for kind, after in (
        ("idle_reminder", life.idle_reminder_after),
        ("auto_close", life.auto_close_after),
    ):
        if after is not None:
            due = since + timedelta(seconds=after)
            await schedule(tx.conn, str(row["id"]), kind, due, later_only=True)


async def _customer_activity(payload: MessageReceived, account: str, tx: StageTx) -> list[Envelope]:
    """The customer wrote: the idle timers start again from this message."""
    workstream = tx.config.current.workstream(payload.workstream)
    assert workstream is not None  # ``wants`` said so
    life = workstream.lifecycle
    # The conversation the conversations stage stored this message in; a survey answer sits
    # in a closed one (nothing to time). Looked up by the message, so no race with the stage.
    stored = await tx.conn.fetchrow(
        "SELECT c.id, c.state FROM messages m JOIN conversations c ON c.id = m.conversation_id"
        " WHERE m.twilio_sid = $1",
        payload.message_sid,
    )
    if stored is None:
        raise NotYetStored(f"message {payload.message_sid} is not stored (yet)")
    if stored["state"] not in OPEN_STATES:
        return []  # a survey answer, kept in the closed conversation: nothing to time
    conversation_id = stored["id"]
    for kind, after in (
        ("idle_reminder", life.idle_reminder_after),
        ("auto_close", life.auto_close_after),
    ):
        if after is not None:
            due = payload.received_at + timedelta(seconds=after)
            await schedule(tx.conn, str(conversation_id), kind, due, later_only=True)
    return []


async def tick(tx: StageTx) -> list[Envelope]:
    """Fire the due timers (each once, whichever replica takes it)."""
    events: list[Envelope] = []
    for timer in await take_due(tx.conn, tx.now):
        row = await tx.conn.fetchrow(_CONVERSATION + " FOR UPDATE OF c", timer["conversation_id"])
        if row is None:
            continue
        key = f"timer:{timer['id']}"
        if timer["kind"] == "idle_reminder" and row["state"] in AGENT_WAITS:
            events += await automated(tx, row, "idle_reminder", key)
        elif timer["kind"] == "auto_close" and row["state"] in AGENT_WAITS:
            events.append(await close_conversation(tx.conn, str(row["id"]), "idle", tx.now))
        elif timer["kind"] == "wrap_up_end" and row["state"] == "wrap-up":
            events.append(await close_conversation(tx.conn, str(row["id"]), "agent", tx.now))
        elif timer["kind"] == BOT_IDLE and row["state"] == "bot":
            events += await _bot_idle(tx, row)
    return events


async def _bot_idle(tx: StageTx, row: Any) -> list[Envelope]:
    """Still at the bot (not escalated meanwhile): closed ``bot_idle`` if the customer has
    been silent for the bot's ``close_after``. The bot stage pushes the timer only when it
    handles a message: one stored but not handled yet (that stage behind) counts by the
    conversation's ``last_customer_message_at``, and moves the timer to its own end. A bot
    without ``close_after`` now (a reload turned it off) closes nothing; a workstream
    without a bot now leaves it to the bot stage (escalated ``bot_unavailable``)."""
    workstream = tx.config.current.workstream(row["workstream"])
    bot = workstream.bot if workstream is not None else None
    if bot is None or bot.close_after is None:
        return []
    due = row["last_customer_message_at"] + timedelta(seconds=bot.close_after)
    if due > tx.now:
        await schedule(tx.conn, str(row["id"]), BOT_IDLE, due, later_only=True)
        return []
    closed = await close_at_bot(tx.conn, str(row["id"]), "bot_idle", tx.now)
    return [closed] if closed is not None else []


STAGE = Stage(
    name="lifecycle",
    handlers={
        EventType.CONVERSATION_QUEUED: on_queued,
        EventType.CONVERSATION_ASSIGNED: on_assigned,
        EventType.CONVERSATION_ENDED: on_ended,
        EventType.CONVERSATION_CLOSED: on_closed,
        EventType.MESSAGE_RECEIVED: on_message,
        EventType.CONVERSATION_OVERFLOWED: on_overflowed,
    },
    tick=tick,
    wants=wants,
    needs=needs,
)
