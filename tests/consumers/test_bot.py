"""A bot before the agents (issue 14), end to end: the real router on a real port, the
conversations, bot, classify, distribute and outbound stages, RabbitMQ, PostgreSQL, the
Twilio emulator, and real HTTP bots speaking Rasa's REST channel protocol
(``tests.bot_servers``).

Each test gets a configuration of its own: the bot's URL, and queues named for it alone
(``bt<hex>-main``, ``-orders``, ``-vip``), so no other test's agents or work meet it.

The ends of a conversation at the bot (resolved, idle) run the lifecycle stage too; the idle
timer's on a clock the test sets (``SetClock``), so "not before" holds however slow the run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from consumers import bot, classify, conversations, distribute, lifecycle, outbound
from consumers.runtime import StageTx
from omniroute.commands.dead_letters import list_dead
from omniroute.infra.bus import Bus, declare_stage
from omniroute.infra.config_loader import LiveConfig, parse_config
from omniroute.infra.settings import Settings
from omniroute.infra.topology import STAGES
from omniroute.twilio_emulator import RunningEmulator
from router.app import create_app
from router.state import BUS
from schemas.events import Envelope, MessageReceived
from tests.bot_servers import (
    BotServer,
    Reply,
    Script,
    answers,
    bot_server,
    buttons,
    by_message,
    delayed,
    echo,
    failing,
    handoff,
    image,
    malformed,
    not_a_list,
    texts,
)
from tests.conftest import Infra, make_settings
from tests.consumers.conftest import RunnerFactory
from tests.support import (
    ACCOUNT_SID,
    BUSINESS,
    CONFIG_YAML,
    ENVIRON,
    INBOUND,
    inbound_form,
    new_agent,
    new_customer,
    signed_post,
    tap,
    wait_for,
)

Client = TestClient[Any, Any]
STAGE_QUEUES = ("conversations", "classify", "distribute", "outbound", "bot", "lifecycle")
GREETING = "Olá! Sou o assistente virtual."


def _yaml(prefix: str, url: str, workstream: dict[str, Any] | None = None, **bot: Any) -> str:
    """The test accounts; support-pt with the bot at ``url`` (``bot`` overrides its
    settings, ``workstream`` adds keys to the workstream), rules that route on what the bot
    collected; the test's own queues."""
    accounts = CONFIG_YAML.split("workstreams:\n")[0]
    settings: dict[str, Any] = {
        "url": url,
        "timeout": "2s",
        "max_turns": 5,
        "greeting": {"pt-BR": GREETING},
        **bot,
    }
    workstreams = [
        {
            "name": "support-pt",
            "language": "pt-BR",
            "fallback_queue": f"{prefix}-main",
            "bot": settings,
            "classification": [
                {
                    "name": "from-bot",
                    "rules": [
                        {
                            "name": "order",
                            "when": {"field": "variables.order", "op": "exists"},
                            "then": {"skills": {"orders": 2}, "priority": 3},
                        }
                    ],
                }
            ],
            "routing": [
                {
                    "name": "orders",
                    "when": {"field": "skills.orders", "op": "exists"},
                    "queue": f"{prefix}-orders",
                }
            ],
            **(workstream or {}),
        },
        {"name": "support-en", "language": "en", "fallback_queue": f"{prefix}-main"},
    ]
    queues = [{"name": f"{prefix}-{q}"} for q in ("main", "orders", "vip")]
    return (
        f"{accounts}workstreams: {orjson.dumps(workstreams).decode()}\n"
        f"queues: {orjson.dumps(queues).decode()}\n"
    )


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def settings(infra: Infra, emulator: RunningEmulator, router_port: int) -> Settings:
    return make_settings(
        infra,
        twilio_api_url=emulator.url,
        public_url=f"http://127.0.0.1:{router_port}",
        tick_interval=0.05,
        # A message.received may reach the bot stage before the conversations stage stored
        # it (the bot stage then retries): room for that.
        delivery_limit=10,
        retry_backoff_base=0.05,
        retry_backoff_max=0.3,
    )


@pytest.fixture
async def router(settings: Settings, config: LiveConfig, router_port: int) -> AsyncIterator[Client]:
    app = create_app(settings, config)
    async with TestClient(TestServer(app, host="127.0.0.1", port=router_port)) as client:
        async with asyncio.timeout(10):
            await app[BUS].wait_ready()
        yield client


