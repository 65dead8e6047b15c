"""The ``bot`` stage: a workstream's bot talks to the customer before any agent does.

``conversation.bot-started`` → the bot's greeting (if configured), as a bot message.
``message.received`` in a conversation in the ``bot`` state → one *turn*:

1. in the handler's transaction: find the stored message and its conversation's state,
   without a lock (a conversation not at the bot, the agents' or closed, costs this one
   read); at the bot, lock the conversation and record the turn in ``bot_turns`` (its
   idempotency record, keyed by the customer message). A hand-off keyword, or ``max_turns``
   answers reached, escalates at once without asking the bot. Otherwise the turn is
   ``calling``;
2. after the commit (no transaction open during the call): POST to the bot over Rasa's
   REST channel protocol (``consumers.bot_protocol``), retried with backoff on refused
   connections and 5xx within the bot's ``timeout``;
3. in a transaction of its own: the turn ``answered``, each bot message stored (origin
   ``bot``) and handed to the outbound stage (the 24-hour gate applies), ``bot.replied``;
   a ``custom`` hand-off escalates with its variables and hints, a ``custom``
   ``{"resolved": true}`` closes the conversation (``resolved_by_bot``) after those
   messages, in the same transaction (their send requests come first in the outbox). A
   failure escalates (``bot_error``) under ``handoff_on_error``; else the turn stays
   ``calling`` with the error and the delivery is retried, dead-lettered with the reason at
   the delivery limit. An answer is read up to ``MAX_ANSWER_BYTES`` (beyond: invalid).

The customer's message reaches this stage beside the conversations stage, which stores it:
when it is not stored yet the handler raises ``NotYetStored``, which the runtime holds and
retries in place without counting it toward the delivery limit (``consumers.runtime``), so
a restart or backlog of the conversations stage delays the bot's answer and loses nothing.
Driving the stage from an event the conversations stage emits when it stores the message
would avoid the wait, but take a second event per customer message and a contract change.

Which bot, if any, is decided by the conversation's row — its state and its workstream, as
configured now — never by the message's workstream (a number moved to another workstream
keeps its open conversations where they are). A conversation at the bot whose workstream
has no bot any more (a reload removed it) is escalated ``bot_unavailable``: by its next
customer message, and by this stage's tick, which sweeps such conversations once per
configuration the process loads (``STRANDED``: the ``bot`` rows through
``conversations_state``, opened before the configuration was applied here). A replica
behind a reload that gave a workstream its bot would take the conversations opened at the
new bot for stranded: the message path waits ``RELOAD_GRACE`` from the conversation's
opening for this process to apply it (``NotYetStored``), and the sweep never touches
conversations opened after its configuration was applied.

``message.received`` is bound while any workstream has a bot (``needs``), whichever the
message's workstream: the row, not the message, says whether it is the bot's. With no bot
anywhere it is unbound (deployments without bots pay nothing per message); conversations
left at a bot by that reload are escalated by the tick's sweep, and what their customers
wrote meanwhile is stored by the conversations stage, so the agent sees it.

A conversation left at the bot ends after the bot's ``close_after``: each customer message
(step 1) and each answer (step 3) push its durable ``bot_idle`` timer later; the lifecycle
stage's tick fires it (``bot_idle``) if the conversation is still the bot's.

A redelivered message finds its turn: ``answered``/``skipped``/``failed`` asks nothing; a
``calling`` one (the process died during the call, or the call failed) asks again with the
same message id in ``metadata.message_id``, so the bot can dedupe.

Order: within a process, the bot calls of one conversation run one at a time (a lock per
conversation), in the order its messages reached the lock. Across replicas nothing
serializes the calls themselves: two messages of one customer handled by two replicas at
the same instant may reach the bot in either order (each turn is still recorded once, and
the conversation row lock orders the records). Where strict order across replicas
matters, run one replica, or shard the stage's queue by conversation (DESIGN.md "Past one
machine"). A slow bot never blocks other conversations: the stage's prefetch gives as many
calls in flight, on one HTTP session per process (the stage's ``resources``).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import orjson
import structlog
from pydantic import BaseModel

from consumers.automated import send_requested, text_for
from consumers.bot_protocol import (
    BotMessage,
    InvalidAnswer,
    Outgoing,
    asks_for_person,
    chosen_payload,
    handoff_of,
    outgoing,
    parse_answer,
    resolved_of,
)
from consumers.conversations import SANDBOX_JOIN
from consumers.runtime import Stage, StageTx
from omniroute.domain.conversation import Handoff, close_at_bot, escalate
from omniroute.domain.timers import BOT_IDLE, schedule
from omniroute.errors import NotYetStored, TransientError
from omniroute.infra.config_loader import LiveConfig
from omniroute.infra.outbox import add_to_outbox
from omniroute.infra.settings import Settings
from omniroute.infra.store import Connection
from schemas.config import AutomatedMessage, Bot, Config
from schemas.events import (
    BotReplied,
    ConversationBotStarted,
    Envelope,
    EventType,
    MessageReceived,
    MessageSendRequested,
    new_event,
)

log = structlog.get_logger("omniroute.bot")

# Backoff between attempts at one customer message, all within the bot's ``timeout``.
RETRY_BACKOFF_BASE = 0.2
RETRY_BACKOFF_MAX = 2.0
# Connections kept to bots by one process (the stage's prefetch bounds calls in flight).
CONNECTION_LIMIT = 100
# The most of a bot's answer read: beyond it the answer is invalid (a bot gone wrong must
# not fill the process's memory).
MAX_ANSWER_BYTES = 1024 * 1024
# How long after a conversation opened at a bot this process waits to apply the reload that
# gave its workstream the bot, before taking it for stranded (``bot_unavailable``).
RELOAD_GRACE = timedelta(seconds=30)
# Stranded conversations escalated per tick transaction.
SWEEP_LIMIT = 100


class BotUnavailable(TransientError):
    """The bot failed and the workstream does not hand off on errors: retry the message."""


# --- resources: one HTTP session and the per-conversation order, per process ------------


@dataclass
class BotClient:
    """The stage's HTTP session, and a lock per conversation with a bot call in flight
    (dropped when nobody holds or waits for it)."""

    session: aiohttp.ClientSession
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _users: dict[str, int] = field(default_factory=dict)

    @asynccontextmanager
    async def turn_of(self, conversation_id: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(conversation_id, asyncio.Lock())
        self._users[conversation_id] = self._users.get(conversation_id, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[conversation_id] -= 1
            if not self._users[conversation_id]:
                del self._users[conversation_id], self._locks[conversation_id]

    @property
    def conversations_in_flight(self) -> int:
        return len(self._locks)


@asynccontextmanager
async def bot_client(_settings: Settings, _config: LiveConfig) -> AsyncIterator[BotClient]:
    connector = aiohttp.TCPConnector(limit=CONNECTION_LIMIT)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield BotClient(session)


# --- the call ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Answered:
    messages: list[BotMessage]
    latency_ms: float


@dataclass(frozen=True)
class Failed:
    detail: str
    latency_ms: float


def _seconds(value: float) -> str:
    return f"{value:g} s"


async def ask(
    session: aiohttp.ClientSession, bot: Bot, request: dict[str, Any]
) -> Answered | Failed:
    """POST ``request`` to the bot; refused connections and 5xx are tried again with
    backoff while ``bot.timeout`` lasts (it bounds every attempt together), a 4xx or an
    answer that is not a list of bot messages is not. Never raises for the bot's failures;
    the failure's ``detail`` names no URL or token."""
    headers = {"Content-Type": "application/json"}
    if bot.token is not None:
        headers["Authorization"] = f"Bearer {bot.token.get_secret_value()}"
    body = orjson.dumps(request)
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + bot.timeout
    attempts = 0
    last = ""

    def elapsed() -> float:
        return round((loop.time() - started) * 1000, 1)

    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return Failed(last or f"timeout after {_seconds(bot.timeout)}", elapsed())
        attempts += 1
        try:
            async with session.post(
                str(bot.url),
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=remaining),
                allow_redirects=False,
            ) as response:
                status = response.status
                raw = await _read_capped(response) if 200 <= status < 300 else b""
        except TimeoutError:
            return Failed(f"timeout after {_seconds(bot.timeout)}", elapsed())
        except aiohttp.ClientError as exc:
            last = f"connection failed ({type(exc).__name__})"
        else:
            if 200 <= status < 300:
                return _answer(raw, elapsed())
            last = f"HTTP {status}"
            if status < 500:
                return Failed(last, elapsed())  # the bot refuses this request: not again
        delay = min(RETRY_BACKOFF_MAX, RETRY_BACKOFF_BASE * 2 ** (attempts - 1))
        delay *= random.uniform(0.5, 1.0)
        if loop.time() + delay >= deadline:
            return Failed(f"{last}, {attempts} attempts in {_seconds(bot.timeout)}", elapsed())
        await asyncio.sleep(delay)


