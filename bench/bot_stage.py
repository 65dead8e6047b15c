"""Bot stage throughput: customer messages per second through the ``bot`` stage (the stored
message looked up, the turn recorded, the bot asked over HTTP, its answer stored as an
outbound message with ``message.send-requested`` and ``bot.replied`` in the outbox), against
a bot that answers instantly, vs a raw aio-pika consumer doing the same bot call then the ack
— the least any bridge from the broker to a bot must do — in the same run.

The bot is the example FAQ bot (``examples/faq_bot.py``) in a process of its own, so its
CPU is not the stage's; its answer is computed in microseconds, and its own rate (calls per
second from one client at the stage's concurrency) is printed beside, to show it is not what
limits either side. Both sides send the same request (Rasa's REST channel body with the
metadata the stage sends) with the bearer token, on loopback.

Each measurement seeds ``count`` conversations in the ``bot`` state, each with its stored
customer message (COPY, then ``VACUUM ANALYZE`` of the tables written), on top of a year of
closed history (``bench.history.seed_history``) seeded once, so the stage's lookups run on a
database that is not empty; their ``message.received`` events fill the stage's queue before
the runner starts, and the time is from its start until every turn is answered. Warm-up
first, then the two sides interleaved, best of two each (the machine's noise is larger than
a round's). Every drain is bounded by ``DRAIN_LIMIT``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import orjson

from bench.history import seed_history, vacuum_analyze
from bench.infra import CONVERSATION_COLUMNS, BenchInfra
from bench.processes import free_port, python_process, wait_port
from consumers import bot
from consumers.runtime import StageRunner
from omniroute.infra.bus import Bus
from omniroute.infra.config_loader import LiveConfig, parse_config
from omniroute.infra.settings import Settings
from omniroute.infra.store import Store
from omniroute.infra.topology import StageQueue
from schemas.events import Envelope, EventType, MessageReceived, event_id

SID = "AC0000000000000000000000000000000e"
BUSINESS = "+5511999990000"
BOT_TOKEN = "bench-bot-token"
ENVIRON = {"BENCH_TOKEN": "bench-pipeline-token", "BENCH_BOT_TOKEN": BOT_TOKEN}
# A question the FAQ bot answers at once (opening hours) and that names no hand-off keyword.
QUESTION = "Qual o horário de atendimento?"
PREFETCH = 64
DRAIN_LIMIT = 180.0  # seconds one side may take to drain its queue before the run fails
MESSAGE_COLUMNS = ["id", "conversation_id", "direction", "twilio_sid", "body", "status"]


def config_yaml(bot_url: str) -> str:
    """One workstream whose bot is the FAQ bot; turns never run out within a run."""
    return f"""
accounts:
  - name: bench
    account_sid: {SID}
    auth_token_env: BENCH_TOKEN
    numbers: [{{name: Main, number: "{BUSINESS}", workstream: main}}]
workstreams:
  - name: main
    language: pt-BR
    fallback_queue: general
    bot: {{url: "{bot_url}", token_env: BENCH_BOT_TOKEN, timeout: 10s, max_turns: 1000}}
queues: [{{name: general}}]
"""


def _settings(infra: BenchInfra) -> Settings:
    return Settings.model_validate(
        {
            "amqp_url": infra.amqp_url,
            "database_url": infra.database_url,
            "prefetch": PREFETCH,
            "db_pool_max": 10,
        }
    )


def _all_keys(stage: StageQueue) -> tuple[str, ...]:
    """The bot stage's queue bound to its optional keys too, so the events published before
    its runner starts (which binds them) are in it."""
    return stage.bindings if stage.stage == "bot" else stage.required


def received(sid: str, customer: str, now: datetime) -> Envelope:
    """A customer's ``message.received``, as the router publishes it."""
    payload = MessageReceived(
        message_sid=sid,
        account_sid=SID,
        business_number=BUSINESS,
        number_name="Main",
        workstream="main",
        customer=customer,
        customer_wa_id=customer.lstrip("+"),
        profile_name="Maria",
        body=QUESTION,
        received_at=now,
        form={"MessageSid": sid, "Body": QUESTION},
    )
    eid = event_id(EventType.MESSAGE_RECEIVED, "bench", sid)
    return Envelope(
        id=eid,
        type=EventType.MESSAGE_RECEIVED,
        occurred_at=now,
        account="bench",
        correlation_id=eid,
        data=payload.model_dump(mode="json"),
    )


