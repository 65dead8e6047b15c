"""Delivery receipts: shuffled and duplicated callbacks through the real router end in the
right final state with one event per step; unknown sids are retried, not dropped."""

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

from consumers import status
from consumers.delivery import advance
from omniroute.dead_letters import list_dead
from omniroute.settings import Settings
from tests.consumers.conftest import RunnerFactory
from tests.support import ACCOUNT_SID, EventTap, new_customer, new_sid, signed_post, tap, wait_for

STATUS = "/twilio/contoso/status"


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
        ("delivered", "undelivered", "undelivered", ["message.failed"]),
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


async def _outbound(db: asyncpg.Pool) -> str:
    contact, conversation, sid = uuid.uuid4(), uuid.uuid4(), new_sid()
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


async def _callback(router: TestClient[Any, Any], sid: str, state: str, code: str = "") -> None:
    form = [
        ("MessageSid", sid),
        ("SmsSid", sid),
        ("MessageStatus", state),
        ("SmsStatus", state),
        ("AccountSid", ACCOUNT_SID),
    ]
    if code:
        form.append(("ErrorCode", code))
    body, headers = signed_post(STATUS, form)
    response = await router.post(STATUS, data=body, headers=headers)
    assert response.status == 200


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
        await _callback(router, sid, state)
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
    await _callback(router, sid, "failed", "63016")
    assert await _events_for(receipts, sid, 1) == ["message.failed"]
    await _callback(router, sid, "delivered")
    await _none_for(receipts, sid)
    row = await db.fetchrow("SELECT status, error_code FROM messages WHERE twilio_sid = $1", sid)
    assert row is not None and (row["status"], row["error_code"]) == ("failed", "63016")


async def test_callback_before_the_sid_is_stored_is_retried_not_dropped(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    settings: Settings,
    db: asyncpg.Pool,
) -> None:
    await start_runner(status.STAGE)
    sid = new_sid()
    await _callback(router, sid, "delivered")

    async def dead() -> Any:
        letters = await list_dead(settings, "status", 1000)
        return next((d for d in letters if sid.encode() in d.body), None)

    letter = await wait_for(dead, timeout=20, interval=0.3)
    assert "is not stored yet" in letter.reason