def _answer(raw: bytes | None, latency_ms: float) -> Answered | Failed:
    """A 2xx's body (None: longer than ``MAX_ANSWER_BYTES``) as the bot's messages."""
    if raw is None:
        return Failed(f"invalid answer: larger than {MAX_ANSWER_BYTES} bytes", latency_ms)
    try:
        messages = parse_answer(raw) if raw.strip() else []
    except InvalidAnswer as exc:
        return Failed(f"invalid answer: {exc}", latency_ms)
    return Answered(messages, latency_ms)


async def _read_capped(response: aiohttp.ClientResponse) -> bytes | None:
    """The answer's body, or None when it is longer than ``MAX_ANSWER_BYTES``."""
    if response.content_length is not None and response.content_length > MAX_ANSWER_BYTES:
        return None
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            return None
    return bytes(body)


# --- bot messages to the customer --------------------------------------------------------


async def queue_bot_message(
    conn: Connection,
    *,
    account: str,
    conversation_id: str,
    message_id: str,
    message: Outgoing,
    now: datetime,
    correlation_id: str | None,
    causation_id: str | None,
) -> list[Envelope]:
    """Store a bot message (origin ``bot``) and ask the outbound stage to send it, through
    the window gate like any message. Idempotent on ``message_id``."""
    kind = "media" if message.media_urls else "text"
    inserted = await conn.fetchval(
        "INSERT INTO messages (id, conversation_id, direction, body, media, status, received_at,"
        " kind, origin, attributes) VALUES ($1, $2, 'outbound', $3, $4, 'requested', $5, $6,"
        " 'bot', $7) ON CONFLICT (id) DO NOTHING RETURNING id",
        message_id,
        conversation_id,
        message.body,
        [{"url": url} for url in message.media_urls],
        now,
        kind,
        {"buttons": message.buttons} if message.buttons else {},
    )
    if inserted is None:
        return []
    data = MessageSendRequested(message_id=message_id, kind=kind, requested_at=now)
    return [
        send_requested(
            data,
            account=account,
            conversation_id=conversation_id,
            correlation_id=correlation_id,
            causation_id=causation_id,
        )
    ]


