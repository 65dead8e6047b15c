"""Agents' messages through the window gate and the outbound stage to Twilio, end to end.

Real broker, database and router; Twilio is the local emulator, reached through the
official ``twilio`` client. The router listens on a real port that is also the public URL,
so the emulator's signed status callbacks and customer messages come back through it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from consumers import conversations, outbound, status
from omniroute.infra.bus import Bus
from omniroute.infra.config_loader import LiveConfig, parse_config
from omniroute.infra.metrics import GATE_REJECTIONS
from omniroute.infra.settings import Settings
from omniroute.infra.webhook_urls import status_url
from omniroute.twilio_emulator import (
    RunningEmulator,
    StoredMedia,
)
from router.app import create_app
from router.state import BUS
from schemas.events import EventType, MessageSendRequested, new_event
from tests.conftest import Infra, make_settings
from tests.consumers.conftest import RunnerFactory
from tests.support import (
    ACCOUNT_SID,
    BUSINESS,
    CONFIG_YAML,
    ENVIRON,
    EventTap,
    free_port,
    new_agent,
    new_customer,
    tap,
    wait_for,
)

SID_PT = "HX" + "a1" * 16
SID_EN = "HX" + "b2" * 16
SID_HELLO = "HX" + "c3" * 16
TEMPLATES = (
    "    templates:\n"
    "      - name: order_update\n"
    "        default_language: pt-BR\n"
    "        languages:\n"
    "          pt-BR:\n"
    f"            content_sid: {SID_PT}\n"
    '            text: "Olá {{1}}, seu pedido {{2}} saiu."\n'
    "          en:\n"
    f"            content_sid: {SID_EN}\n"
    '            text: "Hi {{1}}, your order {{2}} shipped."\n'
    "      - name: hello\n"
    "        default_language: en\n"
    "        languages:\n"
    "          en:\n"
    f"            content_sid: {SID_HELLO}\n"
    '            text: "Hello {{ name }}, {{name}}!"\n'
)
OUTBOUND_YAML = CONFIG_YAML.replace(
    "  - name: support-en\n", TEMPLATES + "  - name: support-en\n", 1
)
ATTACHMENTS_AT = "    language: pt-BR\n"


def _with_attachments(customers: bool, agents: bool) -> str:
    flags = (
        f"    attachments: {{customers: {str(customers).lower()}, agents: {str(agents).lower()}}}\n"
    )
    return OUTBOUND_YAML.replace(ATTACHMENTS_AT, ATTACHMENTS_AT + flags, 1)


TEMPLATE_NAMES = ["order_update", "hello"]
INBOUND = "/twilio/contoso/inbound"


# --- fixtures: the emulator, a router on a real port, settings pointing at both ------------


@pytest.fixture
def settings(infra: Infra, emulator: RunningEmulator, router_port: int) -> Settings:
    return make_settings(
        infra,
        twilio_api_url=emulator.url,
        public_url=f"http://127.0.0.1:{router_port}",
        send_backoff_base=0.05,
        send_backoff_max=0.2,
        tick_interval=0.05,
    )


@pytest.fixture
def config() -> LiveConfig:
    return LiveConfig(parse_config(OUTBOUND_YAML, "outbound.yaml", ENVIRON))


@pytest.fixture
async def router(
    settings: Settings, config: LiveConfig, router_port: int
) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(settings, config)
    server = TestServer(app, host="127.0.0.1", port=router_port)
    async with TestClient(server) as client:
        async with asyncio.timeout(10):
            await app[BUS].wait_ready()
        yield client


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
async def events(settings: Settings) -> AsyncIterator[EventTap]:
    async with tap(settings.amqp_url.get_secret_value(), "message.*") as spy:
        yield spy


@pytest.fixture
async def sender(start_runner: RunnerFactory) -> None:
    await start_runner(outbound.STAGE)


# --- helpers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Chat:
    id: str
    customer: str
    agent_id: str
    auth: dict[str, str]


async def _chat(
    db: asyncpg.Pool, *, hours_ago: float = 1.0, language: str | None = "pt-BR"
) -> Chat:
    """An active conversation assigned to a fresh agent; the customer wrote ``hours_ago``."""
    # An offline agent in a private queue: no distribute stage ever gives it other work.
    queue = f"outbound-test-{uuid.uuid4().hex[:8]}"
    agent_id, auth = await new_agent(db, queues=[queue], capacity=3, used=1)
    contact, conversation, customer = uuid.uuid4(), uuid.uuid4(), new_customer()
    now = datetime.now(UTC)
    last = now - timedelta(hours=hours_ago)
    await db.execute(
        "INSERT INTO contacts (id, account, address, profile_name) VALUES ($1, 'contoso', $2, $3)",
        contact,
        customer,
        "Maria",
    )
    await db.execute(
        "INSERT INTO conversations (id, account, business_number, customer, contact_id,"
        " workstream, state, opened_at, last_customer_message_at, agent_id, assigned_at,"
        " language, queue)"
        " VALUES ($1, 'contoso', $2, $3, $4, 'support-pt', 'active', $5, $5, $6, $7, $8, $9)",
        conversation,
        BUSINESS,
        customer,
        contact,
        last,
        agent_id,
        now,
        language,
        queue,
    )
    await db.execute(
        "INSERT INTO assignments (id, conversation_id, agent_id, units, assigned_at)"
        " VALUES ($1, $2, $3, 1, $4)",
        uuid.uuid4(),
        conversation,
        agent_id,
        now,
    )
    return Chat(str(conversation), customer, agent_id, auth)


def _customer_wrote(emulator: RunningEmulator, chat: Chat) -> None:
    """The emulator's own window memory: as if the customer had written through Twilio."""
    emulator.state.record_customer_message(
        ACCOUNT_SID, f"whatsapp:{BUSINESS}", f"whatsapp:{chat.customer}"
    )


