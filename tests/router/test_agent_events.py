"""``GET /api/me/events`` end to end on the real broker and database: an agent's stream
carries the events that concern it (offers naming it, its customers' messages, delivery
updates of its conversations) in SSE framing, never another agent's; keep-alive comments
flow while it is idle; no token, no stream. The shutdown and disconnect tests serve the
router as ``omniroute run`` does, since the test server cancels a handler whose client left
and so hides what a disconnect or a shutdown does. Last, the console's session cookie works
as the token does, and a reconnect with ``Last-Event-ID`` replays what was missed, once and
in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from omniroute.infra.bus import Bus
from omniroute.infra.config_loader import LiveConfig
from omniroute.infra.outbox import add_to_outbox
from omniroute.infra.settings import Settings
from router import agent_events
from router.app import create_app
from router.session import COOKIE
from router.state import BUS
from schemas.events import (
    ConversationOffered,
    Envelope,
    EventType,
    MessageOutcome,
    new_event,
    utcnow,
)
from tests.support import BUSINESS, new_agent, new_customer, received_event, wait_for

Client = TestClient[Any, Any]
EVENTS = "/api/me/events"
HEARTBEAT = 0.2
PROBE_QUEUE = "sse-probe"  # marks the offers sent only to learn that the stream is live


@pytest.fixture(autouse=True)
def fast_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_events, "HEARTBEAT_SECONDS", HEARTBEAT)


@dataclass
class Frame:
    """One SSE frame: its comment lines and its fields."""

    comments: list[str] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def event(self) -> dict[str, Any]:
        data: dict[str, Any] = orjson.loads(self.fields["data"])
        return data


class EventStream:
    """Reads a ``text/event-stream`` response frame by frame."""

    def __init__(self, response: ClientResponse) -> None:
        self.response = response
        self._pending: list[str] = []  # lines of a frame not complete yet (kept on timeout)

    async def frame(self, timeout: float = 5.0) -> Frame:
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    raise AssertionError("the stream ended")
                line = raw.decode().rstrip("\r\n")
                if line:
                    self._pending.append(line)
                elif self._pending:
                    lines, self._pending = self._pending, []
                    return _parse(lines)

    async def event(self, timeout: float = 5.0) -> Frame:
        """The next frame that carries an event (comments skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.frame()
                if frame.fields:
                    return frame

    async def until(self, event_id: str, timeout: float = 5.0) -> list[Frame]:
        """The event frames up to and including the one for ``event_id``."""
        frames: list[Frame] = []
        async with asyncio.timeout(timeout):
            while not frames or frames[-1].fields.get("id") != event_id:
                frames.append(await self.event())
        return frames


def _parse(lines: list[str]) -> Frame:
    frame = Frame()
    for line in lines:
        if line.startswith(":"):
            frame.comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        assert name not in frame.fields, f"repeated field {name!r}"
        frame.fields[name] = value.removeprefix(" ")
    return frame


@contextlib.asynccontextmanager
async def _stream(router: Client, headers: dict[str, str]) -> AsyncIterator[EventStream]:
    response = await router.get(EVENTS, headers=headers)
    try:
        assert response.status == 200, await response.text()
        assert response.content_type == "text/event-stream"
        assert response.headers["Cache-Control"] == "no-cache"
        stream = EventStream(response)
        assert (await stream.frame()).comments == ["connected"]
        yield stream
    finally:
        response.close()


async def _conversation(db: asyncpg.Pool, agent_id: str, customer: str) -> str:
    """An active conversation of ``customer`` on the business number, assigned to the agent."""
    contact_id, conversation_id = uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC)
    await db.execute(
        "INSERT INTO contacts (id, account, address) VALUES ($1, 'contoso', $2)",
        contact_id,
        customer,
    )
    await db.execute(
        "INSERT INTO conversations (id, account, business_number, customer, contact_id,"
        " workstream, state, opened_at, last_customer_message_at, queue, agent_id, assigned_at)"
        " VALUES ($1, 'contoso', $2, $3, $4, 'support-pt', 'active', $5, $5, 'general', $6, $5)",
        conversation_id,
        BUSINESS,
        customer,
        contact_id,
        now,
        agent_id,
    )
    return str(conversation_id)


