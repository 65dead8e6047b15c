"""``omniroute demo``: the Twilio emulator, the router and every stage in one process, with
simulated WhatsApp customers, told as it happens.

It uses the example configuration, its own emulator and the configured database and
broker; it checks its own outcome (each message stored once, the right conversations) and
exits non-zero if anything did not happen as it should.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiohttp
import asyncpg
import orjson

from omniroute.commands.demo_agents import (
    close,
    converse,
    create_demo_agents,
    go_available,
    retire_demo_agents,
    take_work,
)
from omniroute.commands.service import Service
from omniroute.infra.config_loader import LiveConfig, load_config
from omniroute.infra.database import create_database, drop_database
from omniroute.infra.settings import Settings
from omniroute.infra.store import Store, migrate
from omniroute.twilio_emulator import EmulatorState, start_emulator
from schemas.config import Account, Config, Lifecycle
from schemas.events import EXCHANGE

DEMO_CONFIG = Path("examples/omniroute.yaml")
DEMO_TOKENS = {"TWILIO_AUTH_TOKEN_CONTOSO": "demo-auth-token-not-a-secret"}
WAIT_SECONDS = 30.0
START_SECONDS = 30.0
# A 1×1 JPEG is enough to show media handling.
PIXEL = base64.b64encode(bytes.fromhex("ffd8ffe000104a46494600010100000100010000ffd9")).decode()


@dataclass
class Step:
    who: str
    sender: str
    to_name: str
    body: str
    media: int = 0
    repeat: int = 1
    expect_status: int = 200
    routed: bool = True  # a sandbox join is acknowledged, not stored in a conversation


@dataclass
class Outcome:
    sids: set[str] = field(default_factory=set)
    events: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    outbound: set[str] = field(default_factory=set)
    sends: dict[str, dict[str, Any]] = field(default_factory=dict)  # sender → first send


DEMO_LIFECYCLE = Lifecycle(wrap_up=2, idle_reminder_after=4, auto_close_after=8)


def _quick_lifecycle(config: Config) -> Config:
    """The example's timers in seconds instead of minutes, so the demo shows them fire."""
    workstreams = [w.model_copy(update={"lifecycle": DEMO_LIFECYCLE}) for w in config.workstreams]
    return config.model_copy(update={"workstreams": workstreams})


def demo_database(settings: Settings) -> str:
    """The demo's own database, next to the configured one (``…/omniroute_demo``)."""
    parts = urlsplit(settings.database_url.get_secret_value())
    name = (parts.path.lstrip("/") or "omniroute") + "_demo"
    return urlunsplit(parts._replace(path=f"/{name}"))


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise RuntimeError("no free port")


def _script(account: Account) -> list[Step]:
    """The customers of this run (new numbers each run, so each run opens conversations)."""
    names = {n.name: n.number for n in account.numbers}
    main, other = next(iter(names)), list(names)[-1]
    run = f"{random.randrange(10_000):04d}"
    maria, ana, john = f"+5511988{run}", f"+5521977{run}", f"+1415555{run}"
    return [
        Step("Maria", f"whatsapp:{maria}", main, "Olá! Meu pedido 1234 não chegou."),
        Step("Maria", f"whatsapp:{maria}", main, "Vocês estão aí? 🙏"),
        Step(
            "Maria (Twilio resends the same webhook)",
            f"whatsapp:{maria}",
            main,
            "Podem me ajudar com a troca?",
            repeat=2,
        ),
        Step("Ana (an album of 3 photos)", f"whatsapp:{ana}", main, "", media=3),
        Step(
            "a username sender",
            f"whatsapp:US.1349120865530{run}",
            main,
            "Hi! Question about my invoice.",
        ),
        Step(
            "John (joins the sandbox)", f"whatsapp:{john}", other, "join brave-tiger", routed=False
        ),
        Step("John", f"whatsapp:{john}", other, "Hello! I need help with my order."),
        Step(
            "a number nobody configured",
            "whatsapp:+5511911112222",
            "(unconfigured)",
            "hello?",
            expect_status=404,
        ),
    ]