async def _send(
    router: TestClient[Any, Any], chat: Chat, body: dict[str, Any], key: str | None = None
) -> tuple[int, dict[str, Any]]:
    headers = dict(chat.auth)
    if key is not None:
        headers["Idempotency-Key"] = key
    response = await router.post(
        f"/api/conversations/{chat.id}/messages", json=body, headers=headers
    )
    answer: dict[str, Any] = await response.json()
    return response.status, answer


async def _emulated(
    http: aiohttp.ClientSession, emulator: RunningEmulator, what: str, customer: str
) -> list[dict[str, Any]]:
    async with http.get(f"{emulator.url}/_emulator/{what}") as response:
        assert response.status == 200
        items: list[dict[str, Any]] = await response.json()
    return [m for m in items if m["to"] == f"whatsapp:{customer}"]


async def _fault(
    http: aiohttp.ClientSession, emulator: RunningEmulator, chat: Chat, **spec: Any
) -> None:
    """Inject an error for this customer's next create call(s) only."""
    body = {"to": f"whatsapp:{chat.customer}", **spec}
    async with http.post(f"{emulator.url}/_emulator/faults", json=body) as response:
        assert response.status == 201, await response.text()


async def _message(db: asyncpg.Pool, message_id: str) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM messages WHERE id = $1", message_id)
    assert row is not None
    return row


async def _status_is(
    db: asyncpg.Pool, message_id: str, *wanted: str, timeout: float = 10.0
) -> asyncpg.Record:
    async def reached() -> asyncpg.Record | None:
        row = await _message(db, message_id)
        return row if row["status"] in wanted else None

    found: asyncpg.Record = await wait_for(reached, timeout=timeout)
    return found


async def _history_of(db: asyncpg.Pool, message_id: str, steps: int) -> list[Any] | None:
    """The message's status history in the order the callbacks were received, once it
    holds ``steps`` entries."""
    history = await db.fetchval(
        "SELECT jsonb_agg(step ORDER BY (step ->> 'received_at')::timestamptz)"
        " FROM messages, jsonb_array_elements(status_history) AS step WHERE id = $1",
        uuid.UUID(message_id),
    )
    return history if history is not None and len(history) >= steps else None


async def _sid_stored(db: asyncpg.Pool, message_id: str) -> asyncpg.Record:
    async def stored() -> asyncpg.Record | None:
        row = await _message(db, message_id)
        return row if row["twilio_sid"] else None

    found: asyncpg.Record = await wait_for(stored)
    return found