def _bot_message_id(key: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"bot:{key}"))


def _bot_of(config: Config, workstream: str) -> Bot | None:
    found = config.workstream(workstream)
    return found.bot if found is not None else None


# --- conversation.bot-started ------------------------------------------------------------


async def on_started(
    event: Envelope, payload: ConversationBotStarted, tx: StageTx
) -> list[Envelope]:
    """The bot's greeting, once per conversation, while the conversation is the bot's."""
    workstream = tx.config.current.workstream(payload.workstream)
    bot = workstream.bot if workstream is not None else None
    if workstream is None or bot is None or not bot.greeting or event.conversation_id is None:
        return []
    state = await tx.conn.fetchval(
        "SELECT state FROM conversations WHERE id = $1", event.conversation_id
    )
    if state is None:
        raise TransientError(f"conversation {event.conversation_id} is not stored (yet)")
    if state != "bot":
        return []
    return await _greeting(tx, event, event.conversation_id, bot, workstream.language)


async def _greeting(
    tx: StageTx, event: Envelope, conversation_id: str, bot: Bot, language: str
) -> list[Envelope]:
    """The bot's greeting, once per conversation (whichever comes first: the bot's start,
    or its first turn, which stores it before the bot's answer so the thread reads in
    order)."""
    if not bot.greeting:
        return []
    text = text_for(AutomatedMessage(text=bot.greeting), None, language)
    return await queue_bot_message(
        tx.conn,
        account=event.account,
        conversation_id=conversation_id,
        message_id=_bot_message_id(f"greeting:{conversation_id}"),
        message=Outgoing(text),
        now=tx.now,
        correlation_id=event.correlation_id,
        causation_id=event.id,
    )


# --- message.received --------------------------------------------------------------------

