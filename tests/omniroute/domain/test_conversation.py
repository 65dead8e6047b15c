"""The conversation state machine's one owner keeps the trace: a walk of one MessageSid
from the signed webhook to ``conversation.assigned``, through the real router, stages,
RabbitMQ and PostgreSQL, keeps one correlation id, and each event names its cause."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from consumers import classify, conversations, distribute
from omniroute.infra.config_loader import LiveConfig, parse_config
from omniroute.infra.settings import Settings
from tests.consumers.conftest import RunnerFactory
from tests.support import (
    CONFIG_YAML,
    ENVIRON,
    EventTap,
    customer_writes,
    new_agent,
    new_customer,
    purge_queues,
    tap,
)

# A queue of this module's own, so no other test's agents or work meet this walk.
QUEUE = "trace-walk"
# Only this walk's message reaches the queue (a routing rule on its words): work that earlier
# modules left in the stage queues or the outbox goes to the fallback queue, not to our agent.
TRACE_WORDS = "rastreio de ponta a ponta"
TRACE_YAML = CONFIG_YAML.replace(
    "    routing:\n",
    "    routing:\n"
    f"      - {{name: trace, when: {{field: body, op: contains, value: {TRACE_WORDS}}},"
    f" queue: {QUEUE}}}\n",
    1,
).replace("queues:\n", f"queues:\n  - name: {QUEUE}\n", 1)


@pytest.fixture
def config() -> LiveConfig:
    return LiveConfig(parse_config(TRACE_YAML, "trace.yaml", ENVIRON))


async def _until(spy: EventTap, kind: str, conversation_id: str | None) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            event: dict[str, Any] = await spy.next()
            if event["type"] == kind and conversation_id in (None, event["conversation_id"]):
                return event


async def test_one_message_sid_keeps_one_correlation_up_to_the_assignment(
    router: TestClient[Any, Any],
    start_runner: RunnerFactory,
    settings: Settings,
    db: asyncpg.Pool,
) -> None:
    await start_runner(conversations.STAGE)
    await start_runner(classify.STAGE, clock=lambda: datetime(2026, 11, 25, 15, tzinfo=UTC))
    await start_runner(distribute.STAGE, tick_interval=0.1)
    # Earlier modules leave events in the stage queues: drop them, this walk is about its own.
    amqp = settings.amqp_url.get_secret_value()
    await purge_queues(
        amqp, "omniroute.conversations", "omniroute.classify", "omniroute.distribute"
    )
    agent, auth = await new_agent(db, queues=[QUEUE], presence="available")
    try:
        await _walk(router, settings, auth)
    finally:  # nobody is left available for later modules' stages to offer work to
        await db.execute("UPDATE agents SET presence = 'offline' WHERE id = $1", agent)


async def _walk(router: TestClient[Any, Any], settings: Settings, auth: dict[str, str]) -> None:
    customer = new_customer()
    async with tap(
        settings.amqp_url.get_secret_value(), "message.received", "conversation.*", "offer.*"
    ) as spy:
        sid = await customer_writes(router, customer, f"quero falar com alguém: {TRACE_WORDS}")
        received = await _until(spy, "message.received", None)
        while received["data"]["message_sid"] != sid:
            received = await _until(spy, "message.received", None)
        opened = await _until(spy, "conversation.opened", None)
        while opened["data"].get("customer") != customer:  # stages may still drain older work
            opened = await _until(spy, "conversation.opened", None)
        cid = opened["conversation_id"]
        classified = await _until(spy, "conversation.classified", cid)
        queued = await _until(spy, "conversation.queued", cid)
        offered = await _until(spy, "conversation.offered", cid)
        accepted = await router.post(
            f"/api/offers/{offered['data']['offer_id']}/accept", headers=auth
        )
        assert accepted.status == 200, await accepted.text()
        assigned = await _until(spy, "conversation.assigned", cid)

    walk = [received, opened, classified, queued, offered, assigned]
    assert {e["correlation_id"] for e in walk} == {received["correlation_id"]}
    assert opened["causation_id"] == received["id"]
    assert classified["causation_id"] == opened["id"]
    assert queued["causation_id"] == opened["id"]
    assert offered["causation_id"] == queued["id"]  # read from the row the cycle locked
    assert assigned["causation_id"] == offered["id"]  # read from the row accept locked
    assert offered["data"]["queue"] == QUEUE


async def test_a_conversation_stored_before_the_trace_was_kept_still_correlates(
    db: asyncpg.Pool, store: Any
) -> None:
    """Rows from before migration 0011 have no trace: events fall back to the conversation
    id as their correlation, as they did before."""
    from omniroute.domain.conversation import ConversationRef
    from schemas.events import ConversationOffered, EventType

    ref = ConversationRef("c-1", "contoso", "billing")
    data = ConversationOffered(
        offer_id="o-1",
        agent_id="a-1",
        queue="billing",
        units=1,
        affinity=False,
        expires_at=datetime(2026, 11, 25, tzinfo=UTC),
    )
    event = ref.event(EventType.CONVERSATION_OFFERED, ("o-1",), data, datetime.now(UTC))
    assert event.correlation_id == "c-1" and event.causation_id is None