async def _event(spy: EventTap, kind: str, message_id: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            event = await spy.next(timeout=10)
            if event["type"] == kind and event["data"].get("message_id") == message_id:
                return event


async def _events_until(spy: EventTap, message_id: str, last: str) -> list[str]:
    """The types of this message's events, in order, up to and including ``last``."""
    seen: list[str] = []
    async with asyncio.timeout(10):
        while not seen or seen[-1] != last:
            event = await spy.next(timeout=10)
            if event["data"].get("message_id") == message_id:
                seen.append(event["type"])
    return seen


def _handled_reaches(count: float) -> Callable[[], Awaitable[bool]]:
    """A condition: the outbound stage has handled (and acked) ``count`` deliveries."""

    async def reached() -> bool:
        return _handled() >= count

    return reached


def _handled() -> float:
    value = REGISTRY.get_sample_value(
        "omniroute_stage_messages_total", {"stage": "outbound", "outcome": "handled"}
    )
    return value or 0.0


async def _redeliver(bus: Bus, chat: Chat, message_id: str, kind: str = "text") -> None:
    """Publish ``message.send-requested`` again, with the same id, as a redelivery would."""
    now = datetime.now(UTC)
    data = MessageSendRequested(
        message_id=message_id, agent_id=chat.agent_id, kind=kind, requested_at=now
    )
    await bus.publish(
        new_event(
            EventType.MESSAGE_SEND_REQUESTED,
            account="contoso",
            key=(message_id,),
            data=data.model_dump(mode="json"),
            occurred_at=now,
            conversation_id=chat.id,
        )
    )


async def _stored_outbound(db: asyncpg.Pool, chat: Chat, status: str, body: str) -> str:
    """An outbound message row written directly, in the given status."""
    message_id = str(uuid.uuid4())
    await db.execute(
        "INSERT INTO messages (id, conversation_id, direction, body, status, received_at,"
        " agent_id, kind, attempts) VALUES ($1, $2, 'outbound', $3, $4, now(), $5, 'text', $6)",
        message_id,
        chat.id,
        body,
        status,
        chat.agent_id,
        1 if status == "sending" else 0,
    )
    return message_id


# --- inside the window ---------------------------------------------------------------------


async def test_text_inside_the_window_is_sent_once_and_followed_to_read(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    emulator: RunningEmulator,
    settings: Settings,
    events: EventTap,
    http: aiohttp.ClientSession,
    db: asyncpg.Pool,
) -> None:
    await start_runner(outbound.STAGE)
    await start_runner(status.STAGE)
    chat = await _chat(db)
    _customer_wrote(emulator, chat)

    code, answer = await _send(router, chat, {"text": "Olá Maria, já vou verificar."})
    assert code == 202, answer
    assert answer["status"] == "requested"
    assert answer["window"]["open"] is True
    message_id = answer["id"]
    uuid.UUID(message_id)

    read = await _status_is(db, message_id, "read")
    sent = await _emulated(http, emulator, "messages", chat.customer)
    assert len(sent) == 1
    assert sent[0]["to"] == f"whatsapp:{chat.customer}"
    assert sent[0]["from"] == f"whatsapp:{BUSINESS}"
    assert sent[0]["body"] == "Olá Maria, já vou verificar."
    # With Twilio's connection overrides: a callback answered 5xx or too late is retried.
    assert sent[0]["status_callback"] == status_url(settings.public_base(), "contoso")
    assert sent[0]["content_sid"] is None and sent[0]["media_urls"] == []
    assert read["twilio_sid"] == sent[0]["sid"]
    assert read["attempts"] == 1 and read["kind"] == "text" and read["direction"] == "outbound"
    # The status stage applies concurrent callbacks in any order (the row's history is in
    # that order; the API orders it by receipt): every step recorded, in the order received.
    history = await wait_for(lambda: _history_of(db, message_id, 3), timeout=10)
    assert [h["status"] for h in history] == ["sent", "delivered", "read"]

    assert await _events_until(events, message_id, EventType.MESSAGE_READ) == [
        EventType.MESSAGE_SEND_REQUESTED,
        EventType.MESSAGE_SENT,
        EventType.MESSAGE_DELIVERED,
        EventType.MESSAGE_READ,
    ]


async def test_the_same_idempotency_key_sends_once(
    router: TestClient[Any, Any],
    sender: None,
    emulator: RunningEmulator,
    http: aiohttp.ClientSession,
    db: asyncpg.Pool,
) -> None:
    chat = await _chat(db)
    _customer_wrote(emulator, chat)
    key = f"click-{uuid.uuid4()}"
    # A double click: both at once, then a retry later.
    (first_code, first), (second_code, second) = await asyncio.gather(
        _send(router, chat, {"text": "Um momento"}, key),
        _send(router, chat, {"text": "Um momento"}, key),
    )
    assert first_code == second_code == 202
    assert first == second
    retried_code, retried = await _send(router, chat, {"text": "Um momento"}, key)
    assert (retried_code, retried) == (202, first)

    await _sid_stored(db, first["id"])
    assert len(await _emulated(http, emulator, "messages", chat.customer)) == 1
    count = await db.fetchval(
        "SELECT count(*) FROM messages WHERE conversation_id = $1 AND direction = 'outbound'",
        chat.id,
    )
    assert count == 1
    requested = await db.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'message.send-requested'"
        " AND body->'data'->>'message_id' = $1",
        first["id"],
    )
    assert requested == 1

    # Another key is another message.
    other_code, other = await _send(router, chat, {"text": "Um momento"}, f"click-{uuid.uuid4()}")
    assert other_code == 202 and other["id"] != first["id"]
    await _sid_stored(db, other["id"])
    assert len(await _emulated(http, emulator, "messages", chat.customer)) == 2
    too_long = await _send(router, chat, {"text": "x"}, "k" * 201)
    assert too_long[0] == 400


# --- outside the window --------------------------------------------------------------------


async def test_outside_the_window_only_templates_go_out(
    router: TestClient[Any, Any],
    sender: None,
    emulator: RunningEmulator,
    events: EventTap,
    http: aiohttp.ClientSession,
    db: asyncpg.Pool,
) -> None:
    chat = await _chat(db, hours_ago=25)
    rejections = GATE_REJECTIONS.labels("window_closed")
    before = rejections._value.get()
    code, answer = await _send(router, chat, {"text": "Ainda precisa de ajuda?"})
    assert code == 422, answer
    assert rejections._value.get() == before + 1  # omniroute_gate_rejections_total
    error = answer["error"]
    assert error["code"] == "window_closed"
    assert error["details"]["templates"] == TEMPLATE_NAMES
    assert error["details"]["window"]["open"] is False
    rejected_id = error["details"]["message_id"]
    row = await _message(db, rejected_id)
    assert (row["status"], row["error_code"], row["body"]) == (
        "rejected",
        "window_closed",
        "Ainda precisa de ajuda?",
    )
    rejected = await _event(events, EventType.MESSAGE_REJECTED, rejected_id)
    assert rejected["data"]["reason"] == "window_closed"
    assert rejected["data"]["templates"] == TEMPLATE_NAMES
    media_code, media = await _send(router, chat, {"media_urls": ["https://cdn.example.com/a.jpg"]})
    assert (media_code, media["error"]["code"]) == (422, "window_closed")

    code, answer = await _send(
        router,
        chat,
        {"template": {"name": "order_update", "variables": {"1": "Maria", "2": "A-17"}}},
    )
    assert code == 202, answer
    stored = await _sid_stored(db, answer["id"])
    assert stored["body"] == "Olá Maria, seu pedido A-17 saiu."
    assert stored["kind"] == "template"
    assert stored["template"]["language"] == "pt-BR"
    assert stored["template"]["content_sid"] == SID_PT

    sent = await _emulated(http, emulator, "messages", chat.customer)
    assert len(sent) == 1  # the template; the refused text never reached Twilio
    assert sent[0]["content_sid"] == SID_PT
    assert sent[0]["content_variables"] == {"1": "Maria", "2": "A-17"}
    assert sent[0]["sid"] == stored["twilio_sid"]
    assert await _emulated(http, emulator, "rejected", chat.customer) == []