def _offer(agent_id: str, queue: str = "general") -> Envelope:
    offer_id = str(uuid.uuid4())
    now = utcnow()
    data = ConversationOffered(
        offer_id=offer_id,
        agent_id=agent_id,
        queue=queue,
        units=1,
        expires_at=now + timedelta(seconds=30),
    )
    return new_event(
        EventType.CONVERSATION_OFFERED,
        account="contoso",
        key=(offer_id,),
        data=data.model_dump(mode="json"),
        occurred_at=now,
        conversation_id=str(uuid.uuid4()),
    )


async def _until_live(bus: Bus, stream: EventStream, agent_id: str) -> None:
    """Offer probes until one arrives: the hub binds its queue after the app started."""
    async with asyncio.timeout(10):
        while True:
            await bus.publish(_offer(agent_id, PROBE_QUEUE))
            with contextlib.suppress(TimeoutError):
                frame = await stream.event(timeout=0.3)
                assert frame.event["data"]["queue"] == PROBE_QUEUE
                return


def _not_probes(frames: list[Frame]) -> list[Frame]:
    return [f for f in frames if f.event["data"].get("queue") != PROBE_QUEUE]


def _app(client: Client) -> web.Application:
    app = client.app
    assert isinstance(app, web.Application)
    return app


async def test_no_token_no_stream(router: Client) -> None:
    anonymous = await router.get(EVENTS)
    assert anonymous.status == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await anonymous.json())["error"]["code"] == "unauthorized"
    forged = await router.get(EVENTS, headers={"Authorization": "Bearer omr_nobody"})
    assert forged.status == 401
    assert (await forged.json())["error"]["code"] == "invalid_token"


async def test_each_agent_gets_its_own_events(router: Client, bus: Bus, db: asyncpg.Pool) -> None:
    agent, auth = await new_agent(db)
    other, other_auth = await new_agent(db)
    customer = new_customer()
    await _conversation(db, agent, customer)
    async with _stream(router, auth) as mine, _stream(router, other_auth) as theirs:
        await _until_live(bus, mine, agent)
        await _until_live(bus, theirs, other)

        # The other agent's offer is handled (it reached them) before this agent's is sent,
        # so had it leaked, it would come first on this agent's stream.
        for_other = _offer(other)
        await bus.publish(for_other)
        [got] = _not_probes(await theirs.until(for_other.id))
        assert got.event["data"]["agent_id"] == other
        for_me = _offer(agent)
        await bus.publish(for_me)
        [frame] = _not_probes(await mine.until(for_me.id))
        # SSE framing: the event id, its type, and the whole envelope as one JSON data line.
        assert list(frame.fields) == ["id", "event", "data"]
        assert frame.fields["id"] == for_me.id
        assert frame.fields["event"] == "conversation.offered"
        assert frame.event == for_me.model_dump(mode="json")

        # A customer's message reaches the agent who has the conversation, and only them.
        message: Envelope = received_event(customer=customer, body="ainda aí?")
        await bus.publish(message)
        [frame] = _not_probes(await mine.until(message.id))
        assert frame.fields["event"] == "message.received"
        assert frame.event["data"]["customer"] == customer
        assert frame.event["data"]["body"] == "ainda aí?"
        sentinel = _offer(other)
        await bus.publish(sentinel)
        assert [f.fields["id"] for f in _not_probes(await theirs.until(sentinel.id))] == [
            sentinel.id
        ]


async def test_keep_alive_while_idle_and_unsubscribed_on_close(
    router: Client, db: asyncpg.Pool
) -> None:
    agent, auth = await new_agent(db)
    hub = _app(router)[agent_events.HUB]
    async with _stream(router, auth) as stream:
        # The stream is idle: comments keep proxies from closing it, several per second here.
        for _ in range(2):
            frame = await stream.frame(timeout=HEARTBEAT * 10)
            assert frame == Frame(comments=["keep-alive"])
        assert agent in hub._clients

    # Closing the stream ends its handler, which lets go of the agent's subscription.
    async def unsubscribed() -> bool:
        return agent not in hub._clients

    await wait_for(unsubscribed, timeout=HEARTBEAT * 20)


