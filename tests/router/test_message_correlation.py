"""Support staff and an agent's tools find a message in Twilio's console from our API: each
message's Twilio sid, the ``ButtonPayload`` (and ``ButtonText``) of a customer's quick-reply
tap, and every delivery status callback, in the agent's thread and the admin's conversation.

Everything goes the real way: the customer's tap and Twilio's callbacks as signed webhooks
into the router, stored by the real conversations and status stages."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from consumers.conversations import STAGE as CONVERSATIONS
from consumers.status import STAGE as STATUS_STAGE
from omniroute.infra.config_loader import LiveConfig
from router.app import create_app
from router.state import BUS
from tests.conftest import Infra, RunnerFactory, make_settings
from tests.support import (
    INBOUND,
    inbound_form,
    new_agent,
    new_customer,
    post_webhook,
    status_callback,
    wait_for,
)

Client = TestClient[Any, Any]
ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
async def admin_router(infra: Infra, config: LiveConfig) -> AsyncIterator[Client]:
    app = create_app(make_settings(infra, admin_token=ADMIN_TOKEN), config)
    async with TestClient(TestServer(app)) as client:
        async with asyncio.timeout(10):
            await app[BUS].wait_ready()
        yield client


async def test_sid_button_payload_and_status_history_reach_both_views(
    admin_router: Client, start_runner: RunnerFactory, db: asyncpg.Pool
) -> None:
    await start_runner(CONVERSATIONS)
    await start_runner(STATUS_STAGE)
    customer = new_customer()
    tap = inbound_form(
        customer=customer,
        body="Yes, reschedule",
        MessageType="button",
        ButtonText="Yes, reschedule",
        ButtonPayload="reschedule:order-42",
    )
    typed = inbound_form(customer=customer, body="and today?")
    await post_webhook(admin_router, INBOUND, tap)
    await post_webhook(admin_router, INBOUND, typed)
    tap_sid, typed_sid = dict(tap)["MessageSid"], dict(typed)["MessageSid"]

    async def stored() -> Any:
        return await db.fetchval(
            "SELECT conversation_id FROM messages WHERE twilio_sid = $1"
            " AND EXISTS (SELECT 1 FROM messages WHERE twilio_sid = $2)",
            tap_sid,
            typed_sid,
        )

    conversation_id = await wait_for(stored)
    agent, auth = await new_agent(db)
    await db.execute(
        "UPDATE conversations SET state = 'active', agent_id = $2, assigned_at = now()"
        " WHERE id = $1",
        conversation_id,
        agent,
    )
    # The agent's reply as the outbound stage leaves it once Twilio took it.
    reply_sid = f"SM{secrets.token_hex(16)}"
    await db.execute(
        "INSERT INTO messages (id, conversation_id, direction, body, status, received_at,"
        " agent_id, kind, twilio_sid) VALUES ($1, $2, 'outbound', 'Done', 'sent', $3, $4,"
        " 'text', $5)",
        uuid.uuid4(),
        conversation_id,
        datetime.now(UTC),
        agent,
        reply_sid,
    )
    for status in ("sent", "delivered", "read"):
        await status_callback(admin_router, reply_sid, status)

    async def read() -> Any:
        return await db.fetchval(
            "SELECT status = 'read' FROM messages WHERE twilio_sid = $1", reply_sid
        )

    await wait_for(read)

    response = await admin_router.get(
        f"/api/conversations/{conversation_id}/messages", headers=auth
    )
    assert response.status == 200, await response.text()
    thread = {m["twilio_sid"]: m for m in await response.json()}
    response = await admin_router.get(f"/api/admin/conversations/{conversation_id}", headers=ADMIN)
    assert response.status == 200, await response.text()
    detail = {m["twilio_sid"]: m for m in (await response.json())["messages"]}

    for view in (thread, detail):
        assert set(view) == {tap_sid, typed_sid, reply_sid}
        assert view[tap_sid]["button_payload"] == "reschedule:order-42"
        assert view[tap_sid]["button_text"] == "Yes, reschedule"
        assert view[typed_sid]["button_payload"] is None
        assert view[typed_sid]["button_text"] is None
        assert view[reply_sid]["button_payload"] is None
        assert [s["status"] for s in view[reply_sid]["status_history"]] == [
            "sent",
            "delivered",
            "read",
        ]
        assert all(s["received_at"] for s in view[reply_sid]["status_history"])
        assert view[tap_sid]["status_history"] == []