# The customer's message, its conversation and the customer's name; read first without a
# lock (most conversations are not at the bot), then again locked (``_MESSAGE_LOCKED``: the
# turns of one conversation are numbered and recorded one at a time across replicas).
_MESSAGE = """
SELECT m.id, m.body, m.media, c.id AS conversation_id, c.state, c.account, c.customer,
       c.workstream, c.language, c.variables, c.opened_at, ct.profile_name
FROM messages m
JOIN conversations c ON c.id = m.conversation_id
JOIN contacts ct ON ct.id = c.contact_id
WHERE m.twilio_sid = $1
"""
_MESSAGE_LOCKED = _MESSAGE + "FOR UPDATE OF c"
# Conversations at a bot whose workstream has none now (``$1``: those that have one),
# opened before this process applied its configuration (``$2``).
STRANDED = """
SELECT id, workstream FROM conversations
WHERE state = 'bot' AND opened_at < $2 AND workstream <> ALL($1::text[])
ORDER BY opened_at LIMIT $3
FOR UPDATE SKIP LOCKED
"""
# The conversation's turns so far and the buttons of its last answer (``bot_turns_conversation``).
_TURNS = """
SELECT count(*) AS turns, count(*) FILTER (WHERE state = 'answered') AS answered,
       (SELECT answer -> 'buttons' FROM bot_turns
         WHERE conversation_id = $1 AND state = 'answered'
         ORDER BY turn DESC LIMIT 1) AS buttons
FROM bot_turns WHERE conversation_id = $1
"""


@dataclass(frozen=True)
class Call:
    """One turn to ask the bot about, as the after-commit work needs it."""

    message_id: str
    conversation_id: str
    account: str
    workstream: str
    turn: int
    request: dict[str, Any]
    correlation_id: str | None
    causation_id: str


def _media_paths(conversation_id: str, message_id: str, media: list[Any]) -> list[dict[str, Any]]:
    """The customer's media as the bot may know it: content types and our media endpoint
    (never Twilio's URL: fetching it takes the account's credentials)."""
    return [
        {
            "content_type": item.get("content_type"),
            "path": f"/api/conversations/{conversation_id}/messages/{message_id}/media/{n}",
        }
        for n, item in enumerate(media)
    ]


def build_request(row: Any, message: str, workstream_language: str) -> dict[str, Any]:
    """The REST channel body for one customer message (``sender`` is the conversation)."""
    conversation_id, message_id = str(row["conversation_id"]), str(row["id"])
    return {
        "sender": conversation_id,
        "message": message,
        "metadata": {
            "message_id": message_id,
            "customer": row["customer"],
            "profile_name": row["profile_name"],
            "language": row["language"] or workstream_language,
            "variables": row["variables"] or {},
            "media": _media_paths(conversation_id, message_id, row["media"] or []),
            "workstream": row["workstream"],
        },
    }


async def _skip_and_escalate(tx: StageTx, row: Any, turn: int, handoff: Handoff) -> list[Envelope]:
    await tx.conn.execute(
        "INSERT INTO bot_turns (message_id, conversation_id, turn, state, error, answered_at)"
        " VALUES ($1, $2, $3, 'skipped', $4, $5) ON CONFLICT (message_id) DO NOTHING",
        row["id"],
        row["conversation_id"],
        turn,
        handoff.detail,
        tx.now,
    )
    escalated = await escalate(
        tx.conn, str(row["conversation_id"]), handoff, row["workstream"], tx.now
    )
    return [escalated] if escalated is not None else []


def _unavailable(workstream: str) -> str:
    return f"the workstream {workstream!r} has no bot (any more)"


