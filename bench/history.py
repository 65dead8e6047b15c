"""A year of closed history in a migrated database, seeded with COPY: what a deployment's
database looks like on day 100 (or 365), for benchmarks that must show the hot paths cost
the same with it as on an empty database.

``seed_history`` writes, for ``conversations`` closed conversations spread over the last
365 days of one tenant (the account, number, workstream and queue the benchmarks configure):

* contacts — returning customers, about three conversations each — and their affinity row
  in ``contact_agents``: the agent and time of their latest assignment (as
  ``omniroute.domain.conversation.assign`` keeps it);
* agents — the ones already there (a benchmark's), or ``agents`` offline ones;
* per conversation: three messages (inbound, the agent's outbound answer, the customer's
  reply; Twilio sids, final statuses), one accepted offer, one released assignment, two
  fired timers, one published outbox event (``conversation.closed``) and, for a quarter of
  them, an answered survey.

Outbox rows carry ``txid`` 1 (below any real transaction id) and the watermark is moved over
them, so the relay treats them as published. Their ``created_at`` lies within the last
``outbox_within`` seconds (default 30 minutes, inside the default one-hour retention): in
steady state the pruner keeps only the retention's worth of the log, so older rows would not
be there, and rows stamped a year ago would make a benchmark measure the pruner catching up.

Rows are generated in Python in chunks of ``chunk`` conversations and written with
``copy_records_to_table``. When the role may (a superuser), the session runs with
``session_replication_role = replica``, like ``pg_restore --disable-triggers``: the foreign
keys' per-row triggers and the outbox NOTIFY trigger do not fire (the rows are consistent
by construction). Every table is then ``VACUUM ANALYZE``d — autovacuum may be off (it is on
the benchmark server), and a freshly copied table has neither statistics nor a visibility
map — and a ``CHECKPOINT`` keeps the seeding's dirty pages out of the measurement.

``python -m bench.history --database-url URL --conversations N`` seeds a database (migrated
first) for operators.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

# The tenant the benchmarks configure (bench/deployment.py): account "bench" (the account's
# name in the configuration is what conversations store; its Twilio SID is in the form),
# number +5511999990000, workstream "main", queue "general".
ACCOUNT = "bench"
ACCOUNT_SID = "AC0000000000000000000000000000000e"
BUSINESS_NUMBER = "+5511999990000"
WORKSTREAM = "main"
QUEUES = ["general"]
# History customers: +55 21 9xxxx-xxxx, never one of the +55 11 9… customers the benchmarks
# send as new conversations (a returning customer takes other code paths).
CUSTOMER_PREFIX = "+55219"
YEAR = 365 * 86400.0

NAMES = ("Maria", "João", "Ana", "Pedro", "Juliana", "Carlos", "Fernanda", "Lucas", "Beatriz")
QUESTIONS = (
    "Olá, meu pedido não chegou",
    "Quero trocar o tamanho da camiseta",
    "Qual o prazo de entrega para Niterói?",
    "O boleto venceu, podem mandar outro?",
    "Preciso cancelar a assinatura",
)
ANSWERS = (
    "Olá! Vou verificar o seu pedido, um momento.",
    "Claro, já gerei a etiqueta de troca.",
    "O prazo é de 3 dias úteis.",
    "Segue o novo boleto no link.",
)
REPLIES = ("Obrigado!", "Ok, aguardo", "Perfeito, valeu", "👍")
CLASSIFICATION = '{"rule": null, "queue": "general", "fallback": true, "language": "pt-BR"}'

CONVERSATION_COLUMNS = [
    "id",
    "account",
    "business_number",
    "customer",
    "contact_id",
    "workstream",
    "state",
    "opened_at",
    "closed_at",
    "last_customer_message_at",
    "updated_at",
    "queue",
    "language",
    "classification",
    "classified_at",
    "queued_at",
    "close_reason",
    "agent_id",
    "units",
    "assigned_at",
]
MESSAGE_COLUMNS = [
    "id",
    "conversation_id",
    "direction",
    "twilio_sid",
    "body",
    "attributes",
    "status",
    "status_history",
    "received_at",
    "created_at",
    "updated_at",
    "agent_id",
    "attempts",
]
CONTACT_COLUMNS = ["id", "account", "address", "wa_id", "profile_name", "created_at", "updated_at"]
CONTACT_AGENT_COLUMNS = ["contact_id", "agent_id", "assigned_at"]
OFFER_COLUMNS = [
    "id",
    "conversation_id",
    "agent_id",
    "units",
    "state",
    "created_at",
    "expires_at",
    "decided_at",
]
ASSIGNMENT_COLUMNS = ["id", "conversation_id", "agent_id", "units", "assigned_at", "released_at"]
TIMER_COLUMNS = ["id", "conversation_id", "kind", "due_at", "fired_at"]
OUTBOX_COLUMNS = ["id", "routing_key", "body", "created_at", "published_at", "txid"]
SURVEY_COLUMNS = [
    "conversation_id",
    "account",
    "business_number",
    "customer",
    "workstream",
    "asked_at",
    "expires_at",
    "rating",
    "comment",
    "answered_at",
]
# Parents before children (foreign keys, when their triggers do fire).
TABLES = ("conversations", "messages", "offers", "assignments", "timers", "outbox", "surveys")
COLUMNS = {
    "conversations": CONVERSATION_COLUMNS,
    "messages": MESSAGE_COLUMNS,
    "offers": OFFER_COLUMNS,
    "assignments": ASSIGNMENT_COLUMNS,
    "timers": TIMER_COLUMNS,
    "outbox": OUTBOX_COLUMNS,
    "surveys": SURVEY_COLUMNS,
}
Row = tuple[Any, ...]
SLICE = 50_000  # rows per COPY statement


def _ids(n: int) -> list[str]:
    """``n`` random 128-bit ids as hex (PostgreSQL takes them as uuid)."""
    text = os.urandom(16 * n).hex()
    return [text[i : i + 32] for i in range(0, 32 * n, 32)]


def _dashed(h: str) -> str:
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass
class _Plan:
    """The shape of the whole history, decided up front: which contact and agent each
    conversation has and when it opened (in time order), so contacts can be written first
    with their latest agent."""

    now: datetime
    agents: list[str]
    queues: list[str]
    offsets: list[float]  # seconds after ``start`` each conversation opened, ascending
    contact_of: list[int]
    agent_of: list[int]
    contact_ids: list[str]
    addresses: list[str]
    outbox_within: float
    rng: random.Random
    start: datetime = field(init=False)
    # Per contact: its latest assignment so far (agent, when), filled as chunks are made.
    latest: dict[int, tuple[str, datetime]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.start = self.now - timedelta(days=365)


def _plan(
    conversations: int,
    agents: list[str],
    queues: list[str],
    now: datetime,
    first_contact: int,
    outbox_within: float,
    seed: int | None,
) -> _Plan:
    rng = random.Random(seed)
    contacts = max(1, conversations // 3) if conversations else 0
    # Every contact has at least one conversation; the rest come back at random.
    contact_of = list(range(contacts))[:conversations]
    contact_of += [rng.randrange(contacts) for _ in range(conversations - len(contact_of))]
    rng.shuffle(contact_of)
    # Opened within the year, ending a day ago (so every close lies in the past).
    span = YEAR - 86400.0
    offsets = sorted(rng.random() * span for _ in range(conversations))
    agent_of = [rng.randrange(len(agents)) for _ in range(conversations)]
    addresses = [f"{CUSTOMER_PREFIX}{first_contact + n:08d}" for n in range(contacts)]
    return _Plan(
        now=now,
        agents=agents,
        queues=queues,
        offsets=offsets,
        contact_of=contact_of,
        agent_of=agent_of,
        contact_ids=_ids(contacts),
        addresses=addresses,
        outbox_within=outbox_within,
        rng=rng,
    )


def _contacts(plan: _Plan) -> list[Row]:
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for offset, contact in zip(plan.offsets, plan.contact_of, strict=True):
        first.setdefault(contact, offset)
        last[contact] = offset  # ascending offsets: the latest wins
    rows: list[Row] = []
    for n, (cid, address) in enumerate(zip(plan.contact_ids, plan.addresses, strict=True)):
        rows.append(
            (
                cid,
                ACCOUNT,
                address,
                address[1:],
                NAMES[n % len(NAMES)],
                plan.start + timedelta(seconds=first[n]),
                plan.start + timedelta(seconds=last[n] + 3600.0),
            )
        )
    return rows


def _contact_agents(plan: _Plan) -> list[Row]:
    return [(plan.contact_ids[contact], agent, at) for contact, (agent, at) in plan.latest.items()]


def _chunk(plan: _Plan, lo: int, hi: int, total: int) -> dict[str, list[Row]]:
    """Every row of conversations ``lo``…``hi - 1``, table by table."""
    n = hi - lo
    rng = plan.rng
    ids = _ids(n * 12)  # conversation, 3 messages, offer, assignment, 2 timers, outbox, 3 sids
    out: dict[str, list[Row]] = {table: [] for table in TABLES}
    conversations, messages = out["conversations"], out["messages"]
    offers, assignments, timers = out["offers"], out["assignments"], out["timers"]
    outbox, surveys = out["outbox"], out["surveys"]
    second = timedelta(seconds=1)
    outbox_step = plan.outbox_within / max(total, 1)
    outbox_origin = plan.now - timedelta(seconds=plan.outbox_within)
    for k in range(n):
        i = lo + k
        base = 12 * k
        cid = ids[base]
        contact = plan.contact_of[i]
        customer = plan.addresses[contact]
        agent = plan.agents[plan.agent_of[i]]
        queue = plan.queues[i % len(plan.queues)]
        opened = plan.start + timedelta(seconds=plan.offsets[i])
        classified = opened + 0.2 * second
        queued = opened + 0.3 * second
        offered = queued + (0.5 + rng.random() * 30) * second
        assigned = offered + (1 + rng.random() * 20) * second
        answered = assigned + (20 + rng.random() * 280) * second
        replied = answered + (20 + rng.random() * 600) * second
        idle_due = replied + 1800 * second
        by_agent = rng.random() < 0.6
        if by_agent:
            closed = replied + (60 + rng.random() * 900) * second
            reason, second_timer = "agent", "wrap_up_end"
        else:
            closed = replied + 3600 * second
            reason, second_timer = "idle", "auto_close"
        sid_in, sid_out, sid_reply = (
            "SM" + ids[base + 9],
            "SM" + ids[base + 10],
            "SM" + ids[base + 11],
        )
        question = QUESTIONS[i % len(QUESTIONS)]
        name = NAMES[contact % len(NAMES)]
        conversations.append(
            (
                cid,
                ACCOUNT,
                BUSINESS_NUMBER,
                customer,
                plan.contact_ids[contact],
                WORKSTREAM,
                "closed",
                opened,
                closed,
                replied,
                closed,
                queue,
                "pt-BR",
                CLASSIFICATION,
                classified,
                queued,
                reason,
                agent,
                1,
                assigned,
            )
        )
        form = (
            '{"form": {"MessageSid": "'
            + sid_in
            + '", "AccountSid": "'
            + ACCOUNT_SID
            + '", "From": "whatsapp:'
            + customer
            + '", "To": "whatsapp:'
            + BUSINESS_NUMBER
            + '", "Body": "'
            + question
            + '", "ProfileName": "'
            + name
            + '", "NumMedia": "0", "MessageType": "text"}, "message_type": "text"}'
        )
        read = rng.random() < 0.7
        status = "read" if read else "delivered"
        history = (
            '[{"status": "sent", "error_code": null, "received_at": "'
            + (answered + second).isoformat()
            + '"}, {"status": "delivered", "error_code": null, "received_at": "'
            + (answered + 2 * second).isoformat()
            + '"}'
            + (
                ', {"status": "read", "error_code": null, "received_at": "'
                + (answered + 9 * second).isoformat()
                + '"}]'
                if read
                else "]"
            )
        )
        messages.append(
            (ids[base + 1], cid, "inbound", sid_in, question, form, "received", "[]",
             opened, opened, opened, None, 0)
        )  # fmt: skip
        messages.append(
            (ids[base + 2], cid, "outbound", sid_out, ANSWERS[i % len(ANSWERS)], "{}", status,
             history, answered, answered, answered + 9 * second, agent, 1)
        )  # fmt: skip
        messages.append(
            (ids[base + 3], cid, "inbound", sid_reply, REPLIES[i % len(REPLIES)],
             '{"form": {"MessageSid": "' + sid_reply + '"}, "message_type": "text"}',
             "received", "[]", replied, replied, replied, None, 0)
        )  # fmt: skip
        offers.append(
            (ids[base + 4], cid, agent, 1, "accepted", offered, offered + 30 * second, assigned)
        )
        assignments.append((ids[base + 5], cid, agent, 1, assigned, closed))
        plan.latest[contact] = (agent, assigned)  # time order: the latest wins
        timers.append((ids[base + 6], cid, "idle_reminder", idle_due, idle_due))
        timers.append((ids[base + 7], cid, second_timer, closed, closed))
        event = ids[base + 8]
        stamped = outbox_origin + timedelta(seconds=i * outbox_step)
        outbox.append(
            (
                event,
                "conversation.closed",
                '{"id": "' + _dashed(event) + '", "type": "conversation.closed", "version": 1,'
                ' "occurred_at": "'
                + closed.isoformat()
                + '", "account": "'
                + ACCOUNT
                + '", "conversation_id": "'
                + _dashed(cid)
                + '", "correlation_id": "'
                + _dashed(event)
                + '", "causation_id": null, "data": {"reason": "'
                + reason
                + '", "workstream": "'
                + WORKSTREAM
                + '", "automated_message": null,'
                ' "closed_at": "' + closed.isoformat() + '"}}',
                stamped,
                stamped,
                1,
            )
        )
        if i % 4 == 0:
            surveys.append(
                (cid, ACCOUNT, BUSINESS_NUMBER, customer, WORKSTREAM, closed,
                 closed + 86400 * second, 1 + i % 5, "", closed + 120 * second)
            )  # fmt: skip
    return out


async def _agents(conn: asyncpg.Connection[Any], count: int, queues: list[str]) -> list[str]:
    """The agents there are (a benchmark's), or ``count`` new offline ones."""
    rows = await conn.fetch(
        "SELECT id::text FROM agents WHERE deleted_at IS NULL ORDER BY created_at, id"
    )
    if rows:
        return [r["id"] for r in rows]
    ids = _ids(count)
    await conn.copy_records_to_table(
        "agents",
        records=[
            (aid, f"history agent {n}", queues, 5, "offline", os.urandom(16).hex())
            for n, aid in enumerate(ids)
        ],
        columns=["id", "name", "queues", "capacity_units", "presence", "token_hash"],
    )
    return ids


async def _session(conn: asyncpg.Connection[Any]) -> bool:
    """Faster loading for this session; True if triggers are off (needs a superuser)."""
    await conn.execute("SET synchronous_commit = off")
    try:
        await conn.execute("SET session_replication_role = replica")
    except asyncpg.InsufficientPrivilegeError:
        return False
    return True


async def _watermark(conn: asyncpg.Connection[Any]) -> None:
    """Move the relay's watermark over the seeded rows (txid 1), never back."""
    last = await conn.fetchval("SELECT max(seq) FROM outbox WHERE txid = '1'::xid8")
    if last is not None:
        await conn.execute(
            "UPDATE outbox_watermark SET txid = '1'::xid8, seq = $1"
            " WHERE (txid, seq) < ('1'::xid8, $1::bigint)",
            last,
        )


def _in_chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, total, size):
        yield lo, min(total, lo + size)