def _customer() -> str:
    return f"+55119{uuid.uuid4().int % 10**8:08d}"


async def _seed(database_url: str, count: int) -> list[Envelope]:
    """``count`` conversations in the ``bot`` state with one stored customer message each;
    their ``message.received`` events."""
    now = datetime.now(UTC)
    contacts, conversations, messages, events = [], [], [], []
    for _ in range(count):
        contact, conversation, message = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        customer, sid = _customer(), "SM" + uuid.uuid4().hex
        contacts.append((contact, "bench", customer, customer.lstrip("+"), "Maria"))
        conversations.append(
            (conversation, "bench", BUSINESS, customer, contact, "main", "bot", now, now)
        )
        messages.append((message, conversation, "inbound", sid, QUESTION, "received"))
        events.append(received(sid, customer, now))
    conn = await asyncpg.connect(database_url)
    try:
        await conn.copy_records_to_table(
            "contacts",
            records=contacts,
            columns=["id", "account", "address", "wa_id", "profile_name"],
        )
        await conn.copy_records_to_table(
            "conversations", records=conversations, columns=CONVERSATION_COLUMNS
        )
        # received_at: the conversation's, as the conversations stage stamps it.
        await conn.copy_records_to_table(
            "messages",
            records=[(*m, now) for m in messages],
            columns=[*MESSAGE_COLUMNS, "received_at"],
        )
        await vacuum_analyze(conn, ("contacts", "conversations", "messages", "bot_turns"))
    finally:
        await conn.close()
    return events


async def _drained(pool: asyncpg.Pool[Any], sids: list[str], started: float) -> None:
    """Wait until every seeded message's bot turn is answered (by primary key lookups)."""
    query = (
        "SELECT count(*) FROM bot_turns t JOIN messages m ON m.id = t.message_id"
        " WHERE m.twilio_sid = ANY($1::text[]) AND t.state = 'answered'"
    )
    while (done := await pool.fetchval(query, sids)) < len(sids):
        if time.perf_counter() - started > DRAIN_LIMIT:
            raise TimeoutError(f"bot stage: {done} of {len(sids)} answered after {DRAIN_LIMIT} s")
        await asyncio.sleep(0.02)


async def stage_rate(infra: BenchInfra, bot_url: str, count: int) -> float:
    """Customer messages per second through one in-process bot stage runner."""
    settings = _settings(infra)
    config = LiveConfig(parse_config(config_yaml(bot_url), "bench.yaml", ENVIRON))
    store = Store(infra.database_url, max_size=10)
    bus = Bus.from_settings(settings, declare_keys=_all_keys)
    await bus.start()
    await asyncio.wait_for(bus.wait_ready(), 10)
    try:
        events = await _seed(infra.database_url, count)
        for start in range(0, count, 500):
            await asyncio.gather(*(bus.publish(e) for e in events[start : start + 500]))
        sids = [str(e.data["message_sid"]) for e in events]
        pool = await store.pool()
        runner = StageRunner(bot.STAGE, bus=bus, store=store, config=config, settings=settings)
        started = time.perf_counter()
        await runner.start()
        try:
            await _drained(pool, sids, started)
            elapsed = time.perf_counter() - started
        finally:
            await runner.stop()
        await _check_replies(pool, sids)
    finally:
        await bus.close()
        await store.close()
    return count / elapsed


async def _check_replies(pool: asyncpg.Pool[Any], sids: list[str]) -> None:
    """Each seeded conversation got exactly one bot message: the run measured real work."""
    replies = await pool.fetchval(
        "SELECT count(*) FROM messages r JOIN messages m ON m.conversation_id = r.conversation_id"
        " WHERE m.twilio_sid = ANY($1::text[]) AND r.origin = 'bot'",
        sids,
    )
    if replies != len(sids):
        raise AssertionError(f"{replies} bot messages stored for {len(sids)} customer messages")


