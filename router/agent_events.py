"""``GET /api/me/events``: each agent's live stream (Server-Sent Events) of its offers,
assignments, transfers, closes and its customers' new messages, so an agent UI never polls.

While at least one agent is connected, one exclusive queue per router process receives
the events from the exchange; the hub routes each to the agents it concerns (the agent named
in the event, or for a customer message, the agent who has that conversation) and drops it
for anyone not connected. With nobody connected the feed is closed, so a router that only
takes webhooks does not also consume every event. The stream is a live view: the agent's
current state is always available from the REST calls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import structlog
from aio_pika.abc import AbstractIncomingMessage
from aiohttp import web

from omniroute.infra.bus import Bus
from omniroute.infra.store import Store
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


class AgentEventHub:
    def __init__(self, bus: Bus, store: Store) -> None:
        self._bus = bus
        self._store = store
        self._clients: dict[str, set[asyncio.Queue[dict[str, Any]]]] = defaultdict(set)
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
            for agent_id in await self._audience(event):
                for client in list(self._clients.get(agent_id, ())):
                    with contextlib.suppress(asyncio.QueueFull):
                        client.put_nowait(event)
        except Exception as exc:  # a bad event must not stop the stream for everyone
            log.warning("agent_events.skipped", error=f"{exc!r}"[:200])

    async def _audience(self, event: dict[str, Any]) -> set[str]:
        data = event.get("data") or {}
        agents = {str(data[k]) for k in ("agent_id", "from_agent", "to_agent") if data.get(k)}
        if agents:
            return agents
        pool = await self._store.pool()
        if event.get("type") == EventType.MESSAGE_RECEIVED:
            agent = await pool.fetchval(
                "SELECT agent_id FROM conversations WHERE account = $1 AND business_number = $2"
                " AND customer = $3 AND state <> 'closed' AND agent_id IS NOT NULL",
                event.get("account"),
                data.get("business_number"),
                data.get("customer"),
            )
        elif event.get("conversation_id"):
            agent = await pool.fetchval(
                "SELECT agent_id FROM conversations WHERE id = $1", event["conversation_id"]
            )
        else:
            agent = None
        return {str(agent)} if agent else set()


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


async def stream(request: web.Request) -> web.StreamResponse:
    agent = await current_agent(request)
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
        async with hub.subscribe(str(agent["id"])) as events:
            await response.write(b": connected\n\n")  # the feed is bound from here on
            while not hub.closing.is_set():
                frame = await _next_frame(events, hub.closing)
                if frame is not None:
                    await response.write(frame)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        pass  # the agent's UI went away: not an error
    return response


async def _next_frame(
    events: asyncio.Queue[dict[str, Any]], closing: asyncio.Event
) -> bytes | None:
    """The next event as an SSE frame, a keep-alive comment, or None when shutting down."""
    getter = asyncio.ensure_future(events.get())
    stopper = asyncio.ensure_future(closing.wait())
    try:
        done, _ = await asyncio.wait(
            {getter, stopper}, timeout=HEARTBEAT_SECONDS, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        # Cancelled or not, never leave these behind pending (even if we are cancelled).
        for task in (getter, stopper):
            if not task.done():
                task.cancel()
        await asyncio.gather(getter, stopper, return_exceptions=True)
    del done
    if getter.done() and not getter.cancelled():  # also when it completed as we timed out
        event = getter.result()
        payload = orjson.dumps(event)
        return f"id: {event['id']}\nevent: {event['type']}\ndata: ".encode() + payload + b"\n\n"
    if stopper.done() and not stopper.cancelled():
        return None
    return b": keep-alive\n\n"


STREAM_DESCRIPTION = (
    "One frame per event: `id:` (the event id), `event:` (its type), `data:` (the event "
    "envelope as JSON), then a blank line; `: keep-alive` comments in between."
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
