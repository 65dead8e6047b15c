"""``omniroute supervise …`` run as a process (``python -m omniroute``) against the test
database: the list a supervisor reads, each action with its audit record in the outbox, and
every refusal or mistake as one line on stderr with exit 1 or 2, never a traceback."""

from __future__ import annotations

import getpass
import os
import uuid
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import Infra
from tests.omniroute.commands.test_cli import _cli
from tests.router.test_supervisor_api import seed_conversation, supervised_config
from tests.support import ENVIRON, new_agent


@pytest.fixture
def queue() -> str:
    return f"cli{uuid.uuid4().hex[:10]}"


@pytest.fixture
def env(infra: Infra, tmp_path: Path, queue: str) -> dict[str, str]:
    config = tmp_path / "omniroute.yaml"
    config.write_text(supervised_config(queue), encoding="utf-8")
    return {
        **os.environ,
        **ENVIRON,
        "OMNIROUTE_AMQP_URL": infra.amqp_url,
        "OMNIROUTE_DATABASE_URL": infra.database_url,
        "OMNIROUTE_CONFIG": str(config),
        # $USER is the default actor; the database role stays the test run's.
        "PGUSER": os.environ.get("PGUSER") or getpass.getuser(),
        "USER": "night-shift",
    }


async def _supervise(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    return await _cli("supervise", *args, env=env)


def _one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


async def _audit(db: asyncpg.Pool, **where: str) -> list[dict[str, str]]:
    """The supervisor.acted records in the outbox whose data has these fields."""
    rows = await db.fetch(
        "SELECT body->'data' AS data FROM outbox WHERE routing_key = 'supervisor.acted'"
        " AND body->'data' @> $1::jsonb ORDER BY created_at",
        where,
    )
    return [dict(r["data"]) for r in rows]


async def test_list_transfer_and_close(env: dict[str, str], db: asyncpg.Pool, queue: str) -> None:
    waiting = await seed_conversation(db, queue, waited=125)
    agent, _ = await new_agent(db, queues=[queue], capacity=2, presence="available")
    held = await seed_conversation(db, queue, state="active", agent=agent)

    code, out, err = await _supervise(env, "conversations", "--queue", queue)
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "STATE", "QUEUE", "AGENT", "WAIT"]
    listed = {row.split()[0]: row.split()[1:] for row in rows}
    assert listed[waiting][:3] == ["queued", queue, "-"]
    assert listed[waiting][3].startswith("2m0")  # 2m05s, give or take a second
    assert listed[held] == ["active", queue, agent, "-"]
    code, out, _ = await _supervise(env, "conversations", "--agent", agent)
    assert code == 0 and [row.split()[0] for row in out.splitlines()[1:]] == [held]

    code, out, err = await _supervise(
        env, "transfer", waiting, "--agent", agent, "--reason", "knows the customer"
    )
    assert code == 0, err
    assert out.strip() == f"conversation {waiting} offered to agent {agent}"
    [acted] = await _audit(db, conversation_id=waiting)
    assert acted["actor"] == "night-shift" and acted["to_agent"] == agent
    assert acted["reason"] == "knows the customer"

    code, out, err = await _supervise(env, "close", held, "--actor", "lead")
    assert code == 0, err
    assert out.strip() == f"conversation {held} closed"
    [acted] = await _audit(db, conversation_id=held)
    assert acted["actor"] == "lead" and acted["action"] == "close"
    assert await db.fetchval("SELECT state FROM conversations WHERE id = $1", held) == "closed"


async def test_end_offer_and_presence(env: dict[str, str], db: asyncpg.Pool, queue: str) -> None:
    agent, _ = await new_agent(db, queues=[queue], capacity=2, presence="available")
    offered = await seed_conversation(db, queue)
    code, _, err = await _supervise(env, "transfer", offered, "--agent", agent)
    assert code == 0, err
    offer_id = str(await db.fetchval("SELECT id FROM offers WHERE conversation_id = $1", offered))
    code, out, err = await _supervise(env, "end-offer", offer_id)
    assert code == 0, err
    assert out.strip() == f"offer {offer_id} ended; conversation {offered} queued"
    code, _, err = await _supervise(env, "end-offer", offer_id)
    assert code == 1
    assert _one_line(err).startswith("omniroute supervise end-offer: offer_closed: ")

    held = await seed_conversation(db, queue, state="active", agent=agent)
    code, out, err = await _supervise(env, "presence", agent, "offline")
    assert code == 0, err
    assert out.strip().endswith("is offline; 1 conversation(s) requeued")
    assert await db.fetchval("SELECT state FROM conversations WHERE id = $1", held) == "queued"
    [acted] = await _audit(db, agent_id=agent, action="set_presence")
    assert acted["presence"] == "offline" and acted["actor"] == "night-shift"


async def test_mistakes_are_one_line(env: dict[str, str], db: asyncpg.Pool, queue: str) -> None:
    cid = await seed_conversation(db, queue)
    offline, _ = await new_agent(db, queues=[queue], presence="offline")
    cases = [
        (("transfer", cid, "--agent", offline), 1, "transfer: agent_unavailable: "),
        (("transfer", cid, "--queue", "nowhere"), 1, "transfer: unknown_queue: no queue nowhere"),
        (("transfer", str(uuid.uuid4()), "--queue", "general"), 1, "transfer: not_found: "),
        (("close", "not-an-id"), 1, "close: no conversation with id not-an-id"),
        (("presence", str(uuid.uuid4()), "away"), 1, "presence: no agent with id "),
        (("presence", offline, "asleep"), 2, "presence: argument PRESENCE: invalid choice"),
        (("transfer", cid), 2, "one of the arguments --queue --agent is required"),
        (("close", cid, "--actor", "x" * 101), 2, "--actor: an actor is 1 to 100 printable"),
        (("conversations", "--limit", "0"), 2, "argument --limit: '0': an integer from 1 to 500"),
    ]
    wrong_role = {**env, "PGUSER": "no-such-role"}
    code, _, err = await _supervise(wrong_role, "conversations")
    assert code == 1 and _one_line(err).startswith("omniroute supervise: database error: ")
    for args, status, message in cases:
        code, _, err = await _supervise(env, *args)
        assert code == status, (args, err)
        assert message in _one_line(err), (args, err)
    assert await db.fetchval("SELECT state FROM conversations WHERE id = $1", cid) == "queued"
    assert await _audit(db, conversation_id=cid) == []