async def test_delivery_updates_reach_the_agent(router: Client, bus: Bus, db: asyncpg.Pool) -> None:
    agent, auth = await new_agent(db)
    conversation_id = await _conversation(db, agent, new_customer())
    message_id = str(uuid.uuid4())
    delivered = new_event(
        EventType.MESSAGE_DELIVERED,
        account="contoso",
        key=(message_id,),
        data=MessageOutcome(message_id=message_id, status="delivered").model_dump(mode="json"),
        occurred_at=utcnow(),
        conversation_id=conversation_id,
    )
    async with _stream(router, auth) as stream:
        await _until_live(bus, stream, agent)
        await bus.publish(delivered)
        [frame] = _not_probes(await stream.until(delivered.id))
        assert frame.fields["event"] == "message.delivered"
        assert frame.event["conversation_id"] == conversation_id


@dataclass
class Served:
    url: str
    runner: web.AppRunner
    hub: agent_events.AgentEventHub


@contextlib.asynccontextmanager
async def _served(settings: Settings, config: LiveConfig) -> AsyncIterator[Served]:
    """The router as ``omniroute run`` serves it: an ``AppRunner``, whose handlers (unlike
    the test server's) are not cancelled when a client goes away."""
    app = create_app(settings, config)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        async with asyncio.timeout(10):
            await app[BUS].wait_ready()
        yield Served(f"http://{host}:{port}", runner, app[agent_events.HUB])
    finally:
        if runner.server is not None:  # not stopped by the test itself
            await runner.cleanup()


async def test_shutdown_ends_open_streams(
    settings: Settings, config: LiveConfig, db: asyncpg.Pool
) -> None:
    _, auth = await new_agent(db)
    async with _served(settings, config) as served, aiohttp.ClientSession() as session:
        response = await session.get(served.url + EVENTS, headers=auth)
        assert (await EventStream(response).frame()).comments == ["connected"]
        stopping = asyncio.ensure_future(served.runner.cleanup())
        try:
            async with asyncio.timeout(3 * HEARTBEAT + 2):
                await asyncio.shield(stopping)
                # The agent's UI sees its stream end cleanly (and would reconnect elsewhere).
                assert await response.content.read() == b""
        finally:
            response.close()
            async with asyncio.timeout(10):
                await stopping


