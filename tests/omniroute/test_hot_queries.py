"""Day 100: the hot statements are index-driven on a database with a history behind it.

Not a timing: each statement's plan is read with ``EXPLAIN (FORMAT JSON)`` on a private
database seeded (COPY) with a year of closed conversations and what they left behind
(contacts, messages, accepted offers, released assignments, fired timers, published outbox
rows below the watermark) plus a live part (queued conversations in three queues, agents with
free room, pending offers and timers, unpublished outbox rows). The seeded tables are
``VACUUM ANALYZE``d: autovacuum may be off on the test server, and a table without
statistics is planned from guesses.

Every statement is explained twice (``mode``):

* ``custom``: ``EXPLAIN`` with the parameters bound, so the planner sees their values — the
  plan of asyncpg's first executions of a prepared statement;
* ``generic``: ``PREPARE`` + ``EXPLAIN EXECUTE`` under ``plan_cache_mode =
  force_generic_plan`` — the plan PostgreSQL may switch to after five executions of the same
  prepared statement (asyncpg keeps its statements prepared), planned without the values.

Either may be what the application runs, so neither may read a large table sequentially, and
each statement must go through the index it was written for.

There is no "day 1" variant (the live part alone): with a few hundred rows per table the
planner rightly prefers sequential scans and hash joins (ITEMS hash-joins a seq scan of
``contact_agents``, TAKE_DUE and FIRED_GUARD seq-scan ``timers``, TAIL and PRUNE ``outbox``), so the
plans do not keep their shape there, and that costs nothing. What must hold is the shape once
the history is there.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
import pytest

from consumers import bot, classify, distribute, lifecycle, outbound, overflow
from omniroute.domain import conversation, queue_view, timers
from omniroute.infra import outbox
from omniroute.infra.database import create_database, drop_database
from omniroute.infra.store import migrate
from router import agent_events

BASE_DB = os.environ.get("OMNIROUTE_TEST_DATABASE_BASE", "postgresql://127.0.0.1:5432")

HISTORY = 50_000  # closed conversations
HISTORY_CONTACTS = 20_000  # returning customers: 2.5 conversations each
QUEUES = ("general", "billing", "vip")
ACCOUNT = "acme"
NUMBERS = ("+5511999990000", "+5511999990001")
WORKSTREAMS = ("support", "sales", "concierge")  # concierge: pick mode (ITEMS' $3)

# Tables that grow with history: a sequential scan there costs what the history costs.
# ``agents`` is small for good (the people of one deployment): a seq scan there is fine.
BIG = frozenset(
    {
        "conversations",
        "messages",
        "assignments",
        "timers",
        "outbox",
        "offers",
        "contacts",
        "contact_agents",
        "bot_turns",
    }
)

Row = tuple[Any, ...]
Scan = tuple[str, str | None, str | None]  # node type, relation, index


# --- the plan --------------------------------------------------------------------------------


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


def _scans(plan: Any) -> list[Scan]:
    """Every node of an ``EXPLAIN (FORMAT JSON)`` plan that reads a relation or an index,
    in tree order (subplans and init plans included): (node type, relation, index).
    A ``Bitmap Index Scan`` names only its index; its ``Bitmap Heap Scan`` the relation."""
    if isinstance(plan, str):
        plan = json.loads(plan)
    root = plan[0]["Plan"] if isinstance(plan, list) else plan["Plan"]
    return [
        (node["Node Type"], node.get("Relation Name"), node.get("Index Name"))
        for node in _nodes(root)
        if "Relation Name" in node or "Index Name" in node
    ]


def _indexes(scans: list[Scan]) -> set[str]:
    return {index for _, _, index in scans if index is not None}


def _big_seq_scans(scans: list[Scan]) -> list[Scan]:
    return [s for s in scans if s[0] == "Seq Scan" and s[1] in BIG]


# --- the seeded database ---------------------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    dsn: str
    now: datetime
    queued: list[asyncpg.Record]  # id, queue, priority, queued_at of the live queue
    active: str  # a live (assigned) conversation
    closed: str  # a conversation of the history
    returning: tuple[str, str]  # business number, address of a customer of the history
    watermark: tuple[int, int]


def _uuids(n: int) -> list[uuid.UUID]:
    raw = os.urandom(16 * n)
    return [uuid.UUID(bytes=raw[i : i + 16]) for i in range(0, 16 * n, 16)]


async def _copy(conn: asyncpg.Connection[Any], table: str, columns: str, rows: list[Row]) -> None:
    if rows:
        await conn.copy_records_to_table(table, records=rows, columns=columns.split())


def _agents(now: datetime) -> list[Row]:
    """40 agents: 15 available with room, 10 available and full, 13 away or offline, two
    deleted."""
    rows: list[Row] = []
    for n, aid in enumerate(_uuids(40)):
        queues = [QUEUES[n % 3], QUEUES[(n + 1) % 3]] if n % 4 else list(QUEUES)
        if n < 15:
            presence, used = "available", n % 4
        elif n < 25:
            presence, used = "available", 4
        else:
            presence, used = ("away" if n % 2 else "offline"), 0
        deleted = now - timedelta(days=30) if n >= 38 else None
        rows.append(
            (aid, f"agent {n}", queues, 4, used, presence, uuid.uuid4().hex,
             now - timedelta(days=400), now - timedelta(minutes=n), deleted)
        )  # fmt: skip
    return rows


AGENT_COLUMNS = (
    "id name queues capacity_units used_units presence token_hash created_at"
    " last_assigned_at deleted_at"
)
CONTACT_COLUMNS = "id account address wa_id profile_name created_at updated_at"
CONTACT_AGENT_COLUMNS = "contact_id agent_id assigned_at"
CONVERSATION_COLUMNS = (
    "id account business_number customer contact_id workstream state opened_at closed_at"
    " last_customer_message_at updated_at queue priority classified_at queued_at close_reason"
    " agent_id assigned_at"
)
MESSAGE_COLUMNS = "id conversation_id direction twilio_sid body status received_at agent_id"
OFFER_COLUMNS = "id conversation_id agent_id units state created_at expires_at decided_at"
ASSIGNMENT_COLUMNS = "id conversation_id agent_id units assigned_at released_at"
TIMER_COLUMNS = "id conversation_id kind due_at fired_at"
OUTBOX_COLUMNS = "id routing_key body created_at txid"


@dataclass
class _Tables:
    contacts: list[Row]
    conversations: list[Row]
    messages: list[Row]
    offers: list[Row]
    assignments: list[Row]
    timers: list[Row]
    outbox: list[Row]
    contact_agents: list[Row]

    @classmethod
    def empty(cls) -> _Tables:
        return cls([], [], [], [], [], [], [], [])


def _history(now: datetime, agents: list[uuid.UUID], top_txid: int, rng: random.Random) -> _Tables:
    """``HISTORY`` closed conversations over the last year, two messages, an accepted offer,
    a released assignment and two fired timers each; one published ``conversation.closed``
    per conversation in the outbox, written over the last 61 minutes (the default retention
    is an hour and the pruner runs every minute: about a minute's worth is prunable)."""
    t = _Tables.empty()
    contacts = _uuids(HISTORY_CONTACTS)
    ids = _uuids(HISTORY * 8)
    start = now - timedelta(days=365)
    span = (365 - 1) * 86400.0
    offsets = sorted(rng.random() * span for _ in range(HISTORY))
    last_agent: dict[int, tuple[uuid.UUID, datetime]] = {}
    first_seen: dict[int, datetime] = {}
    s = timedelta(seconds=1)
    outbox_origin = now - 61 * 60 * s
    for i, offset in enumerate(offsets):
        cid, m1, m2, offer, assignment, t1, t2, event = ids[8 * i : 8 * i + 8]
        contact = i if i < HISTORY_CONTACTS else rng.randrange(HISTORY_CONTACTS)
        agent = agents[rng.randrange(len(agents))]
        number = NUMBERS[contact % 2]
        customer = f"+55219{contact:08d}"
        queue = QUEUES[i % 3]
        opened = start + offset * s
        queued = opened + s
        assigned = queued + (5 + rng.random() * 60) * s
        answered = assigned + (30 + rng.random() * 300) * s
        replied = answered + (30 + rng.random() * 600) * s
        closed = replied + 1800 * s
        last_agent[contact] = (agent, assigned)
        first_seen.setdefault(contact, opened)
        t.conversations.append(
            (cid, ACCOUNT, number, customer, contacts[contact], WORKSTREAMS[i % 2], "closed",
             opened, closed, replied, closed, queue, 5 if i % 10 == 0 else 0, opened, queued,
             "idle", agent, assigned)
        )  # fmt: skip
        t.messages.append((m1, cid, "inbound", f"SM{m1.hex}", "Olá", "received", opened, None))
        t.messages.append((m2, cid, "outbound", f"SM{m2.hex}", "Bom dia!", "read", answered, agent))
        t.offers.append((offer, cid, agent, 1, "accepted", queued, queued + 60 * s, assigned))
        t.assignments.append((assignment, cid, agent, 1, assigned, closed))
        t.timers.append((t1, cid, "idle_reminder", replied + 900 * s, replied + 900 * s))
        t.timers.append((t2, cid, "auto_close", closed, closed))
        written = outbox_origin + (61 * 60.0 * i / HISTORY) * s
        body = json.dumps({"id": str(event), "type": "conversation.closed"})
        t.outbox.append(
            (event, "conversation.closed", body, written, 3 + i * (top_txid - 3) // HISTORY)
        )
    for n, contact_id in enumerate(contacts):
        seen = first_seen.get(n, start)
        t.contacts.append(
            (contact_id, ACCOUNT, f"+55219{n:08d}", f"55219{n:08d}", f"Cliente {n}", seen, seen)
        )  # fmt: skip
        if n in last_agent:
            t.contact_agents.append((contact_id, *last_agent[n]))
    return t


def _live(now: datetime, agents: list[Row], returning: list[Row], rng: random.Random) -> _Tables:
    """What is going on right now: 300 queued conversations in three queues (a tenth of them
    returning customers), 30 offered with a pending offer (a few due), 60 assigned, 20 just
    opened and 10 in wrap-up; each with messages and a pending timer (a few due)."""
    t = _Tables.empty()
    available = [row[0] for row in agents if row[5] == "available" and row[9] is None]
    s = timedelta(seconds=1)
    states = ["queued"] * 300 + ["offered"] * 30 + ["active"] * 60 + ["open"] * 20
    states += ["wrap-up"] * 10
    for i, state in enumerate(states):
        cid, m1, timer = _uuids(3)
        if i < len(returning):
            contact = returning[i]
            contact_id, customer = contact[0], contact[2]
        else:
            contact_id, customer = uuid.uuid4(), f"+55119{i:08d}"
            t.contacts.append((contact_id, ACCOUNT, customer, customer[1:], f"Novo {i}", now, now))
        number = NUMBERS[i % 2]
        opened = now - (60 + rng.random() * 3600) * s
        queue, queued = (None, None) if state == "open" else (QUEUES[i % 3], opened + s)
        agent, assigned = None, None
        if state in ("active", "wrap-up"):
            agent, assigned = available[i % len(available)], opened + 30 * s
            t.assignments.append((uuid.uuid4(), cid, agent, 1, assigned, None))
        t.conversations.append(
            (cid, ACCOUNT, number, customer, contact_id, WORKSTREAMS[i % 3], state, opened, None,
             opened, opened, queue, rng.choice((0, 0, 0, 1, 5)), queued, queued, None, agent,
             assigned)
        )  # fmt: skip
        t.messages.append((m1, cid, "inbound", f"SM{m1.hex}", "Oi", "received", opened, None))
        if state == "offered":
            offer_agent = available[i % len(available)]
            expires = now + (rng.random() * 60 - 5) * s
            t.offers.append((uuid.uuid4(), cid, offer_agent, 1, "pending", now, expires, None))
        if state != "queued":
            kind = "wrap_up_end" if state == "wrap-up" else "idle_reminder"
            due = now + (rng.random() * 1800 - 60) * s  # a few due already
            t.timers.append((timer, cid, kind, due, None))
    return t


async def _write(conn: asyncpg.Connection[Any], t: _Tables) -> None:
    await _copy(conn, "contacts", CONTACT_COLUMNS, t.contacts)
    await _copy(conn, "conversations", CONVERSATION_COLUMNS, t.conversations)
    await _copy(conn, "messages", MESSAGE_COLUMNS, t.messages)
    await _copy(conn, "offers", OFFER_COLUMNS, t.offers)
    await _copy(conn, "assignments", ASSIGNMENT_COLUMNS, t.assignments)
    await _copy(conn, "timers", TIMER_COLUMNS, t.timers)
    await _copy(conn, "outbox", OUTBOX_COLUMNS, t.outbox)
    await _copy(conn, "contact_agents", CONTACT_AGENT_COLUMNS, t.contact_agents)


async def _seed(dsn: str) -> Seeded:
    """Seed a migrated database: the history, then the live part; VACUUM ANALYZE."""
    rng = random.Random(100)
    now = datetime.now(UTC)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET synchronous_commit = off")
        # Like ``pg_restore --disable-triggers``: no per-row foreign key checks (the rows are
        # consistent by construction), no outbox NOTIFY. Needs a superuser; slower otherwise.
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SET session_replication_role = replica")
        agent_rows = _agents(now)
        await _copy(conn, "agents", AGENT_COLUMNS, agent_rows)
        agent_ids = [row[0] for row in agent_rows]
        top_txid = int(await conn.fetchval("SELECT pg_current_xact_id()::text::bigint")) - 1
        past = _history(now, agent_ids, top_txid, rng)
        await _write(conn, past)
        # A tenth of the queue are customers of the history coming back.
        live = _live(now, agent_rows, rng.sample(past.contacts, 30), rng)
        await _write(conn, live)
        # The relay has published the history: the watermark is on its last row.
        await conn.execute(
            "UPDATE outbox_watermark SET txid = o.txid, seq = o.seq FROM"
            " (SELECT txid, seq FROM outbox ORDER BY txid DESC, seq DESC LIMIT 1) o"
        )
        # Written since the relay last looked: above the watermark (txid of this transaction).
        await conn.executemany(
            "INSERT INTO outbox (id, routing_key, body) VALUES ($1, 'conversation.queued', '{}')",
            [(i,) for i in _uuids(20)],
        )
        # Every customer's first message of the history had a bot turn (issue 14).
        await conn.execute(
            "INSERT INTO bot_turns (message_id, conversation_id, turn, state, answered_at)"
            " SELECT id, conversation_id, 1, 'answered', received_at FROM messages"
            " WHERE direction = 'inbound'"
        )
        await conn.execute("RESET session_replication_role")
        await conn.execute("VACUUM ANALYZE")
        watermark = await conn.fetchrow("SELECT txid::text::bigint, seq FROM outbox_watermark")
        assert watermark is not None
        queued = await conn.fetch(
            "SELECT id, queue, priority, queued_at FROM conversations WHERE state = 'queued'"
            " ORDER BY queue, priority DESC, queued_at"
        )
        return Seeded(
            dsn=dsn,
            now=now,
            queued=list(queued),
            active=str(await conn.fetchval("SELECT id FROM conversations WHERE state = 'active'")),
            closed=str(past.conversations[-1][0]),
            returning=(NUMBERS[1], past.contacts[-1][2]),
            watermark=(watermark[0], watermark[1]),
        )
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def seeded() -> AsyncIterator[Seeded]:
    """A private migrated database with a year of history and the live part (not the run's
    shared database: 50 000 closed conversations would change what other tests see)."""
    dsn = f"{BASE_DB}/omniroute_test_hot_{uuid.uuid4().hex[:10]}"
    await create_database(dsn)
    try:
        await migrate(dsn)
        yield await _seed(dsn)
    finally:
        await drop_database(dsn)


# --- the statements --------------------------------------------------------------------------


def _schedule_later_only() -> str:
    """The statement ``omniroute.domain.timers.schedule(..., later_only=True)`` sends, captured."""
    sent: list[str] = []

    class Recorder:
        async def execute(self, sql: str, *args: object) -> str:
            sent.append(sql)
            return "INSERT 0 1"

    # Recorder.execute never suspends: one send() runs schedule() to its end.
    running = timers.schedule(
        cast(Any, Recorder()),
        str(uuid.uuid4()),
        "idle_reminder",
        datetime.now(UTC),
        later_only=True,
    )
    with contextlib.suppress(StopIteration):
        running.send(None)
    return sent[0]


@dataclass(frozen=True)
class Case:
    name: str
    sql: str
    args: Callable[[Seeded], tuple[Any, ...]]
    # Each set: one of these indexes must be in the plan.
    indexes: tuple[frozenset[str], ...]


def _ahead_args(s: Seeded) -> tuple[Any, ...]:
    row = s.queued[len(s.queued) // 2]  # someone in the middle of a queue
    return (row["queue"], row["queued_at"], row["priority"], lifecycle.POSITION_CAP)


def _items_args(s: Seeded) -> tuple[Any, ...]:
    return (["billing", "general", "vip"], [18, 30, 10], ["concierge"])


def _store_inbound_args(s: Seeded) -> tuple[Any, ...]:
    number, customer = s.returning
    sid = f"SM{uuid.uuid4().hex}"
    return (uuid.uuid4(), ACCOUNT, customer, customer[1:], None, "Cliente", uuid.uuid4(), number,
            "support", s.now, uuid.uuid4(), sid, "Oi de novo", "[]", "{}", sid, None,
            "open")  # fmt: skip


def _reopen_args(s: Seeded) -> tuple[Any, ...]:
    """A returning customer of the history writes again (``reopen_within``: an hour)."""
    number, customer = s.returning
    return (ACCOUNT, number, customer, s.now - timedelta(hours=1), s.now, str(uuid.uuid4()),
            str(uuid.uuid4()))  # fmt: skip


CASES = [
    Case("distribute.AGENTS", distribute.AGENTS, lambda s: (None,), ()),
    Case(
        "distribute.ITEMS",
        distribute.ITEMS,
        _items_args,
        (frozenset({"conversations_queue"}), frozenset({"contact_agents_pkey"})),
    ),
    Case(
        "distribute.DUE_OFFERS",
        distribute.DUE_OFFERS,
        lambda s: (s.now,),
        (frozenset({"offers_due"}),),
    ),
    Case(
        # Every send: is an earlier message of the conversation still to go out?
        "outbound._EARLIER_UNSENT",
        outbound._EARLIER_UNSENT,
        lambda s: (s.active, s.now, uuid.uuid4(), 60.0),
        (frozenset({"messages_conversation"}),),
    ),
    Case("lifecycle.AHEAD", lifecycle.AHEAD, _ahead_args, (frozenset({"conversations_queue"}),)),
    Case(
        "lifecycle._CONVERSATION",
        lifecycle._CONVERSATION,
        lambda s: (s.active,),
        (frozenset({"conversations_pkey"}), frozenset({"contacts_pkey"})),
    ),
    Case(
        "lifecycle._CONVERSATION FOR UPDATE",
        lifecycle._CONVERSATION + " FOR UPDATE OF c",
        lambda s: (s.closed,),
        (frozenset({"conversations_pkey"}), frozenset({"contacts_pkey"})),
    ),
    Case(
        "conversation._STORE_INBOUND",
        conversation._STORE_INBOUND,
        _store_inbound_args,
        (frozenset({"messages_twilio_sid_key"}),),
    ),
    Case(
        "timers.schedule(later_only) / FIRED_GUARD",
        _schedule_later_only(),
        lambda s: (uuid.uuid4(), s.active, "idle_reminder", s.now + timedelta(minutes=30)),
        (frozenset({"timers_fired"}),),
    ),
    Case(
        # Every customer message to a bot, and every bot answer, pushes its idle timer.
        "bot idle: timers.schedule(later_only) of bot_idle",
        _schedule_later_only(),
        lambda s: (uuid.uuid4(), s.active, timers.BOT_IDLE, s.now + timedelta(minutes=30)),
        (frozenset({"timers_fired"}),),
    ),
    Case(
        # The closed conversation a message may reopen (not one that ended at the bot):
        # the recent closes by time, never the history of every customer.
        "conversation._REOPEN",
        conversation._REOPEN,
        _reopen_args,
        (frozenset({"conversations_closed"}), frozenset({"conversations_one_open"})),
    ),
    Case("timers.TAKE_DUE", timers.TAKE_DUE, lambda s: (s.now, 100), (frozenset({"timers_due"}),)),
    Case(
        "overflow.WAITED",
        overflow.WAITED,
        lambda s: ("general", s.now - timedelta(minutes=5), 100),
        (frozenset({"conversations_queue"}),),
    ),
    Case(
        "overflow.LOAD",
        overflow.LOAD,
        lambda s: ("billing", 21),
        (frozenset({"conversations_queue"}),),
    ),
    Case(
        "conversation._conversation(lock): its pending offer first",
        conversation.LOCK_PENDING_OFFER,
        lambda s: (s.queued[0]["id"],),
        (frozenset({"offers_one_pending"}),),
    ),
    Case(
        "conversation.ORPHANED",
        conversation.ORPHANED,
        lambda s: (10,),
        # Pending offers: by agent, or the (small) set of pending ones through offers_due.
        (frozenset({"conversations_agent"}), frozenset({"offers_agent", "offers_due"})),
    ),
    Case(
        "outbox.TAIL",
        outbox.TAIL,
        lambda s: (*s.watermark, 500),
        (frozenset({"outbox_log"}),),
    ),
    Case(
        "outbox.PRUNE",
        outbox.PRUNE,
        lambda s: (3600.0, *s.watermark, 5000),
        # By age through the BRIN index; (txid, seq) <= watermark holds for nearly every row,
        # so a walk of ``outbox_log`` would read the whole log (and its dead head) to prune.
        (frozenset({"outbox_age"}),),
    ),
    # The supervisor page polls these every few seconds (omniroute.domain.queue_view).
    Case(
        "queue_view.WAITING",
        queue_view.WAITING,
        lambda s: (list(QUEUES),),
        (frozenset({"conversations_state", "conversations_queue"}),),
    ),
    Case(
        "queue_view.AGENTS",
        queue_view.AGENTS,
        lambda s: (list(QUEUES),),
        (frozenset({"conversations_agent"}),),
    ),
    Case(
        "queue_view.OFFERS",
        queue_view.OFFERS,
        lambda s: (list(QUEUES),),
        (frozenset({"offers_due", "offers_one_pending"}), frozenset({"conversations_pkey"})),
    ),
    Case(
        "queue_view.SPANS",
        queue_view.SPANS,
        lambda s: (list(QUEUES), s.now - timedelta(minutes=queue_view.MAX_MINUTES)),
        # The open ones (small), and the closed ones by when they closed.
        (
            frozenset({"conversations_one_open", "conversations_state"}),
            frozenset({"conversations_closed"}),
        ),
    ),
    Case(
        "agent_events.REPLAY: a reconnect's missed events",
        agent_events.REPLAY,
        lambda s: (uuid.uuid4(), agent_events.REPLAY_LIMIT + 1),
        # The client's last id by its key, then the log walked from there (never by age).
        (frozenset({"outbox_pkey"}), frozenset({"outbox_log"})),
    ),
    Case(
        "agent_events.OWNERS",
        agent_events.OWNERS,
        lambda s: ([s.active, s.closed],),
        (frozenset({"conversations_pkey"}),),
    ),
    Case(
        "bot._MESSAGE",
        bot._MESSAGE,
        lambda s: (f"SM{uuid.uuid4().hex}",),
        (frozenset({"messages_twilio_sid_key"}),),
    ),
    Case(
        "bot._TURNS",
        bot._TURNS,
        lambda s: (s.active,),
        (frozenset({"bot_turns_conversation", "bot_turns_pkey"}),),
    ),
    Case(
        "classify._CONVERSATION",
        classify._CONVERSATION,
        lambda s: (s.active,),
        (frozenset({"conversations_pkey"}), frozenset({"messages_conversation"})),
    ),
    Case(
        "agent_events.CUSTOMER_OWNERS",
        agent_events.CUSTOMER_OWNERS,
        lambda s: ([ACCOUNT], [s.returning[0]], [s.returning[1]]),
        (frozenset({"conversations_one_open"}),),
    ),
]


async def _explain_custom(conn: asyncpg.Connection[Any], sql: str, args: tuple[Any, ...]) -> Any:
    return await conn.fetchval("EXPLAIN (FORMAT JSON) " + sql, *args)


async def _explain_generic(conn: asyncpg.Connection[Any], sql: str, args: tuple[Any, ...]) -> Any:
    """The generic plan of ``sql``: PREPARE it with the parameter types PostgreSQL infers,
    then EXPLAIN EXECUTE with the values as literals, under ``force_generic_plan``."""
    statement = await conn.prepare(sql)
    oids = [t.oid for t in statement.get_parameters()]
    types = [await conn.fetchval("SELECT format_type($1::oid, NULL)", oid) for oid in oids]
    literals = [
        await conn.fetchval(f"SELECT quote_nullable($1::{t})", value) + f"::{t}"
        for t, value in zip(types, args, strict=True)
    ]
    await conn.execute(f"PREPARE hot ({', '.join(types)}) AS {sql}")
    try:
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        return await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE hot ({', '.join(literals)})")
    finally:
        await conn.execute("RESET plan_cache_mode")
        await conn.execute("DEALLOCATE hot")


@pytest.mark.parametrize("mode", ["custom", "generic"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_hot_statement_is_index_driven(seeded: Seeded, case: Case, mode: str) -> None:
    conn = await asyncpg.connect(seeded.dsn)
    try:
        explain = _explain_custom if mode == "custom" else _explain_generic
        plan = await explain(conn, case.sql, case.args(seeded))
    finally:
        await conn.close()
    scans = _scans(plan)
    shown = json.dumps(json.loads(plan) if isinstance(plan, str) else plan, indent=1)
    assert not _big_seq_scans(scans), (
        f"{case.name} ({mode} plan) reads a large table sequentially: "
        f"{_big_seq_scans(scans)}\nscans: {scans}\nplan:\n{shown}"
    )
    used = _indexes(scans)
    for wanted in case.indexes:
        assert used & wanted, (
            f"{case.name} ({mode} plan) does not use {' or '.join(sorted(wanted))}"
            f"\nscans: {scans}\nplan:\n{shown}"
        )


def test_scans_walks_subplans() -> None:
    plan = [
        {
            "Plan": {
                "Node Type": "Result",
                "Plans": [
                    {"Node Type": "Seq Scan", "Relation Name": "agents"},
                    {
                        "Node Type": "Bitmap Heap Scan",
                        "Relation Name": "outbox",
                        "Plans": [{"Node Type": "Bitmap Index Scan", "Index Name": "outbox_age"}],
                    },
                ],
            }
        }
    ]
    assert _scans(json.dumps(plan)) == [
        ("Seq Scan", "agents", None),
        ("Bitmap Heap Scan", "outbox", None),
        ("Bitmap Index Scan", None, "outbox_age"),
    ]
    assert _big_seq_scans(_scans(plan)) == []
    assert _big_seq_scans([("Seq Scan", "timers", None)]) == [("Seq Scan", "timers", None)]


# The bot stage after the review of issue 14: its message read locks only at the bot, and
# its tick sweeps the conversations left at a bot a reload removed (the few ``bot`` rows
# through ``conversations_state``, never the history).
BOT_REVIEW_CASES = [
    Case(
        "bot._MESSAGE_LOCKED",
        bot._MESSAGE_LOCKED,
        lambda s: (f"SM{uuid.uuid4().hex}",),
        (frozenset({"messages_twilio_sid_key"}),),
    ),
    Case(
        "bot.STRANDED",
        bot.STRANDED,
        lambda s: (["support"], s.now, bot.SWEEP_LIMIT),
        (frozenset({"conversations_state"}),),
    ),
]


@pytest.mark.parametrize("mode", ["custom", "generic"])
@pytest.mark.parametrize("case", BOT_REVIEW_CASES, ids=[c.name for c in BOT_REVIEW_CASES])
async def test_bot_review_statement_is_index_driven(seeded: Seeded, case: Case, mode: str) -> None:
    await test_hot_statement_is_index_driven(seeded, case, mode)
