"""``omniroute demo``: the Twilio emulator, the router and every stage in one process, with
simulated WhatsApp customers, told as it happens.

It uses the example configuration, its own emulator and the configured database and
broker; it checks its own outcome (each message stored once, the right conversations, and
the routing scenarios: an overflow, a decline, a transfer, a supervisor's rescue, each read
back from PostgreSQL) and exits non-zero, saying why, if anything did not happen as it should.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
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
    DemoAgent,
    close,
    converse,
    create_demo_agents,
    decide,
    go_available,
    offer_for,
    remove_as_supervisor,
    retire_demo_agents,
    take_work,
    transfer,
)
from omniroute.commands.demo_bot import (
    answered,
    bot_numbers,
    check_bot,
    check_resolved,
    faq_bot,
    free_port,
    with_bot_at,
)
from omniroute.commands.demo_console import (
    admin_token,
    console_agent,
    customer_command,
    print_console,
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
    scenario: str | None = None  # the routing scenario this customer's conversation shows
    settle: bool = False  # classified before the next customer writes (the queue's order)


@dataclass
class Outcome:
    sids: set[str] = field(default_factory=set)
    events: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    outbound: set[str] = field(default_factory=set)
    sends: dict[str, dict[str, Any]] = field(default_factory=dict)  # sender → first send
    scenarios: dict[str, list[str]] = field(default_factory=dict)  # scenario → message sids


@dataclass
class Customers:
    """The demo's customers: they write through the emulator, which signs like Twilio."""

    http: aiohttp.ClientSession
    emulator_url: str
    router_url: str
    account: Account
    numbers: Mapping[str, str]
    store: Store
    outcome: Outcome

    async def write(self, step: Step) -> list[str]:
        """Send the step's message(s); for a ``settle`` step, wait until each is classified."""
        sids = await _send(
            self.http,
            self.emulator_url,
            self.router_url,
            self.account,
            step,
            self.numbers,
            self.outcome,
        )
        if step.settle:
            try:
                for sid in sids:
                    await self.conversation(sid)
            except TimeoutError:
                self.outcome.problems.append(f"{step.who}: not classified in time")
        return sids

    async def conversation(self, sid: str) -> str:
        """The conversation the message landed in, once classified (raises TimeoutError)."""
        query = (
            "SELECT c.id FROM conversations c JOIN messages m ON m.conversation_id = c.id"
            " WHERE m.twilio_sid = $1 AND c.state <> 'open'"
        )
        pool = await self.store.pool()
        async with asyncio.timeout(WAIT_SECONDS):
            while True:
                found = await pool.fetchval(query, sid)
                if found is not None:
                    return str(found)
                await asyncio.sleep(0.05)


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


def _script(account: Account) -> list[Step]:
    """The customers of this run (new numbers each run, so each run opens conversations)."""
    main = account.numbers[0].name
    other = next((n.name for n in account.numbers if n.sandbox), account.numbers[-1].name)
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
        # Urgent cases go to a small queue whose overflow rule (more than 1 waiting) sends
        # the third to general: one after another, as the queue sees them.
        *(
            Step(
                f"{name} (urgent, {n} of 3)",
                f"whatsapp:+55319660{n}{run}",
                main,
                "URGENTE: não consigo acessar minha conta!",
                scenario="overflow",
                settle=True,
            )
            for n, name in enumerate(("Paulo", "Rita", "Sofia"), start=1)
        ),
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
) -> list[str]:
    """One customer's message(s) through the emulator; the MessageSids the router took."""
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
    sids = []
    for answer in answers:
        result = await answer.json()
        statuses = result.get("statuses") or [result.get("status")]
        text = step.body or "(photo)"
        print(f"  {step.who:<42} → {step.to_name:<14} {text[:40]!r:<44} router: {statuses}")
        if any(s != step.expect_status for s in statuses):
            outcome.problems.append(f"{step.who}: expected {step.expect_status}, got {statuses}")
        if step.expect_status == 200 and step.routed:
            outcome.sids.add(result["message_sid"])
            sids.append(result["message_sid"])
    if step.scenario:
        outcome.scenarios.setdefault(step.scenario, []).extend(sids)
    return sids


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