async def test_template_language_and_variables_through_the_api(
    router: TestClient[Any, Any], sender: None, db: asyncpg.Pool
) -> None:
    english = await _chat(db, hours_ago=30, language="en")
    code, answer = await _send(
        router, english, {"template": {"name": "order_update", "variables": {"1": "Ann", "2": "9"}}}
    )
    assert code == 202, answer
    row = await _message(db, answer["id"])
    assert row["body"] == "Hi Ann, your order 9 shipped."
    assert (row["template"]["language"], row["template"]["content_sid"]) == ("en", SID_EN)

    # A language the template lacks, and no language at all: the template's default.
    for language in ("es", None):
        chat = await _chat(db, hours_ago=30, language=language)
        code, answer = await _send(
            router, chat, {"template": {"name": "order_update", "variables": {"1": "A", "2": "1"}}}
        )
        assert code == 202, answer
        row = await _message(db, answer["id"])
        assert row["template"]["language"] == "pt-BR", language
        assert row["body"] == "Olá A, seu pedido 1 saiu."
    # The agent may name the language.
    code, answer = await _send(
        router,
        chat,
        {"template": {"name": "order_update", "language": "en", "variables": {"1": "A", "2": "1"}}},
    )
    assert code == 202 and (await _message(db, answer["id"]))["template"]["language"] == "en"
    # A language the agent names that the template does not define: refused, naming those it
    # has (the conversation's language falls back; an explicit choice is never swapped).
    code, answer = await _send(
        router,
        chat,
        {"template": {"name": "order_update", "language": "es", "variables": {"1": "A", "2": "1"}}},
    )
    assert code == 422, answer
    assert answer["error"]["code"] == "unknown_template_language"
    assert answer["error"]["details"]["languages"] == ["en", "pt-BR"]
    # Repeated and spaced placeholders.
    code, answer = await _send(
        router, chat, {"template": {"name": "hello", "variables": {"name": "Bo"}}}
    )
    assert code == 202 and (await _message(db, answer["id"]))["body"] == "Hello Bo, Bo!"

    for variables, problem in [
        ({"1": "Ann"}, "missing 2"),
        ({"1": "Ann", "2": "9", "3": "x"}, "unknown 3"),
        ({"name": "Ann"}, "missing 1, 2; unknown name"),
    ]:
        code, answer = await _send(
            router, english, {"template": {"name": "order_update", "variables": variables}}
        )
        assert code == 422, answer
        assert answer["error"]["code"] == "invalid_variables"
        assert problem in answer["error"]["message"]
        row = await _message(db, answer["error"]["details"]["message_id"])
        assert (row["status"], row["error_code"]) == ("rejected", "invalid_variables")

    code, answer = await _send(router, english, {"template": {"name": "nope"}})
    assert code == 422 and answer["error"]["code"] == "unknown_template"
    assert answer["error"]["details"]["templates"] == TEMPLATE_NAMES
    code, answer = await _send(
        router, english, {"text": "hi", "template": {"name": "hello", "variables": {"name": "x"}}}
    )
    assert code == 422 and answer["error"]["code"] == "invalid_body"


async def test_template_language_falls_back_to_the_base_language(
    router: TestClient[Any, Any], sender: None, db: asyncpg.Pool
) -> None:
    chat = await _chat(db, hours_ago=30, language="en-US")
    code, answer = await _send(
        router, chat, {"template": {"name": "order_update", "variables": {"1": "A", "2": "1"}}}
    )
    assert code == 202, answer
    assert (await _message(db, answer["id"]))["template"]["language"] == "en"


async def test_the_gate_runs_again_at_send_time(
    sender: None,
    bus: Bus,
    emulator: RunningEmulator,
    events: EventTap,
    http: aiohttp.ClientSession,
    db: asyncpg.Pool,
) -> None:
    # Requested while the window was open; by the time the stage sees it, it has closed.
    chat = await _chat(db, hours_ago=24.5)
    message_id = await _stored_outbound(db, chat, "requested", "Ainda aí?")
    await _redeliver(bus, chat, message_id)
    rejected = await _event(events, EventType.MESSAGE_REJECTED, message_id)
    assert rejected["data"]["reason"] == "window_closed"
    assert rejected["data"]["templates"] == TEMPLATE_NAMES
    row = await _message(db, message_id)
    assert (row["status"], row["attempts"], row["twilio_sid"]) == ("rejected", 0, None)
    assert await _emulated(http, emulator, "messages", chat.customer) == []
    assert await _emulated(http, emulator, "rejected", chat.customer) == []


# --- attachments ---------------------------------------------------------------------------