async def on_message(event: Envelope, payload: MessageReceived, tx: StageTx) -> list[Envelope]:
    row = await tx.conn.fetchrow(_MESSAGE, payload.message_sid)
    if row is None:
        raise NotYetStored(f"message {payload.message_sid} is not stored (yet)")
    if row["state"] != "bot":
        return []  # agents' (escalated, or a workstream given a bot later): not the bot's
    row = await tx.conn.fetchrow(_MESSAGE_LOCKED, payload.message_sid)
    if row is None or row["state"] != "bot":
        return []  # handed off or closed since the first read
    turn = await tx.conn.fetchrow(
        "SELECT turn, state, request FROM bot_turns WHERE message_id = $1", row["id"]
    )
    if turn is not None and turn["state"] != "calling":
        return []  # answered, skipped or failed before: a redelivery asks nothing
    workstream = tx.config.current.workstream(row["workstream"])
    bot = workstream.bot if workstream is not None else None
    counts = await tx.conn.fetchrow(_TURNS, row["conversation_id"])
    assert counts is not None  # an aggregate: always one row
    if workstream is None or bot is None:
        if tx.now - row["opened_at"] < RELOAD_GRACE:
            # Opened at a bot moments ago: this process may not have applied the reload
            # that gave the workstream its bot yet.
            raise NotYetStored(f"{_unavailable(row['workstream'])} in this process's configuration")
        number = turn["turn"] if turn is not None else int(counts["turns"]) + 1
        handoff = Handoff(
            "bot_unavailable", _unavailable(row["workstream"]), turns=int(counts["answered"])
        )
        return await _skip_and_escalate(tx, row, number, handoff)
    events: list[Envelope] = []
    if turn is None:
        number = int(counts["turns"]) + 1
        keyword = asks_for_person(row["body"], bot.handoff_keywords)
        if keyword is not None:
            handoff = Handoff(
                "customer_asked",
                f"the customer wrote {keyword!r}",
                turns=int(counts["answered"]),
            )
            return await _skip_and_escalate(tx, row, number, handoff)
        if counts["answered"] >= bot.max_turns:
            detail = f"{counts['answered']} bot answers (max_turns {bot.max_turns})"
            return await _skip_and_escalate(
                tx, row, number, Handoff("max_turns", detail, turns=int(counts["answered"]))
            )
        buttons = counts["buttons"] or []
        text = chosen_payload(row["body"], buttons) if buttons else None
        request = build_request(row, text if text is not None else row["body"], workstream.language)
        if number == 1:
            events += await _greeting(
                tx, event, str(row["conversation_id"]), bot, workstream.language
            )
        await tx.conn.execute(
            "INSERT INTO bot_turns (message_id, conversation_id, turn, state, request)"
            " VALUES ($1, $2, $3, 'calling', $4)",
            row["id"],
            row["conversation_id"],
            number,
            request,
        )
    else:
        number, request = turn["turn"], turn["request"]
    await _idle_from(tx.conn, str(row["conversation_id"]), bot, payload.received_at)
    call = Call(
        message_id=str(row["id"]),
        conversation_id=str(row["conversation_id"]),
        account=row["account"],
        workstream=row["workstream"],
        turn=number,
        request=request,
        correlation_id=event.correlation_id,
        causation_id=event.id,
    )
    tx.after_commit.append(lambda: _call(tx, call))
    return events


async def _call(tx: StageTx, call: Call) -> list[Envelope]:
    """Ask the bot (no transaction open), then record what it said or that it failed."""
    store, client = tx.store, tx.resources
    assert store is not None and isinstance(client, BotClient)
    async with client.turn_of(call.conversation_id):
        # An earlier message of the conversation may have handed it off meanwhile.
        async with store.transaction() as conn:
            current = await conn.fetchrow(
                "SELECT c.state, t.state AS turn_state FROM bot_turns t"
                " JOIN conversations c ON c.id = t.conversation_id WHERE t.message_id = $1",
                call.message_id,
            )
        if current is None or current["turn_state"] != "calling":
            return []
        bot = _bot_of(tx.config.current, call.workstream)
        if current["state"] != "bot":
            return await tx.until_stored(lambda: _record_skip(store, call, "no longer the bot's"))
        if bot is None:  # a reload removed the workstream's bot since the turn was recorded
            return await tx.until_stored(lambda: _record_unavailable(store, tx, call))
        outcome = await ask(client.session, bot, call.request)
        log.info(
            "bot.called",
            conversation_id=call.conversation_id,
            turn=call.turn,
            outcome="answered" if isinstance(outcome, Answered) else "failed",
            detail=outcome.detail if isinstance(outcome, Failed) else None,
            latency_ms=outcome.latency_ms,
        )

        async def record() -> list[Envelope]:
            async with store.transaction() as conn:
                events = await _record(conn, tx, call, bot, outcome)
                return await add_to_outbox(conn, events)

        events = await tx.until_stored(record)
    if isinstance(outcome, Failed) and not bot.handoff_on_error:
        raise BotUnavailable(f"the bot failed: {outcome.detail}")
    return events


