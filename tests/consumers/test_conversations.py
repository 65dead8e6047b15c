"""The conversations stage on the real broker and database."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg

from omniroute.infra.bus import Bus
from omniroute.infra.config_loader import LiveConfig
from omniroute.infra.settings import Settings
from tests.consumers.conftest import RunnerFactory
from tests.support import EventTap, about, new_customer, new_sid, received_event, tap, wait_for


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
    opened = await spy.next(where=about(customer=customer))
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
    await spy.expect_none(within=0.3, where=about(customer=customer))


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
    opened = await spy.next(where=about(customer=customer))
    assert opened["data"]["first_message_sid"] == sid
    await spy.expect_none(within=0.5, where=about(customer=customer))
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
    opened = await spy.next(where=about(customer=customer))
    assert opened["data"]["customer"] == customer
    await spy.expect_none(within=0.5, where=about(customer=customer))


async def test_closed_conversation_is_not_reused(
    bus: Bus, start_runner: RunnerFactory, spy: EventTap, db: asyncpg.Pool
) -> None:
    await start_runner()
    customer = new_customer()
    await bus.publish(received_event(customer=customer))
    first = await spy.next(where=about(customer=customer))
    await db.execute(
        "UPDATE conversations SET state = 'closed', closed_at = now() WHERE id = $1",
        first["conversation_id"],
    )
    await bus.publish(received_event(customer=customer, body="voltei"))
    second = await spy.next(where=about(customer=customer))
    assert second["type"] == "conversation.opened"
    assert second["conversation_id"] != first["conversation_id"]


async def test_media_where_customers_may_not_send_it_gets_the_automated_notice(
    bus: Bus,
    start_runner: RunnerFactory,
    db: asyncpg.Pool,
    config: LiveConfig,
    settings: Settings,
) -> None:
    from omniroute.infra.config_loader import parse_config
    from tests.support import CONFIG_YAML, ENVIRON

    no_media = CONFIG_YAML.replace(
        "    language: pt-BR\n    timezone: America/Sao_Paulo\n",
        "    language: pt-BR\n    timezone: America/Sao_Paulo\n"
        "    attachments: {customers: false, agents: true}\n"
        "    automated_messages:\n"
        "      attachments_not_allowed:\n"
        "        text: {pt-BR: 'Não recebemos anexos por aqui.', en: 'No attachments here.'}\n",
    )
    config.current = parse_config(no_media, "no-media.yaml", ENVIRON)
    await start_runner()
    customer = new_customer()
    photo = [{"url": "https://api.twilio.com/x/Media/ME1", "content_type": "image/jpeg"}]
    async with tap(settings.amqp_url.get_secret_value(), "message.send-requested") as sends:
        event = received_event(customer=customer, body="", media=photo)
        await bus.publish(event)
        await bus.publish(event)  # Twilio resends: still one notice
        requested = await sends.next()
        await sends.expect_none(within=0.5)
    notice = await db.fetchrow(
        "SELECT body, kind, status FROM messages WHERE id = $1", requested["data"]["message_id"]
    )
    assert notice is not None
    assert (notice["body"], notice["kind"], notice["status"]) == (
        "Não recebemos anexos por aqui.",
        "system",
        "requested",
    )