async def test_attachments_follow_the_workstream_setting(
    router: TestClient[Any, Any],
    sender: None,
    config: LiveConfig,
    emulator: RunningEmulator,
    http: aiohttp.ClientSession,
    db: asyncpg.Pool,
) -> None:
    chat = await _chat(db)
    _customer_wrote(emulator, chat)
    photo = {"text": "veja a foto", "media_urls": ["https://cdn.example.com/p/foto.jpg"]}

    config.current = parse_config(_with_attachments(True, False), "no-attach.yaml", ENVIRON)
    code, answer = await _send(router, chat, photo)
    assert code == 422 and answer["error"]["code"] == "attachments_not_allowed", answer
    row = await _message(db, answer["error"]["details"]["message_id"])
    assert row["status"] == "rejected" and row["media"] == [{"url": photo["media_urls"][0]}]

    config.current = parse_config(_with_attachments(True, True), "attach.yaml", ENVIRON)
    code, answer = await _send(router, chat, {"media_urls": ["https://cdn.example.com/x.exe"]})
    assert code == 422 and answer["error"]["code"] == "invalid_media", answer
    code, answer = await _send(router, chat, photo)
    assert code == 202, answer
    stored = await _sid_stored(db, answer["id"])
    assert stored["kind"] == "media"
    sent = await _emulated(http, emulator, "messages", chat.customer)
    assert len(sent) == 1
    assert sent[0]["media_urls"] == photo["media_urls"]
    assert sent[0]["body"] == "veja a foto"


# --- retries -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("http_status", "code"), [(429, 20429), (500, 20500), (503, 20503)], ids=str
)
async def test_transient_errors_are_retried_until_sent_once(
    router: TestClient[Any, Any],
    sender: None,
    emulator: RunningEmulator,
    http: aiohttp.ClientSession,
    db: asyncpg.Pool,
    http_status: int,
    code: int,
) -> None:
    chat = await _chat(db)
    _customer_wrote(emulator, chat)
    await _fault(http, emulator, chat, status=http_status, code=code, count=2)
    status_code, answer = await _send(router, chat, {"text": "tentando"})
    assert status_code == 202
    row = await _sid_stored(db, answer["id"])
    assert row["attempts"] == 3
    assert row["status"] not in ("retrying", "sending", "failed")
    sent = await _emulated(http, emulator, "messages", chat.customer)
    assert [m["sid"] for m in sent] == [row["twilio_sid"]]
    refused = await _emulated(http, emulator, "rejected", chat.customer)
    assert [(r["status"], r["code"]) for r in refused] == [(http_status, code)] * 2


async def test_retries_exhausted_fail_the_message(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    emulator: RunningEmulator,
    events: EventTap,
    http: aiohttp.ClientSession,
    db: asyncpg.Pool,
) -> None:
    await start_runner(outbound.STAGE, send_attempts=2)
    chat = await _chat(db)
    await _fault(http, emulator, chat, status=429, code=20429, count=5)
    code, answer = await _send(router, chat, {"text": "não vai"})
    assert code == 202
    failed = await _event(events, EventType.MESSAGE_FAILED, answer["id"])
    assert failed["data"]["status"] == "failed"
    assert failed["data"]["error_code"] == "20429"
    row = await _message(db, answer["id"])
    assert (row["status"], row["attempts"], row["twilio_sid"]) == ("failed", 2, None)
    assert row["error_code"] == "20429"
    assert await _emulated(http, emulator, "messages", chat.customer) == []
    assert len(await _emulated(http, emulator, "rejected", chat.customer)) == 2


@pytest.fixture
async def stalling() -> AsyncIterator[tuple[str, list[str]]]:
    """A Messages API that takes the request and answers too late (a lost response)."""
    calls: list[str] = []
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        to = (await request.post()).get("To")
        calls.append(f"{request.path} {to if isinstance(to, str) else ''}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await release.wait()
        return web.json_response({"code": 20500, "message": "late", "status": 500}, status=500)

    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", stall)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/")).rstrip("/"), calls
    finally:
        release.set()
        await server.close()