async def seed_history(
    database_url: str,
    conversations: int,
    *,
    agents: int = 50,
    queues: list[str] | None = None,
    now: datetime | None = None,
    chunk: int = 50_000,
    outbox_within: float = 1800.0,
    vacuum: bool = True,
    seed: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """Fill a migrated database with ``conversations`` closed conversations and what they
    left behind (see the module's docstring); the rows written, per table."""
    if conversations < 0 or agents < 1:
        raise ValueError("conversations must be >= 0 and agents >= 1")
    queues = queues or QUEUES
    now = now or datetime.now(UTC)
    say = progress or (lambda _: None)
    conn = await asyncpg.connect(database_url)
    try:
        triggers_off = await _session(conn)
        agent_ids = await _agents(conn, agents, queues)
        first_contact = await conn.fetchval(
            "SELECT count(*) FROM contacts WHERE account = $1 AND address LIKE $2",
            ACCOUNT,
            CUSTOMER_PREFIX + "%",
        )
        plan = _plan(conversations, agent_ids, queues, now, first_contact, outbox_within, seed)
        counts = dict.fromkeys(("contacts", *TABLES), 0)
        counts["agents"] = len(agent_ids)
        contacts = _contacts(plan)
        await conn.copy_records_to_table("contacts", records=contacts, columns=CONTACT_COLUMNS)
        counts["contacts"] = len(contacts)
        del contacts
        await _copy_chunks(database_url, plan, conversations, chunk, counts, triggers_off, say)
        affinity = _contact_agents(plan)
        await conn.copy_records_to_table(
            "contact_agents", records=affinity, columns=CONTACT_AGENT_COLUMNS
        )
        counts["contact_agents"] = len(affinity)
        await _watermark(conn)
        await conn.execute("RESET session_replication_role")
        if vacuum:
            say("VACUUM ANALYZE (autovacuum may be off: the seeded tables are vacuumed here)")
            await vacuum_analyze(conn)
        counts["triggers_off"] = int(triggers_off)
        return counts
    finally:
        await conn.close()


async def _copy_chunks(
    database_url: str,
    plan: _Plan,
    total: int,
    size: int,
    counts: dict[str, int],
    triggers_off: bool,
    say: Callable[[str], None],
    workers: int = 3,
) -> None:
    """Generate chunk k + 1 in a thread while chunk k is copied, table by table on
    connections of their own (both cores busy: PostgreSQL's backends and Python)."""
    started = time.perf_counter()
    chunks = list(_in_chunks(total, size))
    if not chunks:
        return
    # Connections of their own, set up like the first (no pool: its reset would undo
    # session_replication_role); big tables are cut so that several backends share them.
    conns = [await asyncpg.connect(database_url) for _ in range(workers)]
    try:
        for conn in conns:
            await _session(conn)

        async def copy(jobs: list[tuple[str, list[Row]]]) -> None:
            async def work(conn: asyncpg.Connection[Any]) -> None:
                while jobs:
                    table, rows = jobs.pop()
                    await conn.copy_records_to_table(table, records=rows, columns=COLUMNS[table])
                    counts[table] += len(rows)

            await asyncio.gather(*(work(conn) for conn in conns))

        ahead = asyncio.ensure_future(asyncio.to_thread(_chunk, plan, *chunks[0], total))
        for n, (_, hi) in enumerate(chunks):
            rows = await ahead
            if n + 1 < len(chunks):
                following = chunks[n + 1]
                ahead = asyncio.ensure_future(asyncio.to_thread(_chunk, plan, *following, total))
            children: tuple[str, ...] = TABLES
            if not triggers_off:  # foreign keys checked: parents committed first
                await copy([("conversations", rows["conversations"])])
                children = TABLES[1:]
            await copy(
                [
                    (table, rows[table][lo : lo + SLICE])
                    for table in reversed(children)
                    for lo in range(0, len(rows[table]), SLICE)
                ]
            )
            say(f"{hi} of {total} conversations, {time.perf_counter() - started:.0f} s")
    finally:
        for conn in conns:
            await conn.close()


async def vacuum_analyze(conn: asyncpg.Connection[Any], tables: Sequence[str] = ()) -> None:
    """``VACUUM ANALYZE`` every table (or those named), then a checkpoint if permitted."""
    if tables:
        for table in tables:
            await conn.execute(f'VACUUM ANALYZE "{table}"')
    else:
        await conn.execute("VACUUM ANALYZE")
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await conn.execute("CHECKPOINT")


async def _main(args: argparse.Namespace) -> None:
    from omniroute.infra.store import migrate

    await migrate(args.database_url)
    started = time.perf_counter()
    counts = await seed_history(
        args.database_url,
        args.conversations,
        agents=args.agents,
        queues=args.queues or None,
        chunk=args.chunk,
        vacuum=not args.no_vacuum,
        progress=lambda line: print(f"  {line}", flush=True),
    )
    elapsed = time.perf_counter() - started
    triggers = "off (session_replication_role = replica)" if counts.pop("triggers_off") else "on"
    print(f"seeded in {elapsed:.0f} s (triggers {triggers}; every table VACUUM ANALYZEd):")
    for table, count in counts.items():
        print(f"  {table:<14} {count:>12,}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m bench.history",
        description="Seed a (migrated) omniroute database with a year of closed history.",
    )
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--conversations", type=int, required=True)
    parser.add_argument("--agents", type=int, default=50, help="if the database has none")
    parser.add_argument("--queues", nargs="*", default=[], help="default: general")
    parser.add_argument("--chunk", type=int, default=50_000, help="conversations per COPY")
    parser.add_argument("--no-vacuum", action="store_true", help="skip VACUUM ANALYZE")
    asyncio.run(_main(parser.parse_args()))
