"""The classify stage end to end: a signed webhook becomes a queued (or closed) conversation,
with the rules' trace, on the real router, broker and database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from consumers import classify, conversations
from omniroute.commands.service import Service, request_reload
from omniroute.infra.config_loader import LiveConfig, parse_config
from omniroute.infra.settings import Settings
from tests.consumers.conftest import RunnerFactory
from tests.support import (
    CONFIG_YAML,
    ENVIRON,
    EventTap,
    about,
    customer_writes,
    new_customer,
    tap,
    wait_for,
)

WEDNESDAY_NOON_SP = datetime(2026, 11, 25, 15, 0, tzinfo=UTC)
SATURDAY_SP = datetime(2026, 11, 28, 15, 0, tzinfo=UTC)


@pytest.fixture
async def flow(settings: Settings) -> AsyncIterator[EventTap]:
    async with tap(settings.amqp_url.get_secret_value(), "conversation.*") as events:
        yield events


async def _until(
    spy: EventTap, kind: str, customer_conversation: str | None = None, customer: str | None = None
) -> Any:
    """The next ``kind`` event of this conversation (or this customer): events other tests
    left in the outbox may be relayed while this one runs."""
    async with asyncio.timeout(10):
        while True:
            event = await spy.next()
            if event["type"] != kind:
                continue
            if customer_conversation not in (None, event["conversation_id"]):
                continue
            if customer is None or (event.get("data") or {}).get("customer") == customer:
                return event


@pytest.mark.parametrize(
    ("body", "queue", "skills", "priority"),
    [
        ("Meu BOLETO não chegou", "billing", {"billing": 5}, 5),
        ("a fatura veio errada, é urgente", "billing", {"billing": 5}, 10),
        ("quero comprar um plano", "sales", {"sales": 3}, 0),
        ("oi, tudo bem?", "general", {}, 0),
    ],
)
async def test_webhook_ends_queued_in_the_expected_queue(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    flow: EventTap,
    db: asyncpg.Pool,
    body: str,
    queue: str,
    skills: dict[str, int],
    priority: int,
) -> None:
    await start_runner(conversations.STAGE)
    await start_runner(classify.STAGE, clock=lambda: WEDNESDAY_NOON_SP)
    customer = new_customer()
    await customer_writes(router, customer, body)
    opened = await _until(flow, "conversation.opened", customer=customer)
    classified = await _until(flow, "conversation.classified", opened["conversation_id"])
    queued = await _until(flow, "conversation.queued", opened["conversation_id"])
    assert classified["data"]["queue"] == queue == queued["data"]["queue"]
    assert classified["data"]["skills"] == skills
    assert queued["data"]["priority"] == priority
    assert classified["data"]["fallback"] is (queue == "general")
    if queue != "general":
        assert classified["data"]["route"]["rule"] == queue
    row = await db.fetchrow("SELECT * FROM conversations WHERE id = $1", opened["conversation_id"])
    assert row is not None
    assert row["state"] == "queued" and row["queue"] == queue
    assert row["classification"]["matched"] == classified["data"]["matched"]
    assert row["queued_at"] == WEDNESDAY_NOON_SP


async def test_out_of_hours_close_action_closes_the_conversation(
    router: TestClient[Any, Any], start_runner: RunnerFactory, flow: EventTap, db: asyncpg.Pool
) -> None:
    await start_runner(conversations.STAGE)
    await start_runner(classify.STAGE, clock=lambda: SATURDAY_SP)
    customer = new_customer()
    await customer_writes(router, customer, "quero comprar hoje")
    opened = await _until(flow, "conversation.opened", customer=customer)
    classified = await _until(flow, "conversation.classified", opened["conversation_id"])
    closed = await _until(flow, "conversation.closed", opened["conversation_id"])
    assert classified["data"]["out_of_hours"] is True
    assert classified["data"]["out_of_hours_action"] == "close"
    assert closed["data"]["reason"] == "out_of_hours"
    assert closed["data"]["automated_message"] == "out_of_hours"
    state = await db.fetchval(
        "SELECT state FROM conversations WHERE id = $1", opened["conversation_id"]
    )
    assert state == "closed"
    # The customer writes again: a new conversation, not the closed one.
    await customer_writes(router, customer, "alô?")
    again = await _until(flow, "conversation.opened", customer=customer)
    assert again["conversation_id"] != opened["conversation_id"]


async def test_redelivered_opened_event_is_classified_once(
    router: TestClient[Any, Any], start_runner: RunnerFactory, flow: EventTap, settings: Settings
) -> None:
    await start_runner(conversations.STAGE)
    customer = new_customer()
    await customer_writes(router, customer, "boleto")
    opened = await _until(flow, "conversation.opened", customer=customer)
    from omniroute.infra.bus import Bus
    from schemas.events import Envelope

    bus = Bus.from_settings(settings)
    await bus.start()
    await bus.wait_ready()
    await bus.publish(Envelope.model_validate(opened))  # a redelivery of the same event
    await bus.close()
    await start_runner(classify.STAGE, clock=lambda: WEDNESDAY_NOON_SP)
    await _until(flow, "conversation.classified", opened["conversation_id"])
    await _until(flow, "conversation.queued", opened["conversation_id"])
    await flow.expect_none(within=0.5, where=about(conversation_id=opened["conversation_id"]))


async def test_unknown_workstream_goes_to_the_default_queue_with_a_note(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    flow: EventTap,
    config: LiveConfig,
) -> None:
    await start_runner(conversations.STAGE)
    await start_runner(classify.STAGE, clock=lambda: WEDNESDAY_NOON_SP)
    customer = new_customer()
    # The router accepted the message while support-pt existed; then the config changed.
    await customer_writes(router, customer, "boleto")
    renamed = CONFIG_YAML.replace("support-pt", "support-br")
    config.current = parse_config(renamed, "renamed.yaml", ENVIRON)
    opened = await _until(flow, "conversation.opened", customer=customer)
    classified = await _until(flow, "conversation.classified", opened["conversation_id"])
    assert classified["data"]["queue"] == "general"
    assert any("no longer exists" in note for note in classified["data"]["notes"])


async def test_reload_switches_rules_for_new_conversations_only(
    router: TestClient[Any, Any],
    settings: Settings,
    flow: EventTap,
    db: asyncpg.Pool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in ENVIRON.items():  # a reload reads secrets from the process environment
        monkeypatch.setenv(name, value)
    path = tmp_path / "omniroute.yaml"
    path.write_text(CONFIG_YAML)
    live = LiveConfig(parse_config(CONFIG_YAML, str(path), ENVIRON), path)
    service = Service(settings, live, ["conversations", "classify"], serve_http=False)
    await service.start()
    try:
        before = new_customer()
        await customer_writes(router, before, "boleto")
        first = await _queued_for(flow, db, before)
        assert first["data"]["queue"] == "billing"

        path.write_text(CONFIG_YAML.replace("queue: billing}", "queue: general}"))
        old = live.current
        await request_reload(settings)
        await wait_for(lambda: _changed(live, old), timeout=10)

        after = new_customer()
        await customer_writes(router, after, "boleto")
        second = await _queued_for(flow, db, after)
        assert second["conversation_id"] != first["conversation_id"]
        assert second["data"]["queue"] == "general"
        still = await db.fetchval(
            "SELECT queue FROM conversations WHERE id = $1", first["conversation_id"]
        )
        assert still == "billing"
    finally:
        await service.stop()


async def _queued_for(flow: EventTap, db: asyncpg.Pool, customer: str) -> Any:
    """``conversation.queued`` of this customer's conversation (not another test's leftover
    relayed meanwhile: seen taking one queued in general for this test's billing)."""
    conversation = await wait_for(
        lambda: db.fetchval("SELECT id::text FROM conversations WHERE customer = $1", customer)
    )
    return await _until(flow, "conversation.queued", customer_conversation=conversation)


