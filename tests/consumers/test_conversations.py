"""The conversations stage on the real broker and database."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg

from omniroute.bus import Bus
from tests.consumers.conftest import RunnerFactory
from tests.support import EventTap, new_customer, new_sid, received_event, wait_for


async def _conversations(db: asyncpg.Pool, customer: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT * FROM conversations WHERE customer = $1 ORDER BY opened_at", customer
    )


async def _messages(db: asyncpg.Pool, customer: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT m.* FROM messages m JOIN conversations c ON c.id = m.conversation_id"
        " WHERE c.customer = $1 ORDER BY m.received_at",
        customer,
    )


async def test_first_message_opens_then_next_reuses(
    bus: Bus, start_runner: RunnerFactory, spy: EventTap, db: asyncpg.Pool
) -> None:
    await start_runner()
    customer = new_customer()
    first_at = datetime.now(UTC) - timedelta(minutes=5)
    await bus.publish(received_event(customer=customer, body="oi", received_at=first_at))
    opened = await spy.next()
    assert opened["type"] == "conversation.opened"
    assert opened["data"]["customer"] == customer
    assert opened["data"]["first_message_body"] == "oi"
    conversation_id = opened["conversation_id"]

    second_at = datetime.now(UTC)
    await bus.publish(received_event(customer=customer, body="ainda aí?", received_at=second_at))
    messages = await wait_for(lambda: _has(db, customer, 2))
    assert {str(m["conversation_id"]) for m in messages} == {conversation_id}
    [conversation] = await _conversations(db, customer)
    assert conversation["state"] == "open"
    assert conversation["last_customer_message_at"] == second_at
    assert conversation["workstream"] == "support-pt"
    await spy.expect_none(within=0.3)


async def _has(db: asyncpg.Pool, customer: str, count: int) -> list[asyncpg.Record] | None:
    messages = await _messages(db, customer)
    return messages if len(messages) >= count else None


async def test_duplicate_message_is_stored_once_and_opens_once(
    bus: Bus, start_runner: RunnerFactory, spy: EventTap, db: asyncpg.Pool
) -> None:
    await start_runner()
    customer, sid = new_customer(), new_sid()
    event = received_event(customer=customer, sid=sid)
    for _ in range(3):  # Twilio resends, the broker redelivers
        await bus.publish(event)
    opened = await spy.next()
    assert opened["data"]["first_message_sid"] == sid
    await spy.expect_none(within=0.5)
    assert len(await _messages(db, customer)) == 1
    assert len(await _conversations(db, customer)) == 1


async def test_two_replicas_racing_on_a_burst_open_one_conversation(
    bus: Bus, start_runner: RunnerFactory, spy: EventTap, db: asyncpg.Pool
) -> None:
    await start_runner()
    await start_runner()
    customer = new_customer()
    at = datetime.now(UTC)
    # An album: several media messages in the same second, plus a resend of each.
    events = [
        received_event(
            customer=customer,
            body="",
            received_at=at + timedelta(milliseconds=n),
            media=[{"url": f"https://api.twilio.com/m/{n}", "content_type": "image/jpeg"}],
        )
        for n in range(30)
    ]
    await asyncio.gather(*(bus.publish(e) for e in events + events))
    await wait_for(lambda: _has(db, customer, 30))
    assert len(await _conversations(db, customer)) == 1
    messages = await _messages(db, customer)
    assert len(messages) == 30
    assert [m["received_at"] for m in messages] == sorted(e.occurred_at for e in events)
    opened = await spy.next()
    assert opened["data"]["customer"] == customer
    await spy.expect_none(within=0.5)


async def test_closed_conversation_is_not_reused(
    bus: Bus, start_runner: RunnerFactory, spy: EventTap, db: asyncpg.Pool
) -> None:
    await start_runner()
    customer = new_customer()
    await bus.publish(received_event(customer=customer))
    first = await spy.next()
    await db.execute(
        "UPDATE conversations SET state = 'closed', closed_at = now() WHERE id = $1",
        first["conversation_id"],
    )
    await bus.publish(received_event(customer=customer, body="voltei"))
    second = await spy.next()
    assert second["type"] == "conversation.opened"
    assert second["conversation_id"] != first["conversation_id"]