async def _report(dsn: str, outcome: Outcome, config: Config) -> None:
    """What landed in PostgreSQL and on the exchange, and the routing scenarios, checked."""
    store = Store(dsn, max_size=1)
    try:
        pool = await store.pool()
        rows = await pool.fetch(
            "SELECT c.id, c.state, c.account, c.business_number, c.customer, c.workstream,"
            " c.queue, c.priority, c.skills, a.name AS agent, ct.profile_name, m.body, m.media,"
            " m.kind, m.origin,"
            " m.received_at, m.twilio_sid, m.direction, m.status"
            " FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " JOIN contacts ct ON ct.id = c.contact_id LEFT JOIN agents a ON a.id = c.agent_id"
            " WHERE m.conversation_id IN (SELECT conversation_id FROM messages"
            " WHERE twilio_sid = ANY($1::text[]) OR id = ANY($2::uuid[]))"
            " ORDER BY c.opened_at, m.received_at",
            list(outcome.sids),
            list(outcome.outbound),
        )
        _conversations(rows, outcome)
        print(
            "\nEvents on omniroute.events: "
            + ", ".join(f"{k} ×{v}" for k, v in sorted(outcome.events.items()))
        )
        await _routing_report(pool, outcome, config)
    finally:
        await store.close()


def _conversations(rows: list[Any], outcome: Outcome) -> None:
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
        if row["origin"] == "bot":
            status += " (bot)"
        elif row["direction"] == "outbound" and row["kind"] == "system":
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
    async with faq_bot() as bot_url:
        return await _run_demo(settings, keep_running, config_path, bot_url)


async def _run_demo(settings: Settings, keep_running: bool, config_path: Path, bot_url: str) -> int:
    environ = {**DEMO_TOKENS, **os.environ}
    example = with_bot_at(load_config(config_path, environ), bot_url)
    config = _quick_lifecycle(example)
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
    port = free_port(settings.http_port)
    router_url = f"http://127.0.0.1:{port}"
    demo_settings = Settings.model_validate(
        settings.model_dump()
        | {
            "http_host": "127.0.0.1",
            "http_port": port,
            "public_url": router_url,
            "twilio_api_url": emulator.url,
            "admin_token": admin_token(
                settings.admin_token.get_secret_value() if settings.admin_token else None
            ),
        }
    )
    from consumers.registry import STAGES

    live = LiveConfig(config, config_path)
    service = Service(demo_settings, live, list(STAGES), True)
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
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
                customers = Customers(
                    http, emulator.url, router_url, account, numbers, store, outcome
                )
                script = _script(account)
                for step in script:
                    await customers.write(step)
                await _forged(http, router_url, account, outcome)
                await _wait_stored(dsn, outcome.sids)
                await _agents_at_work(customers, config, script)
        finally:
            await store.close()
        await asyncio.sleep(0.5)  # let the last events reach the tap
        await _report(dsn, outcome, config)
        if keep_running:
            live.current = example  # a person at the console works at human speed
            await _console(demo_settings, example, router_url, emulator.url, account)
            print(f"\nStill running (Ctrl-C to stop): router {router_url}, emulator {emulator.url}")
            await _until_interrupted()
    finally:
        tap.cancel()
        await asyncio.gather(tap, return_exceptions=True)
        await service.stop()
        await emulator.close()
    for problem in outcome.problems:
        print(f"PROBLEM: {problem}")
    print(
        "\ndemo "
        + (
            "FAILED"
            if outcome.problems
            else "finished: every message stored once, every routing scenario as described"
        )
    )
    return 1 if outcome.problems else 0


async def _agents_at_work(customers: Customers, config: Config, script: list[Step]) -> None:
    """Agents take the conversations, one replies and closes; then the routing scenarios
    with new customers; then the agents are retired."""
    http, url, store, outcome = (
        customers.http,
        customers.router_url,
        customers.store,
        customers.outcome,
    )
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
        except aiohttp.ClientResponseError as exc:
            outcome.problems.append(
                f"the agent API answered {exc.status} to {exc.request_info.url}"
            )
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
        present = await _routing(customers, agents, run)
        await _bot(customers, present, run, config)
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


# The routing scenarios: where an agent moves an order question (any other queue of the
# example both demo agents serve), and who removes an agent.
TRANSFER_QUEUE = "billing"
SUPERVISOR = "Marta (supervisor)"


async def _arrives(customers: Customers, step: Step) -> str:
    """The customer writes; the conversation, once classified."""
    [sid] = await customers.write(step)
    return await customers.conversation(sid)