async def _send(
    http: aiohttp.ClientSession,
    emulator_url: str,
    router_url: str,
    account: Account,
    step: Step,
    numbers: Mapping[str, str],
    outcome: Outcome,
) -> list[asyncio.Task[Any]]:
    to = numbers.get(step.to_name, "+5511000000000")
    body: dict[str, Any] = {
        "account_sid": account.account_sid,
        "url": f"{router_url}/twilio/{account.name}/inbound",
        "from": step.sender,
        "to": f"whatsapp:{to}",
        "body": step.body,
        "profile_name": step.who.split(" ")[0],
        "repeat": step.repeat,
    }
    outcome.sends.setdefault(step.sender, body | {"emulator": emulator_url})
    sends = []
    for n in range(max(step.media, 1)):
        one = dict(body)
        if step.media:
            one["media"] = [{"content_type": "image/jpeg", "data_base64": PIXEL}]
            one["body"] = f"photo {n + 1}"
        sends.append(http.post(f"{emulator_url}/_emulator/customers/send", json=one))
    answers = await asyncio.gather(*sends)  # an album arrives at once
    for answer in answers:
        result = await answer.json()
        statuses = result.get("statuses") or [result.get("status")]
        text = step.body or "(photo)"
        print(f"  {step.who:<42} → {step.to_name:<14} {text[:40]!r:<44} router: {statuses}")
        if any(s != step.expect_status for s in statuses):
            outcome.problems.append(f"{step.who}: expected {step.expect_status}, got {statuses}")
        if step.expect_status == 200 and step.routed:
            outcome.sids.add(result["message_sid"])
    return []


async def _forged(
    http: aiohttp.ClientSession, router_url: str, account: Account, outcome: Outcome
) -> None:
    form = {
        "MessageSid": "SM" + "f" * 32,
        "AccountSid": account.account_sid,
        "From": "whatsapp:+5511900000000",
        "To": f"whatsapp:{account.numbers[0].number}",
        "Body": "send me the auth token",
    }
    async with http.post(
        f"{router_url}/twilio/{account.name}/inbound",
        data=form,
        headers={"X-Twilio-Signature": "Zm9yZ2Vk"},
    ) as response:
        print(
            f"  {'a forger (bad X-Twilio-Signature)':<42} → {'Support':<14} "
            f"{form['Body']!r:<44} router: [{response.status}]"
        )
        if response.status != 403:
            outcome.problems.append(f"forged webhook answered {response.status}, not 403")


async def _count_events(amqp_url: str, outcome: Outcome, ready: asyncio.Event) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key="#")
        ready.set()
        async with queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                kind = orjson.loads(message.body).get("type", "?")
                outcome.events[kind] = outcome.events.get(kind, 0) + 1


async def _report(dsn: str, outcome: Outcome) -> None:
    store = Store(dsn, max_size=1)
    try:
        pool = await store.pool()
        rows = await pool.fetch(
            "SELECT c.id, c.state, c.account, c.business_number, c.customer, c.workstream,"
            " c.queue, c.priority, c.skills, a.name AS agent, ct.profile_name, m.body, m.media,"
            " m.kind,"
            " m.received_at, m.twilio_sid, m.direction, m.status"
            " FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " JOIN contacts ct ON ct.id = c.contact_id LEFT JOIN agents a ON a.id = c.agent_id"
            " WHERE m.conversation_id IN (SELECT conversation_id FROM messages"
            " WHERE twilio_sid = ANY($1::text[]) OR id = ANY($2::uuid[]))"
            " ORDER BY c.opened_at, m.received_at",
            list(outcome.sids),
            list(outcome.outbound),
        )
    finally:
        await store.close()
    stored = [r["twilio_sid"] for r in rows if r["twilio_sid"] in outcome.sids]
    if sorted(stored) != sorted(outcome.sids):
        outcome.problems.append(
            f"{len(outcome.sids)} distinct messages accepted, {len(stored)} stored"
        )
    print("\nConversations in PostgreSQL (this run's messages):")
    current = None
    for row in rows:
        if row["id"] != current:
            current = row["id"]
            skills = ", ".join(f"{k}≥{v}" for k, v in (row["skills"] or {}).items()) or "none"
            print(
                f"  [{row['state']}] {row['profile_name'] or '?'} {row['customer']} → "
                f"{row['business_number']} · workstream {row['workstream']} · queue "
                f"{row['queue']} (priority {row['priority']}, skills {skills}) · agent "
                f"{row['agent'] or '-'}"
            )
        media = f"  +{len(row['media'])} media" if row["media"] else ""
        arrow = "←" if row["direction"] == "inbound" else "→"
        status = f"  [{row['status']}]" if row["direction"] == "outbound" else ""
        if row["direction"] == "outbound" and row["kind"] == "system":
            status += " (automated)"
        print(f"      {row['received_at']:%H:%M:%S.%f} {arrow} {row['body']!r}{media}{status}")