async def _purge(amqp_url: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for stage in STAGE_QUEUES:
            await (await declare_stage(channel, STAGES[stage])).purge()


@pytest.fixture(scope="module", autouse=True)
async def quiet_queues(infra: Infra) -> AsyncIterator[None]:
    """Start clean (earlier modules leave events in the stage queues), leave nothing."""
    await _purge(infra.amqp_url)
    yield
    await _purge(infra.amqp_url)


@dataclass
class Rig:
    """The stages on the test's configuration, the events seen, the emulator's sends."""

    router: Client
    db: asyncpg.Pool
    config: LiveConfig
    emulator: RunningEmulator
    start_runner: RunnerFactory
    prefix: str = field(default_factory=lambda: "bt" + uuid.uuid4().hex[:8])
    seen: list[dict[str, Any]] = field(default_factory=list)

    def queue(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    async def start(
        self, url: str, workstream: dict[str, Any] | None = None, **bot_settings: Any
    ) -> None:
        self.config.current = parse_config(
            _yaml(self.prefix, url, workstream, **bot_settings), "bot.yaml", ENVIRON
        )
        for stage in (conversations.STAGE, classify.STAGE, outbound.STAGE):
            await self.start_runner(stage)
        await self.start_runner(distribute.STAGE, tick_interval=0.1)

    async def start_bot_stage(self, **overrides: Any) -> None:
        await self.start_runner(bot.STAGE, **overrides)

    async def writes(self, customer: str, body: str, **extra: str) -> str:
        """The customer writes (through the signed webhook; the emulator's window opens)."""
        self.emulator.state.record_customer_message(
            ACCOUNT_SID, f"whatsapp:{BUSINESS}", f"whatsapp:{customer}"
        )
        form = inbound_form(customer=customer, body=body, **extra)
        data, headers = signed_post(INBOUND, form, base=str(self.router.make_url("")).rstrip("/"))
        response = await self.router.post(INBOUND, data=data, headers=headers)
        assert response.status == 200, await response.text()
        return dict(form)["MessageSid"]

    def sent_to(self, customer: str) -> list[Any]:
        """What Twilio (the emulator) was asked to send the customer, in order."""
        messages = [m for m in self.emulator.state.messages.values()]
        return sorted(
            (m for m in messages if m.to == f"whatsapp:{customer}"), key=lambda m: m.sequence
        )

    async def received(self, customer: str, count: int) -> list[Any]:
        async def enough() -> list[Any] | None:
            sent = self.sent_to(customer)
            return sent if len(sent) >= count else None

        found: list[Any] = await wait_for(enough, timeout=10)
        return found

    async def conversation(self, customer: str) -> asyncpg.Record:
        async def stored() -> asyncpg.Record | None:
            row: asyncpg.Record | None = await self.db.fetchrow(
                "SELECT * FROM conversations WHERE customer = $1 ORDER BY opened_at DESC LIMIT 1",
                customer,
            )
            return row

        found: asyncpg.Record = await wait_for(stored, timeout=10)
        return found

    async def event(self, kind: str, conversation_id: str, timeout: float = 10.0) -> dict[str, Any]:
        async def arrived() -> dict[str, Any] | None:
            return next(
                (
                    e
                    for e in self.seen
                    if e["type"] == kind and e.get("conversation_id") == conversation_id
                ),
                None,
            )

        found: dict[str, Any] = await wait_for(arrived, timeout=timeout)
        return found

    def events(self, kind: str, conversation_id: str) -> list[dict[str, Any]]:
        return [
            e
            for e in self.seen
            if e["type"] == kind and e.get("conversation_id") == conversation_id
        ]


@pytest.fixture
async def rig(
    router: Client,
    db: asyncpg.Pool,
    config: LiveConfig,
    emulator: RunningEmulator,
    start_runner: RunnerFactory,
    settings: Settings,
) -> AsyncIterator[Rig]:
    rig = Rig(router, db, config, emulator, start_runner)
    keys = ("conversation.*", "bot.replied", "message.received", "message.send-requested")
    async with tap(settings.amqp_url.get_secret_value(), *keys) as spy:

        async def drain() -> None:
            while True:
                event, _ = await spy.events.get()
                rig.seen.append(event)

        task = asyncio.create_task(drain())
        try:
            yield rig
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await db.execute(
                "UPDATE agents SET presence = 'offline' WHERE $1 = ANY(queues) OR $2 = ANY(queues)",
                rig.queue("orders"),
                rig.queue("vip"),
            )


@pytest.fixture
async def started(rig: Rig) -> AsyncIterator[Callable[..., Awaitable[BotServer]]]:
    """Start a scripted bot and every stage, the workstream pointing at the bot."""
    stack: list[Any] = []

    async def start(
        script: Script,
        *,
        stage: dict[str, Any] | None = None,
        workstream: dict[str, Any] | None = None,
        **bot_settings: Any,
    ) -> BotServer:
        context = bot_server(script)
        server = await context.__aenter__()
        stack.append(context)
        await rig.start(server.url, workstream, **bot_settings)
        await rig.start_bot_stage(**(stage or {}))
        return server

    yield start
    for context in reversed(stack):
        await context.__aexit__(None, None, None)


Start = Callable[..., Awaitable[BotServer]]


# --- answers reach the customer ----------------------------------------------------------


async def test_the_bots_answers_reach_the_customer_once_and_no_queue_meanwhile(
    rig: Rig, started: Start
) -> None:
    server = await started(texts("Posso ajudar com pedidos.", "O que deseja?"))
    customer = new_customer()
    await rig.writes(customer, "oi")
    sent = await rig.received(customer, 3)
    expected = [GREETING, "Posso ajudar com pedidos.", "O que deseja?"]
    assert sorted(m.body for m in sent) == sorted(expected)  # outbound sends concurrently
    conv = await rig.conversation(customer)
    cid = str(conv["id"])
    assert conv["state"] == "bot" and conv["queue"] is None and conv["agent_id"] is None
    [call] = server.calls
    assert call.body["sender"] == cid and call.message == "oi"
    meta = call.metadata
    assert meta["customer"] == customer and meta["workstream"] == "support-pt"
    assert meta["language"] == "pt-BR" and meta["profile_name"] == "Maria"
    assert meta["variables"] == {} and meta["media"] == []
    assert "Authorization" not in call.headers
    started_event = await rig.event("conversation.bot-started", cid)
    assert started_event["data"]["bot_url"] == server.url.split("/webhooks")[0]
    replied = await rig.event("bot.replied", cid)
    assert replied["data"]["turn"] == 1 and replied["data"]["handoff"] is False
    assert replied["data"]["texts"] == ["Posso ajudar com pedidos.", "O que deseja?"]
    assert replied["data"]["message_id"] == meta["message_id"]
    thread = await rig.db.fetch(
        "SELECT origin, body FROM messages WHERE conversation_id = $1 AND direction ="
        " 'outbound' ORDER BY received_at, id",
        conv["id"],
    )
    assert [(r["origin"], r["body"]) for r in thread] == [("bot", text) for text in expected]
    await asyncio.sleep(0.5)  # nothing more: no second send, never classified
    assert len(rig.sent_to(customer)) == 3
    assert not rig.events("conversation.classified", cid)
    assert not rig.events("conversation.queued", cid)


async def test_a_handoff_carries_variables_into_classification_the_queue_and_an_offer(
    rig: Rig, started: Start
) -> None:
    script = by_message(
        {
            "meu pedido": handoff(
                "Vou chamar alguém.", variables={"order": "A-77"}, skills={"vip": 4}, priority=7
            )
        },
        default=texts("Qual é o número do pedido?"),
    )
    await started(script)
    agent_id, auth = await new_agent(
        rig.db, queues=[rig.queue("orders")], skills={"orders": 2, "vip": 4}, presence="available"
    )
    customer = new_customer()
    await rig.writes(customer, "oi")
    await rig.received(customer, 2)
    await rig.writes(customer, "meu pedido")
    conv = await rig.conversation(customer)
    cid = str(conv["id"])
    escalated = await rig.event("conversation.escalated", cid)
    assert escalated["data"]["reason"] == "bot"
    assert escalated["data"]["variables"] == {"order": "A-77"}
    assert escalated["data"]["turns"] == 2
    classified = await rig.event("conversation.classified", cid)
    assert classified["data"]["variables"]["order"] == "A-77"
    assert classified["data"]["skills"] == {"orders": 2, "vip": 4}
    assert classified["data"]["priority"] == 7  # the bot's, higher than the rule's 3
    assert classified["data"]["queue"] == rig.queue("orders")  # routed on the bot's variable
    queued = await rig.event("conversation.queued", cid)
    assert queued["data"]["queue"] == rig.queue("orders")
    offered = await rig.event("conversation.offered", cid)
    assert offered["data"]["agent_id"] == agent_id
    trace = await rig.db.fetchval("SELECT classification FROM conversations WHERE id = $1", cid)
    assert trace["bot"]["reason"] == "bot" and any("bot" in n for n in trace["notes"])
    # The agent takes it and reads the bot's transcript.
    response = await rig.router.post(
        f"/api/offers/{offered['data']['offer_id']}/accept", headers=auth
    )
    assert response.status == 200, await response.text()
    response = await rig.router.get(f"/api/conversations/{cid}/messages", headers=auth)
    assert response.status == 200
    thread = [(m["sender"], m["body"]) for m in await response.json()]
    assert thread[:5] == [
        ("customer", "oi"),
        ("bot", GREETING),
        ("bot", "Qual é o número do pedido?"),
        ("customer", "meu pedido"),
        ("bot", "Vou chamar alguém."),
    ]


async def test_the_bots_queue_replaces_the_routing_decision(rig: Rig, started: Start) -> None:
    await started(handoff(None, variables={"order": "B-1"}, queue=rig.queue("vip")), greeting={})
    customer = new_customer()
    await rig.writes(customer, "oi")
    cid = str((await rig.conversation(customer))["id"])
    classified = await rig.event("conversation.classified", cid)
    # The rules alone would route on the order to -orders: the bot's queue wins.
    assert classified["data"]["queue"] == rig.queue("vip")
    assert classified["data"]["skills"] == {"orders": 2}
    assert any("replaces the routing decision" in n for n in classified["data"]["notes"])
    queued = await rig.event("conversation.queued", cid)
    assert queued["data"]["queue"] == rig.queue("vip")


# --- escalation without the bot's say ------------------------------------------------------


async def test_a_customer_asking_for_a_person_escalates_without_asking_the_bot(
    rig: Rig, started: Start
) -> None:
    server = await started(echo(), greeting={})
    customer = new_customer()
    await rig.writes(customer, "Quero falar com um ATENDENTE, por favor")
    conv = await rig.conversation(customer)
    cid = str(conv["id"])
    escalated = await rig.event("conversation.escalated", cid)
    assert escalated["data"]["reason"] == "customer_asked"
    assert "atendente" in escalated["data"]["detail"]
    await rig.event("conversation.queued", cid)
    # Agents' now: the bot is never asked, not even about the next message.
    await rig.writes(customer, "alô?")
    await asyncio.sleep(0.6)
    assert server.calls == []
    assert rig.sent_to(customer) == []


async def test_after_max_turns_the_conversation_goes_to_agents(rig: Rig, started: Start) -> None:
    server = await started(echo(), greeting={}, max_turns=2)
    customer = new_customer()
    for n, body in enumerate(("um", "dois")):
        await rig.writes(customer, body)
        await rig.received(customer, n + 1)
    await rig.writes(customer, "três")
    cid = str((await rig.conversation(customer))["id"])
    escalated = await rig.event("conversation.escalated", cid)
    assert escalated["data"]["reason"] == "max_turns" and escalated["data"]["turns"] == 2
    assert server.messages == ["um", "dois"]
    await rig.event("conversation.queued", cid)


# --- the bot failing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "detail"),
    [
        pytest.param(delayed(3.0), "timeout after 0.6 s", id="timeout"),
        pytest.param(failing(1000, 503), "HTTP 503", id="5xx"),
        pytest.param(malformed(), "invalid answer: not JSON", id="malformed"),
        pytest.param(not_a_list(), "invalid answer: expected a list", id="not-a-list"),
        pytest.param(answers({"text": "x"}, status=404), "HTTP 404", id="4xx"),
        pytest.param(
            # Valid JSON (an empty list) but past the cap: never read whole.
            lambda body: Reply(200, b"[" + b" " * (2 * 1024 * 1024) + b"]"),
            "invalid answer: larger than",
            id="too-large",
        ),
    ],
)
async def test_a_failing_bot_escalates_with_the_reason(
    rig: Rig, started: Start, script: Script, detail: str
) -> None:
    server = await started(script, greeting={}, timeout="600ms")
    customer = new_customer()
    await rig.writes(customer, "oi")
    cid = str((await rig.conversation(customer))["id"])
    escalated = await rig.event("conversation.escalated", cid)
    assert escalated["data"]["reason"] == "bot_error"
    assert escalated["data"]["detail"].startswith(detail), escalated["data"]["detail"]
    await rig.event("conversation.queued", cid)
    turn = await rig.db.fetchrow(
        "SELECT state, error FROM bot_turns WHERE conversation_id = $1", cid
    )
    assert turn is not None and turn["state"] == "failed" and turn["error"].startswith(detail)
    if "HTTP 5" in detail:
        assert len(server.calls) >= 2  # retried within the timeout
    elif detail.startswith(("invalid", "HTTP 4")):
        assert len(server.calls) == 1  # not retried


async def test_a_bot_failing_once_is_asked_again_within_the_timeout(
    rig: Rig, started: Start
) -> None:
    server = await started(failing(1, 502, then=texts("de volta")), greeting={})
    customer = new_customer()
    await rig.writes(customer, "oi")
    [sent] = await rig.received(customer, 1)
    assert sent.body == "de volta"
    assert len(server.calls) == 2
    assert server.calls[0].metadata["message_id"] == server.calls[1].metadata["message_id"]


async def test_without_handoff_on_error_the_message_is_retried_then_dead_lettered(
    rig: Rig, started: Start, settings: Settings
) -> None:
    server = await started(
        failing(1000, 503),
        greeting={},
        timeout="300ms",
        handoff_on_error=False,
        stage={"delivery_limit": 4},
    )
    customer = new_customer()
    sid = await rig.writes(customer, "oi")
    cid = str((await rig.conversation(customer))["id"])
    received = await wait_for(
        lambda: _first(rig.seen, lambda e: e["data"].get("message_sid") == sid), timeout=5
    )

    async def dead() -> Any:
        letters = await list_dead(settings, "bot", 1000)
        return next((d for d in letters if d.message_id == received["id"]), None)

    letter = await wait_for(dead, timeout=15, interval=0.2)
    assert "HTTP 503" in letter.reason and "failed 4 times" in letter.reason
    assert len({c.metadata["message_id"] for c in server.calls}) == 1
    assert len(server.calls) >= 3
    conv = await rig.conversation(customer)
    assert conv["state"] == "bot"
    assert not rig.events("conversation.escalated", cid)
    turn = await rig.db.fetchrow(
        "SELECT state, error FROM bot_turns WHERE conversation_id = $1", cid
    )
    assert turn is not None and turn["state"] == "calling" and "HTTP 503" in turn["error"]


async def _first(
    seen: list[dict[str, Any]], match: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    return next((e for e in seen if match(e)), None)


# --- buttons and media -------------------------------------------------------------------


async def test_buttons_become_numbered_choices_and_a_number_goes_back_as_the_payload(
    rig: Rig, started: Start
) -> None:
    script = by_message(
        {"/trocas": texts("Trocas em até 30 dias.")},
        default=buttons("Sobre o quê?", [("Horário", "/horario"), ("Trocas", "/trocas")]),
    )
    server = await started(script, greeting={})
    customer = new_customer()
    await rig.writes(customer, "oi")
    [choices] = await rig.received(customer, 1)
    assert choices.body == "Sobre o quê?\n1. Horário\n2. Trocas"
    await rig.writes(customer, "2")
    sent = await rig.received(customer, 2)
    assert sent[1].body == "Trocas em até 30 dias."
    assert server.messages == ["oi", "/trocas"]
    cid = str((await rig.conversation(customer))["id"])
    first = await rig.event("bot.replied", cid)
    assert first["data"]["buttons"] == 2


async def test_an_image_goes_as_media_and_the_customers_media_reaches_the_bot_as_types(
    rig: Rig, started: Start
) -> None:
    url = "https://cdn.example.com/menu.png"
    server = await started(image(url, "Nosso cardápio"), greeting={})
    customer = new_customer()
    twilio_media = (
        f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/MM1/Media/ME1"
    )
    await rig.writes(
        customer,
        "veja",
        NumMedia="1",
        MediaUrl0=twilio_media,
        MediaContentType0="image/jpeg",
    )
    sent = await rig.received(customer, 2)
    assert sorted((m.body, tuple(m.media_urls)) for m in sent) == [
        ("", (url,)),
        ("Nosso cardápio", ()),
    ]
    [call] = server.calls
    [media] = call.metadata["media"]
    assert media["content_type"] == "image/jpeg"
    assert media["path"].startswith("/api/conversations/") and "twilio" not in str(call.body)
    cid = str((await rig.conversation(customer))["id"])
    replied = await rig.event("bot.replied", cid)
    assert replied["data"]["media"] == 1


# --- at most once per message --------------------------------------------------------------


async def test_a_redelivered_message_does_not_ask_the_bot_twice(
    rig: Rig, started: Start, bus: Bus
) -> None:
    server = await started(texts("resposta"), greeting={})
    customer = new_customer()
    sid = await rig.writes(customer, "oi")
    await rig.received(customer, 1)
    received = await wait_for(
        lambda: _first(rig.seen, lambda e: e["data"].get("message_sid") == sid), timeout=5
    )
    envelope = Envelope.model_validate(received)
    await bus.publish(envelope)
    await bus.publish(envelope)
    cid = str((await rig.conversation(customer))["id"])
    await asyncio.sleep(0.8)
    assert len(server.calls) == 1
    assert len(rig.sent_to(customer)) == 1
    assert len(rig.events("bot.replied", cid)) == 1
    # A turn left 'calling' (the process died during the call) asks again with the same
    # message id, and the answer is stored and sent once.
    await rig.db.execute("UPDATE bot_turns SET state = 'calling' WHERE conversation_id = $1", cid)
    await bus.publish(envelope)
    calls = await server.wait_calls(2)
    assert calls[0].metadata["message_id"] == calls[1].metadata["message_id"]
    await asyncio.sleep(0.6)
    assert len(rig.sent_to(customer)) == 1
    turn = await rig.db.fetchval("SELECT state FROM bot_turns WHERE conversation_id = $1", cid)
    assert turn == "answered"


# --- the end of a conversation at the bot ----------------------------------------------------

CLOSED = "Conversa encerrada. Obrigado!"
QUESTION = "De 1 a 5, como foi o atendimento?"
# The workstream says something when a conversation closes and asks a survey after one an
# agent served: a conversation ending at the bot gets the first, never the second.
CLOSING = {
    "automated_messages": {"closed": {"text": {"pt-BR": CLOSED}}},
    "survey": {"question": {"pt-BR": QUESTION}, "expires_after": "1h"},
}


def resolves(*lines: str) -> Script:
    """The bot's last words, then ``custom: {"resolved": true}``."""
    return answers(*({"text": line} for line in lines), {"custom": {"resolved": True}})


class SetClock:
    """A clock that stands where the test puts it (never back): the lifecycle tick sees no
    time pass between two settings, so "not yet" is not a race with the run's speed."""

    def __init__(self) -> None:
        self.at = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.at

    def set(self, at: datetime) -> datetime:
        self.at = max(self.at, at)
        return self.at


@dataclass
class Ticks:
    """The lifecycle stage with its tick recorded: when did a tick run at ``at`` or later."""

    seen: list[datetime] = field(default_factory=list)

    def stage(self) -> Any:
        async def tick(tx: StageTx) -> list[Envelope]:
            events = await lifecycle.tick(tx)
            self.seen.append(tx.now)
            return events

        return dataclasses.replace(lifecycle.STAGE, tick=tick)

    async def past(self, at: datetime, count: int = 3) -> None:
        """``count`` ticks ran at ``at`` or later: all but the last committed and published."""
        before = len(self.seen)

        async def enough() -> bool:
            return sum(1 for t in self.seen[before:] if t >= at) >= count

        await wait_for(enough, timeout=10)


async def _answered_at_a_closing_bot(rig: Rig, started: Start) -> tuple[SetClock, Ticks, str, str]:
    """A customer's "oi" answered by a bot that closes after 10 min idle, lifecycle ticking
    on a settable clock: (clock, ticks, customer, conversation id)."""
    clock = SetClock()
    await started(echo(), greeting={}, close_after="10m", workstream=CLOSING)
    ticks = await _start_lifecycle(rig, clock)
    customer = new_customer()
    await rig.writes(customer, "oi")
    cid = str((await rig.conversation(customer))["id"])
    await rig.event("bot.replied", cid)
    return clock, ticks, customer, cid


async def _start_lifecycle(rig: Rig, clock: Callable[[], datetime] | None = None) -> Ticks:
    ticks = Ticks()
    await rig.start_runner(
        ticks.stage(),
        **({"clock": clock} if clock is not None else {}),
        tick_interval=0.05,
        delivery_limit=10,
        retry_backoff_base=0.05,
        retry_backoff_max=0.3,
    )
    return ticks


async def _idle_due(rig: Rig, cid: str) -> datetime:
    due: datetime = await rig.db.fetchval(
        "SELECT due_at FROM timers WHERE conversation_id = $1 AND kind = 'bot_idle'"
        " AND fired_at IS NULL",
        cid,
    )
    return due


async def _outbound(rig: Rig, cid: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await rig.db.fetch(
        "SELECT id, origin, body, received_at, attributes FROM messages"
        " WHERE conversation_id = $1 AND direction = 'outbound' ORDER BY received_at, id",
        cid,
    )
    return rows


async def _no_survey(rig: Rig, customer: str, cid: str) -> None:
    await asyncio.sleep(0.5)  # time for a survey to be asked, were it asked
    assert QUESTION not in [m.body for m in rig.sent_to(customer)]
    assert (
        await rig.db.fetchval("SELECT count(*) FROM surveys WHERE conversation_id = $1", cid) == 0
    )


async def test_a_bot_that_resolves_closes_the_conversation_after_its_last_words(
    rig: Rig, started: Start
) -> None:
    """``custom: {"resolved": true}``: the answer's texts go first (stored and requested in
    the same transaction, ahead of ``conversation.closed``), then the conversation closes
    ``resolved_by_bot`` — the workstream's closing message, no survey, no wrap-up, no queue."""
    script = by_message(
        {"obrigado, era isso": resolves("De nada!", "Até a próxima.")},
        default=texts("Nosso horário é das 9h às 18h."),
    )
    server = await started(script, greeting={}, workstream=CLOSING)
    await _start_lifecycle(rig)
    customer = new_customer()
    await rig.writes(customer, "qual o horário?")
    await rig.received(customer, 1)
    await rig.writes(customer, "obrigado, era isso")
    cid = str((await rig.conversation(customer))["id"])
    closed = await rig.event("conversation.closed", cid)
    assert closed["data"]["reason"] == "resolved_by_bot"
    sent = await rig.received(customer, 4)
    assert sorted(m.body for m in sent) == sorted(
        ["Nosso horário é das 9h às 18h.", "De nada!", "Até a próxima.", CLOSED]
    )
    conv = await rig.conversation(customer)
    assert (conv["state"], conv["close_reason"]) == ("closed", "resolved_by_bot")
    assert conv["queue"] is None and conv["agent_id"] is None and conv["assigned_at"] is None
    assert conv["wrap_up_until"] is None
    # The thread: the bot's last words, then the closing message; all before or at the close.
    thread = await _outbound(rig, cid)
    assert [(r["origin"], r["body"]) for r in thread] == [
        ("bot", "Nosso horário é das 9h às 18h."),
        ("bot", "De nada!"),
        ("bot", "Até a próxima."),
        (None, CLOSED),
    ]
    assert all(r["received_at"] <= conv["closed_at"] for r in thread[:3])
    # Published in that order: the last words' send requests, then the close.
    last_words = {str(r["id"]) for r in thread[1:3]}
    order = [
        e["type"]
        for e in rig.seen
        if e.get("conversation_id") == cid
        and (
            e["type"] == "conversation.closed"
            or (e["type"] == "message.send-requested" and e["data"]["message_id"] in last_words)
        )
    ]
    assert order == ["message.send-requested", "message.send-requested", "conversation.closed"]
    replied = rig.events("bot.replied", cid)
    assert [r["data"]["texts"] for r in replied][-1] == ["De nada!", "Até a próxima."]
    await _no_survey(rig, customer, cid)
    assert not rig.events("conversation.escalated", cid)
    assert not rig.events("conversation.queued", cid)
    assert len(rig.events("conversation.closed", cid)) == 1
    assert len(server.calls) == 2
    # Nothing left to fire for it.
    assert await _idle_due(rig, cid) is None


async def test_a_handoff_in_the_same_answer_wins_over_resolved(rig: Rig, started: Start) -> None:
    """Told both, the bot's hand-off stands: a customer who was promised a person gets one."""
    await started(
        answers({"text": "Vou chamar alguém."}, {"custom": {"resolved": True, "handoff": True}}),
        greeting={},
    )
    customer = new_customer()
    await rig.writes(customer, "oi")
    cid = str((await rig.conversation(customer))["id"])
    escalated = await rig.event("conversation.escalated", cid)
    assert escalated["data"]["reason"] == "bot"
    await rig.event("conversation.queued", cid)
    assert not rig.events("conversation.closed", cid)


async def test_a_customer_silent_at_the_bot_is_closed_after_close_after_and_not_before(
    rig: Rig, started: Start
) -> None:
    """``close_after`` counts from the bot's last answer; a message in between starts it
    again; the timer closes the conversation ``bot_idle`` once, without a survey."""
    clock, ticks, customer, cid = await _answered_at_a_closing_bot(rig, started)
    answered = await rig.db.fetchval(
        "SELECT answered_at FROM bot_turns WHERE conversation_id = $1", cid
    )
    first = await _idle_due(rig, cid)
    assert first == answered + timedelta(minutes=10)

    await ticks.past(clock.set(first - timedelta(seconds=1)))
    assert (await rig.conversation(customer))["state"] == "bot"
    assert not rig.events("conversation.closed", cid)

    # The customer writes again before it fires: the ten minutes start over from the answer.
    await rig.writes(customer, "ainda está aí?")
    await wait_for(lambda: _count(rig, "bot.replied", cid, 2))
    second = await _idle_due(rig, cid)
    answered = await rig.db.fetchval(
        "SELECT max(answered_at) FROM bot_turns WHERE conversation_id = $1", cid
    )
    assert second == answered + timedelta(minutes=10) and second > first

    # Past the first due time (the answers were moments apart in real time): still open.
    await ticks.past(clock.set(first + (second - first) / 2))
    assert (await rig.conversation(customer))["state"] == "bot"
    assert not rig.events("conversation.closed", cid)

    at = clock.set(second + timedelta(seconds=1))
    closed = await rig.event("conversation.closed", cid)
    assert closed["data"]["reason"] == "bot_idle"
    conv = await rig.conversation(customer)
    assert (conv["state"], conv["close_reason"]) == ("closed", "bot_idle")
    assert conv["closed_at"] >= second and conv["assigned_at"] is None
    sent = await rig.received(customer, 3)
    assert sent[-1].body == CLOSED
    await _no_survey(rig, customer, cid)
    # Fired once: later ticks find nothing.
    await ticks.past(clock.set(at + timedelta(hours=1)))
    assert len(rig.events("conversation.closed", cid)) == 1
    assert await _idle_due(rig, cid) is None


async def test_without_close_after_a_conversation_stays_at_the_bot(
    rig: Rig, started: Start
) -> None:
    """``close_after: 0`` turns the idle close off: no timer at all."""
    await started(echo(), greeting={}, close_after=0)
    customer = new_customer()
    await rig.writes(customer, "oi")
    cid = str((await rig.conversation(customer))["id"])
    await rig.event("bot.replied", cid)
    count = await rig.db.fetchval(
        "SELECT count(*) FROM timers WHERE conversation_id = $1 AND kind = 'bot_idle'", cid
    )
    assert count == 0


async def _count(rig: Rig, kind: str, cid: str, n: int) -> bool:
    return len(rig.events(kind, cid)) >= n


async def test_a_customer_writing_after_the_bot_resolved_starts_a_new_conversation_at_the_bot(
    rig: Rig, started: Start
) -> None:
    """Even within ``reopen_within``: a conversation that ended at the bot never reached a
    queue, so it is not reopened (it used to come back ``queued`` with no queue, and the
    customer's messages sat in it unrouted); the message opens a new one, at the bot."""
    script = by_message({"tchau": resolves("Até mais!")}, default=echo())
    server = await started(script, greeting={}, workstream={"lifecycle": {"reopen_within": "1h"}})
    await _start_lifecycle(rig)
    customer = new_customer()
    await rig.writes(customer, "tchau")
    first = str((await rig.conversation(customer))["id"])
    await rig.event("conversation.closed", first)
    await rig.writes(customer, "voltei")

    async def reopened_or_new() -> asyncpg.Record | None:
        row: asyncpg.Record | None = await rig.db.fetchrow(
            "SELECT * FROM conversations WHERE customer = $1 AND state <> 'closed'", customer
        )
        return row

    second = await wait_for(reopened_or_new)
    assert str(second["id"]) != first and second["state"] == "bot" and second["queue"] is None
    call = (await server.wait_calls(2))[1]
    assert call.body["sender"] == str(second["id"]) and call.message == "voltei"
    [answer] = [m for m in await rig.received(customer, 2) if m.body == "echo: voltei"]
    assert answer.body == "echo: voltei"
    old = await rig.db.fetchrow(
        "SELECT state, close_reason FROM conversations WHERE id = $1", first
    )
    assert old is not None and (old["state"], old["close_reason"]) == ("closed", "resolved_by_bot")
    await rig.event("conversation.bot-started", str(second["id"]))
    assert not rig.events("conversation.reopened", first)
    assert not rig.events("conversation.queued", first)


# --- review of issue 14: never lost to a lag, never stranded at a bot ----------------------


async def test_a_message_stored_late_by_the_conversations_stage_still_reaches_the_bot(
    rig: Rig,
) -> None:
    """The conversations stage down longer than the bot stage's delivery limit lasts: the
    bot stage waits for the message to be stored (not counted as deliveries)."""
    async with bot_server(echo()) as server:
        rig.config.current = parse_config(
            _yaml(rig.prefix, server.url, greeting={}), "bot.yaml", ENVIRON
        )
        await rig.start_runner(outbound.STAGE)
        await rig.start_bot_stage(delivery_limit=3, retry_backoff_base=0.05, retry_backoff_max=0.1)
        customer = new_customer()
        await rig.writes(customer, "oi")
        await asyncio.sleep(1.5)  # three deliveries take well under a second
        assert server.calls == []
        await rig.start_runner(conversations.STAGE)
        [sent] = await rig.received(customer, 1)
        assert sent.body == "echo: oi"


async def test_a_conversation_left_at_a_removed_bot_is_escalated_without_a_message(
    rig: Rig, started: Start
) -> None:
    """A reload removes the workstream's bot: the bot stage's sweep escalates the
    conversations at it (``bot_unavailable``) into classification and a queue."""
    server = await started(echo(), greeting={})
    customer = new_customer()
    await rig.writes(customer, "oi")
    cid = str((await rig.conversation(customer))["id"])
    await rig.event("bot.replied", cid)
    rig.config.current = parse_config(
        _yaml(rig.prefix, server.url, {"bot": None}), "bot.yaml", ENVIRON
    )
    escalated = await rig.event("conversation.escalated", cid)
    assert escalated["data"]["reason"] == "bot_unavailable"
    assert escalated["data"]["turns"] == 1
    await rig.event("conversation.queued", cid)
    assert len(server.calls) == 1


async def test_the_conversations_row_decides_whose_a_message_is_not_the_messages_workstream(
    rig: Rig, started: Start, bus: Bus
) -> None:
    """A number moved to a workstream without a bot: the conversation opened at the bot
    stays the bot's (its row's workstream), its customer's next message is answered."""
    server = await started(echo(), greeting={})
    customer = new_customer()
    sid = await rig.writes(customer, "oi")
    cid = str((await rig.conversation(customer))["id"])
    await rig.event("bot.replied", cid)
    first = next(
        e for e in rig.seen if e["type"] == "message.received" and e["data"]["message_sid"] == sid
    )
    moved_sid = f"SM{uuid.uuid4().hex}"
    data = {
        **first["data"],
        "message_sid": moved_sid,
        "body": "segunda",
        "workstream": "support-en",
        "received_at": datetime.now(UTC).isoformat(),
        "form": {"MessageSid": moved_sid},
    }
    await bus.publish(
        Envelope.model_validate(
            {**first, "id": str(uuid.uuid4()), "occurred_at": data["received_at"], "data": data}
        )
    )
    await wait_for(lambda: _count(rig, "bot.replied", cid, 2))
    assert server.messages == ["oi", "segunda"]


async def test_a_message_of_a_conversation_not_at_the_bot_takes_no_lock(
    rig: Rig, started: Start, settings: Settings
) -> None:
    """Agents' conversations: the bot stage reads the state without ``FOR UPDATE`` (an agent's
    transaction holding the row does not hold the bot stage up)."""
    await started(echo(), greeting={})
    customer = new_customer()
    await rig.writes(customer, "quero um atendente")
    cid = str((await rig.conversation(customer))["id"])
    await rig.event("conversation.queued", cid)
    sid = await rig.writes(customer, "alô?")

    async def seen() -> dict[str, Any] | None:
        await asyncio.sleep(0)
        return next(
            (
                e
                for e in rig.seen
                if e["type"] == "message.received" and e["data"]["message_sid"] == sid
            ),
            None,
        )

    received: dict[str, Any] = await wait_for(seen, timeout=10)
    await wait_for(lambda: rig.db.fetchval("SELECT 1 FROM messages WHERE twilio_sid = $1", sid))
    event = Envelope.model_validate(received)
    payload = MessageReceived.model_validate(received["data"])
    async with rig.db.acquire() as holder, holder.transaction():
        await holder.execute("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", cid)
        async with rig.db.acquire() as conn, conn.transaction():
            tx = StageTx(conn, rig.config, datetime.now(UTC), settings)
            async with asyncio.timeout(3):
                assert await bot.on_message(event, payload, tx) == []


async def test_a_message_stored_but_not_yet_handled_by_the_bot_keeps_it_from_idling_out(
    rig: Rig, started: Start
) -> None:
    """The idle timer fires while the customer's newest message is stored but the bot stage
    has not pushed the timer yet: not closed, the timer moves to that message's end."""
    clock, ticks, customer, cid = await _answered_at_a_closing_bot(rig, started)
    first = await _idle_due(rig, cid)
    # A message stored a minute before the timer is due, which the bot stage is behind on.
    last = first - timedelta(minutes=1)
    await rig.db.execute(
        "UPDATE conversations SET last_customer_message_at = $2 WHERE id = $1", cid, last
    )
    await ticks.past(clock.set(first + timedelta(seconds=1)))
    assert (await rig.conversation(customer))["state"] == "bot"
    assert not rig.events("conversation.closed", cid)
    assert await _idle_due(rig, cid) == last + timedelta(minutes=10)
    closed_at = clock.set(last + timedelta(minutes=10, seconds=1))
    closed = await rig.event("conversation.closed", cid)
    assert closed["data"]["reason"] == "bot_idle"
    assert (await rig.conversation(customer))["closed_at"] >= closed_at - timedelta(seconds=1)