async def _routing(customers: Customers, agents: list[DemoAgent], run: str) -> list[DemoAgent]:
    """New customers in push mode, the agents acting through the agent API: an offer
    declined, a conversation transferred to another queue, a conversation rescued when a
    supervisor removes its agent. What happened is read back in ``_routing_report``.
    Answers the agents still there (the rescue removes one)."""
    rest = agents
    http, url = customers.http, customers.router_url
    main = next(iter(customers.numbers))

    def customer(n: int, name: str, body: str, scenario: str) -> Step:
        return Step(name, f"whatsapp:+55419770{n}{run}", main, body, scenario=scenario)

    print("\nRouting (new customers; the agents decide through the agent API):")
    try:
        cid = await _arrives(
            customers, customer(1, "Carlos", "Meu pedido 555 veio errado.", "decline")
        )
        first, offer = await offer_for(http, url, agents, cid)
        declined = await decide(http, url, first, offer, "decline")
        print(f"  {first.name} declines the offer for Carlos: {declined}")
        second, offer = await offer_for(http, url, agents, cid)
        accepted = await decide(http, url, second, offer, "accept")
        print(f"  the offer goes to {second.name}, who accepts: {accepted}")
        print(f"  {second.name} ends the conversation: {await close(http, url, second, cid)}")

        cid = await _arrives(
            customers, customer(2, "Diego", "Quero trocar o pedido 777.", "transfer")
        )
        holder, offer = await offer_for(http, url, agents, cid)
        accepted = await decide(http, url, holder, offer, "accept")
        moved = await transfer(http, url, holder, cid, TRANSFER_QUEUE)
        print(f"  {holder.name} accepts Diego ({accepted}), transfers to {TRANSFER_QUEUE}: {moved}")
        second, offer = await offer_for(http, url, agents, cid)
        accepted = await decide(http, url, second, offer, "accept")
        print(f"  the offer in {TRANSFER_QUEUE} goes to {second.name}, who accepts: {accepted}")
        print(f"  {second.name} ends the conversation: {await close(http, url, second, cid)}")

        cid = await _arrives(customers, customer(3, "Elisa", "Cadê o meu pedido 999?", "rescue"))
        holder, offer = await offer_for(http, url, agents, cid)
        print(f"  {holder.name} accepts Elisa: {await decide(http, url, holder, offer, 'accept')}")
        removed = await remove_as_supervisor(customers.store, holder, SUPERVISOR)
        print(
            f"  {SUPERVISOR} removes {holder.name}, who holds Elisa: "
            + ("removed (offers ended, conversations requeued)" if removed else "no such agent")
        )
        rest = [a for a in agents if a is not holder]
        second, offer = await offer_for(http, url, rest, cid)
        accepted = await decide(http, url, second, offer, "accept")
        print(f"  back in its queue, the offer goes to {second.name}, who accepts: {accepted}")
        print(f"  {second.name} ends the conversation: {await close(http, url, second, cid)}")
    except (TimeoutError, aiohttp.ClientError) as exc:
        customers.outcome.problems.append(
            f"the routing scenarios stopped: {type(exc).__name__} {exc}".rstrip()
        )
    return rest


async def _bot(customers: Customers, agents: list[DemoAgent], run: str, config: Config) -> None:
    """A customer of the bot's number talks to the FAQ bot (each message answered before
    the next), asks for a person, and an agent takes the conversation it hands over."""
    numbers = bot_numbers(config)
    if not numbers:
        customers.outcome.problems.append("bot: no number of the demo configuration has a bot")
        return
    pool = await customers.store.pool()
    sender = f"whatsapp:+55419770{4}{run}"
    print(
        f"\nA bot before the agents ({numbers[0]}: examples/faq_bot.py over Rasa's REST channel):"
    )
    try:
        for body in ("Oi, meu pedido não chegou", "É o 40917", "quero falar com alguém"):
            [sid] = await customers.write(Step("Helena", sender, numbers[0], body, scenario="bot"))
            await answered(pool, sid)
        cid = await customers.conversation(sid)  # handed over: offer_for waits for the offer
        http, url = customers.http, customers.router_url
        holder, offer = await offer_for(http, url, agents, cid)
        accepted = await decide(http, url, holder, offer, "accept")
        print(f"  handed to the agents; the offer goes to {holder.name}, who accepts: {accepted}")
        print(f"  {holder.name} ends the conversation: {await close(http, url, holder, cid)}")
        other = f"whatsapp:+55419770{5}{run}"
        for body in ("Qual o horário de vocês?", "Obrigado, tchau!"):
            step = Step("Igor", other, numbers[0], body, scenario="bot-resolved")
            [sid] = await customers.write(step)
            await answered(pool, sid)
    except (TimeoutError, aiohttp.ClientError) as exc:
        customers.outcome.problems.append(f"the bot scenario stopped: {type(exc).__name__} {exc}")