async def _record_unavailable(store: Any, tx: StageTx, call: Call) -> list[Envelope]:
    """The turn skipped, and the conversation escalated ``bot_unavailable``."""
    async with store.transaction() as conn:
        now = datetime.now(tx.now.tzinfo)
        skipped = await conn.fetchval(
            "UPDATE bot_turns SET state = 'skipped', error = $2, answered_at = $3"
            " WHERE message_id = $1 AND state = 'calling' RETURNING message_id",
            call.message_id,
            _unavailable(call.workstream),
            now,
        )
        if skipped is None:
            return []
        handoff = Handoff(
            "bot_unavailable",
            _unavailable(call.workstream),
            turns=await _answered(conn, call.conversation_id),
        )
        escalated = await escalate(conn, call.conversation_id, handoff, call.workstream, now)
        added: list[Envelope] = await add_to_outbox(conn, [escalated] if escalated else [])
        return added


async def _record_skip(store: Any, call: Call, why: str) -> list[Envelope]:
    async with store.transaction() as conn:
        await conn.execute(
            "UPDATE bot_turns SET state = 'skipped', error = $2, answered_at = now()"
            " WHERE message_id = $1 AND state = 'calling'",
            call.message_id,
            why,
        )
    return []


async def _record(
    conn: Connection, tx: StageTx, call: Call, bot: Bot, outcome: Answered | Failed
) -> list[Envelope]:
    """The turn's outcome, once (another replica may have recorded it meanwhile)."""
    now = datetime.now(tx.now.tzinfo)
    state = await conn.fetchval(
        "SELECT c.state FROM conversations c WHERE c.id = $1 FOR UPDATE", call.conversation_id
    )
    turn_state = await conn.fetchval(
        "SELECT state FROM bot_turns WHERE message_id = $1 FOR UPDATE", call.message_id
    )
    if turn_state != "calling":
        return []
    if isinstance(outcome, Failed):
        if not bot.handoff_on_error:
            await conn.execute(
                "UPDATE bot_turns SET error = $2 WHERE message_id = $1",
                call.message_id,
                outcome.detail,
            )
            return []
        await conn.execute(
            "UPDATE bot_turns SET state = 'failed', error = $2, answered_at = $3"
            " WHERE message_id = $1",
            call.message_id,
            outcome.detail,
            now,
        )
        answered = await _answered(conn, call.conversation_id)
        escalated = await escalate(
            conn,
            call.conversation_id,
            Handoff("bot_error", outcome.detail, turns=answered),
            call.workstream,
            now,
        )
        return [escalated] if escalated is not None else []
    messages = outcome.messages
    handoff = handoff_of(messages)
    sent = outgoing(messages)
    buttons = [b for message in sent for b in message.buttons]
    answer = {
        "messages": [m.model_dump(mode="json", exclude_none=True) for m in messages],
        "buttons": buttons,
    }
    if state != "bot":
        await conn.execute(
            "UPDATE bot_turns SET state = 'skipped', answer = $2, answered_at = $3,"
            " error = 'no longer the bot''s when it answered' WHERE message_id = $1",
            call.message_id,
            answer,
            now,
        )
        return []
    await conn.execute(
        "UPDATE bot_turns SET state = 'answered', answer = $2, answered_at = $3, error = NULL"
        " WHERE message_id = $1",
        call.message_id,
        answer,
        now,
    )
    events: list[Envelope] = []
    for n, message in enumerate(sent):
        events += await queue_bot_message(
            conn,
            account=call.account,
            conversation_id=call.conversation_id,
            message_id=_bot_message_id(f"{call.message_id}:{n}"),
            message=message,
            # A millisecond apart: the thread shows them in the bot's order.
            now=now + timedelta(milliseconds=n),
            correlation_id=call.correlation_id,
            causation_id=call.causation_id,
        )
    replied = BotReplied(
        message_id=call.message_id,
        turn=call.turn,
        texts=[m.body for m in sent if m.body],
        media=sum(len(m.media_urls) for m in sent),
        buttons=len(buttons),
        handoff=handoff is not None,
        latency_ms=outcome.latency_ms,
        replied_at=now,
    )
    events.append(_event(EventType.BOT_REPLIED, call, replied, now))
    if handoff is None and resolved_of(messages):
        # After the answer's messages: their send requests are ahead in this transaction's
        # outbox rows, and the outbound stage sends a closed conversation's messages too.
        # At the last message's moment (each a millisecond apart): nothing after the close.
        at = now + timedelta(milliseconds=max(len(sent) - 1, 0))
        closed = await close_at_bot(conn, call.conversation_id, "resolved_by_bot", at)
        return events + ([closed] if closed is not None else [])
    if handoff is None:
        await _idle_from(conn, call.conversation_id, bot, now)
    if handoff is not None:
        escalated = await escalate(
            conn,
            call.conversation_id,
            Handoff(
                "bot",
                None,
                variables=handoff.variables,
                skills=handoff.skills,
                priority=handoff.priority,
                queue=handoff.queue,
                turns=await _answered(conn, call.conversation_id),
            ),
            call.workstream,
            now,
        )
        if escalated is not None:
            events.append(escalated)
    return events