async def test_a_client_leaving_is_not_an_error(
    settings: Settings, config: LiveConfig, db: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    agent, auth = await new_agent(db)
    async with _served(settings, config) as served, aiohttp.ClientSession() as session:
        response = await session.get(served.url + EVENTS, headers=auth)
        with contextlib.closing(response):
            assert (await EventStream(response).frame()).comments == ["connected"]
            assert agent in served.hub._clients

        async def gone() -> bool:
            return agent not in served.hub._clients

        await wait_for(gone, timeout=HEARTBEAT * 20)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


# --- the console's session and resuming with Last-Event-ID ----------------------------------


async def _session_cookie(router: Client, auth: dict[str, str]) -> dict[str, str]:
    token = auth["Authorization"].removeprefix("Bearer ")
    response = await router.post("/api/session", json={"token": token})
    assert response.status == 201, await response.text()
    return {"Cookie": f"{COOKIE}={response.cookies[COOKIE].value}"}


async def _write_to_outbox(db: asyncpg.Pool, *events: Envelope) -> None:
    """Each event in a transaction of its own, so that the log holds them in this order."""
    for event in events:
        async with db.acquire() as conn, conn.transaction():
            await add_to_outbox(cast(Any, conn), [event])


async def _published(db: asyncpg.Pool, event: Envelope) -> None:
    """Wait until the router's outbox relay has published ``event``."""

    async def behind_watermark() -> bool:
        return bool(
            await db.fetchval(
                "SELECT (o.txid, o.seq) <= (w.txid, w.seq) FROM outbox o, outbox_watermark w"
                " WHERE o.id = $1",
                event.id,
            )
        )

    await wait_for(behind_watermark, timeout=10)


def _delivered(conversation_id: str) -> Envelope:
    message_id = str(uuid.uuid4())
    return new_event(
        EventType.MESSAGE_DELIVERED,
        account="contoso",
        key=(message_id,),
        data=MessageOutcome(message_id=message_id, status="delivered").model_dump(mode="json"),
        occurred_at=utcnow(),
        conversation_id=conversation_id,
    )


async def test_the_stream_takes_the_session_cookie(
    router: Client, bus: Bus, db: asyncpg.Pool
) -> None:
    agent, auth = await new_agent(db)
    cookie = await _session_cookie(router, auth)
    response = await router.get(EVENTS, headers=cookie)
    with contextlib.closing(response):
        assert response.status == 200
        stream = EventStream(response)
        # Browsers wait this long before reconnecting after a drop.
        assert await stream.frame() == Frame(comments=["connected"], fields={"retry": "2000"})
        await _until_live(bus, stream, agent)
        offer = _offer(agent)
        await bus.publish(offer)
        [frame] = _not_probes(await stream.until(offer.id))
        assert frame.event == offer.model_dump(mode="json")


async def test_a_reconnect_replays_what_was_missed_once_and_in_order(
    router: Client, bus: Bus, db: asyncpg.Pool
) -> None:
    agent, auth = await new_agent(db)
    other, _ = await new_agent(db)
    customer = new_customer()
    conversation_id = await _conversation(db, agent, customer)
    cookie = await _session_cookie(router, auth)
    seen = _offer(agent)
    async with _stream(router, cookie) as stream:
        await _until_live(bus, stream, agent)
        await _write_to_outbox(db, seen)
        await stream.until(seen.id)

    # While the agent is away: its events, another agent's, its customer's message (placed
    # in the log here to hold the audience rule to the live one) and a delivery update.
    mine, theirs, more = _offer(agent), _offer(other), _offer(agent)
    message = received_event(customer=customer, body="voltei")
    delivered = _delivered(conversation_id)
    await _write_to_outbox(db, mine, theirs, more, message, delivered)
    await _published(db, delivered)

    async with _stream(router, {**cookie, "Last-Event-ID": seen.id}) as stream:
        replayed = [await stream.event() for _ in range(4)]
        assert [f.fields["id"] for f in replayed] == [mine.id, more.id, message.id, delivered.id]
        assert replayed[0].event == mine.model_dump(mode="json")
        await _until_live(bus, stream, agent)
        # The relay publishing a replayed event late (it read the log before the relay did)
        # does not show it twice; what follows comes live.
        after = _offer(agent)
        await bus.publish(more)
        await bus.publish(after)
        assert [f.fields["id"] for f in _not_probes(await stream.until(after.id))] == [after.id]


@pytest.mark.parametrize("last_id", ["unknown", "not-a-uuid"])
async def test_an_id_no_longer_kept_resets_the_client(
    router: Client, bus: Bus, db: asyncpg.Pool, last_id: str
) -> None:
    agent, auth = await new_agent(db)
    last = str(uuid.uuid4()) if last_id == "unknown" else last_id
    async with _stream(router, {**auth, "Last-Event-ID": last}) as stream:
        reset = await stream.event()
        # The empty id clears the browser's last event id: its next reconnect asks for nothing.
        assert reset.fields == {"id": "", "event": "reset", "data": '{"type":"reset"}'}
        await _until_live(bus, stream, agent)
        offer = _offer(agent)
        await bus.publish(offer)
        assert [f.fields["id"] for f in _not_probes(await stream.until(offer.id))] == [offer.id]


async def test_a_stream_ends_with_its_session_or_its_agent(
    router: Client, bus: Bus, db: asyncpg.Pool
) -> None:
    """Checked when it opens and again every heartbeat: signing out (or removing the agent,
    for a bearer stream) ends a stream that is already open."""
    agent, auth = await new_agent(db)
    token = auth["Authorization"].removeprefix("Bearer ")
    signed = await router.post("/api/session", json={"token": token})
    cookie = {"Cookie": f"{COOKIE}={signed.cookies[COOKIE].value}"}
    csrf = {"X-CSRF-Token": (await signed.json())["csrf_token"]}
    async with _stream(router, cookie) as stream:
        await _until_live(bus, stream, agent)
        assert (await router.delete("/api/session", headers={**cookie, **csrf})).status == 204
        with pytest.raises(AssertionError, match="the stream ended"):
            async with asyncio.timeout(HEARTBEAT * 20):
                while True:
                    await stream.frame()

    async with _stream(router, auth) as stream:
        await _until_live(bus, stream, agent)
        await db.execute("UPDATE agents SET deleted_at = now() WHERE id = $1", agent)
        with pytest.raises(AssertionError, match="the stream ended"):
            async with asyncio.timeout(HEARTBEAT * 20):
                while True:
                    await stream.frame()