@dataclass(frozen=True)
class History:
    """One conversation's routing, read back from PostgreSQL."""

    customer: str
    queue: str
    priority: int
    offers: list[tuple[str, str]]  # (agent, offer state), oldest first
    holders: list[str]  # the agents it was assigned to, in order
    events: list[dict[str, Any]]  # its events in the outbox

    def data(self, kind: str) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events if e["type"] == kind]

    def trail(self, start: int = 0) -> str:
        return ", ".join(f"{a} ({state})" for a, state in self.offers[start:]) or "nobody"


async def _history(pool: Any, conversation_id: str) -> History:
    row = await pool.fetchrow(
        "SELECT ct.profile_name, c.customer, c.queue, c.priority FROM conversations c"
        " JOIN contacts ct ON ct.id = c.contact_id WHERE c.id = $1",
        conversation_id,
    )
    offers = await pool.fetch(
        "SELECT a.name, o.state FROM offers o JOIN agents a ON a.id = o.agent_id"
        " WHERE o.conversation_id = $1 ORDER BY o.created_at, o.id",
        conversation_id,
    )
    holders = await pool.fetch(
        "SELECT a.name FROM assignments s JOIN agents a ON a.id = s.agent_id"
        " WHERE s.conversation_id = $1 ORDER BY s.assigned_at, s.id",
        conversation_id,
    )
    events = await pool.fetch(
        "SELECT body FROM outbox WHERE body->>'conversation_id' = $1 ORDER BY created_at",
        conversation_id,
    )
    return History(
        customer=row["profile_name"] or row["customer"],
        queue=row["queue"],
        priority=row["priority"],
        offers=[(r["name"], r["state"]) for r in offers],
        holders=[r["name"] for r in holders],
        events=[r["body"] for r in events],
    )


def _decline(h: History) -> tuple[bool, str]:
    """The first agent offered it declined; the next one took it."""
    ok = (
        len(h.offers) >= 2
        and h.offers[0][1] == "declined"
        and h.holders == [h.offers[-1][0]]
        and h.holders[0] != h.offers[0][0]
    )
    served = ", ".join(h.holders) or "nobody"
    return ok, f"decline: {h.customer}'s conversation offered to {h.trail()}; served by {served}"


def _transfer(h: History) -> tuple[bool, str]:
    """The agent who took it moved it to another queue; it went to someone else there."""
    moves = h.data("conversation.transferred")
    accepted = next((i for i, (_, state) in enumerate(h.offers) if state == "accepted"), None)
    if not moves or not h.holders or accepted is None:
        return False, f"transfer: {h.customer} was not transferred (offers: {h.trail()})"
    first, move = h.holders[0], moves[0]
    again = [a for a, _ in h.offers[accepted + 1 :]]
    ok = move["to_queue"] == h.queue and first not in again and h.holders[-1] != first
    return ok, (
        f"transfer: {first} took {h.customer} in {move['from_queue']} and moved it to"
        f" {move['to_queue']}; there it was offered to {h.trail(accepted + 1)}; served by"
        f" {h.holders[-1]}; offered back to {first}: {'yes' if first in again else 'no'}"
    )


def _overflow(hs: list[History], config: Config, counted: int) -> tuple[bool, str]:
    """Customers arriving one after another into a small queue: those beyond its
    ``max_waiting`` overflowed where its rule says."""
    queue = next((q for q in config.queues if q.overflow and q.overflow.max_waiting), None)
    if queue is None or queue.overflow is None or queue.overflow.max_waiting is None:
        return False, "overflow: no queue of the demo configuration has overflow max_waiting"
    rule = queue.overflow
    assert rule.max_waiting is not None
    parts, spilled = [], []
    for h in hs:
        spill = h.data("conversation.overflowed")
        spilled.append(bool(spill) and spill[0]["to_queue"] == rule.queue == h.queue)
        if spill:
            e = spill[0]
            parts.append(
                f"{h.customer} found {e['waiting']} waiting ({e['condition']}):"
                f" {e['action']} to {e['to_queue']}"
            )
        else:
            parts.append(f"{h.customer} waited in {h.queue}")
    kept = min(len(hs), rule.max_waiting + 1)
    # The demo promises an overflow: a burst no bigger than the queue's limit shows none.
    ok = len(hs) > kept and spilled == [False] * kept + [True] * (len(hs) - kept)
    ok = ok and all(h.queue == queue.name for h in hs[:kept])
    return ok, (
        f"overflow: {len(hs)} urgent customers one after another into {queue.name}"
        f" (max_waiting {rule.max_waiting}, then {rule.action} to {rule.queue}): "
        + "; ".join(parts)
        + f" — conversation.overflowed ×{counted} on the exchange"
    )


