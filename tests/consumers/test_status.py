"""Delivery receipts: shuffled and duplicated callbacks through the real router end in the
right final state with one event per step; a callback for a sid not stored yet is parked and
applied once the message is stored, or dropped and counted after the grace (never a dead
letter)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY

from consumers import status
from consumers.delivery import advance
from omniroute.commands.dead_letters import list_dead
from omniroute.infra.settings import Settings
from tests.consumers.conftest import RunnerFactory
from tests.support import EventTap, new_customer, new_sid, status_callback, tap, wait_for


@pytest.mark.parametrize(
    ("current", "incoming", "expected", "events"),
    [
        ("queued", "sent", "sent", ["message.sent"]),
        ("queued", "read", "read", ["message.sent", "message.delivered", "message.read"]),
        ("sent", "delivered", "delivered", ["message.delivered"]),
        ("delivered", "sent", "delivered", []),
        ("read", "delivered", "read", []),
        ("read", "read", "read", []),
        ("sent", "failed", "failed", ["message.failed"]),
        ("delivered", "undelivered", "delivered", []),
        ("read", "failed", "read", []),
        ("queued", "undelivered", "undelivered", ["message.failed"]),
        ("failed", "delivered", "failed", []),
        ("failed", "failed", "failed", []),
        ("sent", "played", "sent", []),
        ("sending", "queued", "sending", []),
    ],
)
def test_advance_only_moves_forward(
    current: str, incoming: str, expected: str, events: list[str]
) -> None:
    assert advance(current, incoming) == (expected, events)


@pytest.fixture
async def receipts(settings: Settings) -> AsyncIterator[EventTap]:
    async with tap(
        settings.amqp_url.get_secret_value(),
        "message.sent",
        "message.delivered",
        "message.read",
        "message.failed",
    ) as spy:
        yield spy


async def _outbound(db: asyncpg.Pool, sid: str | None = None) -> str:
    contact, conversation, sid = uuid.uuid4(), uuid.uuid4(), sid or new_sid()
    now = datetime.now(UTC)
    await db.execute(
        "INSERT INTO contacts (id, account, address) VALUES ($1, 'contoso', $2)",
        contact,
        new_customer(),
    )
    await db.execute(
        "INSERT INTO conversations (id, account, business_number, customer, contact_id,"
        " workstream, state, opened_at, last_customer_message_at)"
        " VALUES ($1, 'contoso', '+5511999990000', $2, $3, 'support-pt', 'active', $4, $4)",
        conversation,
        new_customer(),
        contact,
        now,
    )
    await db.execute(
        "INSERT INTO messages (id, conversation_id, direction, twilio_sid, body, status,"
        " received_at) VALUES ($1, $2, 'outbound', $3, 'olá', 'queued', $4)",
        uuid.uuid4(),
        conversation,
        sid,
        now,
    )
    return sid


async def _none_for(spy: EventTap, sid: str, within: float = 0.5) -> None:
    """No further event about this message (other tests' leftovers may pass by)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while True:
                event = await spy.next(timeout=within + 1)
                assert event["data"]["message_sid"] != sid, f"unexpected {event['type']}"


async def _events_for(spy: EventTap, sid: str, count: int) -> list[str]:
    seen: list[str] = []
    async with asyncio.timeout(10):
        while len(seen) < count:
            event = await spy.next()
            if event["data"]["message_sid"] == sid:
                seen.append(event["type"])
    return seen


async def test_shuffled_and_duplicated_callbacks(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    receipts: EventTap,
    db: asyncpg.Pool,
) -> None:
    await start_runner(status.STAGE)
    sid = await _outbound(db)
    callbacks = ["sent", "delivered", "read"] * 2 + ["sending"]
    random.Random(7).shuffle(callbacks)
    for state in callbacks:
        await status_callback(router, sid, state)
    assert await _events_for(receipts, sid, 3) == [
        "message.sent",
        "message.delivered",
        "message.read",
    ]
    await _none_for(receipts, sid)
    row = await db.fetchrow(
        "SELECT status, status_history FROM messages WHERE twilio_sid = $1", sid
    )
    assert row is not None and row["status"] == "read"
    assert len(row["status_history"]) == len(callbacks)


async def test_failure_is_terminal_with_its_code(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    receipts: EventTap,
    db: asyncpg.Pool,
) -> None:
    await start_runner(status.STAGE)
    sid = await _outbound(db)
    await status_callback(router, sid, "failed", "63016")
    assert await _events_for(receipts, sid, 1) == ["message.failed"]
    await status_callback(router, sid, "delivered")
    await _none_for(receipts, sid)
    row = await db.fetchrow("SELECT status, error_code FROM messages WHERE twilio_sid = $1", sid)
    assert row is not None and (row["status"], row["error_code"]) == ("failed", "63016")


async def test_late_failure_after_read_keeps_read(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    receipts: EventTap,
    db: asyncpg.Pool,
) -> None:
    await start_runner(status.STAGE)
    sid = await _outbound(db)
    await status_callback(router, sid, "read")
    assert await _events_for(receipts, sid, 3) == [
        "message.sent",
        "message.delivered",
        "message.read",
    ]
    await status_callback(router, sid, "failed", "63016")
    await _none_for(receipts, sid)
    query = "SELECT status, error_code, status_history FROM messages WHERE twilio_sid = $1"

    async def recorded() -> Any:
        row = await db.fetchrow(query, sid)
        return row if row is not None and len(row["status_history"]) == 2 else None

    row = await wait_for(recorded)
    assert (row["status"], row["error_code"]) == ("read", None)
    assert [h["status"] for h in row["status_history"]] == ["read", "failed"]
    window = await db.fetchval(
        "SELECT c.window_closed_at FROM conversations c JOIN messages m"
        " ON m.conversation_id = c.id WHERE m.twilio_sid = $1",
        sid,
    )
    assert window is None  # the message was read: the window was not closed for it


async def _parked(db: asyncpg.Pool, sid: str) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM parked_status WHERE message_sid = $1", sid)
    return count


async def test_callback_before_the_sid_is_stored_is_parked_then_applied(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    receipts: EventTap,
    db: asyncpg.Pool,
) -> None:
    await start_runner(status.STAGE, status_park_backoff_base=0.05, status_park_backoff_max=0.2)
    sid = new_sid()
    await status_callback(router, sid, "delivered")
    await status_callback(router, sid, "delivered")  # Twilio resending: parked once
    await wait_for(lambda: _parked(db, sid))
    retried = "SELECT attempts >= 2 FROM parked_status WHERE message_sid = $1"
    await wait_for(lambda: db.fetchval(retried, sid))  # a few retries find nothing yet
    assert await _parked(db, sid) == 1

    await _outbound(db, sid)  # the send's answer is stored at last
    assert await _events_for(receipts, sid, 2) == ["message.sent", "message.delivered"]
    await _none_for(receipts, sid)
    assert await _parked(db, sid) == 0
    row = await db.fetchrow(
        "SELECT status, status_history FROM messages WHERE twilio_sid = $1", sid
    )
    assert row is not None and row["status"] == "delivered"
    assert [h["status"] for h in row["status_history"]] == ["delivered"]


async def test_parked_callback_past_the_grace_is_dropped_and_counted_never_dead_lettered(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    settings: Settings,
    db: asyncpg.Pool,
) -> None:
    def dropped() -> float:
        value = REGISTRY.get_sample_value("omniroute_status_callbacks_foreign_total")
        return value or 0.0

    before = dropped()
    await start_runner(
        status.STAGE,
        status_park_grace=0.5,
        status_park_backoff_base=0.05,
        status_park_backoff_max=0.1,
    )
    sid = new_sid()
    await status_callback(router, sid, "delivered")
    await wait_for(lambda: _parked(db, sid))

    async def gone() -> bool:
        return await _parked(db, sid) == 0

    await wait_for(gone, timeout=10)
    await wait_for(lambda: _true(dropped() == before + 1))
    letters = await list_dead(settings, "status", 1000)
    assert not any(sid.encode() in d.body for d in letters)


async def _true(value: bool) -> bool:
    return value
