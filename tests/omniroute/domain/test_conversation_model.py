"""The conversation state machine as a model: random sequences of its transitions on a real
PostgreSQL database, and after every step the invariants a supervisor counts on, read back
from the database.

Rules: add an agent, a conversation queued, one in the bot's hands and its escalation, the
bot ending it (resolved, or its customer idle: closed only while it is the bot's), the
customer writing again after a close (reopened into its queue, never when it ended at the
bot — it had none: found by this model, it came back ``queued`` with no queue), a
distribution-like offer (``claim_capacity`` + ``make_offer``) or auto-accept assignment to
an eligible agent, accept, decline or expire, transfer to a queue or to an agent (which may
be refused: then nothing changed), park it waiting for the customer, the agent ends it (into
wrap-up or closed), close it, requeue an agent's work, an agent going offline (with or
without the requeue policy), an agent removed.

A conversation ended while parked waiting (its capacity released) closes at once: wrap-up
always holds its agent's assignment (found by this model: it used to go to wrap-up holding
nothing).

Each hypothesis example runs on its own event loop and connection, inside one transaction
rolled back at teardown: examples never see each other's rows, and nothing is left behind.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, TypeVar

import asyncpg
from asyncpg.transaction import Transaction
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from omniroute.domain import conversation
from omniroute.domain.agents import delete_agent, update_agent
from omniroute.errors import WorkConflict
from omniroute.infra.store import Connection, init_connection
from schemas.api import AgentUpdate
from schemas.events import EventType, MessageReceived, new_event
from tests.conftest import Infra

T = TypeVar("T")
QUEUES = ("model-a", "model-b")
OFFER_SECONDS = 3600.0  # offers never expire on their own in a model run
HOLDING = ("offered", "active", "waiting", "wrap-up")

_STATE = """
SELECT c.id::text AS id, c.state, c.queue, c.agent_id::text AS agent_id, c.units,
       c.declined_by::text[] AS declined_by,
       (SELECT array_agg(o.agent_id::text) FROM offers o
         WHERE o.conversation_id = c.id AND o.state = 'pending') AS offers,
       (SELECT array_agg(s.agent_id::text) FROM assignments s
         WHERE s.conversation_id = c.id AND s.released_at IS NULL) AS assignments
FROM conversations c WHERE c.id = ANY($1::uuid[]) ORDER BY c.id
"""

_AGENTS = """
SELECT a.id::text AS id, a.presence, a.queues, a.capacity_units, a.used_units,
       a.deleted_at IS NOT NULL AS deleted,
       COALESCE((SELECT sum(o.units) FROM offers o
                  WHERE o.agent_id = a.id AND o.state = 'pending'), 0)
     + COALESCE((SELECT sum(s.units) FROM assignments s
                  WHERE s.agent_id = a.id AND s.released_at IS NULL), 0) AS held
