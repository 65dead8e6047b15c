"""The lifecycle stage end to end: automated messages, idle timers, wrap-up, the survey,
sandbox joins and context variables, on the real broker and database.

Timers are driven by an injected clock: every lifecycle runner of a test shares a ``Clock``
the test moves forward, and a ``Ticks`` recorder tells when a tick ran at (or after) a
given time, so "nothing fired yet" and "fired once" are checked without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import aio_pika
import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY
from pydantic import BaseModel, ValidationError

from consumers import classify, conversations, lifecycle
from consumers.automated import fill, text_for
from consumers.conversations import RATING, SANDBOX_JOIN
from consumers.runtime import Stage, StageRunner, StageTx
from omniroute.commands.service import Service
from omniroute.domain import conversation, supervisor
from omniroute.infra.bus import Bus, declare_stage
from omniroute.infra.config_loader import LiveConfig, parse_config
from omniroute.infra.settings import Settings
from omniroute.infra.store import Connection, Store
from omniroute.infra.topology import STAGES
from schemas.config import AutomatedMessage, Lifecycle, Survey
from schemas.events import (
    ConversationClassified,
    ConversationClosed,
    ConversationQueued,
    Envelope,
    MessageReceived,
)
from tests.conftest import Infra, make_settings
from tests.consumers.conftest import RunnerFactory
from tests.support import (
    BUSINESS,
    CONFIG_YAML,
    ENVIRON,
    SANDBOX,
    EventTap,
    customer_writes,
    new_agent,
    new_customer,
    received_event,
    tap,
    wait_for,
)

ADMIN_TOKEN = "admin-token-for-lifecycle-tests"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SURVEY_NUMBER = "+5511999990001"
QUEUE = "lifecycle"  # private to this module: no other test's agents or stages use it
WRAP_UP = timedelta(seconds=30)
IDLE_REMINDER = timedelta(seconds=60)
AUTO_CLOSE = timedelta(seconds=120)

GREETING = {
    "pt-BR": "Olá {customer_name}! Já vamos te atender.",
    "en": "Hi {customer_name}! We will be right with you.",
}
QUEUED = {
    "pt-BR": "Você é o número {queue_position} da fila.",
    "en": "You are number {queue_position} in line.",
}
AGENT_JOINED = {
    "pt-BR": "{agent_name} entrou na conversa.",
    "en": "{agent_name} joined the conversation.",
}
AGENT_ENDED = {
    "pt-BR": "Atendimento encerrado. Pedido {order}.",
    "en": "We are done here. Order {order}.",
}
IDLE = {"pt-BR": "Você ainda está aí?", "en": "Are you still there?"}
CLOSED = {"pt-BR": "Conversa encerrada. Obrigado!", "en": "Conversation closed. Thank you!"}
OUT_OF_HOURS = {
    "pt-BR": "Estamos fora do horário de atendimento.",
    "en": "We are closed right now.",
}
QUESTION = {"pt-BR": "De 1 a 5, como foi o atendimento?", "en": "From 1 to 5, how did we do?"}
RESUME = {
    "pt-BR": "Podemos retomar o seu atendimento?",
    "en": "Shall we pick up where we left off?",
}
SURVEY_TEMPLATE = {
    "pt-BR": "Conte como foi: responda de 1 a 5.",
    "en": "Tell us how it went: 1 to 5.",
}
SID = {
    ("retomar", "pt-BR"): "HX" + "d4" * 16,
    ("retomar", "en"): "HX" + "e5" * 16,
    ("pesquisa", "pt-BR"): "HX" + "f6" * 16,
    ("pesquisa", "en"): "HX" + "a7" * 16,
}


def _template(name: str, texts: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "default_language": "pt-BR",
        "languages": {
            lang: {"content_sid": SID[(name, lang)], "text": text} for lang, text in texts.items()
        },
    }


def _messages() -> dict[str, Any]:
    return {
        "greeting": {"text": GREETING},
        "queued": {"text": QUEUED},
        "agent_joined": {"text": AGENT_JOINED},
        "agent_ended": {"text": AGENT_ENDED},
        "idle_reminder": {"text": IDLE, "template": "retomar"},
        "closed": {"text": CLOSED},
        "out_of_hours": {"text": OUT_OF_HOURS},
    }


# support-pt: timers, wrap-up, a survey with a template for outside the window.
SUPPORT_PT = {
    "lifecycle": {
        "wrap_up": f"{WRAP_UP.seconds}s",
        "idle_reminder_after": f"{IDLE_REMINDER.seconds}s",
        "auto_close_after": f"{AUTO_CLOSE.seconds}s",
    },
    "templates": [_template("retomar", RESUME), _template("pesquisa", SURVEY_TEMPLATE)],
    "automated_messages": _messages(),
    "survey": {"question": QUESTION, "template": "pesquisa", "expires_after": "1h"},
}
# survey-pt (its own number): closes at once, a survey without a template.
SURVEY_PT = {
    "name": "survey-pt",
    "language": "pt-BR",
    "fallback_queue": QUEUE,
    "templates": [_template("retomar", RESUME)],
    "automated_messages": _messages(),
    "survey": {"question": QUESTION, "expires_after": "1h"},
}


def _lifecycle_yaml() -> str:
    text = CONFIG_YAML.replace(
        "    language: pt-BR\n    timezone: America/Sao_Paulo\n    fallback_queue: general\n",
        "    language: pt-BR\n    timezone: America/Sao_Paulo\n"
        f"    fallback_queue: {QUEUE}\n"
        + "".join(
            f"    {key}: {json.dumps(value, ensure_ascii=False)}\n"
            for key, value in SUPPORT_PT.items()
        ),
        1,
    )
    text = text.replace(
        "workstream: support-en, sandbox: true}\n",
        "workstream: support-en, sandbox: true}\n"
        f'      - {{name: Survey BR, number: "{SURVEY_NUMBER}", workstream: survey-pt}}\n',
        1,
    )
    text = text.replace(
        "  - name: support-en\n",
        f"  - {json.dumps(SURVEY_PT, ensure_ascii=False)}\n  - name: support-en\n",
    )
    text = text.replace("queues:\n", f"queues:\n  - {{name: {QUEUE}}}\n", 1)
    return text


LIFECYCLE_YAML = _lifecycle_yaml()


# ---------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------


@pytest.fixture
def config() -> LiveConfig:
    return LiveConfig(parse_config(LIFECYCLE_YAML, "lifecycle.yaml", ENVIRON))


@pytest.fixture
def settings(infra: Infra) -> Settings:
    return make_settings(infra, admin_token=ADMIN_TOKEN)


async def _purge(amqp_url: str, stages: tuple[str, ...]) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for stage in stages:
            queue = await declare_stage(channel, STAGES[stage])
            await queue.purge()


@pytest.fixture(scope="module", autouse=True)
async def quiet_queues(infra: Infra) -> AsyncIterator[None]:
    """Earlier modules leave events in the stage queues (nobody consumed them): this
    module's runners would handle them with its configuration. Start clean, and leave
    no automated sends behind for the modules after it."""
    await _purge(infra.amqp_url, ("conversations", "classify", "lifecycle"))
    yield
    await _purge(
        infra.amqp_url, ("conversations", "classify", "lifecycle", "distribute", "outbound")
    )


class Clock:
    """Real time plus an offset the test moves forward (never back)."""

    def __init__(self) -> None:
        self._offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self._offset

    def advance_to(self, at: datetime) -> datetime:
        self._offset = max(self._offset, at - datetime.now(UTC))
        return at


class Ticks:
    """The lifecycle stage with its tick recorded: when did a tick run at ``at`` or later."""

    def __init__(self) -> None:
        self.seen: list[datetime] = []

    def stage(self) -> Stage:
        async def tick(tx: StageTx) -> list[Envelope]:
            events = await lifecycle.tick(tx)
            self.seen.append(tx.now)
            return events

        return dataclasses.replace(lifecycle.STAGE, tick=tick)

    async def past(self, at: datetime, count: int = 2) -> None:
        """``count`` ticks ran at ``at`` or later: all but the last committed and published
        (a runner's ticks run one after the other)."""

        async def enough() -> bool:
            return sum(1 for t in self.seen if t >= at) >= count

        await wait_for(enough, timeout=10)


async def _start_lifecycle(start_runner: RunnerFactory, clock: Clock, ticks: Ticks) -> StageRunner:
    # Generous retries: a message.received may reach this stage before the conversations
    # stage stored its conversation (the stage then retries).
    return await start_runner(
        ticks.stage(),
        clock=clock,
        tick_interval=0.05,
        delivery_limit=10,
        retry_backoff_base=0.05,
        retry_backoff_max=0.3,
    )


@dataclasses.dataclass
class Rig:
    """conversations and classify (real time); lifecycle runners on the test's clock."""

    start_runner: RunnerFactory
    clock: Clock = dataclasses.field(default_factory=Clock)
    ticks: Ticks = dataclasses.field(default_factory=Ticks)

    async def start_lifecycle(self) -> None:
        await _start_lifecycle(self.start_runner, self.clock, self.ticks)


@pytest.fixture
async def stages(start_runner: RunnerFactory) -> Rig:
    """Without the lifecycle stage yet: tests about the timers of a customer's first message
    start it once the conversation is stored (the lifecycle stage may lose them otherwise:
    ``test_a_first_message_committed_between_the_lookups_gets_idle_timers``)."""
    await start_runner(conversations.STAGE)
    await start_runner(classify.STAGE)
    return Rig(start_runner)


@pytest.fixture
async def rig(stages: Rig) -> Rig:
    await stages.start_lifecycle()
    return stages


Predicate = Callable[[dict[str, Any]], bool]


class Events:
    """Everything published about conversations, messages sent, surveys and sandbox joins,
    kept: waiting for one event never throws away another."""

    def __init__(self, spy: EventTap) -> None:
        self._spy = spy
        self.seen: list[dict[str, Any]] = []

    async def wait(self, match: Predicate, timeout: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            index = 0
            while True:
                while index < len(self.seen):
                    if match(self.seen[index]):
                        return self.seen[index]
                    index += 1
                event, _ = await self._spy.events.get()
                self.seen.append(event)

    def matching(self, match: Predicate) -> list[dict[str, Any]]:
        while not self._spy.events.empty():
            self.seen.append(self._spy.events.get_nowait()[0])
        return [e for e in self.seen if match(e)]

    async def expect_none(self, match: Predicate, within: float = 0.4) -> None:
        """No (further) event matching within ``within`` seconds."""
        already = len(self.matching(match))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while True:
                    event, _ = await self._spy.events.get()
                    self.seen.append(event)
                    if match(event):
                        break
        assert len(self.matching(match)) == already, self.matching(match)[already:]


def _is(
    kind: str,
    conversation_id: str | None = None,
    *,
    customer: str | None = None,
    automated: str | None = None,
    besides: str | None = None,
) -> Predicate:
    """Events of a kind (about a conversation, a customer, an automated message), but not
    about conversation ``besides``."""

    def match(event: dict[str, Any]) -> bool:
        data = event.get("data") or {}
        return (
            event["type"] == kind
            and conversation_id in (None, event.get("conversation_id"))
            and customer in (None, data.get("customer"))
            and automated in (None, data.get("automated"))
            and (besides is None or event.get("conversation_id") != besides)
        )

    return match


@pytest.fixture
async def events(settings: Settings) -> AsyncIterator[Events]:
    async with tap(
        settings.amqp_url.get_secret_value(),
        "conversation.*",
        "message.send-requested",
        "survey.answered",
        "sandbox.joined",
    ) as spy:
        yield Events(spy)


def _us_customer() -> str:
    """A valid US number: the ``abroad`` rule makes its conversation English."""
    area = ("617", "212", "202", "415", "312", "305")[secrets.randbelow(6)]
    return f"+1{area}555{secrets.randbelow(10000):04d}"


async def _queued(
    router: TestClient[Any, Any],
    events: Events,
    customer: str,
    body: str,
    *,
    to: str = BUSINESS,
    profile: str = "Maria",
) -> str:
    """A new conversation of the customer, classified and waiting in its queue."""
    await customer_writes(router, customer, body, to=to, profile=profile)
    opened = await events.wait(_is("conversation.opened", customer=customer))
    conversation_id: str = opened["conversation_id"]
    await events.wait(_is("conversation.queued", conversation_id))
    return conversation_id


async def _pick(router: TestClient[Any, Any], auth: dict[str, str], conversation_id: str) -> None:
    response = await router.post(f"/api/queue-items/{conversation_id}/pick", headers=auth)
    assert response.status == 200, await response.text()


async def _close(
    router: TestClient[Any, Any], auth: dict[str, str], conversation_id: str
) -> dict[str, Any]:
    response = await router.post(f"/api/conversations/{conversation_id}/close", headers=auth)
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def _automated(
    events: Events, db: asyncpg.Pool, conversation_id: str, kind: str
) -> asyncpg.Record:
    """The automated message of this kind whose send was requested: its stored row."""
    event = await events.wait(_is("message.send-requested", conversation_id, automated=kind))
    assert event["data"]["kind"] == "system"
    row = await db.fetchrow("SELECT * FROM messages WHERE id = $1", event["data"]["message_id"])
    assert row is not None
    assert str(row["conversation_id"]) == conversation_id
    assert (row["direction"], row["status"]) == ("outbound", "requested")
    return row


async def _outbound(db: asyncpg.Pool, conversation_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch(
        "SELECT * FROM messages WHERE conversation_id = $1 AND direction = 'outbound'"
        " ORDER BY received_at, id",
        conversation_id,
    )
    return rows


async def _bodies(db: asyncpg.Pool, conversation_id: str, body: str) -> int:
    return sum(1 for m in await _outbound(db, conversation_id) if m["body"] == body)


async def _pending(db: asyncpg.Pool, conversation_id: str) -> dict[str, datetime]:
    rows = await db.fetch(
        "SELECT kind, due_at FROM timers WHERE conversation_id = $1 AND fired_at IS NULL",
        conversation_id,
    )
    return {r["kind"]: r["due_at"] for r in rows}


async def _idle_timers(db: asyncpg.Pool, conversation_id: str) -> dict[str, datetime]:
    async def both() -> dict[str, datetime] | None:
        pending = await _pending(db, conversation_id)
        return pending if {"idle_reminder", "auto_close"} <= pending.keys() else None

    found: dict[str, datetime] = await wait_for(both)
    return found


async def _served(db: asyncpg.Pool, conversation_id: str, at: datetime | None = None) -> None:
    """An agent is on the conversation (straight in the database): idle timers apply only
    while an agent waits on the customer, never while the customer waits in a queue."""
    await db.execute(
        "UPDATE conversations SET state = 'active', assigned_at = $2 WHERE id = $1",
        conversation_id,
        at or datetime.now(UTC),
    )


async def _conversation(db: asyncpg.Pool, conversation_id: str) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM conversations WHERE id = $1", conversation_id)
    assert row is not None
    return row


async def _row(db: asyncpg.Pool, query: str, *args: object) -> asyncpg.Record:
    row: asyncpg.Record | None = await db.fetchrow(query, *args)
    assert row is not None, (query, args)
    return row


async def _used_units(db: asyncpg.Pool, agent_id: str) -> int:
    used: int = await db.fetchval("SELECT used_units FROM agents WHERE id = $1", agent_id)
    return used


def _handled() -> float:
    """Lifecycle events taken (handled, or acknowledged as having nothing to do)."""
    return sum(
        REGISTRY.get_sample_value(
            "omniroute_stage_messages_total", {"stage": "lifecycle", "outcome": outcome}
        )
        or 0.0
        for outcome in ("handled", "skipped")
    )


# ---------------------------------------------------------------------------------------
# Pure: texts, placeholders, configuration, the patterns of the conversations stage
# ---------------------------------------------------------------------------------------


def test_text_for_takes_the_language_then_its_base_then_the_workstreams() -> None:
    message = AutomatedMessage(text={"pt-BR": "Olá", "en": "Hi"})
    assert text_for(message, "pt-BR", "en") == "Olá"
    assert text_for(message, "en-GB", "pt-BR") == "Hi"
    assert text_for(message, "pt", "en") == "Olá"
    assert text_for(message, "fr", "pt-BR") == "Olá"
    assert text_for(message, None, "en") == "Hi"
    assert text_for(AutomatedMessage(text={"es": "Hola"}), "fr", "de") == "Hola"


def test_fill_replaces_known_placeholders_and_keeps_the_rest() -> None:
    assert fill(AGENT_JOINED["pt-BR"], {"agent_name": "Ana"}) == "Ana entrou na conversa."
    assert fill("Pedido {order}, {customer_name}", {"customer_name": "Maria"}) == (
        "Pedido {order}, Maria"
    )
    assert fill("chaves {} e {0}", {"order": "1"}) == "chaves {} e {0}"
    assert fill("aberta {order", {"order": "1"}) == "aberta {order"


def test_lifecycle_durations_and_their_order() -> None:
    life = Lifecycle.model_validate(
        {"wrap_up": "30s", "idle_reminder_after": "1m", "auto_close_after": "2h"}
    )
    assert (life.wrap_up, life.idle_reminder_after, life.auto_close_after) == (30, 60, 7200)
    assert Lifecycle().wrap_up == 0 and Lifecycle().auto_close_after is None
    with pytest.raises(ValidationError, match="shorter than auto_close_after"):
        Lifecycle.model_validate({"idle_reminder_after": "5m", "auto_close_after": "5m"})
    assert Survey.model_validate(
        {"question": {"en": "?"}, "expires_after": "1d"}
    ).expires_after == (86400)


def test_lifecycle_wants_only_events_its_configuration_can_act_on() -> None:
    configured = LiveConfig(parse_config(LIFECYCLE_YAML, "lifecycle.yaml", ENVIRON)).current
    plain = LiveConfig(parse_config(CONFIG_YAML, "plain.yaml", ENVIRON)).current
    received = received_event()
    message = MessageReceived.model_validate(received.data)
    at = datetime.now(UTC)

    def queued(workstream: str) -> ConversationQueued:
        return ConversationQueued(
            queue=QUEUE, workstream=workstream, language="pt-BR", queued_at=at
        )

    timed = message.model_copy(update={"workstream": "support-pt"})
    assert lifecycle.wants(received, timed, configured)  # idle timers to restart
    assert not lifecycle.wants(received, timed, plain)  # no idle timers there
    join = timed.model_copy(update={"sandbox": True, "body": "join blue-cat"})
    assert not lifecycle.wants(received, join, configured)
    assert lifecycle.wants(received, queued("support-pt"), configured)  # greeting, position
    assert not lifecycle.wants(received, queued("support-pt"), plain)
    assert not lifecycle.wants(received, queued("support-en"), plain)
    closed = ConversationClosed(reason="agent", workstream="support-en", closed_at=at)
    assert lifecycle.wants(received, closed, plain)  # timers to cancel, always


def test_lifecycle_binds_only_what_its_configuration_needs() -> None:
    configured = LiveConfig(parse_config(LIFECYCLE_YAML, "lifecycle.yaml", ENVIRON)).current
    plain = LiveConfig(parse_config(CONFIG_YAML, "plain.yaml", ENVIRON)).current
    ends = {"conversation.ended", "conversation.closed"}
    assert lifecycle.needs(plain) == ends
    assert lifecycle.needs(configured) >= ends | {"message.received", "conversation.queued"}
    assert lifecycle.needs(configured) <= set(STAGES["lifecycle"].bindings)
    assert set(STAGES["lifecycle"].required) == ends  # what every process declares
    # A process of the deployment (a router started before any lifecycle runner) declares
    # the queue with what its configuration needs, so no greeting waits for that runner.
    settings = Settings.model_validate({})
    declared = Service(settings, LiveConfig(configured), [], serve_http=False).declare_keys(
        STAGES["lifecycle"]
    )
    assert set(declared) == set(lifecycle.needs(configured))
    plain_keys = Service(settings, LiveConfig(plain), [], serve_http=False).declare_keys(
        STAGES["lifecycle"]
    )
    assert set(plain_keys) == ends
    assert "conversation.classified" in STAGES["lifecycle"].retired


def test_the_configuration_of_this_module_is_valid() -> None:
    current = LiveConfig(parse_config(LIFECYCLE_YAML, "lifecycle.yaml", ENVIRON)).current
    support = current.workstream("support-pt")
    assert support is not None and support.survey is not None
    assert support.lifecycle.wrap_up == WRAP_UP.total_seconds()
    assert set(support.automated_messages) >= {"greeting", "queued", "idle_reminder", "closed"}
    assert current.reference_problems() == []
    contoso = current.account("contoso")
    assert contoso is not None
    number = contoso.find_number(SURVEY_NUMBER)
    assert number is not None and number.workstream == "survey-pt"


@pytest.mark.parametrize(
    ("body", "rating", "comment"),
    [
        ("4 ótimo atendimento", "4", "ótimo atendimento"),
        ("5", "5", ""),
        (" 3, demorou um pouco", "3", "demorou um pouco"),
        ("10!", "10", ""),
        ("obrigado", None, None),
        ("nota 4", None, None),
    ],
)
def test_what_reads_as_a_rating(body: str, rating: str | None, comment: str | None) -> None:
    match = RATING.match(body)
    assert (match["rating"] if match else None) == rating
    assert (match["comment"] if match else None) == comment


@pytest.mark.parametrize(
    ("body", "joins"),
    [
        ("join brave-tiger", True),
        ("  JOIN Brave-Tiger ", True),
        ("join", False),
        ("join brave tiger", False),
        ("please join brave-tiger", False),
    ],
)
def test_what_reads_as_a_sandbox_join(body: str, joins: bool) -> None:
    assert bool(SANDBOX_JOIN.match(body)) is joins


# ---------------------------------------------------------------------------------------
# Automated messages
# ---------------------------------------------------------------------------------------


async def test_greeting_queue_position_and_agent_joined_in_portuguese(
    router: TestClient[Any, Any], rig: Rig, events: Events, db: asyncpg.Pool
) -> None:
    _, auth = await new_agent(db, queues=[QUEUE], name="Ana Souza", capacity=3)
    first, second = new_customer(), new_customer()
    cid = await _queued(router, events, first, "Olá, preciso de ajuda", profile="Maria")
    greeting = await _automated(events, db, cid, "greeting")
    assert (greeting["kind"], greeting["body"]) == ("system", "Olá Maria! Já vamos te atender.")
    queued = await _automated(events, db, cid, "queued")
    assert queued["kind"] == "system"
    position = await db.fetchval(
        "SELECT count(*) FROM conversations WHERE state = 'queued' AND queue = $1"
        " AND queued_at <= (SELECT queued_at FROM conversations WHERE id = $2)",
        QUEUE,
        cid,
    )
    assert queued["body"] == f"Você é o número {position} da fila."

    # The next customer waits behind the first.
    other = await _queued(router, events, second, "Oi, tudo bem?", profile="João")
    behind = await _automated(events, db, other, "queued")
    assert behind["body"] == f"Você é o número {position + 1} da fila."
    assert (await _automated(events, db, other, "greeting"))["body"] == (
        "Olá João! Já vamos te atender."
    )

    await _pick(router, auth, cid)
    joined = await _automated(events, db, cid, "agent_joined")
    assert (joined["kind"], joined["body"]) == ("system", "Ana Souza entrou na conversa.")
    bodies = [m["body"] for m in await _outbound(db, cid)]
    # (greeting and queue position: see test_the_greeting_goes_before_the_queue_position)
    assert sorted(bodies[:2]) == sorted([greeting["body"], queued["body"]])
    assert bodies[2:] == [joined["body"]]


async def test_an_english_conversation_gets_its_messages_in_english(
    router: TestClient[Any, Any], rig: Rig, events: Events, db: asyncpg.Pool
) -> None:
    _, auth = await new_agent(db, queues=[QUEUE], name="Ana Souza", capacity=3)
    customer = _us_customer()
    cid = await _queued(router, events, customer, "Hello, I need help", profile="John")
    assert (await _conversation(db, cid))["language"] == "en"
    queued = await _automated(events, db, cid, "queued")
    assert queued["body"].startswith("You are number ") and queued["body"].endswith(" in line.")
    await _pick(router, auth, cid)
    joined = await _automated(events, db, cid, "agent_joined")
    assert joined["body"] == "Ana Souza joined the conversation."


async def test_an_english_customer_is_greeted_in_english(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    events: Events,
    db: asyncpg.Pool,
) -> None:
    await start_runner(conversations.STAGE)
    await _start_lifecycle(start_runner, Clock(), Ticks())
    customer = _us_customer()
    await customer_writes(router, customer, "Hello, I need help", profile="John")
    opened = await events.wait(_is("conversation.opened", customer=customer))
    cid = opened["conversation_id"]

    async def greeted() -> bool:
        return bool(await _outbound(db, cid))

    # Classification running a moment later than the lifecycle stage (two independent
    # consumers of one event: either may go first) must not change the greeting.
    with contextlib.suppress(TimeoutError):  # a lifecycle that greets once classified
        await wait_for(greeted, timeout=1.0)
    await start_runner(classify.STAGE)
    greeting = await _automated(events, db, cid, "greeting")
    assert greeting["body"] == "Hi John! We will be right with you."


async def test_the_greeting_goes_before_the_queue_position(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    events: Events,
    db: asyncpg.Pool,
) -> None:
    await start_runner(conversations.STAGE)
    await start_runner(classify.STAGE)
    customer = new_customer()
    queued_handled = asyncio.Event()

    async def handle(event: Envelope, payload: BaseModel, tx: StageTx) -> list[Envelope]:
        mine = isinstance(payload, ConversationQueued | ConversationClassified) and (
            await tx.conn.fetchval(
                "SELECT customer FROM conversations WHERE id = $1", event.conversation_id
            )
            == customer
        )
        if mine and isinstance(payload, ConversationClassified):
            # Delivered a moment after conversation.queued (another replica, a busy one).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(queued_handled.wait(), 2)
            tx = dataclasses.replace(tx, now=datetime.now(UTC))
        try:
            return await lifecycle.STAGE.handlers[event.type](event, payload, tx)
        finally:
            if mine and isinstance(payload, ConversationQueued):
                queued_handled.set()

    await start_runner(
        dataclasses.replace(
            lifecycle.STAGE, handlers=dict.fromkeys(lifecycle.STAGE.handlers, handle)
        )
    )
    cid = await _queued(router, events, customer, "Olá, preciso de ajuda")
    greeting = await _automated(events, db, cid, "greeting")
    queued = await _automated(events, db, cid, "queued")
    assert [m["body"] for m in await _outbound(db, cid)] == [greeting["body"], queued["body"]]


async def test_a_redelivered_trigger_stores_no_second_message(
    router: TestClient[Any, Any], rig: Rig, events: Events, db: asyncpg.Pool, bus: Bus
) -> None:
    customer = new_customer()
    cid = await _queued(router, events, customer, "Olá, preciso de ajuda")
    await _automated(events, db, cid, "greeting")
    await _automated(events, db, cid, "queued")
    trigger = await events.wait(_is("conversation.queued", cid))
    before = _handled()
    for _ in range(2):  # the broker redelivers, a publisher retries
        await bus.publish(Envelope.model_validate(trigger))

    async def handled_all() -> bool:
        return _handled() >= before + 2

    await wait_for(handled_all)
    assert sorted(m["body"] for m in await _outbound(db, cid)) == sorted(
        ["Olá Maria! Já vamos te atender.", (await _automated(events, db, cid, "queued"))["body"]]
    )
    await events.expect_none(_is("message.send-requested", cid), within=0.3)
    assert len(events.matching(_is("message.send-requested", cid))) == 2


async def test_out_of_hours_closing_sends_its_message_and_no_survey(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    events: Events,
    db: asyncpg.Pool,
) -> None:
    await start_runner(conversations.STAGE)
    sunday = datetime(2026, 11, 29, 15, tzinfo=UTC)  # 'sales' is closed on Sundays
    await start_runner(classify.STAGE, clock=lambda: sunday)
    await _start_lifecycle(start_runner, Clock(), Ticks())
    customer = new_customer()
    await customer_writes(router, customer, "Quero comprar um plano")
    opened = await events.wait(_is("conversation.opened", customer=customer))
    cid = opened["conversation_id"]
    closed = await events.wait(_is("conversation.closed", cid))
    assert closed["data"]["reason"] == "out_of_hours"
    message = await _automated(events, db, cid, "out_of_hours")
    assert (message["kind"], message["body"]) == ("system", OUT_OF_HOURS["pt-BR"])
    # Closed out of hours: the out-of-hours message is the answer, no "we'll be right with you".
    await events.expect_none(_is("message.send-requested", cid, automated="closed"), within=0.3)
    assert GREETING["pt-BR"] not in [m["body"] for m in await _outbound(db, cid)]
    assert await db.fetchval("SELECT count(*) FROM surveys WHERE conversation_id = $1", cid) == 0
    assert CLOSED["pt-BR"] not in [m["body"] for m in await _outbound(db, cid)]


# ---------------------------------------------------------------------------------------
# Idle timers
# ---------------------------------------------------------------------------------------


async def test_idle_reminder_then_auto_close_fire_once_and_release_capacity(
    router: TestClient[Any, Any], stages: Rig, events: Events, db: asyncpg.Pool
) -> None:
    agent, auth = await new_agent(db, queues=[QUEUE], name="Bruno Lima", capacity=3)
    customer = _us_customer()
    cid = await _queued(router, events, customer, "Hello, anyone there?", profile="John")
    await stages.start_lifecycle()
    await _pick(router, auth, cid)
    await _automated(events, db, cid, "agent_joined")
    assert await _used_units(db, agent) == 1
    # The customer's silence counts from the later of their message and the assignment.
    row = await _conversation(db, cid)
    last = max(row["last_customer_message_at"], row["assigned_at"])
    assert await _idle_timers(db, cid) == {
        "idle_reminder": last + IDLE_REMINDER,
        "auto_close": last + AUTO_CLOSE,
    }

    await stages.ticks.past(stages.clock.advance_to(last + IDLE_REMINDER - timedelta(seconds=1)))
    assert await _bodies(db, cid, IDLE["en"]) == 0

    await stages.ticks.past(stages.clock.advance_to(last + IDLE_REMINDER + timedelta(seconds=1)))
    reminder = await _automated(events, db, cid, "idle_reminder")
    assert (reminder["kind"], reminder["body"]) == ("system", IDLE["en"])
    conversation = await _conversation(db, cid)
    assert conversation["state"] == "active"
    assert events.matching(_is("conversation.closed", cid)) == []

    at = stages.clock.advance_to(last + AUTO_CLOSE + timedelta(seconds=1))
    closed = await events.wait(_is("conversation.closed", cid))
    assert closed["data"]["reason"] == "idle"
    conversation = await _conversation(db, cid)
    assert (conversation["state"], conversation["close_reason"]) == ("closed", "idle")
    assert await _used_units(db, agent) == 0
    assert (await _automated(events, db, cid, "closed"))["body"] == CLOSED["en"]
    assert (await _automated(events, db, cid, "survey"))["body"] == QUESTION["en"]

    await stages.ticks.past(stages.clock.advance_to(at + AUTO_CLOSE), count=3)
    await events.expect_none(_is("conversation.closed", cid), within=0.3)
    assert len(events.matching(_is("conversation.closed", cid))) == 1
    assert await _bodies(db, cid, IDLE["en"]) == 1
    assert await _pending(db, cid) == {}


async def test_a_customer_waiting_in_the_queue_is_never_idle_and_gets_no_survey(
    router: TestClient[Any, Any], rig: Rig, events: Events, db: asyncpg.Pool, store: Store
) -> None:
    """Waiting is not idleness: while the customer waits on us (queued), no idle reminder,
    no auto-close; the queue message still goes (once served, the silence counts from the
    assignment: ``test_idle_reminder_then_auto_close_fire_once_and_release_capacity``).
    Closed without ever reaching an agent: no survey."""
    waiting = await _queued(router, events, new_customer(), "Olá, preciso de ajuda")
    assert (await _automated(events, db, waiting, "queued"))["kind"] == "system"
    last = (await _conversation(db, waiting))["last_customer_message_at"]
    await rig.ticks.past(rig.clock.advance_to(last + AUTO_CLOSE * 3), count=3)
    row = await _conversation(db, waiting)
    assert row["state"] == "queued"
    assert await _bodies(db, waiting, IDLE["pt-BR"]) == 0
    assert events.matching(_is("conversation.closed", waiting)) == []

    # Another customer who never reaches an agent: closed by a supervisor, no survey.
    unserved = await _queued(router, events, new_customer(), "Alguém aí?")
    async with store.transaction() as conn:
        await supervisor.close(conn, unserved, "supervisor@test", datetime.now(UTC))
    await events.wait(_is("conversation.closed", unserved))
    await _automated(events, db, unserved, "closed")
    await events.expect_none(_is("message.send-requested", unserved, automated="survey"), 0.5)
    assert (
        await db.fetchval("SELECT count(*) FROM surveys WHERE conversation_id = $1", unserved) == 0
    )


async def test_a_new_customer_message_reschedules_the_idle_timers(
    stages: Rig, events: Events, db: asyncpg.Pool, bus: Bus
) -> None:
    customer = new_customer()
    t0 = datetime.now(UTC)
    first = received_event(customer=customer, body="Oi", received_at=t0)
    await bus.publish(first)
    cid = (await events.wait(_is("conversation.opened", customer=customer)))["conversation_id"]
    await _served(db, cid, t0)
    await stages.start_lifecycle()
    assert await _idle_timers(db, cid) == {
        "idle_reminder": t0 + IDLE_REMINDER,
        "auto_close": t0 + AUTO_CLOSE,
    }
    later = t0 + timedelta(seconds=50)
    await bus.publish(received_event(customer=customer, body="Ainda preciso", received_at=later))

    async def moved() -> bool:
        return (await _pending(db, cid)).get("auto_close") == later + AUTO_CLOSE

    await wait_for(moved)
    # The first message handled again after the second (a redelivery, replicas out of
    # order) does not pull the timers back.
    before = _handled()
    await bus.publish(first)

    async def handled() -> bool:
        return _handled() >= before + 1

    await wait_for(handled)
    assert await _pending(db, cid) == {
        "idle_reminder": later + IDLE_REMINDER,
        "auto_close": later + AUTO_CLOSE,
    }

    # Where the first message's reminder was due: nothing.
    await stages.ticks.past(stages.clock.advance_to(t0 + IDLE_REMINDER + timedelta(seconds=1)))
    assert await _bodies(db, cid, IDLE["pt-BR"]) == 0
    await stages.ticks.past(stages.clock.advance_to(later + IDLE_REMINDER + timedelta(seconds=1)))
    assert (await _automated(events, db, cid, "idle_reminder"))["body"] == IDLE["pt-BR"]
    # Where the first message's auto-close was due: still open.
    await stages.ticks.past(stages.clock.advance_to(t0 + AUTO_CLOSE + timedelta(seconds=1)))
    assert (await _conversation(db, cid))["state"] in lifecycle.OPEN_STATES
    stages.clock.advance_to(later + AUTO_CLOSE + timedelta(seconds=1))
    closed = await events.wait(_is("conversation.closed", cid))
    assert closed["data"]["reason"] == "idle"
    assert await _bodies(db, cid, IDLE["pt-BR"]) == 1


async def test_a_redelivered_customer_message_does_not_repeat_the_idle_reminder(
    stages: Rig, events: Events, db: asyncpg.Pool, bus: Bus
) -> None:
    customer = new_customer()
    t0 = datetime.now(UTC)
    message = received_event(customer=customer, body="Oi", received_at=t0)
    await bus.publish(message)
    cid = (await events.wait(_is("conversation.opened", customer=customer)))["conversation_id"]
    await _served(db, cid, t0)
    await stages.start_lifecycle()
    await _idle_timers(db, cid)
    await stages.ticks.past(stages.clock.advance_to(t0 + IDLE_REMINDER + timedelta(seconds=1)))
    await _automated(events, db, cid, "idle_reminder")

    before = _handled()
    await bus.publish(message)  # the same event again

    async def handled() -> bool:
        return _handled() >= before + 1

    await wait_for(handled)
    await stages.ticks.past(stages.clock.advance_to(t0 + IDLE_REMINDER + timedelta(seconds=2)))
    assert await _bodies(db, cid, IDLE["pt-BR"]) == 1


class _CommitsAfterFirstQuery:
    """A transaction's connection that lets another transaction commit right after its
    first query: when the conversations stage commits is not up to the lifecycle stage."""

    def __init__(self, conn: Connection, then: Callable[[], Awaitable[None]]) -> None:
        self._conn = conn
        self._then: Callable[[], Awaitable[None]] | None = then

    async def fetchval(self, query: str, *args: object) -> Any:
        return await self._after(await self._conn.fetchval(query, *args))

    async def fetchrow(self, query: str, *args: object) -> Any:
        return await self._after(await self._conn.fetchrow(query, *args))

    async def _after(self, value: Any) -> Any:
        if self._then is not None:
            then, self._then = self._then, None
            await then()
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_a_first_message_committed_between_the_lookups_gets_idle_timers(
    start_runner: RunnerFactory, infra: Infra, db: asyncpg.Pool, bus: Bus
) -> None:
    customer = new_customer()
    message = received_event(customer=customer, body="Oi")
    first = MessageReceived.model_validate(message.data)
    store = Store(infra.database_url, max_size=1)  # the conversations stage, elsewhere
    handled = asyncio.Event()
    interleaved = False

    async def conversations_commit() -> None:
        async with store.transaction() as conn:
            assert await conversation.store_inbound(conn, "contoso", first) is not None

    async def handle(event: Envelope, payload: BaseModel, tx: StageTx) -> list[Envelope]:
        nonlocal interleaved
        if isinstance(payload, MessageReceived) and payload.message_sid == first.message_sid:
            if not interleaved:
                interleaved = True
                proxy = _CommitsAfterFirstQuery(tx.conn, conversations_commit)
                tx = dataclasses.replace(tx, conn=cast(Connection, proxy))
            try:
                return await lifecycle.STAGE.handlers[event.type](event, payload, tx)
            finally:
                handled.set()
        return await lifecycle.STAGE.handlers[event.type](event, payload, tx)

    await start_runner(
        dataclasses.replace(
            lifecycle.STAGE, handlers=dict.fromkeys(lifecycle.STAGE.handlers, handle)
        ),
        delivery_limit=10,
        retry_backoff_base=0.05,
        retry_backoff_max=0.3,
    )
    try:
        await bus.publish(message)
        await asyncio.wait_for(handled.wait(), 10)
    finally:
        await store.close()
    cid = await db.fetchval("SELECT id FROM conversations WHERE customer = $1", customer)
    assert cid is not None

    async def scheduled() -> bool:
        return len(await _pending(db, str(cid))) == 2

    with contextlib.suppress(TimeoutError):
        await wait_for(scheduled, timeout=2)
    assert set(await _pending(db, str(cid))) == {"idle_reminder", "auto_close"}


async def test_two_replicas_fire_each_timer_exactly_once(
    start_runner: RunnerFactory, events: Events, db: asyncpg.Pool, bus: Bus
) -> None:
    await start_runner(conversations.STAGE)
    clock, replicas = Clock(), [Ticks(), Ticks()]
    t0 = datetime.now(UTC)
    customers = [new_customer() for _ in range(6)]
    for customer in customers:
        await bus.publish(received_event(customer=customer, received_at=t0))
    cids = [
        (await events.wait(_is("conversation.opened", customer=c)))["conversation_id"]
        for c in customers
    ]
    for cid in cids:
        await _served(db, cid, t0)
    for ticks in replicas:
        await _start_lifecycle(start_runner, clock, ticks)
    for cid in cids:
        await _idle_timers(db, cid)

    clock.advance_to(t0 + IDLE_REMINDER + timedelta(seconds=1))
    for cid in cids:
        await _automated(events, db, cid, "idle_reminder")
    at = clock.advance_to(t0 + AUTO_CLOSE + timedelta(seconds=1))
    for cid in cids:
        await events.wait(_is("conversation.closed", cid))
    for ticks in replicas:
        await ticks.past(at, count=3)
    await events.expect_none(
        lambda e: e["type"] == "conversation.closed" and e.get("conversation_id") in cids,
        within=0.3,
    )
    for cid in cids:
        assert len(events.matching(_is("conversation.closed", cid))) == 1
        assert len(events.matching(_is("message.send-requested", cid, automated="idle_reminder")))
        assert await _bodies(db, cid, IDLE["pt-BR"]) == 1
        fired = await db.fetch(
            "SELECT kind FROM timers WHERE conversation_id = $1 ORDER BY kind", cid
        )
        assert [r["kind"] for r in fired] == ["auto_close", "idle_reminder"]


async def test_timers_survive_a_restart_of_every_runner(
    start_runner: RunnerFactory, events: Events, db: asyncpg.Pool, bus: Bus
) -> None:
    clock = Clock()
    first = [await start_runner(conversations.STAGE)]
    t0 = datetime.now(UTC)
    customer = new_customer()
    await bus.publish(received_event(customer=customer, received_at=t0))
    cid = (await events.wait(_is("conversation.opened", customer=customer)))["conversation_id"]
    await _served(db, cid, t0)
    first.append(await _start_lifecycle(start_runner, clock, Ticks()))
    await _idle_timers(db, cid)
    for runner in first:
        await runner.stop()

    # Both timers fall due while nothing runs.
    at = clock.advance_to(t0 + AUTO_CLOSE + timedelta(seconds=5))
    assert await _bodies(db, cid, IDLE["pt-BR"]) == 0
    replicas = [Ticks(), Ticks()]
    for ticks in replicas:
        await _start_lifecycle(start_runner, clock, ticks)
    closed = await events.wait(_is("conversation.closed", cid))
    assert closed["data"]["reason"] == "idle"
    for ticks in replicas:
        await ticks.past(at, count=3)
    await events.expect_none(_is("conversation.closed", cid), within=0.3)
    assert len(events.matching(_is("conversation.closed", cid))) == 1
    assert await _bodies(db, cid, IDLE["pt-BR"]) == 1
    assert (await _conversation(db, cid))["close_reason"] == "idle"


# ---------------------------------------------------------------------------------------
# Wrap-up
# ---------------------------------------------------------------------------------------


async def test_wrap_up_holds_capacity_until_it_ends(
    router: TestClient[Any, Any], rig: Rig, events: Events, db: asyncpg.Pool
) -> None:
    agent, auth = await new_agent(db, queues=[QUEUE], name="Carla Dias", capacity=3)
    cid = await _queued(router, events, new_customer(), "Olá, preciso de ajuda")
    await _pick(router, auth, cid)
    variables = await router.patch(
        f"/api/admin/conversations/{cid}/variables",
        headers=ADMIN,
        json={"variables": {"order": "A-1234"}},
    )
    assert variables.status == 200, await variables.text()

    assert await _close(router, auth, cid) == {"conversation_id": cid, "state": "wrap-up"}
    ended = await events.wait(_is("conversation.ended", cid))
    until = datetime.fromisoformat(ended["data"]["until"])
    assert ended["data"]["agent_id"] == agent
    conversation = await _conversation(db, cid)
    assert (conversation["state"], conversation["wrap_up_until"]) == ("wrap-up", until)
    assert await _used_units(db, agent) == 1
    message = await _automated(events, db, cid, "agent_ended")
    assert message["body"] == "Atendimento encerrado. Pedido A-1234."
    shown = await router.get(f"/api/conversations/{cid}", headers=auth)
    assert (await shown.json())["state"] == "wrap-up"

    async def timer() -> datetime | None:
        return (await _pending(db, cid)).get("wrap_up_end")

    assert await wait_for(timer) == until
    await rig.ticks.past(rig.clock.advance_to(until - timedelta(seconds=1)))
    assert (await _conversation(db, cid))["state"] == "wrap-up"
    assert events.matching(_is("conversation.closed", cid)) == []

    rig.clock.advance_to(until + timedelta(seconds=1))
    closed = await events.wait(_is("conversation.closed", cid))
    assert closed["data"]["reason"] == "agent"
    conversation = await _conversation(db, cid)
    assert conversation["state"] == "closed" and conversation["closed_at"] is not None
    assert await _used_units(db, agent) == 0
    assert (await _automated(events, db, cid, "closed"))["body"] == CLOSED["pt-BR"]
    assert (await _automated(events, db, cid, "survey"))["body"] == QUESTION["pt-BR"]
    gone = await router.post(f"/api/conversations/{cid}/close", headers=auth)
    assert gone.status == 404


async def test_a_second_close_during_wrap_up_closes_at_once(
    router: TestClient[Any, Any], rig: Rig, events: Events, db: asyncpg.Pool
) -> None:
    agent, auth = await new_agent(db, queues=[QUEUE], name="Davi Rocha", capacity=3)
    cid = await _queued(router, events, new_customer(), "Olá, preciso de ajuda")
    await _pick(router, auth, cid)
    assert (await _close(router, auth, cid))["state"] == "wrap-up"
    until = datetime.fromisoformat(
        (await events.wait(_is("conversation.ended", cid)))["data"]["until"]
    )
    await _automated(events, db, cid, "agent_ended")
    assert await _used_units(db, agent) == 1

    assert await _close(router, auth, cid) == {"conversation_id": cid, "state": "closed"}
    closed = await events.wait(_is("conversation.closed", cid))
    assert closed["data"]["reason"] == "agent"
    assert (await _conversation(db, cid))["state"] == "closed"
    assert await _used_units(db, agent) == 0
    await _automated(events, db, cid, "survey")

    async def cancelled() -> bool:
        return await _pending(db, cid) == {}

    await wait_for(cancelled)
    await rig.ticks.past(rig.clock.advance_to(until + timedelta(seconds=1)), count=3)
    await events.expect_none(_is("conversation.closed", cid), within=0.3)
    assert len(events.matching(_is("conversation.closed", cid))) == 1
    assert await _bodies(db, cid, CLOSED["pt-BR"]) == 1


# ---------------------------------------------------------------------------------------
# Context variables
# ---------------------------------------------------------------------------------------


async def test_context_variables_set_by_the_assigned_agent_fill_placeholders(
    router: TestClient[Any, Any], rig: Rig, events: Events, db: asyncpg.Pool
) -> None:
    _, auth = await new_agent(db, queues=[QUEUE], name="Eva Nunes", capacity=3)
    _, other_auth = await new_agent(db, queues=[QUEUE], name="Fábio Reis", capacity=3)
    cid = await _queued(router, events, _us_customer(), "Hi, my order is late", profile="Kim")
    await _pick(router, auth, cid)
    path = f"/api/conversations/{cid}/variables"

    response = await router.patch(
        path, headers=auth, json={"variables": {"order": "B-77", "vip": True, "tries": 2}}
    )
    assert response.status == 200, await response.text()
    assert await response.json() == {
        "conversation_id": cid,
        "variables": {"abroad": True, "order": "B-77", "vip": True, "tries": 2},
    }
    stranger = await router.patch(path, headers=other_auth, json={"variables": {"order": "X"}})
    assert stranger.status == 404
    removed = await router.patch(path, headers=auth, json={"variables": {"vip": None}})
    assert removed.status == 200
    assert (await removed.json())["variables"] == {"abroad": True, "order": "B-77", "tries": 2}
    assert (await router.patch(path, headers=auth, json={"variables": {}})).status == 422
    assert (await router.patch(path, headers=auth, data=b"{nope")).status == 400
    assert (await router.patch(path, json={"variables": {"a": 1}})).status == 401

    shown = await (await router.get(f"/api/conversations/{cid}", headers=auth)).json()
    assert shown["variables"] == {"abroad": True, "order": "B-77", "tries": 2}
    assert (await _conversation(db, cid))["variables"]["order"] == "B-77"

    await _close(router, auth, cid)
    ended = await _automated(events, db, cid, "agent_ended")
    assert ended["body"] == "We are done here. Order B-77."


# ---------------------------------------------------------------------------------------
# Outside the 24-hour window
# ---------------------------------------------------------------------------------------


async def test_outside_the_window_only_templates_go_and_the_rest_is_skipped(
    router: TestClient[Any, Any], stages: Rig, events: Events, db: asyncpg.Pool
) -> None:
    cid = await _queued(router, events, new_customer(), "Olá, preciso de ajuda")
    await stages.start_lifecycle()
    await _automated(events, db, cid, "queued")
    last = (await _conversation(db, cid))["last_customer_message_at"]
    await _served(db, cid, last)
    await _idle_timers(db, cid)
    # Twilio answered 63016 to a send after the customer's last message: the window is shut.
    await db.execute("UPDATE conversations SET window_closed_at = now() WHERE id = $1", cid)

    stages.clock.advance_to(last + AUTO_CLOSE + timedelta(seconds=1))
    closed = await events.wait(_is("conversation.closed", cid))
    assert closed["data"]["reason"] == "idle"
    reminder = await _automated(events, db, cid, "idle_reminder")
    assert (reminder["kind"], reminder["body"]) == ("template", RESUME["pt-BR"])
    assert reminder["template"] == {
        "name": "retomar",
        "language": "pt-BR",
        "content_sid": SID[("retomar", "pt-BR")],
        "variables": {},
    }
    survey = await _automated(events, db, cid, "survey")
    assert (survey["kind"], survey["body"]) == ("template", SURVEY_TEMPLATE["pt-BR"])
    assert survey["template"]["name"] == "pesquisa"

    # 'closed' has no template: recorded as skipped, never sent as free text.
    [skipped] = [m for m in await _outbound(db, cid) if m["status"] == "skipped"]
    assert (skipped["kind"], skipped["body"]) == ("system", CLOSED["pt-BR"])
    assert "window closed" in skipped["error_message"]
    assert events.matching(_is("message.send-requested", cid, automated="closed")) == []
    await events.expect_none(_is("message.send-requested", cid, automated="closed"), within=0.3)


# ---------------------------------------------------------------------------------------
# Survey
# ---------------------------------------------------------------------------------------


async def _surveyed(
    router: TestClient[Any, Any],
    events: Events,
    db: asyncpg.Pool,
    auth: dict[str, str],
    customer: str,
) -> str:
    """A conversation on the survey number, picked, closed by the agent and surveyed."""
    cid = await _queued(router, events, customer, "Olá, preciso de ajuda", to=SURVEY_NUMBER)
    await _pick(router, auth, cid)
    assert (await _close(router, auth, cid))["state"] == "closed"  # no wrap-up there
    question = await _automated(events, db, cid, "survey")
    assert (question["kind"], question["body"]) == ("system", QUESTION["pt-BR"])
    return cid


async def test_survey_answers_are_recorded_not_routed_and_reported(
    router: TestClient[Any, Any], rig: Rig, events: Events, db: asyncpg.Pool
) -> None:
    _, auth = await new_agent(db, queues=[QUEUE], name="Gabi Melo", capacity=3)
    happy, chatty, unhappy, late = (new_customer() for _ in range(4))
    cids = {c: await _surveyed(router, events, db, auth, c) for c in (happy, chatty, unhappy, late)}

    sid = await customer_writes(router, happy, "4 ótimo atendimento", to=SURVEY_NUMBER)
    answered = await events.wait(_is("survey.answered", cids[happy]))
    assert (answered["data"]["rating"], answered["data"]["comment"]) == (4, "ótimo atendimento")
    survey = await _row(db, "SELECT * FROM surveys WHERE conversation_id = $1", cids[happy])
    assert (survey["rating"], survey["comment"]) == (4, "ótimo atendimento")
    stored = await _row(db, "SELECT * FROM messages WHERE twilio_sid = $1", sid)
    assert str(stored["conversation_id"]) == cids[happy]
    assert stored["attributes"] == {"survey_answer": True}

    await customer_writes(router, unhappy, "2", to=SURVEY_NUMBER)
    answered = await events.wait(_is("survey.answered", cids[unhappy]))
    assert (answered["data"]["rating"], answered["data"]["comment"]) == (2, None)

    # Not a rating: an ordinary message, a new conversation as usual.
    await customer_writes(router, chatty, "obrigado, era só isso", to=SURVEY_NUMBER)
    reopened = await events.wait(_is("conversation.opened", customer=chatty, besides=cids[chatty]))
    await events.wait(_is("conversation.queued", reopened["conversation_id"]))

    # After the survey's window: a rating-like message is an ordinary message too.
    await db.execute(
        "UPDATE surveys SET expires_at = now() - interval '1 second' WHERE conversation_id = $1",
        cids[late],
    )
    await customer_writes(router, late, "5 estrelas", to=SURVEY_NUMBER)
    await events.wait(_is("conversation.opened", customer=late, besides=cids[late]))

    # The answers opened nothing and went to no queue.
    for customer in (happy, unhappy):
        await events.expect_none(_is("conversation.opened", customer=customer), within=0.2)
        states = await db.fetch("SELECT state FROM conversations WHERE customer = $1", customer)
        assert [r["state"] for r in states] == ["closed"]
    assert events.matching(_is("survey.answered", cids[chatty])) == []
    assert events.matching(_is("survey.answered", cids[late])) == []

    unauthorized = await router.get("/api/admin/surveys")
    assert unauthorized.status == 401
    response = await router.get("/api/admin/surveys?workstream=survey-pt", headers=ADMIN)
    assert response.status == 200
    report = await response.json()
    totals = await _row(
        db,
        "SELECT count(*) AS asked, count(rating) AS answered, avg(rating) AS average"
        " FROM surveys WHERE workstream = 'survey-pt'",
    )
    assert (report["asked"], report["answered"]) == (totals["asked"], totals["answered"])
    assert report["average_rating"] == round(float(totals["average"]), 2)
    mine = {s["conversation_id"]: s for s in report["surveys"]}
    assert (mine[cids[happy]]["rating"], mine[cids[happy]]["comment"]) == (4, "ótimo atendimento")
    assert mine[cids[unhappy]]["rating"] == 2
    assert mine[cids[chatty]]["rating"] is None and mine[cids[late]]["answered_at"] is None
    assert {s["workstream"] for s in report["surveys"]} == {"survey-pt"}
    if report["asked"] == 4:  # this test alone on the survey number so far
        assert (report["answered"], report["average_rating"]) == (2, 3.0)


async def test_a_survey_never_sent_takes_no_answer(
    router: TestClient[Any, Any], rig: Rig, events: Events, db: asyncpg.Pool
) -> None:
    _, auth = await new_agent(db, queues=[QUEUE], name="Hugo Pires", capacity=3)
    customer = new_customer()
    cid = await _queued(router, events, customer, "Olá, preciso de ajuda", to=SURVEY_NUMBER)
    await _pick(router, auth, cid)
    await db.execute("UPDATE conversations SET window_closed_at = now() WHERE id = $1", cid)
    await _close(router, auth, cid)

    async def skipped() -> list[asyncpg.Record]:
        rows = await _outbound(db, cid)
        return [m for m in rows if m["body"] == QUESTION["pt-BR"] and m["status"] == "skipped"]

    [question] = await wait_for(skipped)  # no template for the survey: skipped, not sent
    assert question["kind"] == "system"
    assert events.matching(_is("message.send-requested", cid, automated="survey")) == []

    # The customer was never asked: this is a new request, not a rating.
    await customer_writes(router, customer, "3 produtos chegaram quebrados", to=SURVEY_NUMBER)
    answered, opened = _is("survey.answered", cid), _is("conversation.opened", besides=cid)
    outcome = await events.wait(
        lambda e: answered(e) or (opened(e) and e["data"]["customer"] == customer)
    )
    assert outcome["type"] == "conversation.opened", outcome


async def test_a_message_in_a_new_conversation_is_not_a_late_survey_answer(
    router: TestClient[Any, Any], rig: Rig, events: Events, db: asyncpg.Pool
) -> None:
    _, auth = await new_agent(db, queues=[QUEUE], name="Iris Prado", capacity=3)
    customer = new_customer()
    cid = await _surveyed(router, events, db, auth, customer)
    await customer_writes(router, customer, "Preciso de outra coisa", to=SURVEY_NUMBER)
    reopened = (await events.wait(_is("conversation.opened", customer=customer, besides=cid)))[
        "conversation_id"
    ]
    await events.wait(_is("conversation.queued", reopened))
    sid = await customer_writes(router, customer, "2 caixas chegaram amassadas", to=SURVEY_NUMBER)

    async def stored() -> asyncpg.Record | None:
        row: asyncpg.Record | None = await db.fetchrow(
            "SELECT * FROM messages WHERE twilio_sid = $1", sid
        )
        return row

    message = await wait_for(stored)
    assert str(message["conversation_id"]) == reopened
    assert events.matching(_is("survey.answered", cid)) == []


# ---------------------------------------------------------------------------------------
# Twilio sandbox
# ---------------------------------------------------------------------------------------


async def test_a_sandbox_join_is_noted_and_opens_nothing(
    router: TestClient[Any, Any], rig: Rig, events: Events, db: asyncpg.Pool
) -> None:
    customer = _us_customer()
    sid = await customer_writes(router, customer, "join brave-tiger", to=SANDBOX, profile="Sam")
    joined = await events.wait(_is("sandbox.joined", customer=customer))
    assert joined["data"]["code"] == "brave-tiger"
    assert joined["data"]["business_number"] == SANDBOX
    assert (
        await db.fetchval("SELECT count(*) FROM conversations WHERE customer = $1", customer) == 0
    )
    assert await db.fetchval("SELECT count(*) FROM messages WHERE twilio_sid = $1", sid) == 0
    contact = await _row(
        db, "SELECT * FROM contacts WHERE account = 'contoso' AND address = $1", customer
    )
    assert contact["sandbox_joined_at"] is not None and contact["profile_name"] == "Sam"

    await customer_writes(
        router, customer, "Hi, I need help with my order", to=SANDBOX, profile="Sam"
    )
    opened = await events.wait(_is("conversation.opened", customer=customer))
    assert opened["data"]["workstream"] == "support-en"
    assert opened["data"]["first_message_body"] == "Hi, I need help with my order"
    await events.wait(_is("conversation.queued", opened["conversation_id"]))
    assert (
        await db.fetchval("SELECT count(*) FROM conversations WHERE customer = $1", customer) == 1
    )
    assert events.matching(_is("sandbox.joined", customer=customer)) == [joined]

    # On a number that is not the sandbox, "join …" is an ordinary message.
    other = new_customer()
    await customer_writes(router, other, "join brave-tiger")
    await events.wait(_is("conversation.opened", customer=other))
    assert events.matching(_is("sandbox.joined", customer=other)) == []


async def test_reopen_within_the_period_goes_back_to_the_same_agent(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    db: asyncpg.Pool,
    config: LiveConfig,
    settings: Settings,
) -> None:
    from consumers import classify, conversations, distribute
    from tests.support import CONFIG_YAML as BASE
    from tests.support import ENVIRON as SECRETS

    reopening = BASE.replace(
        "    language: pt-BR\n    timezone: America/Sao_Paulo\n",
        "    language: pt-BR\n    timezone: America/Sao_Paulo\n"
        "    lifecycle: {reopen_within: 1h}\n",
    )
    config.current = parse_config(reopening, "reopen.yaml", SECRETS)
    queue = "billing"
    await db.execute("UPDATE agents SET presence = 'offline' WHERE $1 = ANY(queues)", queue)
    await db.execute(
        "UPDATE conversations SET state = 'closed' WHERE state IN ('queued', 'offered')"
        " AND queue = $1",
        queue,
    )
    agents = [
        (
            await new_agent(
                db, queues=[queue], skills={"billing": 9}, capacity=5, presence="available"
            )
        )[0]
        for _ in range(2)
    ]
    await start_runner(conversations.STAGE)
    await start_runner(classify.STAGE)
    await start_runner(distribute.STAGE, tick_interval=0.1)
    customer = new_customer()
    async with tap(settings.amqp_url.get_secret_value(), "conversation.*") as spy:
        await customer_writes(router, customer, "boleto")
        offered = await spy.next(
            where=lambda e: e["type"] == "conversation.offered" and e["data"]["agent_id"] in agents,
            timeout=10,
        )
        cid, first_agent = offered["conversation_id"], offered["data"]["agent_id"]
        await db.execute(
            "UPDATE offers SET state = 'accepted' WHERE id = $1", offered["data"]["offer_id"]
        )
        await db.execute(
            "INSERT INTO assignments (id, conversation_id, agent_id, units, assigned_at,"
            " released_at) VALUES ($1, $2, $3, 1, now(), now())",
            uuid.uuid4(),
            cid,
            first_agent,
        )
        await db.execute(  # what an accepted offer records (omniroute.domain.conversation.assign)
            "INSERT INTO contact_agents (contact_id, agent_id, assigned_at)"
            " SELECT contact_id, $2, now() FROM conversations WHERE id = $1",
            cid,
            first_agent,
        )
        await db.execute(
            "UPDATE conversations SET state = 'closed', closed_at = now(), close_reason = 'agent'"
            " WHERE id = $1",
            cid,
        )
        await db.execute("UPDATE agents SET used_units = 0 WHERE id = ANY($1::uuid[])", agents)
        # The other agent is now the least loaded one, but affinity wins.
        await db.execute("UPDATE agents SET used_units = 4 WHERE id = $1", first_agent)
        await customer_writes(router, customer, "voltei")
        reopened = await spy.next(where=lambda e: e["type"] == "conversation.reopened", timeout=10)
        assert reopened["conversation_id"] == cid
        again = await spy.next(
            where=lambda e: e["type"] == "conversation.offered" and e["conversation_id"] == cid,
            timeout=10,
        )
        assert again["data"]["agent_id"] == first_agent
        assert again["data"]["affinity"] is True
    count = await db.fetchval("SELECT count(*) FROM conversations WHERE customer = $1", customer)
    assert count == 1