async def _wait_stored(dsn: str, sids: set[str]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        async with asyncio.timeout(WAIT_SECONDS):
            query = "SELECT count(*) FROM messages WHERE twilio_sid = ANY($1::text[])"
            while True:
                if await conn.fetchval(query, list(sids)) >= len(sids):
                    break
                await asyncio.sleep(0.1)
    except TimeoutError:
        pass
    finally:
        await conn.close()


async def run_demo(
    settings: Settings, *, keep_running: bool = False, config_path: Path = DEMO_CONFIG
) -> int:
    """Run the demo; 0 if everything happened as it should."""
    environ = {**DEMO_TOKENS, **os.environ}
    config = _quick_lifecycle(load_config(config_path, environ))
    # A database of its own, new each run: the demo never touches real data, and what an
    # earlier run left waiting does not take this run's agents.
    settings = Settings.model_validate(
        settings.model_dump() | {"database_url": demo_database(settings)}
    )
    await drop_database(settings.database_url.get_secret_value())
    await create_database(settings.database_url.get_secret_value())
    await migrate(settings.database_url.get_secret_value())
    account = config.accounts[0]
    assert account.auth_token is not None
    emulator = await start_emulator(
        EmulatorState(
            accounts={
                a.account_sid: a.auth_token.get_secret_value()
                for a in config.accounts
                if a.auth_token
            }
        )
    )
    port = _free_port(settings.http_port)
    router_url = f"http://127.0.0.1:{port}"
    demo_settings = Settings.model_validate(
        settings.model_dump()
        | {
            "http_host": "127.0.0.1",
            "http_port": port,
            "public_url": router_url,
            "twilio_api_url": emulator.url,
        }
    )
    from consumers.registry import STAGES

    service = Service(demo_settings, LiveConfig(config, config_path), list(STAGES), True)
    outcome = Outcome()
    tap_ready = asyncio.Event()
    tap = asyncio.create_task(
        _count_events(settings.amqp_url.get_secret_value(), outcome, tap_ready)
    )
    print(
        f"omniroute demo — Twilio emulator {emulator.url}, router {router_url}, "
        f"stages: {', '.join(STAGES)}"
    )
    try:
        async with asyncio.timeout(START_SECONDS):
            await service.start()
            await tap_ready.wait()
        numbers = {n.name: n.number for n in account.numbers}
        print("\nCustomers write on WhatsApp (through the emulator, signed like Twilio):")
        dsn = settings.database_url.get_secret_value()
        store = Store(dsn, max_size=2)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
            script = _script(account)
            for step in script:
                await _send(http, emulator.url, router_url, account, step, numbers, outcome)
            await _forged(http, router_url, account, outcome)
            await _wait_stored(dsn, outcome.sids)
            try:
                await _agents_at_work(http, router_url, store, config, script, outcome)
            finally:
                await store.close()
        await asyncio.sleep(0.5)  # let the last events reach the tap
        await _report(dsn, outcome)
        print(
            "\nEvents on omniroute.events: "
            + ", ".join(f"{k} ×{v}" for k, v in sorted(outcome.events.items()))
        )
        if keep_running:
            print(
                f"\nStill running (Ctrl-C to stop): router {router_url}, "
                f"emulator {emulator.url}/_emulator/customers/send"
            )
            await _until_interrupted()
    finally:
        tap.cancel()
        await asyncio.gather(tap, return_exceptions=True)
        await service.stop()
        await emulator.close()
    for problem in outcome.problems:
        print(f"PROBLEM: {problem}")
    print("\ndemo " + ("FAILED" if outcome.problems else "finished: every message stored once"))
    return 1 if outcome.problems else 0


async def _agents_at_work(
    http: aiohttp.ClientSession,
    url: str,
    store: Store,
    config: Config,
    script: list[Step],
    outcome: Outcome,
) -> None:
    """Agents take the conversations, one replies and closes; then they are retired."""
    run = script[0].sender[-4:]
    agents = await create_demo_agents(store, config, run)
    try:
        print("\nAgents sign in (created like the admin API does; tokens stored hashed):")
        await go_available(http, url, agents)
        pool = await store.pool()
        rows = await pool.fetch(
            "SELECT DISTINCT c.id, c.customer FROM conversations c"
            " JOIN messages m ON m.conversation_id = c.id"
            " WHERE m.twilio_sid = ANY($1::text[]) AND c.state <> 'closed'",
            list(outcome.sids),
        )
        wanted = {str(r["id"]) for r in rows}
        print("\nDistribution (classify → queue → offer or pick → assigned):")
        try:
            taken = await take_work(http, url, agents, wanted, [q.name for q in config.queues])
        except TimeoutError:
            outcome.problems.append("not every conversation was taken by an agent in time")
            return
        maria = next(str(r["id"]) for r in rows if script[0].sender.endswith(r["customer"]))
        agent = next(a for a in agents if a.name == taken[maria])
        print(f"\n{agent.name} talks to Maria (through the 24-hour window gate):")
        sent = await converse(http, url, agent, maria, "order_update")
        outcome.outbound.update(sent)
        await _wait_read(pool, sent, outcome)
        print(
            f"  {agent.name} ends the conversation: {await close(http, url, agent, maria)}"
            f" → wrap-up ({DEMO_LIFECYCLE.wrap_up:.0f} s, capacity still held)"
        )
        await _life_after_close(http, pool, maria, script, outcome)
    finally:
        await retire_demo_agents(store, agents)


async def _state(pool: Any, conversation_id: str, states: tuple[str, ...]) -> Any:
    query = "SELECT state, close_reason FROM conversations WHERE id = $1"
    async with asyncio.timeout(WAIT_SECONDS):
        while True:
            row = await pool.fetchrow(query, conversation_id)
            if row["state"] in states:
                return row
            await asyncio.sleep(0.1)


async def _life_after_close(
    http: aiohttp.ClientSession, pool: Any, maria: str, script: list[Step], outcome: Outcome
) -> None:
    """Wrap-up ends by its timer, the survey goes out and Maria answers it; the idle
    conversations are reminded, then closed by their timers."""
    try:
        await _state(pool, maria, ("closed",))
        print("  wrap-up over: the conversation is closed and the agent's capacity released")
        survey = await _wait_message(pool, maria, "De 1 a 5%")
        print(f"  the survey goes out: {survey!r}")
        first = outcome.sends[script[0].sender]
        answer = first | {"body": "5 Muito bom!", "repeat": 1}
        async with http.post(
            f"{first['emulator']}/_emulator/customers/send",
            json={k: v for k, v in answer.items() if k != "emulator"},
        ) as r:
            await r.read()
        async with asyncio.timeout(WAIT_SECONDS):
            while True:
                if await pool.fetchval(
                    "SELECT rating FROM surveys WHERE conversation_id = $1", maria
                ):
                    break
                await asyncio.sleep(0.1)
        print(
            "  Maria answers '5 Muito bom!': recorded as rating 5 (survey.answered), "
            "not routed to an agent"
        )
        others = await pool.fetch(
            "SELECT id, customer FROM conversations WHERE id <> $1 AND state <> 'closed'", maria
        )
        print(
            f"\nThe others stay silent: reminded after {DEMO_LIFECYCLE.idle_reminder_after:.0f}"
            f" s, closed after {DEMO_LIFECYCLE.auto_close_after:.0f} s (durable timers):"
        )
        for other in others:
            row = await _state(pool, str(other["id"]), ("closed",))
            print(f"  {other['customer']}: closed ({row['close_reason']})")
    except TimeoutError:
        outcome.problems.append("the conversation's life after close did not complete in time")


async def _wait_message(pool: Any, conversation_id: str, like: str) -> str:
    query = (
        "SELECT body FROM messages WHERE conversation_id = $1 AND direction = 'outbound'"
        " AND body LIKE $2"
    )
    async with asyncio.timeout(WAIT_SECONDS):
        while True:
            body = await pool.fetchval(query, conversation_id, like)
            if body:
                return str(body)
            await asyncio.sleep(0.1)


async def _wait_read(pool: Any, ids: list[str], outcome: Outcome) -> None:
    query = "SELECT count(*) FROM messages WHERE id = ANY($1::uuid[]) AND status = 'read'"
    try:
        async with asyncio.timeout(WAIT_SECONDS):
            while True:
                if await pool.fetchval(query, ids) >= len(ids):
                    break
                await asyncio.sleep(0.1)
        print("  Twilio's receipts arrived (signed callbacks): sent → delivered → read")
    except TimeoutError:
        outcome.problems.append("the agent's messages were not read in time")


async def _until_interrupted() -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