async def _idle_from(conn: Connection, conversation_id: str, bot: Bot, since: datetime) -> None:
    """The conversation closes ``bot_idle`` once ``close_after`` passes from ``since`` (a
    customer message or a bot answer) with nothing later: only ever pushed later (messages
    handled out of order), never set again for a moment it already fired for."""
    if bot.close_after is not None:
        due = since + timedelta(seconds=bot.close_after)
        await schedule(conn, conversation_id, BOT_IDLE, due, later_only=True)


async def _answered(conn: Connection, conversation_id: str) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM bot_turns WHERE conversation_id = $1 AND state = 'answered'",
        conversation_id,
    )
    return count


def _event(kind: str, call: Call, data: BaseModel, now: datetime) -> Envelope:
    return new_event(
        kind,
        account=call.account,
        key=(call.message_id,),
        data=data.model_dump(mode="json"),
        occurred_at=now,
        conversation_id=call.conversation_id,
        correlation_id=call.correlation_id,
        causation_id=call.causation_id,
    )


# --- the tick: conversations left at a bot that is gone ---------------------------------


@dataclass
class _Sweep:
    """The stranded-conversation sweep of one loaded configuration: from when it applied
    here, and whether it is done."""

    applied_at: datetime | None = None
    done: bool = False


async def tick(tx: StageTx) -> list[Envelope]:
    """Once per configuration this process loads (a start, a reload): escalate
    ``bot_unavailable`` the conversations at a bot whose workstream has none in it, so they
    do not wait for their customer's next message. Afterwards a tick costs no query."""
    sweep = tx.config.derive("bot.stranded", lambda _config: _Sweep())
    if sweep.applied_at is None:
        sweep.applied_at = tx.now
    if sweep.done:
        return []
    with_bot = [ws.name for ws in tx.config.current.workstreams if ws.bot is not None]
    rows = await tx.conn.fetch(STRANDED, with_bot, sweep.applied_at, SWEEP_LIMIT)
    if not rows:
        # Done only when a sweep finds nothing: a batch whose transaction failed, or rows
        # another replica held, are looked for again (the runner ticks again at once while
        # a tick makes progress).
        sweep.done = True
    events: list[Envelope] = []
    for row in rows:
        conversation_id = str(row["id"])
        handoff = Handoff(
            "bot_unavailable",
            _unavailable(row["workstream"]),
            turns=await _answered(tx.conn, conversation_id),
        )
        escalated = await escalate(tx.conn, conversation_id, handoff, row["workstream"], tx.now)
        events += [escalated] if escalated is not None else []
    return events


# --- what the configuration asks of the stage --------------------------------------------


def needs(config: Config) -> frozenset[str]:
    """With no bot in any workstream the stage's queue is bound to nothing."""
    if any(ws.bot is not None for ws in config.workstreams):
        return frozenset({EventType.MESSAGE_RECEIVED, EventType.CONVERSATION_BOT_STARTED})
    return frozenset()


def wants(event: Envelope, payload: BaseModel, config: Config) -> bool:
    """Customer messages while any workstream has a bot (its conversation's row says whose
    it is; never a sandbox join, which is not stored), and bot starts with a greeting to
    send; the rest is acked without a transaction."""
    if isinstance(payload, MessageReceived):
        return any(ws.bot is not None for ws in config.workstreams) and not (
            payload.sandbox and SANDBOX_JOIN.match(payload.body)
        )
    if isinstance(payload, ConversationBotStarted):
        bot = _bot_of(config, payload.workstream)
        return bot is not None and bool(bot.greeting)
    return True


STAGE = Stage(
    name="bot",
    handlers={
        EventType.CONVERSATION_BOT_STARTED: on_started,
        EventType.MESSAGE_RECEIVED: on_message,
    },
    resources=bot_client,
    tick=tick,
    wants=wants,
    needs=needs,
)
