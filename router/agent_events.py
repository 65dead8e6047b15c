"""``GET /api/me/events``: each agent's live stream (Server-Sent Events) of its offers,
assignments, transfers, closes and its customers' new messages, so an agent UI never polls.

While at least one agent is connected, one exclusive queue per router process receives
the events from the exchange; the hub routes each to the agents it concerns (``audience``:
the agent named in the event, or for a customer message, the agent who has that
conversation) and drops it for anyone not connected. With nobody connected the feed is
closed, so a router that only takes webhooks does not also consume every event. The stream
is a live view: the agent's current state is always available from the REST calls.

A browser's ``EventSource`` reconnects by itself after a drop (after the ``retry: 2000`` the
stream starts with) and sends the id of the last event it got as ``Last-Event-ID`` (WHATWG
HTML, "Server-sent events", 9.2.4 and 9.2.6). The stream then subscribes first, replays
from the ``outbox`` log the agent's events written after that id (in the log's
``(txid, seq)`` order, ``omniroute.infra.outbox``; the same ``audience`` rule; at most
``REPLAY_LIMIT`` rows of the log), and continues live, skipping the ids it replayed (the
relay may publish them after the replay read them). When the id is not in the log (pruned
after ``outbox_retention``, never there, or more than ``REPLAY_LIMIT`` rows behind), one
``event: reset`` frame tells the client to fetch its state again; its empty ``id:`` clears
the browser's last event id. Events the router publishes straight from a webhook
(``message.received``, ``message.status``) are not in the outbox: a customer's message that
arrived during the drop is not replayed, and a ``Last-Event-ID`` naming one gets a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol

import aiohttp
import orjson
import structlog
from aio_pika.abc import AbstractIncomingMessage
from aiohttp import web

from omniroute.errors import StoreUnavailable
from omniroute.infra.bus import Bus
from omniroute.infra.store import UNAVAILABLE, Store
from router import session
from router.auth import current_agent
from router.routes import Content, Route
from router.state import BUS, STORE
from schemas.events import EXCHANGE, EventType

log = structlog.get_logger("omniroute.agent_events")

STREAMED = (
    "conversation.*",
    "offer.*",
    "message.*",  # customer messages and delivery updates of the agent's messages
    EventType.AGENT_PRESENCE_CHANGED,
)
HEARTBEAT_SECONDS = 15.0
BACKLOG = 1000  # events held per slow client; past that its newest events are dropped
FEED_WAIT_SECONDS = 2.0  # a client waits this long for the feed to be bound
RETRY_MS = 2000  # the reconnection delay the stream asks browsers for
REPLAY_LIMIT = 2000  # rows of the outbox log a reconnect replays at most; past that: reset
_STREAMED_PREFIXES = ("conversation.", "offer.", "message.")

# The rows of the log after the event the client saw last, in the relay's order: the id by
# its primary key, then a walk of ``outbox_log`` from there. No row when the id is unknown;
# one row of NULLs when it is known and nothing follows.
REPLAY = """
SELECT o.id, o.body
FROM (SELECT txid, seq FROM outbox WHERE id = $1) last
LEFT JOIN LATERAL (
    SELECT id, body, txid, seq FROM outbox
    WHERE (txid, seq) > (last.txid, last.seq)
    ORDER BY txid, seq
    LIMIT $2
) o ON true
ORDER BY o.txid, o.seq
"""
OWNER = "SELECT agent_id FROM conversations WHERE id = $1"
CUSTOMER_OWNER = (
    "SELECT agent_id FROM conversations WHERE account = $1 AND business_number = $2"
    " AND customer = $3 AND state <> 'closed' AND agent_id IS NOT NULL"
)
OWNERS = "SELECT id::text, agent_id FROM conversations WHERE id = ANY($1::uuid[])"
CUSTOMER_OWNERS = """
SELECT c.account, c.business_number, c.customer, c.agent_id
FROM unnest($1::text[], $2::text[], $3::text[]) AS k(account, business_number, customer)
JOIN conversations c ON c.account = k.account AND c.business_number = k.business_number
    AND c.customer = k.customer AND c.state <> 'closed' AND c.agent_id IS NOT NULL
