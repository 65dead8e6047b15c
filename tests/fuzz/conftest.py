"""Fixtures of the fuzz suite: a router with an admin token on a real loopback port (every
answer counted), two agents and a conversation owned by the first, and a clean broker after
each test (generated events must not reach other suites' stages)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from omniroute.infra.config_loader import LiveConfig
from omniroute.infra.logging import configure_logging
from omniroute.infra.settings import Settings
from omniroute.infra.topology import STAGES
from router.app import create_app
from router.state import BUS
from tests.conftest import Infra, make_settings
from tests.fuzz.common import STATS, counting
from tests.support import ACCOUNT_SID, BUSINESS, new_customer, new_sid

ADMIN_TOKEN = "fuzz-admin-" + uuid.uuid4().hex
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
Client = TestClient[Any, Any]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if STATS.requests or STATS.events:
        terminalreporter.write_line(STATS.summary())
        for crash in STATS.crashes[:20]:
            terminalreporter.write_line(f"  500 from {crash}")


def _closed_port() -> int:
    """A loopback port nothing listens on: a Twilio API that is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def fuzz_settings(infra: Infra) -> Settings:
    return make_settings(
        infra,
        admin_token=ADMIN_TOKEN,
        twilio_api_url=f"http://127.0.0.1:{_closed_port()}",
        twilio_timeout=2.0,
    )


@dataclass
class Served:
    app: web.Application
    client: Client
    base_url: str  # http://127.0.0.1:<port>, no trailing slash


@pytest.fixture
async def served(fuzz_settings: Settings, config: LiveConfig) -> AsyncIterator[Served]:
    """The real router (bus, store, every route) on a loopback port, answers counted."""
    app = create_app(fuzz_settings, config)
    app.middlewares.append(counting)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        async with asyncio.timeout(10):
            await app[BUS].wait_ready()
        yield Served(app, client, str(client.make_url("")).rstrip("/"))


@dataclass(frozen=True)
class Agent:
    id: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass(frozen=True)
class World:
    """Agent ``owner`` holds an active conversation (with one inbound message carrying an
    attachment) and a pending offer; ``intruder`` is another agent of other queues."""

    owner: Agent
    intruder: Agent
    conversation_id: str
    message_id: str
    offer_id: str
    offered_conversation_id: str
    queued_conversation_id: str


async def _create_agent(client: Client, queues: list[str]) -> Agent:
    body = {"name": f"fuzz-{uuid.uuid4().hex[:8]}", "queues": queues, "capacity": 0}
    response = await client.post("/api/admin/agents", json=body, headers=ADMIN)
    assert response.status == 201, await response.text()
    created = await response.json()
    return Agent(created["id"], created["token"])


async def _conversation(
    db: asyncpg.Pool, state: str, queue: str, agent_id: str | None, media_url: str | None = None
) -> tuple[str, str]:
    """Insert a conversation (and its first inbound message) straight into the database."""
    now = datetime.now(UTC)
    customer = new_customer()
    contact_id, conversation_id, message_id = (str(uuid.uuid4()) for _ in range(3))
    await db.execute(
        "INSERT INTO contacts (id, account, address, wa_id, profile_name)"
        " VALUES ($1, 'contoso', $2, $3, 'Fuzz')",
        contact_id,
        customer,
        customer.lstrip("+"),
    )
    await db.execute(
        "INSERT INTO conversations (id, account, business_number, customer, contact_id,"
        " workstream, state, opened_at, last_customer_message_at, queue, agent_id,"
        " assigned_at, queued_at, units)"
        " VALUES ($1, 'contoso', $2, $3, $4, 'support-pt', $5, $6, $6, $7, $8, $9, $6, 0)",
        conversation_id,
        BUSINESS,
        customer,
        contact_id,
        state,
        now,
        queue,
        agent_id,
        now if state == "active" else None,
    )
    media = [{"url": media_url, "content_type": "image/jpeg"}] if media_url else []
    await db.execute(
        "INSERT INTO messages (id, conversation_id, direction, twilio_sid, body, media, status,"
        " received_at) VALUES ($1, $2, 'inbound', $3, 'olá', $4, 'received', $5)",
        message_id,
        conversation_id,
        new_sid(),
        media,
        now,
    )
    return conversation_id, message_id


@pytest.fixture
async def world(served: Served, db: asyncpg.Pool) -> AsyncIterator[World]:
    owner = await _create_agent(served.client, ["general", "billing"])
    intruder = await _create_agent(served.client, ["sales"])
    media_url = (
        f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/MM{uuid.uuid4().hex}"
        "/Media/ME0"
    )
    conversation_id, message_id = await _conversation(db, "active", "general", owner.id, media_url)
    offered_id, _ = await _conversation(db, "offered", "billing", None)
    offer_id = str(uuid.uuid4())
    now = datetime.now(UTC)
    await db.execute(
        "INSERT INTO offers (id, conversation_id, agent_id, units, state, created_at, expires_at)"
        " VALUES ($1, $2, $3, 0, 'pending', $4, $5)",
        offer_id,
        offered_id,
        owner.id,
        now,
        now + timedelta(hours=1),
    )
    queued_id, _ = await _conversation(db, "queued", "billing", None)
    yield World(owner, intruder, conversation_id, message_id, offer_id, offered_id, queued_id)
    await db.execute(
        "UPDATE offers SET state = 'cancelled' WHERE id = $1 AND state = 'pending'", offer_id
    )
    await db.execute(
        "UPDATE conversations SET state = 'closed', closed_at = now() WHERE id = ANY($1::uuid[])",
        [conversation_id, offered_id, queued_id],
    )


@pytest.fixture(autouse=True)
async def _leave_no_trace(settings: Settings, db: asyncpg.Pool) -> AsyncIterator[None]:
    """After each test: agents created meanwhile go offline and removed, conversations
    opened meanwhile close, and the stage queues (and their dead letters) are emptied, so
    the rest of the session never meets generated data."""
    started = await db.fetchval("SELECT now()")
    yield
    await db.execute(
        "UPDATE agents SET presence = 'offline', capacity_units = 0,"
        " deleted_at = coalesce(deleted_at, now()) WHERE created_at >= $1",
        started,
    )
    await db.execute(
        "UPDATE offers SET state = 'cancelled' WHERE state = 'pending' AND created_at >= $1",
        started,
    )
    await db.execute(
        "UPDATE conversations SET state = 'closed', closed_at = now()"
        " WHERE state <> 'closed' AND opened_at >= $1",
        started,
    )
    await purge_stage_queues(settings.amqp_url.get_secret_value())


async def purge_stage_queues(amqp_url: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        for stage in STAGES.values():
            for name in (stage.queue, stage.dead_queue):
                channel = await connection.channel()
                with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
                    queue = await channel.declare_queue(name, passive=True)
                    await queue.purge()
                with contextlib.suppress(Exception):
                    await channel.close()


@pytest.fixture
def rendered_logs() -> Iterator[io.BytesIO]:
    """Every structlog line rendered as the service renders it (JSON, debug level, the
    service's own processors, secret masking included), into a buffer."""
    previous = structlog.get_config()
    buffer = io.BytesIO()
    configure_logging("json", "debug")
    structlog.configure(logger_factory=structlog.BytesLoggerFactory(file=buffer))
    try:
        yield buffer
    finally:
        configure_logging("console", "warning")  # takes the JSON root handler off again
        structlog.configure(**previous)
