"""Test helpers shared by the suites: signed webhooks, agents, event capture, waiting on
conditions."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlencode

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractIncomingMessage
from aiohttp.test_utils import TestClient
from twilio.request_validator import RequestValidator

from omniroute.domain.agents import hash_token, new_token
from schemas.events import EXCHANGE

ACCOUNT_SID = "AC00000000000000000000000000000001"
AUTH_TOKEN = "test-auth-token-0123456789abcdef"
OTHER_ACCOUNT_SID = "AC00000000000000000000000000000002"
OTHER_TOKEN = "other-auth-token-0123456789abcdef"
BUSINESS = "+5511999990000"
SANDBOX = "+14155238886"
PUBLIC_URL = "https://omniroute.example.com"
T = TypeVar("T")
INBOUND = "/twilio/contoso/inbound"
STATUS = "/twilio/contoso/status"

CONFIG_YAML = f"""
accounts:
  - name: contoso
    account_sid: {ACCOUNT_SID}
    auth_token_env: TEST_TWILIO_TOKEN_CONTOSO
    webhook_keys_env: {{webhooks_sharedkey_test: TEST_TWILIO_SHARED_KEY}}
    numbers:
      - {{name: Support BR, number: "{BUSINESS}", workstream: support-pt}}
      - {{name: Sandbox, number: "{SANDBOX}", workstream: support-en, sandbox: true}}
  - name: fabrikam
    account_sid: {OTHER_ACCOUNT_SID}
    auth_token_env: TEST_TWILIO_TOKEN_FABRIKAM
    numbers:
      - {{name: Sales, number: "+442071838750", workstream: support-en}}
workstreams:
  - name: support-pt
    language: pt-BR
    timezone: America/Sao_Paulo
    fallback_queue: general
    classification:
      - name: topics
        rules:
          - name: billing
            when: {{any: [{{field: body, op: contains, value: boleto}},
                          {{field: body, op: matches, value: "fatura|cobran[cç]a"}}]}}
            then: {{skills: {{billing: 5}}, priority: 5}}
          - name: sales
            when: {{field: body, op: contains, value: comprar}}
            then: {{skills: {{sales: 3}}}}
      - name: urgency
        hit_policy: all
        rules:
          - name: urgent
            when: {{field: body, op: contains, value: urgente}}
            then: {{priority: 10, severity: high}}
          - name: abroad
            when: {{field: customer.region, op: ne, value: BR}}
            then: {{language: en, variables: {{abroad: true}}}}
    routing:
      - {{name: billing, when: {{field: skills.billing, op: exists}}, queue: billing}}
      - {{name: sales, when: {{field: skills.sales, op: ge, value: 1}}, queue: sales}}
  - name: support-en
    language: en
    fallback_queue: general
queues:
  - {{name: general}}
  - {{name: billing, priority: 5}}
  - name: sales
    hours:
      timezone: America/Sao_Paulo
      weekly: {{mon: ["09:00-18:00"], tue: ["09:00-18:00"], wed: ["09:00-18:00"],
               thu: ["09:00-18:00"], fri: ["09:00-18:00"]}}
      holidays: ["2026-12-25"]
      out_of_hours: {{action: close, message: out_of_hours}}