async def _changed(live: LiveConfig, old: object) -> bool:
    return live.current is not old


async def test_classification_uses_the_earliest_message_whichever_was_stored_first(
    bus: Any, start_runner: RunnerFactory, flow: EventTap, db: asyncpg.Pool
) -> None:
    from datetime import timedelta

    from tests.support import received_event

    await start_runner(conversations.STAGE)
    customer = new_customer()
    first_at = datetime.now(UTC)
    # The later message reaches the stage first (another replica was faster).
    await bus.publish(
        received_event(customer=customer, body="alô?", received_at=first_at + timedelta(seconds=1))
    )
    opened = await _until(flow, "conversation.opened", customer=customer)
    await bus.publish(
        received_event(customer=customer, body="meu boleto venceu", received_at=first_at)
    )
    await wait_for(
        lambda: db.fetchval(
            "SELECT count(*) = 2 FROM messages WHERE conversation_id = $1",
            opened["conversation_id"],
        )
    )
    await start_runner(classify.STAGE, clock=lambda: WEDNESDAY_NOON_SP)
    classified = await _until(flow, "conversation.classified", opened["conversation_id"])
    assert classified["data"]["queue"] == "billing"
    opened_at = await db.fetchval(
        "SELECT opened_at FROM conversations WHERE id = $1", opened["conversation_id"]
    )
    assert opened_at == first_at