FROM agents a WHERE a.id = ANY($1::uuid[]) ORDER BY a.id
"""


class ConversationModel(RuleBasedStateMachine):
    database_url: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.agents: list[str] = []
        self.convs: list[str] = []
        self.now = datetime.now(UTC)
        self.cache: dict[str, list[asyncpg.Record]] = {}
        self.pool, self.conn, self.tx = self.run(self._open())

    # --- plumbing ------------------------------------------------------------------------

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(work)

    async def _open(self) -> tuple[asyncpg.Pool, Connection, Transaction]:
        pool = await asyncpg.create_pool(
            self.database_url, min_size=1, max_size=1, init=init_connection
        )
        conn: Connection = await pool.acquire()
        tx = conn.transaction()
        await tx.start()
        return pool, conn, tx

    def teardown(self) -> None:
        async def close() -> None:
            await self.tx.rollback()
            await self.pool.release(self.conn)
            await self.pool.close()

        self.run(close())
        self.loop.close()

    def tick(self) -> datetime:
        """The time of a write (every rule that writes takes one): cached reads are stale."""
        self.now += timedelta(seconds=1)
        self.cache.clear()
        return self.now

    def conversations(self) -> list[asyncpg.Record]:
        if "conversations" not in self.cache:
            rows = self.run(self.conn.fetch(_STATE, self.convs))
            # In the order they were made (ids are random): replays draw the same.
            self.cache["conversations"] = sorted(rows, key=lambda r: self.convs.index(r["id"]))
        return self.cache["conversations"]

    def agent_rows(self) -> list[asyncpg.Record]:
        if "agents" not in self.cache:
            rows = self.run(self.conn.fetch(_AGENTS, self.agents))
            self.cache["agents"] = sorted(rows, key=lambda r: self.agents.index(r["id"]))
        return self.cache["agents"]

    def snapshot(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return (
            [dict(r) for r in self.conversations()],
            [dict(r) for r in self.agent_rows()],
        )

    @staticmethod
    def pick(data: st.DataObject, rows: Sequence[T]) -> T | None:
        return data.draw(st.sampled_from(rows)) if rows else None

    def ref(self, conversation_id: str) -> conversation.ConversationRef:
        row = self.run(
            self.conn.fetchrow(
                "SELECT account, queue FROM conversations WHERE id = $1", conversation_id
            )
        )
        assert row is not None
        return conversation.ConversationRef(conversation_id, row["account"], row["queue"])

    # --- rules ---------------------------------------------------------------------------

    @initialize()
    def someone_to_serve(self) -> None:
        self.add_agent(list(QUEUES), 2, "available")

    @precondition(lambda self: len(self.agents) < 4)
    @rule(
        queues=st.lists(st.sampled_from(QUEUES), min_size=1, max_size=2, unique=True),
        capacity=st.integers(0, 3),
        presence=st.sampled_from(["available", "available", "away"]),
    )
    def add_agent(self, queues: list[str], capacity: int, presence: str) -> None:
        agent_id = str(uuid.uuid4())
        self.run(
            self.conn.execute(
                "INSERT INTO agents (id, name, queues, capacity_units, presence, token_hash)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                agent_id,
                f"model-{agent_id[:8]}",
                queues,
                capacity,
                presence,
                uuid.uuid4().hex,
            )
        )
        self.agents.append(agent_id)
        self.tick()

    @precondition(lambda self: len(self._open_conversations()) < 4)
    @rule(queue=st.sampled_from(QUEUES))
    def new_conversation(self, queue: str) -> None:
        async def insert() -> str:
            contact, cid = uuid.uuid4(), uuid.uuid4()
            customer = f"+1555{uuid.uuid4().int % 10**7:07d}"
            await self.conn.execute(
                "INSERT INTO contacts (id, account, address) VALUES ($1, 'model', $2)",
                contact,
                customer,
            )
            await self.conn.execute(
                "INSERT INTO conversations (id, account, business_number, customer, contact_id,"
                " workstream, state, opened_at, last_customer_message_at, queue, queued_at)"
                " VALUES ($1, 'model', '+15550000000', $2, $3, 'model', 'queued', $4, $4, $5, $4)",
                cid,
                customer,
                contact,
                self.tick(),
                queue,
            )
            return str(cid)

        self.convs.append(self.run(insert()))
        self.tick()

    @precondition(lambda self: len(self._open_conversations("bot")) < 2)
    @rule()
    def new_bot_conversation(self) -> None:
        """A conversation of a workstream with a bot: no queue until the bot escalates."""

        async def insert() -> str:
            contact, cid = uuid.uuid4(), uuid.uuid4()
            customer = f"+1555{uuid.uuid4().int % 10**7:07d}"
            await self.conn.execute(
                "INSERT INTO contacts (id, account, address) VALUES ($1, 'model', $2)",
                contact,
                customer,
            )
            await self.conn.execute(
                "INSERT INTO conversations (id, account, business_number, customer, contact_id,"
                " workstream, state, opened_at, last_customer_message_at)"
                " VALUES ($1, 'model', '+15550000000', $2, $3, 'model', 'bot', $4, $4)",
                cid,
                customer,
                contact,
                self.tick(),
            )
            return str(cid)

        self.convs.append(self.run(insert()))
        self.tick()

    @precondition(lambda self: bool(self._open_conversations("bot")))
    @rule(data=st.data())
    def escalate(self, data: st.DataObject) -> None:
        """The bot hands off: ``open`` for classification, once (a second is a no-op)."""
        row = self.pick(data, self._open_conversations("bot"))
        if row is None:
            return
        handoff = conversation.Handoff("bot", variables={"order": "A-1"}, skills={"x": 2})
        now = self.tick()
        first = self.run(conversation.escalate(self.conn, row["id"], handoff, "model", now))
        again = self.run(conversation.escalate(self.conn, row["id"], handoff, "model", now))
        assert first is not None and again is None
        self.tick()

    @precondition(lambda self: bool(self._open_conversations(*HOLDING, "queued", "bot", "open")))
    @rule(data=st.data(), reason=st.sampled_from(["resolved_by_bot", "bot_idle"]))
    def bot_ends(self, data: st.DataObject, reason: conversation.BotEnd) -> None:
        """The bot resolves it, or its idle timer fires: closed while it is the bot's, once;
        anyone else's (escalated, queued, with an agent) is left as it is."""
        row = self.pick(data, self._open_conversations(*HOLDING, "queued", "bot", "open"))
        if row is None:
            return
        before = self.snapshot()
        now = self.tick()
        closed = self.run(conversation.close_at_bot(self.conn, row["id"], reason, now))
        if row["state"] != "bot":
            assert closed is None and self.snapshot() == before, "not the bot's: unchanged"
            return
        assert closed is not None and closed.data["reason"] == reason
        assert self.run(conversation.close_at_bot(self.conn, row["id"], reason, now)) is None
        self.tick()

    @precondition(lambda self: bool(self._open_conversations("closed")))
    @rule(data=st.data())
    def customer_returns(self, data: st.DataObject) -> None:
        """The customer writes within ``reopen_within`` of the close: back into its queue, or,
        when it never reached one (it ended at the bot), not reopened at all."""
        row = self.pick(data, self._open_conversations("closed"))
        if row is None:
            return
        customer = self.run(
            self.conn.fetchval("SELECT customer FROM conversations WHERE id = $1", row["id"])
        )
        now = self.tick()
        message = MessageReceived(
            message_sid=f"SM{uuid.uuid4().hex}",
            account_sid="AC0",
            business_number="+15550000000",
            number_name="model",
            workstream="model",
            customer=customer,
            received_at=now,
        )
        received = new_event(
            EventType.MESSAGE_RECEIVED,
            account="model",
            key=(message.message_sid,),
            data=message.model_dump(mode="json"),
            occurred_at=now,
        )
        since = now - timedelta(hours=1)
        reopened = self.run(conversation.reopen(self.conn, received, message, since))
        assert (reopened is not None) == (row["queue"] is not None), dict(row)
        self.tick()

    def _eligible(self) -> list[tuple[str, str]]:
        agents = [a for a in self.agent_rows() if a["presence"] == "available" and not a["deleted"]]
        return [
            (c["id"], a["id"])
            for c in self.conversations()
            if c["state"] == "queued"
            for a in agents
            if c["queue"] in a["queues"]
            and a["capacity_units"] - a["used_units"] >= c["units"]
            and a["id"] not in c["declined_by"]
        ]

    @precondition(lambda self: bool(self._eligible()))
    @rule(data=st.data())
    def offer(self, data: st.DataObject) -> None:
        """What a distribution cycle does for one eligible pair."""
        pair = self.pick(data, self._eligible())
        if pair is None:
            return
        cid, agent = pair
        now = self.tick()
        assert self.run(conversation.claim_capacity(self.conn, agent, 1, now))
        self.run(conversation.make_offer(self.conn, self.ref(cid), agent, 1, OFFER_SECONDS, now))

    @precondition(lambda self: bool(self._eligible()))
    @rule(data=st.data())
    def auto_assign(self, data: st.DataObject) -> None:
        """Distribution with auto-accept: capacity claimed, assigned at once."""
        pair = self.pick(data, self._eligible())
        if pair is None:
            return
        cid, agent = pair
        now = self.tick()
        assert self.run(conversation.claim_capacity(self.conn, agent, 1, now))
        self.run(conversation.assign(self.conn, self.ref(cid), agent, 1, "auto-accept", now))

    def _pending(self) -> list[tuple[str, str]]:
        if "offers" not in self.cache:
            self.cache["offers"] = list(
                self.run(
                    self.conn.fetch(
                        "SELECT id::text, agent_id::text, conversation_id::text FROM offers"
                        " WHERE state = 'pending' AND conversation_id = ANY($1::uuid[])",
                        self.convs,
                    )
                )
            )
        rows = sorted(self.cache["offers"], key=lambda r: self.convs.index(r["conversation_id"]))
        return [(r["id"], r["agent_id"]) for r in rows]

    @precondition(lambda self: bool(self._pending()))
    @rule(data=st.data())
    def accept(self, data: st.DataObject) -> None:
        offer = self.pick(data, self._pending())
        if offer is not None:
            self.run(conversation.accept_offer(self.conn, offer[0], offer[1], self.tick()))

    @precondition(lambda self: bool(self._pending()))
    @rule(data=st.data(), outcome=st.sampled_from(["declined", "expired"]))
    def end_offer(self, data: st.DataObject, outcome: str) -> None:
        offer = self.pick(data, self._pending())
        if offer is not None:
            agent = offer[1] if outcome == "declined" else None
            self.run(conversation.end_offer(self.conn, offer[0], agent, outcome, self.tick()))

    def _open_conversations(self, *states: str) -> list[asyncpg.Record]:
        return [c for c in self.conversations() if c["state"] in (states or (*HOLDING, "queued"))]

    @precondition(lambda self: bool(self._open_conversations()))
    @rule(data=st.data(), queue=st.sampled_from(QUEUES))
    def transfer_to_queue(self, data: st.DataObject, queue: str) -> None:
        row = self.pick(data, self._open_conversations())
        if row is not None:
            self.run(conversation.transfer_to_queue(self.conn, row["id"], queue, None, self.tick()))

    @precondition(lambda self: bool(self._open_conversations() and self.agents))
    @rule(data=st.data())
    def transfer_to_agent(self, data: st.DataObject) -> None:
        """Any open conversation to any agent (removed, away, full, elsewhere included):
        done, or refused with WorkConflict having changed nothing."""
        row = self.pick(data, self._open_conversations())
        target = self.pick(data, self.agents)
        if row is None or target is None:
            return
        before = self.snapshot()

        async def attempt() -> bool:
            async with self.conn.transaction():  # a savepoint, kept even when refused
                try:
                    await conversation.transfer_to_agent(
                        self.conn, row["id"], target, None, OFFER_SECONDS, self.tick()
                    )
                except WorkConflict:
                    return False
            return True

        if not self.run(attempt()):
            assert self.snapshot() == before, "a refused transfer changed something"

    @precondition(lambda self: bool(self._open_conversations("active")))
    @rule(data=st.data())
    def wait_for_customer(self, data: st.DataObject) -> None:
        row = self.pick(data, self._open_conversations("active"))
        if row is not None:
            self.run(
                conversation.wait_for_customer(self.conn, row["id"], row["agent_id"], self.tick())
            )

    @precondition(lambda self: bool(self._open_conversations("active", "waiting", "wrap-up")))
    @rule(data=st.data(), wrap_up=st.sampled_from([0.0, 30.0]))
    def end_by_agent(self, data: st.DataObject, wrap_up: float) -> None:
        """The agent's close (the API's: its own active, waiting or wrap-up conversation)."""
        row = self.pick(data, self._open_conversations("active", "waiting", "wrap-up"))
        if row is not None:
            self.run(
                conversation.end_by_agent(
                    self.conn, row["id"], row["agent_id"], "agent", wrap_up, self.tick()
                )
            )

    @precondition(lambda self: bool(self._open_conversations(*HOLDING, "queued", "bot")))
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        """A supervisor's close: any open conversation, the bot's too."""
        row = self.pick(data, self._open_conversations(*HOLDING, "queued", "bot"))
        if row is not None:
            self.run(conversation.close_conversation(self.conn, row["id"], "test", self.tick()))

    @precondition(lambda self: bool(self.agents))
    @rule(data=st.data())
    def requeue_agent_work(self, data: st.DataObject) -> None:
        agent = self.pick(data, self.agents)
        if agent is not None:
            self.run(
                conversation.requeue_agent_work(self.conn, agent, "agent_offline", self.tick())
            )

    @precondition(lambda self: bool(self.agents))
    @rule(data=st.data(), requeue=st.booleans())
    def go_offline(self, data: st.DataObject, requeue: bool) -> None:
        agent = self.pick(data, self.agents)
        if agent is not None:
            self.run(
                update_agent(
                    self.conn,
                    agent,
                    AgentUpdate(presence="offline"),
                    now=self.tick(),
                    requeue_workstreams={"model"} if requeue else (),
                )
            )

    @precondition(lambda self: bool(self.agents))
    @rule(data=st.data())
    def remove_agent(self, data: st.DataObject) -> None:
        agent = self.pick(data, self.agents)
        if agent is not None:
            self.run(delete_agent(self.conn, agent, now=self.tick()))

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def capacity_is_what_is_held(self) -> None:
        for agent in self.agent_rows():
            assert agent["used_units"] == agent["held"], dict(agent)
            assert 0 <= agent["used_units"] <= agent["capacity_units"], dict(agent)

    @invariant()
    def each_conversation_is_held_as_its_state_says(self) -> None:
        removed = {a["id"] for a in self.agent_rows() if a["deleted"]}
        for c in self.conversations():
            offers, held = c["offers"] or [], c["assignments"] or []
            assert len(offers) <= 1 and len(held) <= 1, dict(c)
            state, agent = c["state"], c["agent_id"]
            if state in HOLDING:
                assert agent is not None and agent not in removed, dict(c)
            expected: tuple[list[str], list[str]] = {
                "offered": ([agent], []),
                "active": ([], [agent]),
                "wrap-up": ([], [agent]),
            }.get(state, ([], []))
            assert (offers, held) == expected, dict(c)
            if state == "queued":
                assert c["queue"] is not None, dict(c)
            if state in ("bot", "open"):  # the bot's, or escalated and not yet classified
                assert c["queue"] is None and agent is None, dict(c)


def test_the_conversation_state_machine_keeps_its_invariants(infra: Infra) -> None:
    ConversationModel.database_url = infra.database_url
    run_state_machine_as_test(
        ConversationModel,
        settings=settings(
            max_examples=100,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
