"""Agents in the database: create, list, change and remove them, and find one by its token.

Shared by the admin API and the ``omniroute agents`` command; no HTTP here. Every function
runs on the caller's connection, inside the caller's transaction.

An agent's token is ``omr_`` + 32 random bytes (url-safe base64). Only its SHA-256 is
stored: the token is shown once, when the agent is created, and cannot be read back.
Removing an agent is a soft delete (``deleted_at``): the row stays for the conversations,
offers and assignments that name it, and its token stops authenticating at once.

A presence change writes ``agent.presence-changed`` to the outbox in the same transaction;
the caller publishes it after commit (or the outbox relay does, later).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from omniroute.domain.conversation import requeue_agent_work
from omniroute.errors import UnknownQueues
from omniroute.infra.ids import new_id
from omniroute.infra.outbox import add_to_outbox
from omniroute.infra.store import Connection
from schemas.api import AgentCreate, AgentOut, AgentUpdate
from schemas.config import Config
from schemas.events import AgentPresenceChanged, Envelope, EventType, new_event, utcnow

TOKEN_PREFIX = "omr_"
TOKEN_BYTES = 32

# API field → column. The only columns an update may touch (the SQL is built from these).
_COLUMNS = {
    "name": "name",
    "queues": "queues",
    "skills": "skills",
    "capacity": "capacity_units",
    "language": "language",
    "presence": "presence",
}


@dataclass(frozen=True)
class AgentChange:
    """An agent before and after a change, and the events the change put in the outbox."""

    before: asyncpg.Record
    after: asyncpg.Record
    events: list[Envelope] = field(default_factory=list)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    """What is stored for a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_id(value: str | uuid.UUID) -> uuid.UUID | None:
    """The agent id as a UUID, or None when it is not one (callers answer "not found")."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def check_queues(queues: Iterable[str], known: Collection[str] | None) -> None:
    """Raise UnknownQueues naming every queue not in ``known``; ``None`` skips the check."""
    if known is None:
        return
    unknown = [q for q in queues if q not in known]
    if unknown:
        raise UnknownQueues(unknown, known)


def agent_out(row: asyncpg.Record) -> AgentOut:
    """The API's view of an agent row (no token hash)."""
    return AgentOut(
        id=row["id"],
        name=row["name"],
        queues=list(row["queues"]),
        skills=row["skills"],
        capacity=row["capacity_units"],
        used=row["used_units"],
        presence=row["presence"],
        language=row["language"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_assigned_at=row["last_assigned_at"],
    )


def presence_event(before: asyncpg.Record, after: asyncpg.Record, at: datetime) -> Envelope:
    """``agent.presence-changed``; its id derives from the agent and the time of the change."""
    agent_id = str(after["id"])
    data = AgentPresenceChanged(
        agent_id=agent_id,
        presence=after["presence"],
        previous=before["presence"],
        queues=list(after["queues"]),
    )
    return new_event(
        EventType.AGENT_PRESENCE_CHANGED,
        account="*",
        key=(agent_id, at.isoformat()),
        data=data.model_dump(mode="json"),
        occurred_at=at,
    )


async def create_agent(
    conn: Connection,
    body: AgentCreate,
    *,
    known_queues: Collection[str] | None = None,
    now: datetime | None = None,
) -> tuple[asyncpg.Record, str]:
    """Insert an agent (presence ``offline``); return its row and its token.

    Raises UnknownQueues before writing anything when ``known_queues`` is given and a queue
    is not in it. The token is returned here only: the database keeps its hash.
    """
    check_queues(body.queues, known_queues)
    now = now or utcnow()
    token = new_token()
    row = await conn.fetchrow(
        "INSERT INTO agents (id, name, language, queues, skills, capacity_units, presence,"
        " token_hash, created_at, updated_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, 'offline', $7, $8, $8) RETURNING *",
        new_id(),
        body.name,
        body.language,
        body.queues,
        body.skills,
        body.capacity,
        hash_token(token),
        now,
    )
    assert row is not None
    return row, token


async def list_agents(conn: Connection, *, queue: str | None = None) -> list[asyncpg.Record]:
    """Agents not removed, by name; only those in ``queue`` when given."""
    return list(
        await conn.fetch(
            "SELECT * FROM agents WHERE deleted_at IS NULL"
            " AND ($1::text IS NULL OR $1::text = ANY(queues))"
            " ORDER BY lower(name), created_at, id",
            queue,
        )
    )


async def get_agent(
    conn: Connection, agent_id: str | uuid.UUID, *, lock: bool = False
) -> asyncpg.Record | None:
    """The agent, or None when there is none with that id, it was removed or the id is not
    a UUID. ``lock`` takes the row lock for an update in the same transaction."""
    parsed = parse_id(agent_id)
    if parsed is None:
        return None
    return await conn.fetchrow(
        "SELECT * FROM agents WHERE id = $1 AND deleted_at IS NULL"
        + (" FOR UPDATE" if lock else ""),
        parsed,
    )


async def update_agent(
    conn: Connection,
    agent_id: str | uuid.UUID,
    body: AgentUpdate,
    *,
    known_queues: Collection[str] | None = None,
    now: datetime | None = None,
    requeue_workstreams: Collection[str] = (),
) -> AgentChange | None:
    """Change the fields sent in ``body``; None when the agent does not exist (or was removed).

    Raises UnknownQueues (nothing written) for a queue the configuration does not define.
    A presence that actually changed puts ``agent.presence-changed`` in the outbox. Going
    offline ends the agent's pending offers, and sends its conversations of
    ``requeue_workstreams`` (the workstreams whose ``on_agent_offline`` is ``requeue``) back
    to their queues.
    """
    changes = body.changes()
    if "queues" in changes:
        check_queues(changes["queues"], known_queues)
    now = now or utcnow()
    moved: list[Envelope] = []
    if changes.get("presence") == "offline":
        current = await get_agent(conn, agent_id)
        if current is None:
            return None
        if current["presence"] != "offline":
            moved = await requeue_agent_work(
                conn, str(current["id"]), "agent_offline", now, workstreams=requeue_workstreams
            )
    before = await get_agent(conn, agent_id, lock=True)
    if before is None:
        return None
    values: list[Any] = [before["id"], now]
    assignments = ["updated_at = $2"]
    for name, value in changes.items():
        values.append(value)
        assignments.append(f"{_COLUMNS[name]} = ${len(values)}")
    after = await conn.fetchrow(
        f"UPDATE agents SET {', '.join(assignments)} WHERE id = $1 RETURNING *", *values
    )
    assert after is not None
    events = moved
    if after["presence"] != before["presence"]:
        events = [*events, presence_event(before, after, now)]
    return AgentChange(before, after, await add_to_outbox(conn, events))


async def delete_agent(
    conn: Connection,
    agent_id: str | uuid.UUID,
    *,
    now: datetime | None = None,
    by: str | None = None,
) -> AgentChange | None:
    """Remove an agent (soft delete, presence ``offline``); None when there is none.

    Its token stops authenticating at once. Nothing stays with it: its pending offers end,
    its conversations go back to their queues ahead of others (``requeue_agent_work``). An
    agent that was not offline gets an ``agent.presence-changed`` in the outbox, so
    distribution stops counting on it.
    """
    current = await get_agent(conn, agent_id)
    if current is None:
        return None
    now = now or utcnow()
    # Before the agent's row is locked: offers and conversations first (the lock order).
    moved = await requeue_agent_work(conn, str(current["id"]), "agent_removed", now, by=by)
    before = await get_agent(conn, agent_id, lock=True)
    if before is None:
        return None
    after = await conn.fetchrow(
        "UPDATE agents SET deleted_at = $2, presence = 'offline', updated_at = $2"
        " WHERE id = $1 RETURNING *",
        before["id"],
        now,
    )
    assert after is not None
    events = moved
    if before["presence"] != "offline":
        events = [*events, presence_event(before, after, now)]
    return AgentChange(before, after, await add_to_outbox(conn, events))


async def agent_by_token(conn: Connection, token: str) -> asyncpg.Record | None:
    """The agent whose token this is, or None (unknown token, or the agent was removed)."""
    return await conn.fetchrow(
        "SELECT * FROM agents WHERE token_hash = $1 AND deleted_at IS NULL", hash_token(token)
    )


def offline_requeue(config: Config) -> frozenset[str]:
    """The workstreams whose conversations leave an agent who goes offline."""
    return frozenset(
        ws.name for ws in config.workstreams if ws.distribution.on_agent_offline == "requeue"
    )