"""
ENVIRON = {
    "TEST_TWILIO_TOKEN_CONTOSO": AUTH_TOKEN,
    "TEST_TWILIO_TOKEN_FABRIKAM": OTHER_TOKEN,
    "TEST_TWILIO_SHARED_KEY": "shared-key-secret-for-tests",
}


def new_sid(prefix: str = "SM") -> str:
    return prefix + uuid.uuid4().hex


def inbound_form(
    *,
    sid: str | None = None,
    customer: str = "+5511988887777",
    to: str = BUSINESS,
    body: str = "Olá, preciso de ajuda",
    profile: str = "Maria",
    account_sid: str = ACCOUNT_SID,
    **extra: str,
) -> list[tuple[str, str]]:
    """A Twilio inbound WhatsApp form, as Twilio posts it."""
    sid = sid or new_sid()
    form = [
        ("SmsMessageSid", sid),
        ("NumMedia", "0"),
        ("ProfileName", profile),
        ("MessageType", "text"),
        ("SmsSid", sid),
        ("WaId", customer.lstrip("+")),
        ("SmsStatus", "received"),
        ("Body", body),
        ("To", f"whatsapp:{to}"),
        ("NumSegments", "1"),
        ("ReferralNumMedia", "0"),
        ("MessageSid", sid),
        ("AccountSid", account_sid),
        ("From", f"whatsapp:{customer}"),
        ("ApiVersion", "2010-04-01"),
    ]
    replaced = {k for k in extra}
    return [(k, v) for k, v in form if k not in replaced] + list(extra.items())


def status_form(
    sid: str,
    status: str = "delivered",
    *,
    error_code: str = "",
    customer: str = "+5511988887777",
    account_sid: str = ACCOUNT_SID,
    **extra: str,
) -> list[tuple[str, str]]:
    """A Twilio status callback form for message ``sid``, as Twilio posts it."""
    form = [
        ("MessageSid", sid),
        ("SmsSid", sid),
        ("MessageStatus", status),
        ("SmsStatus", status),
        ("AccountSid", account_sid),
        ("From", f"whatsapp:{BUSINESS}"),
        ("To", f"whatsapp:{customer}"),
        ("ApiVersion", "2010-04-01"),
    ]
    if error_code:
        form.append(("ErrorCode", error_code))
    return form + list(extra.items())


def sign(url: str, form: list[tuple[str, str]], token: str = AUTH_TOKEN) -> str:
    from multidict import MultiDict

    return str(RequestValidator(token).compute_signature(url, MultiDict(form)))


def signed_post(
    path: str, form: list[tuple[str, str]], token: str = AUTH_TOKEN, base: str = PUBLIC_URL
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a webhook signed over ``base + path``."""
    return urlencode(form).encode(), {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": sign(base + path, form, token),
    }


async def post_webhook(
    client: TestClient[Any, Any], path: str, form: list[tuple[str, str]]
) -> None:
    """Post ``form`` signed to ``path`` as Twilio would; the router must answer 200."""
    body, headers = signed_post(path, form)
    response = await client.post(path, data=body, headers=headers)
    assert response.status == 200, await response.text()


async def customer_writes(
    client: TestClient[Any, Any],
    customer: str,
    body: str,
    *,
    to: str = BUSINESS,
    profile: str = "Maria",
) -> str:
    """The customer writes, through the signed inbound webhook; the message sid."""
    form = inbound_form(customer=customer, body=body, to=to, profile=profile)
    await post_webhook(client, INBOUND, form)
    return dict(form)["MessageSid"]


async def status_callback(
    client: TestClient[Any, Any], sid: str, status: str, error_code: str = ""
) -> None:
    """Twilio reports ``status`` for message ``sid``, through the signed status webhook."""
    await post_webhook(client, STATUS, status_form(sid, status, error_code=error_code))


Executor = asyncpg.Pool | asyncpg.Connection


async def new_agent(
    db: Executor,
    *,
    queues: Sequence[str] | None = None,
    name: str | None = None,
    skills: Mapping[str, int] | None = None,
    capacity: int = 2,
    used: int = 0,
    presence: str = "offline",
) -> tuple[str, dict[str, str]]:
    """An agent written straight to the database: its id and the ``Authorization`` header
    of its token. Without ``queues`` it is alone in a queue no configuration knows, so no
    stage gives it work the test did not ask for."""
    token = new_token()
    agent_id = str(uuid.uuid4())
    await db.execute(
        "INSERT INTO agents (id, name, queues, skills, capacity_units, used_units, presence,"
        " token_hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        agent_id,
        name or f"agent-{agent_id[:6]}",
        list(queues) if queues is not None else [f"private-{agent_id[:8]}"],
        dict(skills or {}),
        capacity,
        used,
        presence,
        hash_token(token),
    )
    return agent_id, {"Authorization": f"Bearer {token}"}


async def new_agents(
    db: Executor,
    count: int,
    *,
    queues: Sequence[str],
    capacity: int,
    presence: str = "available",
    name: str = "agent",
) -> list[str]:
    """``count`` agents in one statement (no tokens: nobody logs in as them); their ids."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    await db.executemany(
        "INSERT INTO agents (id, name, queues, capacity_units, presence, token_hash)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        [
            (agent_id, f"{name}-{n}", list(queues), capacity, presence, uuid.uuid4().hex)
            for n, agent_id in enumerate(ids)
        ],
    )
    return ids


async def within(awaitable: Awaitable[T], timeout: float = 5.0) -> T:
    """Await ``awaitable`` (an event, a future), failing the test after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        return await awaitable