def _rescue(h: History, audits: list[dict[str, Any]]) -> tuple[bool, str]:
    """Its agent was removed by a supervisor: back in its queue ahead of others, then
    another agent took it."""
    moves = [m for m in h.data("conversation.transferred") if m.get("reason") == "agent_removed"]
    classified = h.data("conversation.classified")
    if not moves or not h.holders or not classified:
        return False, f"rescue: {h.customer} was not moved off a removed agent"
    move = moves[0]
    audit = next((a for a in audits if a.get("agent_id") == move["from_agent"]), None)
    before = classified[0]["priority"]
    ok = (
        audit is not None
        and audit["action"] == "remove_agent"
        and len(h.holders) == 2
        and h.holders[1] != h.holders[0]
        and h.priority == before + 1
    )
    who = f"{audit['actor']} (supervisor.acted {audit['action']})" if audit else "? (no audit)"
    return ok, (
        f"rescue: {h.holders[0]} held {h.customer} and was removed by {who}; back in"
        f" {move['to_queue']} at priority {h.priority} (was {before}), offered to"
        f" {h.trail(1)}; served by {h.holders[-1]}"
    )


async def _routing_report(pool: Any, outcome: Outcome, config: Config) -> None:
    """One line per routing scenario, from the offers, assignments and outbox; a scenario
    that did not happen as it says is a problem."""
    histories: dict[str, list[History]] = {}
    for scenario, sids in outcome.scenarios.items():
        for sid in sids:
            cid = await pool.fetchval(
                "SELECT conversation_id FROM messages WHERE twilio_sid = $1", sid
            )
            if cid is not None:
                histories.setdefault(scenario, []).append(await _history(pool, str(cid)))
    audits = [
        r["body"]["data"]
        for r in await pool.fetch("SELECT body FROM outbox WHERE routing_key = 'supervisor.acted'")
    ]
    counted = outcome.events.get("conversation.overflowed", 0)
    bot_texts = [
        r["body"]
        for r in await pool.fetch(
            "SELECT body FROM messages WHERE origin = 'bot' AND conversation_id IN"
            " (SELECT conversation_id FROM messages WHERE twilio_sid = ANY($1::text[]))"
            " ORDER BY id",
            outcome.scenarios.get("bot", []),
        )
    ]
    checks: dict[str, Any] = {
        "overflow": lambda hs: _overflow(hs, config, counted),
        "decline": lambda hs: _decline(hs[0]),
        "transfer": lambda hs: _transfer(hs[0]),
        "rescue": lambda hs: _rescue(hs[0], audits),
        "bot": lambda hs: check_bot(hs[0].customer, hs[0].events, hs[0].holders, bot_texts),
        "bot-resolved": lambda hs: check_resolved(hs[0].customer, hs[0].events, hs[0].offers),
    }
    print("\nRouting scenarios (read back from offers, assignments and the outbox):")
    for scenario, check in checks.items():
        found = histories.get(scenario)
        ok, line = check(found) if found else (False, f"{scenario}: did not run")
        print(f"  {'✓' if ok else '✗'} {line}")
        if not ok:
            outcome.problems.append(f"routing scenario not as described — {line}")


async def _console(
    settings: Settings, config: Config, router_url: str, emulator_url: str, account: Account
) -> None:
    store = Store(settings.database_url.get_secret_value(), max_size=1)
    try:
        agent_token = await console_agent(store, config)
    finally:
        await store.close()
    assert settings.admin_token is not None
    print_console(
        router_url,
        agent_token,
        settings.admin_token.get_secret_value(),
        customer_command(emulator_url, router_url, account),
    )


async def _until_interrupted() -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