def request_body(envelope: Envelope) -> dict[str, Any]:
    """The Rasa REST request the stage sends for a customer message (same shape and size)."""
    data = envelope.data
    return {
        "sender": str(uuid.uuid4()),
        "message": data["body"],
        "metadata": {
            "message_id": str(uuid.uuid4()),
            "customer": data["customer"],
            "profile_name": data["profile_name"],
            "language": "pt-BR",
            "variables": {},
            "media": [],
            "workstream": data["workstream"],
        },
    }


async def raw_rate(infra: BenchInfra, bot_url: str, count: int) -> float:
    """Messages per second of a bare aio-pika consumer on a quorum queue of ``count``
    message.received bodies, same prefetch: decode, POST to the bot, read its answer, ack."""
    now = datetime.now(UTC)
    events = [received("SM" + uuid.uuid4().hex, _customer(), now) for _ in range(count)]
    name = f"bench.raw-bot.{uuid.uuid4().hex[:6]}"
    done = asyncio.Event()
    finished = 0
    connection = await aio_pika.connect(infra.amqp_url)
    async with connection, aiohttp.ClientSession() as http:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        for start in range(0, count, 500):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(
                            e.__pydantic_serializer__.to_json(e),
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        routing_key=name,
                    )
                    for e in events[start : start + 500]
                )
            )
        headers = {"Authorization": f"Bearer {BOT_TOKEN}"}

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal finished
            envelope = Envelope.model_validate_json(message.body)
            async with http.post(bot_url, json=request_body(envelope), headers=headers) as r:
                r.raise_for_status()
                await r.read()
            await message.ack()
            finished += 1
            if finished >= count:
                done.set()

        await channel.set_qos(prefetch_count=PREFETCH)
        started = time.perf_counter()
        tag = await queue.consume(on_message)
        try:
            await asyncio.wait_for(done.wait(), DRAIN_LIMIT)
        finally:
            await queue.cancel(tag)
        elapsed = time.perf_counter() - started
        await queue.delete(if_unused=False, if_empty=False)
    return count / elapsed


async def bot_alone(bot_url: str, seconds: float = 2.0) -> float:
    """Calls per second the bot answers from one client, ``PREFETCH`` calls in flight."""
    headers = {"Authorization": f"Bearer {BOT_TOKEN}"}
    body = orjson.dumps({"sender": "bench", "message": QUESTION, "metadata": {"language": "pt-BR"}})
    done = 0
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    async with aiohttp.ClientSession() as http:

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                async with http.post(
                    bot_url,
                    data=body,
                    headers={**headers, "Content-Type": "application/json"},
                ) as r:
                    r.raise_for_status()
                    await r.read()
                done += 1

        await asyncio.gather(*(caller() for _ in range(PREFETCH)))
    return done / (time.perf_counter() - started)


async def run(infra: BenchInfra, count: int = 2000, history: int = 100_000) -> list[dict[str, Any]]:
    started = time.perf_counter()
    await seed_history(infra.database_url, history)
    print(f"# bot: {history} closed conversations seeded in {time.perf_counter() - started:.0f} s")
    port = free_port()
    bot_url = f"http://127.0.0.1:{port}/webhooks/rest/webhook"
    async with python_process(
        ["examples/faq_bot.py", "--port", str(port), "--token-env", "BENCH_BOT_TOKEN"],
        env={"BENCH_BOT_TOKEN": BOT_TOKEN},
    ):
        await wait_port(port)
        await stage_rate(infra, bot_url, min(200, count))  # warm-up: connections, plans
        await raw_rate(infra, bot_url, min(200, count))
        staged = raw = 0.0
        for _ in range(2):
            raw = max(raw, await raw_rate(infra, bot_url, count))
            staged = max(staged, await stage_rate(infra, bot_url, count))
        alone = await bot_alone(bot_url)
    return [
        {
            "figure": "bot stage, instant bot (customer messages/s)",
            "value": round(staged, 1),
            "baseline": "raw aio-pika consumer: same bot call, then ack, same prefetch",
            "baseline_value": round(raw, 1),
            "ratio": round(staged / raw, 3),
            "goal": "information",
        },
        {
            "figure": "the FAQ bot alone (calls/s, 64 in flight)",
            "value": round(alone, 1),
            "baseline": "bot stage, instant bot",
            "baseline_value": round(staged, 1),
            "ratio": round(alone / staged, 3),
            "goal": "> 1 (the bot is not the limit)",
        },
    ]