async def wait_for(
    condition: Callable[[], Awaitable[Any]], timeout: float = 10.0, interval: float = 0.05
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    async with asyncio.timeout(timeout):
        while True:
            result = await condition()
            if result:
                return result
            await asyncio.sleep(interval)


class EventTap:
    """A private, exclusive queue bound to the event exchange: what a downstream service sees."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[tuple[dict[str, Any], AbstractIncomingMessage]] = asyncio.Queue()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        await self.events.put((orjson.loads(message.body), message))

    async def next(
        self, timeout: float = 5.0, where: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any]:
        """The next event (matching ``where``: other tests' leftovers may pass by)."""
        async with asyncio.timeout(timeout):
            while True:
                event, _ = await self.events.get()
                if where is None or where(event):
                    return event

    async def next_message(
        self, timeout: float = 5.0
    ) -> tuple[dict[str, Any], AbstractIncomingMessage]:
        async with asyncio.timeout(timeout):
            return await self.events.get()

    async def expect_none(
        self, within: float = 0.5, where: Callable[[dict[str, Any]], bool] | None = None
    ) -> None:
        """No event (matching ``where``) arrives within ``within`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while True:
                    event, _ = await self.events.get()
                    if where is None or where(event):
                        raise AssertionError(f"unexpected event {event['type']}")


def about(
    customer: str | None = None, conversation_id: str | None = None, sid: str | None = None
) -> Callable[[dict[str, Any]], bool]:
    """A filter for events concerning one customer, conversation or message sid."""

    def match(event: dict[str, Any]) -> bool:
        data = event.get("data") or {}
        return bool(
            (customer is not None and data.get("customer") == customer)
            or (conversation_id is not None and event.get("conversation_id") == conversation_id)
            or (sid is not None and sid in (data.get("message_sid"), data.get("first_message_sid")))
        )

    return match


async def publish_to_queue(amqp_url: str, queue: str, bodies: list[bytes], **kw: Any) -> None:
    """Persistent messages straight into ``queue`` (the default exchange), confirmed."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for body in bodies:
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **kw),
                routing_key=queue,
            )


async def purge_queues(amqp_url: str, *queues: str) -> None:
    """Empty queues that exist (a missing one is an error)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for name in queues:
            await (await channel.declare_queue(name, passive=True)).purge()


@contextlib.asynccontextmanager
async def tap(amqp_url: str, *keys: str) -> AsyncIterator[EventTap]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in keys or ("#",):
            await queue.bind(exchange, routing_key=key)
        spy = EventTap()
        await queue.consume(spy._on_message)
        yield spy


def received_event(
    *,
    customer: str = "+5511988887777",
    sid: str | None = None,
    body: str = "Olá",
    received_at: Any = None,
    media: list[dict[str, str]] | None = None,
    business: str = BUSINESS,
) -> Any:
    """A ``message.received`` envelope as the router publishes it."""
    from datetime import UTC, datetime

    from schemas.events import Envelope, EventType, Media, MessageReceived, event_id

    sid = sid or new_sid()
    at = received_at or datetime.now(UTC)
    payload = MessageReceived(
        message_sid=sid,
        account_sid=ACCOUNT_SID,
        business_number=business,
        number_name="Support BR",
        workstream="support-pt",
        customer=customer,
        customer_wa_id=customer.lstrip("+"),
        profile_name="Maria",
        body=body,
        media=[Media.model_validate(m) for m in media or []],
        received_at=at,
        form={"MessageSid": sid},
    )
    eid = event_id(EventType.MESSAGE_RECEIVED, "contoso", sid)
    return Envelope(
        id=eid,
        type=EventType.MESSAGE_RECEIVED,
        occurred_at=at,
        account="contoso",
        correlation_id=eid,
        data=payload.model_dump(mode="json"),
    )


def new_customer() -> str:
    return "+55119" + str(uuid.uuid4().int)[:8]


class TcpProxy:
    """A loopback TCP proxy a test can cut and restore, to take the broker 'away'."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    def stall(self) -> None:
        """Keep connections open but hold every byte (a broker that stops answering)."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._pipes):
            task.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    await self._flowing.wait()
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()

        for task in (
            asyncio.create_task(pipe(reader, up_writer)),
            asyncio.create_task(pipe(up_reader, writer)),
        ):
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)


def free_port() -> int:
    """A loopback port nobody listens on now (for a server a test starts on a real port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