"""

Customer = tuple[str, str, str]  # account, business number, customer


class Owners(Protocol):
    """Who has a conversation now: looked up one by one (live) or for a batch (replay)."""

    async def of_conversation(self, conversation_id: str) -> str | None: ...

    async def of_customer(self, customer: Customer) -> str | None: ...


def streamed(event_type: str) -> bool:
    """Whether an event of this type is on the stream (the feed's bindings, ``STREAMED``)."""
    return event_type.startswith(_STREAMED_PREFIXES) or (
        event_type == EventType.AGENT_PRESENCE_CHANGED
    )


def _customer(event: dict[str, Any]) -> Customer:
    data = event.get("data") or {}
    return (str(event.get("account")), str(data.get("business_number")), str(data.get("customer")))


async def audience(event: dict[str, Any], owners: Owners) -> set[str]:
    """The agents an event concerns: those it names; else, for a customer's message, the
    agent who has the customer's open conversation; else the conversation's agent."""
    data = event.get("data") or {}
    agents = {str(data[k]) for k in ("agent_id", "from_agent", "to_agent") if data.get(k)}
    if agents:
        return agents
    if event.get("type") == EventType.MESSAGE_RECEIVED:
        agent = await owners.of_customer(_customer(event))
    elif event.get("conversation_id"):
        agent = await owners.of_conversation(event["conversation_id"])
    else:
        agent = None
    return {agent} if agent else set()


class _LiveOwners:
    """One query per event, as each arrives."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def of_conversation(self, conversation_id: str) -> str | None:
        pool = await self._store.pool()
        agent = await pool.fetchval(OWNER, conversation_id)
        return str(agent) if agent else None

    async def of_customer(self, customer: Customer) -> str | None:
        pool = await self._store.pool()
        agent = await pool.fetchval(CUSTOMER_OWNER, *customer)
        return str(agent) if agent else None


class _BatchOwners:
    """Every conversation a replay asks about, read in two statements beforehand."""

    def __init__(self) -> None:
        self._conversations: dict[str, str | None] = {}
        self._customers: dict[Customer, str | None] = {}

    @classmethod
    async def load(cls, conn: Any, events: Iterable[dict[str, Any]]) -> _BatchOwners:
        owners = cls()
        ids: set[str] = set()
        customers: set[Customer] = set()
        for event in events:
            if event.get("type") == EventType.MESSAGE_RECEIVED:
                customers.add(_customer(event))
            elif event.get("conversation_id"):
                ids.add(str(event["conversation_id"]))
        if ids:
            for row in await conn.fetch(OWNERS, sorted(ids)):
                owners._conversations[row["id"]] = row["agent_id"] and str(row["agent_id"])
        if customers:
            keys = sorted(customers)
            columns = ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys])
            rows = await conn.fetch(CUSTOMER_OWNERS, *columns)
            for row in rows:
                key = (row["account"], row["business_number"], row["customer"])
                owners._customers[key] = str(row["agent_id"])
        return owners

    async def of_conversation(self, conversation_id: str) -> str | None:
        return self._conversations.get(str(conversation_id))

    async def of_customer(self, customer: Customer) -> str | None:
        return self._customers.get(customer)


async def replay(store: Store, last_id: str, agent_id: str) -> list[dict[str, Any]] | None:
    """The agent's events written to the outbox after ``last_id``, in the log's order; None
    when the client must fetch its state again (``last_id`` unknown or too far behind)."""
    try:
        key = uuid.UUID(last_id)
    except ValueError:
        return None
    try:
        async with store.transaction() as conn:
            rows = await conn.fetch(REPLAY, key, REPLAY_LIMIT + 1)
            if not rows or len(rows) > REPLAY_LIMIT:
                return None
            events = [r["body"] for r in rows if r["id"] is not None]
            events = [e for e in events if streamed(str(e.get("type")))]
            owners = await _BatchOwners.load(conn, events)
            return [e for e in events if agent_id in await audience(e, owners)]
    except StoreUnavailable:
        return None
    except UNAVAILABLE:
        return None


class AgentEventHub:
    def __init__(self, bus: Bus, store: Store) -> None:
        self._bus = bus
        self._store = store
        self._clients: dict[str, set[asyncio.Queue[dict[str, Any]]]] = defaultdict(set)
        self._owners = _LiveOwners(store)
        self._task: asyncio.Task[None] | None = None
        self._bound = asyncio.Event()
        self.closing = asyncio.Event()

    async def start(self) -> None:
        """Nothing to do until an agent connects: the feed opens with the first client."""

    async def stop(self) -> None:
        await self._close_feed()

    @contextlib.asynccontextmanager
    async def subscribe(self, agent_id: str) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        """A queue of this agent's events; the feed is bound before this yields (or the
        broker is away, in which case the stream starts and events follow once it is back)."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(BACKLOG)
        self._clients[agent_id].add(queue)
        if self._task is None or self._task.done():
            self._bound = asyncio.Event()
            self._task = asyncio.create_task(self._consume(self._bound), name="agent-events")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._bound.wait(), FEED_WAIT_SECONDS)
        try:
            yield queue
        finally:
            self._clients[agent_id].discard(queue)
            if not self._clients[agent_id]:
                del self._clients[agent_id]
            if not self._clients:
                await self._close_feed()

    async def _close_feed(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _consume(self, bound: asyncio.Event) -> None:
        await self._bus.wait_ready()
        channel = await self._bus.channel(prefetch=256)
        try:
            exchange = await channel.get_exchange(EXCHANGE)
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            for key in STREAMED:
                await queue.bind(exchange, routing_key=key)
            await queue.consume(self._on_message)
            bound.set()
            await asyncio.Future()  # until the last client leaves
        finally:
            # Closing the channel cancels the consumer; the auto-delete queue goes with it.
            with contextlib.suppress(Exception):
                await asyncio.shield(channel.close())

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        if not self._clients:
            return
        try:
            event = orjson.loads(message.body)
            for agent_id in await audience(event, self._owners):
                for client in list(self._clients.get(agent_id, ())):
                    with contextlib.suppress(asyncio.QueueFull):
                        client.put_nowait(event)
        except Exception as exc:  # a bad event must not stop the stream for everyone
            log.warning("agent_events.skipped", error=f"{exc!r}"[:200])


HUB = web.AppKey("agent_event_hub", AgentEventHub)


async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
    app[HUB] = AgentEventHub(app[BUS], app[STORE])
    await app[HUB].start()
    yield
    await app[HUB].stop()


async def end_streams(app: web.Application) -> None:
    """On shutdown, before aiohttp waits for handlers: open streams end so it need not wait."""
    if HUB in app:
        app[HUB].closing.set()


def _frame(event: dict[str, Any]) -> bytes:
    payload = orjson.dumps(event)
    return f"id: {event['id']}\nevent: {event['type']}\ndata: ".encode() + payload + b"\n\n"


# An event needs data to be dispatched at all; the empty id clears the browser's last event
# id, so that its next reconnect asks for no replay (WHATWG HTML 9.2.6).
RESET = b'id: \nevent: reset\ndata: {"type":"reset"}\n\n'


async def stream(request: web.Request) -> web.StreamResponse:
    agent = await current_agent(request)
    agent_id = str(agent["id"])
    last_id = request.headers.get("Last-Event-ID", "").strip()
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    hub = request.app[HUB]
    try:
        async with hub.subscribe(agent_id) as events:
            # The feed is bound from here on: what the replay does not see comes live.
            await response.write(f"retry: {RETRY_MS}\n: connected\n\n".encode())
            replayed: set[str] = set()
            if last_id:
                missed = await replay(request.app[STORE], last_id, agent_id)
                if missed is None:
                    await response.write(RESET)
                for old in missed or ():
                    await response.write(_frame(old))
                    replayed.add(old["id"])
                log.info(
                    "agent_events.resumed",
                    agent_id=agent_id,
                    replayed=len(replayed),
                    reset=missed is None,
                )
            loop = asyncio.get_running_loop()
            recheck_at = loop.time() + HEARTBEAT_SECONDS
            while not hub.closing.is_set():
                event = await _next_event(events, hub.closing)
                if loop.time() >= recheck_at:
                    if not await still_signed_in(request):
                        break  # signed out, expired or removed: the stream ends with it
                    recheck_at = loop.time() + HEARTBEAT_SECONDS
                if event is not None and event["id"] in replayed:
                    replayed.discard(event["id"])  # published after the replay read it
                elif event is not None:
                    await response.write(_frame(event))
                elif not hub.closing.is_set():
                    await response.write(b": keep-alive\n\n")
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        pass  # the agent's UI went away: not an error
    return response


async def still_signed_in(request: web.Request) -> bool:
    """Whether the stream's agent may still listen, asked again at every heartbeat: a
    stream must not outlive a sign-out, the session's expiry or the agent's removal (it
    was checked only when it opened). A database that does not answer keeps it open."""
    cookie = request.cookies.get(session.COOKIE)
    try:
        if cookie and "Authorization" not in request.headers:
            principal = await session.resolve(request, cookie)
            return principal.agent is not None
        await current_agent(request)
    except web.HTTPServiceUnavailable:
        return True
    except web.HTTPException:
        return False
    return True


async def _next_event(
    events: asyncio.Queue[dict[str, Any]], closing: asyncio.Event
) -> dict[str, Any] | None:
    """The next event; None after ``HEARTBEAT_SECONDS`` without one, or when shutting down."""
    getter = asyncio.ensure_future(events.get())
    stopper = asyncio.ensure_future(closing.wait())
    try:
        await asyncio.wait(
            {getter, stopper}, timeout=HEARTBEAT_SECONDS, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        # Cancelled or not, never leave these behind pending (even if we are cancelled).
        for task in (getter, stopper):
            if not task.done():
                task.cancel()
        await asyncio.gather(getter, stopper, return_exceptions=True)
    if getter.done() and not getter.cancelled():  # also when it completed as we timed out
        return getter.result()
    return None


STREAM_DESCRIPTION = (
    "One frame per event: `id:` (the event id), `event:` (its type), `data:` (the event "
    "envelope as JSON), then a blank line; `: keep-alive` comments in between. It starts with"
    f" `retry: {RETRY_MS}`. With `Last-Event-ID` (sent by EventSource on reconnect), the"
    " events missed since are replayed first, each once; when they cannot be (the id is no"
    " longer kept), one `event: reset` frame says to fetch the state again."
)
ROUTES = [
    Route(
        "GET",
        "/api/me/events",
        stream,
        "streamMyEvents",
        "Server-Sent Events: offers, assignments, customer messages, delivery updates",
        ("agent",),
        "agentToken",
        {200: Content("text/event-stream", {"type": "string", "description": STREAM_DESCRIPTION})},
    ),
]