async def test_a_timeout_leaves_the_outcome_unknown_and_is_not_retried(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    stalling: tuple[str, list[str]],
    events: EventTap,
    db: asyncpg.Pool,
) -> None:
    url, calls = stalling
    await start_runner(outbound.STAGE, twilio_api_url=url, twilio_timeout=0.3)
    chat = await _chat(db)
    code, answer = await _send(router, chat, {"text": "chegou?"})
    assert code == 202
    # twilio_timeout is 0.3 s: well within 3 s the call has timed out.
    row = await _status_is(db, answer["id"], "unknown", timeout=3)
    assert (row["attempts"], row["twilio_sid"], row["next_attempt_at"]) == (1, None, None)
    assert row["error_message"] and "unknown" in row["error_message"]
    mine = [c for c in calls if c.endswith(f"whatsapp:{chat.customer}")]
    assert mine == [f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json whatsapp:{chat.customer}"]


async def test_an_unreachable_api_is_retried_then_fails(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    events: EventTap,
    db: asyncpg.Pool,
) -> None:
    closed_port = free_port()  # nothing listens there: the request never left
    await start_runner(
        outbound.STAGE, twilio_api_url=f"http://127.0.0.1:{closed_port}", send_attempts=3
    )
    chat = await _chat(db)
    code, answer = await _send(router, chat, {"text": "alô?"})
    assert code == 202
    failed = await _event(events, EventType.MESSAGE_FAILED, answer["id"])
    assert failed["data"]["error_code"] is None
    assert "connection failed" in failed["data"]["error_message"]
    row = await _message(db, answer["id"])
    assert (row["status"], row["attempts"], row["twilio_sid"]) == ("failed", 3, None)


async def test_a_burst_is_paced_and_each_message_goes_out_once(
    router: TestClient[Any, Any],
    sender: None,
    emulator: RunningEmulator,
    http: aiohttp.ClientSession,
    db: asyncpg.Pool,
) -> None:
    chat = await _chat(db)
    _customer_wrote(emulator, chat)
    texts = [f"parte {n}" for n in range(12)]
    answers = await asyncio.gather(*(_send(router, chat, {"text": t}) for t in texts))
    assert {code for code, _ in answers} == {202}
    rows = [await _sid_stored(db, answer["id"]) for _, answer in answers]
    assert {row["attempts"] for row in rows} == {1}
    sent = await _emulated(http, emulator, "messages", chat.customer)
    assert sorted(m["body"] for m in sent) == sorted(texts)
    assert sorted(m["sid"] for m in sent) == sorted(row["twilio_sid"] for row in rows)


# --- Twilio's refusals ---------------------------------------------------------------------


async def test_63016_closes_the_window_until_the_customer_writes(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    router_port: int,
    emulator: RunningEmulator,
    events: EventTap,
    http: aiohttp.ClientSession,
    db: asyncpg.Pool,
) -> None:
    await start_runner(outbound.STAGE)
    await start_runner(conversations.STAGE)
    chat = await _chat(db, hours_ago=2)
    await _fault(http, emulator, chat, status=400, code=63016, message="outside the window")
    code, answer = await _send(router, chat, {"text": "oi de novo"})
    assert code == 202, answer  # our records say the window is open
    rejected = await _event(events, EventType.MESSAGE_REJECTED, answer["id"])
    assert rejected["data"]["reason"] == "window_closed"
    assert rejected["data"]["error_code"] == "63016"
    row = await _message(db, answer["id"])
    assert (row["status"], row["error_code"], row["twilio_sid"]) == ("rejected", "63016", None)
    closed_at = await db.fetchval(
        "SELECT window_closed_at FROM conversations WHERE id = $1", chat.id
    )
    assert closed_at is not None

    code, answer = await _send(router, chat, {"text": "ainda aí?"})
    assert code == 422 and answer["error"]["code"] == "window_closed", answer
    assert answer["error"]["details"]["templates"] == TEMPLATE_NAMES

    # The customer writes (through Twilio and the router): the window opens again.
    async with http.post(
        f"{emulator.url}/_emulator/customers/send",
        json={
            "account_sid": ACCOUNT_SID,
            "url": f"http://127.0.0.1:{router_port}{INBOUND}",
            "from": f"whatsapp:{chat.customer}",
            "to": f"whatsapp:{BUSINESS}",
            "body": "estou aqui",
        },
    ) as response:
        assert response.status == 200
        assert (await response.json())["status"] == 200

    async def reopened() -> bool:
        last = await db.fetchval(
            "SELECT last_customer_message_at FROM conversations WHERE id = $1", chat.id
        )
        return bool(last > closed_at)

    await wait_for(reopened)
    code, answer = await _send(router, chat, {"text": "que bom!"})
    assert code == 202, answer
    await _sid_stored(db, answer["id"])
    assert [m["body"] for m in await _emulated(http, emulator, "messages", chat.customer)] == [
        "que bom!"
    ]


async def test_conversation_view_agrees_with_the_gate_after_63016(
    router: TestClient[Any, Any], db: asyncpg.Pool
) -> None:
    chat = await _chat(db, hours_ago=2)
    await db.execute("UPDATE conversations SET window_closed_at = now() WHERE id = $1", chat.id)
    code, answer = await _send(router, chat, {"text": "oi"})
    assert code == 422 and answer["error"]["code"] == "window_closed"
    assert answer["error"]["details"]["window"]["open"] is False
    view = await (await router.get(f"/api/conversations/{chat.id}", headers=chat.auth)).json()
    assert view["window"]["open"] is False


async def test_63016_in_a_status_callback_closes_the_window(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    emulator: RunningEmulator,
    events: EventTap,
    db: asyncpg.Pool,
) -> None:
    await start_runner(outbound.STAGE)
    await start_runner(status.STAGE)
    # Our records say the customer wrote 2 h ago; Twilio (the emulator) has no such message,
    # so it accepts the send (201) and then reports failed with ErrorCode 63016.
    chat = await _chat(db, hours_ago=2)
    code, answer = await _send(router, chat, {"text": "oi"})
    assert code == 202
    failed = await _event(events, EventType.MESSAGE_FAILED, answer["id"])
    assert failed["data"]["error_code"] == "63016"
    row = await _message(db, answer["id"])
    assert (row["status"], row["error_code"]) == ("failed", "63016")
    closed_at = await db.fetchval(
        "SELECT window_closed_at FROM conversations WHERE id = $1", chat.id
    )
    assert closed_at is not None
    code, answer = await _send(router, chat, {"text": "oi de novo"})
    assert code == 422 and answer["error"]["code"] == "window_closed"


@pytest.mark.parametrize(
    ("code", "kind", "reason"),
    [(21610, EventType.MESSAGE_REJECTED, "opted_out"), (21211, EventType.MESSAGE_FAILED, None)],
    ids=str,
)
async def test_twilio_4xx_rejects_or_fails_without_retrying(
    router: TestClient[Any, Any],
    sender: None,
    emulator: RunningEmulator,
    events: EventTap,
    http: aiohttp.ClientSession,
    db: asyncpg.Pool,
    code: int,
    kind: str,
    reason: str | None,
) -> None:
    chat = await _chat(db)
    await _fault(http, emulator, chat, status=400, code=code, message=f"Twilio says {code}")
    status_code, answer = await _send(router, chat, {"text": "olá"})
    assert status_code == 202
    event = await _event(events, kind, answer["id"])
    assert event["data"]["error_code"] == str(code)
    row = await _message(db, answer["id"])
    assert row["error_code"] == str(code)
    assert row["attempts"] == 1
    if reason is not None:
        assert event["data"]["reason"] == reason
        assert row["status"] == "rejected"
        window_closed_at = await db.fetchval(
            "SELECT window_closed_at FROM conversations WHERE id = $1", chat.id
        )
        assert window_closed_at is None
    else:
        assert event["data"]["status"] == "failed"
        assert row["status"] == "failed"
        assert f"Twilio says {code}" in row["error_message"]
    assert await _emulated(http, emulator, "messages", chat.customer) == []
    assert len(await _emulated(http, emulator, "rejected", chat.customer)) == 1


# --- never two sends -----------------------------------------------------------------------


async def test_a_redelivery_never_sends_twice(
    router: TestClient[Any, Any],
    sender: None,
    bus: Bus,
    emulator: RunningEmulator,
    http: aiohttp.ClientSession,
    db: asyncpg.Pool,
) -> None:
    chat = await _chat(db)
    _customer_wrote(emulator, chat)
    code, answer = await _send(router, chat, {"text": "primeira"})
    assert code == 202
    done = await _sid_stored(db, answer["id"])

    # The process died between the Twilio call and the ack: the row says 'sending'.
    crashed = await _stored_outbound(db, chat, "sending", "talvez enviada")
    before = _handled()
    await _redeliver(bus, chat, answer["id"])  # already sent: nothing to do
    await _redeliver(bus, chat, crashed)
    unknown = await _status_is(db, crashed, "unknown")
    await wait_for(_handled_reaches(before + 2))
    assert (unknown["attempts"], unknown["twilio_sid"]) == (1, None)
    again = await _message(db, answer["id"])
    assert (again["twilio_sid"], again["attempts"]) == (done["twilio_sid"], 1)
    sent = await _emulated(http, emulator, "messages", chat.customer)
    assert [m["body"] for m in sent] == ["primeira"]

    # And 'unknown' stays unknown on a further redelivery.
    before = _handled()
    await _redeliver(bus, chat, crashed)
    await wait_for(_handled_reaches(before + 1))
    assert (await _message(db, crashed))["status"] == "unknown"
    assert len(await _emulated(http, emulator, "messages", chat.customer)) == 1


# --- customer media ------------------------------------------------------------------------


@pytest.fixture
async def trap() -> AsyncIterator[tuple[TestServer, list[str]]]:
    """A server that must never be called: it records every request it gets."""
    calls: list[str] = []

    async def record(request: web.Request) -> web.Response:
        calls.append(f"{request.method} {request.path_qs} {request.headers.get('Authorization')}")
        return web.Response(body=b"stolen")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield server, calls
    finally:
        await server.close()


SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(document.domain)</script></svg>'


async def test_customer_media_is_proxied_only_from_twilio(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    router_port: int,
    config: LiveConfig,
    emulator: RunningEmulator,
    trap: tuple[TestServer, list[str]],
    http: aiohttp.ClientSession,
    db: asyncpg.Pool,
) -> None:
    await start_runner(conversations.STAGE)
    chat = await _chat(db)
    picture = b"\xff\xd8\xff\xe0" + secrets.token_bytes(2048)
    async with http.post(
        f"{emulator.url}/_emulator/customers/send",
        json={
            "account_sid": ACCOUNT_SID,
            "url": f"http://127.0.0.1:{router_port}{INBOUND}",
            "from": f"whatsapp:{chat.customer}",
            "to": f"whatsapp:{BUSINESS}",
            "body": "segue a foto",
            "media": [
                {"content_type": "image/jpeg", "data_base64": base64.b64encode(picture).decode()},
                {"content_type": "image/svg+xml", "data_base64": base64.b64encode(SVG).decode()},
            ],
        },
    ) as response:
        assert response.status == 200
        posted = await response.json()
        assert posted["status"] == 200

    async def stored() -> str | None:
        found: str | None = await db.fetchval(
            "SELECT id::text FROM messages WHERE twilio_sid = $1 AND conversation_id = $2",
            posted["message_sid"],
            chat.id,
        )
        return found

    message_id = await wait_for(stored)
    base = f"/api/conversations/{chat.id}/messages/{message_id}/media"
    fetched = await router.get(f"{base}/0", headers=chat.auth)
    assert fetched.status == 200
    assert fetched.headers["Content-Type"] == "image/jpeg"
    assert fetched.headers["Content-Disposition"] == "inline"
    assert await fetched.read() == picture
    # A file that can carry script is inert on our origin: a download, never sniffed,
    # sandboxed, not the type the customer claimed.
    scripted = await router.get(f"{base}/1", headers=chat.auth)
    assert scripted.status == 200
    assert scripted.headers["Content-Type"] == "application/octet-stream"
    assert scripted.headers["Content-Disposition"] == "attachment"
    assert scripted.headers["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in scripted.headers["Content-Security-Policy"]
    assert await scripted.read() == SVG
    for missing in ("2", "-1", "x"):
        assert (await router.get(f"{base}/{missing}", headers=chat.auth)).status == 404
    _, stranger = await new_agent(db)
    assert (await router.get(f"{base}/0", headers=stranger)).status == 404
    outbound_id = await _stored_outbound(db, chat, "queued", "not inbound")
    outbound_path = f"/api/conversations/{chat.id}/messages/{outbound_id}/media/0"
    assert (await router.get(outbound_path, headers=chat.auth)).status == 404

    # Media URLs a forged webhook could name: never fetched with the account's credentials.
    server, calls = trap
    emulator_netloc = emulator.url.removeprefix("http://")
    foreign = [
        "https://evil.example/x.jpg",
        str(server.make_url("/x.jpg")),
        f"http://{emulator_netloc}@127.0.0.1:{server.port}/x.jpg",
        f"https://{emulator_netloc}/x.jpg",
    ]
    forged = str(uuid.uuid4())
    await db.execute(
        "INSERT INTO messages (id, conversation_id, direction, twilio_sid, body, media, status,"
        " received_at) VALUES ($1, $2, 'inbound', $3, '', $4, 'received', now())",
        forged,
        chat.id,
        "MM" + uuid.uuid4().hex,
        [{"url": url, "content_type": "image/jpeg"} for url in foreign]
        + [
            {
                "url": f"{emulator.url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/"
                f"{posted['message_sid']}/Media/ME{uuid.uuid4().hex}"
            }
        ],
    )
    for index, url in enumerate(foreign):
        answer = await router.get(
            f"/api/conversations/{chat.id}/messages/{forged}/media/{index}", headers=chat.auth
        )
        assert answer.status == 502, url
        assert (await answer.json())["error"]["code"] == "foreign_media_host", url
    assert calls == []
    gone = await router.get(
        f"/api/conversations/{chat.id}/messages/{forged}/media/{len(foreign)}", headers=chat.auth
    )
    assert gone.status == 502
    assert (await gone.json())["error"]["code"] == "media_unavailable"

    # A workstream that takes no attachments from customers serves none.
    config.current = parse_config(_with_attachments(False, True), "no-media.yaml", ENVIRON)
    assert (await router.get(f"{base}/0", headers=chat.auth)).status == 404


async def test_customer_media_proxy_uses_no_deprecated_api(
    router: TestClient[Any, Any], emulator: RunningEmulator, db: asyncpg.Pool
) -> None:
    chat = await _chat(db)
    message_sid, media_sid = "MM" + uuid.uuid4().hex, "ME" + uuid.uuid4().hex
    emulator.state.media[media_sid] = StoredMedia(
        ACCOUNT_SID, message_sid, media_sid, "application/pdf", b"%PDF-1.4 hello"
    )
    message_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO messages (id, conversation_id, direction, twilio_sid, media, status,"
        " received_at) VALUES ($1, $2, 'inbound', $3, $4, 'received', now())",
        message_id,
        chat.id,
        message_sid,
        [
            {
                "url": f"{emulator.url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{message_sid}"
                f"/Media/{media_sid}",
                "content_type": "application/pdf",
            }
        ],
    )
    fetched = await router.get(
        f"/api/conversations/{chat.id}/messages/{message_id}/media/0", headers=chat.auth
    )
    assert fetched.status == 200
    assert await fetched.read() == b"%PDF-1.4 hello"


async def test_a_conversations_messages_are_handed_to_twilio_in_the_order_asked(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    emulator: RunningEmulator,
    http: aiohttp.ClientSession,
    db: asyncpg.Pool,
) -> None:
    """Twilio sends in the order it was given messages; we gave a conversation's messages in
    any order (two replicas, or a retry of the first while the second went out)."""
    for _ in range(2):  # the first send's retry comes 0.5-1 s later
        await start_runner(outbound.STAGE, send_backoff_base=1.0, send_backoff_max=1.0)
    chat = await _chat(db)
    _customer_wrote(emulator, chat)
    await _fault(http, emulator, chat, status=503, code=20503)
    code, first = await _send(router, chat, {"text": "1. Olá"})
    assert code == 202
    await _status_is(db, first["id"], "retrying")
    asked = [first["id"]]
    for n in (2, 3, 4):
        code, answer = await _send(router, chat, {"text": f"{n}. mais uma linha"})
        assert code == 202
        asked.append(answer["id"])
    rows = [await _sid_stored(db, message_id) for message_id in asked]
    sent = await _emulated(http, emulator, "messages", chat.customer)
    assert [m["sid"] for m in sent] == [row["twilio_sid"] for row in rows]
    assert [m["body"][:2] for m in sent] == ["1.", "2.", "3.", "4."]
    # Waiting behind the first is not an attempt of their own.
    assert [row["attempts"] for row in rows] == [2, 1, 1, 1]


async def test_a_message_waits_for_an_earlier_one_only_so_long(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    emulator: RunningEmulator,
    http: aiohttp.ClientSession,
    db: asyncpg.Pool,
) -> None:
    """An earlier message that keeps failing does not hold the conversation's next one
    beyond ``send_order_wait``."""
    await start_runner(
        outbound.STAGE, send_order_wait=1.0, send_backoff_base=20.0, send_backoff_max=20.0
    )
    chat = await _chat(db)
    _customer_wrote(emulator, chat)
    await _fault(http, emulator, chat, status=503, code=20503)
    _, first = await _send(router, chat, {"text": "primeira"})
    await _status_is(db, first["id"], "retrying")
    _, second = await _send(router, chat, {"text": "segunda"})
    second_row = await _sid_stored(db, second["id"])
    first_row = await _message(db, first["id"])
    assert first_row["twilio_sid"] is None  # still waiting for its retry
    assert second_row["attempts"] == 1
