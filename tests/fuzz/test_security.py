"""Security: an agent reaches only its own offers and conversations, tokens do not cross
between the admin and agent APIs, a forged webhook cannot make the router leak the
account's credentials, and no secret (Twilio auth tokens, webhook keys, the admin token,
agents' tokens) ever shows in a log line, an event or an error body."""

from __future__ import annotations

import base64
import io
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import asyncpg
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from omniroute.infra.settings import Settings
from tests.fuzz.common import TIMEOUT, CrashWatch, fuzz_settings
from tests.fuzz.conftest import ADMIN, ADMIN_TOKEN, Served, World, _conversation
from tests.fuzz.strategies import json_values
from tests.support import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    ENVIRON,
    EventTap,
    inbound_form,
    new_customer,
    signed_post,
    tap,
)

pytestmark = [pytest.mark.fuzz, pytest.mark.integration, TIMEOUT]

# Every agent endpoint that names someone else's work; {c} a conversation, {o} an offer,
# {m} a message, {q} a queued conversation (pick mode).
FOREIGN = (
    ("GET", "/api/conversations/{c}"),
    ("GET", "/api/conversations/{c}/messages"),
    ("POST", "/api/conversations/{c}/messages"),
    ("GET", "/api/conversations/{c}/messages/{m}/media/0"),
    ("POST", "/api/conversations/{c}/close"),
    ("POST", "/api/conversations/{c}/transfer"),
    ("POST", "/api/conversations/{c}/wait"),
    ("PATCH", "/api/conversations/{c}/variables"),
    ("POST", "/api/offers/{o}/accept"),
    ("POST", "/api/offers/{o}/decline"),
    ("POST", "/api/queue-items/{q}/pick"),
    ("GET", "/api/queues/billing/items"),
)

bodies = st.one_of(
    st.none(),
    st.sampled_from(
        [
            {"queue": "sales"},
            {"queue": "general"},
            {"text": "hi"},
            {"reason": "done"},
            {"variables": {"x": "y"}},
            {"template": {"name": "order_update", "language": "pt-BR", "variables": {}}},
        ]
    ),
    json_values(),
)


def _path(template: str, world: World) -> str:
    return template.format(
        c=world.conversation_id,
        o=world.offer_id,
        m=world.message_id,
        q=world.queued_conversation_id,
    )


async def _state(db: asyncpg.Pool, world: World) -> Any:
    return await db.fetchrow(
        "SELECT c.state, c.agent_id, c.variables, c.queue,"
        " (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) AS messages,"
        " (SELECT state FROM offers WHERE id = $2) AS offer,"
        " (SELECT state FROM conversations WHERE id = $3) AS queued"
        " FROM conversations c WHERE c.id = $1",
        world.conversation_id,
        world.offer_id,
        world.queued_conversation_id,
    )


@fuzz_settings()
@given(
    endpoint=st.sampled_from(FOREIGN),
    body=bodies,
    key=st.none()
    | st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=10),
)
async def test_agents_cannot_reach_other_agents_work(
    served: Served,
    world: World,
    db: asyncpg.Pool,
    endpoint: tuple[str, str],
    body: Any,
    key: str | None,
) -> None:
    crashes = CrashWatch()
    before = await _state(db, world)
    method, template = endpoint
    headers = dict(world.intruder.auth)
    if key:
        headers["Idempotency-Key"] = key
    response = await served.client.request(
        method, _path(template, world), headers=headers, data=orjson.dumps(body)
    )
    text = await response.text()
    assert response.status != 500, (method, template, text, crashes.new())
    # A body no caller may send (a NUL) is refused before ownership is looked at; it
    # reveals nothing about the other agent's work.
    refused_input = response.status == 422 and "invalid_character" in text
    assert response.status in (403, 404) or refused_input, (method, template, response.status)
    assert await _state(db, world) == before, "another agent's work changed"


async def test_the_owner_does_reach_its_own_work(served: Served, world: World) -> None:
    """The control for the test above: the same reads succeed with the owner's token."""
    for method, template in (*FOREIGN[:2], ("GET", "/api/queues/billing/items")):
        response = await served.client.request(
            method, _path(template, world), headers=world.owner.auth
        )
        assert response.status == 200, (template, await response.text())
    offers = await (await served.client.get("/api/me/offers", headers=world.owner.auth)).json()
    assert world.offer_id in [o["id"] for o in offers]
    theirs = await (await served.client.get("/api/me/offers", headers=world.intruder.auth)).json()
    assert theirs == []
    mine = await (
        await served.client.get("/api/me/conversations", headers=world.intruder.auth)
    ).json()
    assert mine == []


ADMIN_CALLS = (
    ("GET", "/api/admin/agents"),
    ("POST", "/api/admin/agents"),
    ("GET", "/api/admin/conversations"),
    ("GET", "/api/admin/conversations/{c}"),
    ("PATCH", "/api/admin/conversations/{c}/variables"),
    ("GET", "/api/admin/surveys"),
)
AGENT_CALLS = (("GET", "/api/me"), ("GET", "/api/me/offers"), ("GET", "/api/conversations/{c}"))


async def test_tokens_do_not_cross_between_apis(served: Served, world: World) -> None:
    for method, template in ADMIN_CALLS:
        for auth in (world.owner.auth, {"Authorization": f"Bearer {AUTH_TOKEN}"}, {}):
            response = await served.client.request(
                method, _path(template, world), headers=auth, json={}
            )
            assert response.status == 401, (template, auth, response.status)
    for method, template in AGENT_CALLS:
        for auth in (ADMIN, {"Authorization": f"Basic {world.owner.token}"}, {}):
            response = await served.client.request(method, _path(template, world), headers=auth)
            assert response.status == 401, (template, auth, response.status)


async def test_media_when_twilio_is_unreachable_is_a_502(
    served: Served, world: World, db: asyncpg.Pool, fuzz_settings: Settings
) -> None:
    """The attachment lives on the configured Twilio host, which is down: the contract
    answers 502 ("Twilio could not provide the resource"), not a 500."""
    twilio = str(fuzz_settings.twilio_api_url).rstrip("/")
    conversation_id, message_id = await _conversation(
        db, "active", "general", world.owner.id, f"{twilio}/2010-04-01/Media/ME0"
    )
    crashes = CrashWatch()
    response = await served.client.get(
        f"/api/conversations/{conversation_id}/messages/{message_id}/media/0",
        headers=world.owner.auth,
    )
    text = await response.text()
    assert response.status == 502, (response.status, text, crashes.new())
    await db.execute("UPDATE conversations SET state = 'closed' WHERE id = $1", conversation_id)


# Secrets: what must never be seen outside the process.


def _secrets(world: World) -> dict[str, str]:
    basic = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
    return {
        **{f"env {name}": value for name, value in ENVIRON.items()},
        "admin token": ADMIN_TOKEN,
        "owner token": world.owner.token,
        "intruder token": world.intruder.token,
        "basic auth": basic,
    }


@pytest.fixture
async def everything(settings: Settings) -> AsyncIterator[EventTap]:
    async with tap(settings.amqp_url.get_secret_value(), "#") as spy:
        yield spy


async def test_secrets_never_appear_in_logs_events_or_errors(
    served: Served,
    world: World,
    rendered_logs: io.BytesIO,
    caplog: pytest.LogCaptureFixture,
    everything: EventTap,
) -> None:
    caplog.set_level(logging.DEBUG)
    client = served.client
    bodies: list[str] = []

    async def call(method: str, path: str, **kwargs: Any) -> int:
        response = await client.request(method, path, **kwargs)
        text = await response.text()
        if response.status >= 400:
            bodies.append(f"{response.status} {method} {path}: {text}")
        return response.status

    inbound = "/twilio/contoso/inbound"
    # Webhooks: accepted, forged, replayed with a change, unknown account, not a form.
    form = inbound_form(customer=new_customer(), body="secret check")
    body, headers = signed_post(inbound, form)
    assert await call("POST", inbound, data=body, headers=headers) == 200
    await call("POST", inbound, data=body + b"&x=1", headers=headers)
    await call("POST", inbound, data=body, headers={**headers, "X-Twilio-Signature": "AAAA"})
    await call("POST", "/twilio/nobody/inbound", data=body, headers=headers)
    await call(
        "POST",
        "/twilio/contoso/status",
        data=b'{"a": 1}',
        headers={
            "Content-Type": "application/json",
            "X-Twilio-Signature": headers["X-Twilio-Signature"],
        },
    )
    await call("POST", inbound, data=urlencode({"a": "\ufffd"}).encode(), headers=headers)
    # Admin: create an agent (its token is in the answer, and must be nowhere else).
    created = await client.post(
        "/api/admin/agents",
        json={"name": "leak-check", "queues": ["general"], "capacity": 0},
        headers={**ADMIN, "Idempotency-Key": uuid.uuid4().hex},
    )
    assert created.status == 201
    new_token = (await created.json())["token"]
    await call("GET", "/api/admin/agents", headers=ADMIN)
    await call("GET", "/api/admin/agents", headers={"Authorization": f"Bearer {new_token}"})
    await call("POST", "/api/admin/agents", headers=ADMIN, data=b"{not json")
    await call("POST", "/api/admin/agents", headers=ADMIN, json={"name": "", "capacity": -1})
    # Agents: their own work, someone else's, presence (an event), media (credentials).
    await call("PUT", "/api/me/presence", headers=world.owner.auth, json={"presence": "busy"})
    await call("PUT", "/api/me/presence", headers=world.owner.auth, json={"presence": "offline"})
    await call("GET", f"/api/conversations/{world.conversation_id}", headers=world.intruder.auth)
    await call("GET", "/api/me", headers=ADMIN)
    await call("GET", "/api/me", headers={"Authorization": f"Bearer {AUTH_TOKEN}"})
    await call(
        "GET",
        f"/api/conversations/{world.conversation_id}/messages/{world.message_id}/media/0",
        headers=world.owner.auth,
    )
    await call(
        "POST",
        f"/api/conversations/{world.conversation_id}/messages",
        headers={**world.owner.auth, "Idempotency-Key": "k" * 300},
        json={"text": "hi"},
    )
    events: list[bytes] = []
    while not everything.events.empty():
        event, _ = everything.events.get_nowait()
        events.append(orjson.dumps(event))
    assert events, "the accepted webhook and presence changes published events"

    logs = rendered_logs.getvalue().decode("utf-8", "replace")
    stdlib = "\n".join(
        record.getMessage() + str(record.exc_info or "") for record in caplog.records
    )
    assert logs, "nothing was logged: the capture does not work"
    places = {
        "structlog": logs,
        "stdlib logging": stdlib,
        "events": b"\n".join(events).decode(),
        "error bodies": "\n".join(bodies),
    }
    secrets = {**_secrets(world), "created token": new_token}
    leaks = [
        f"{what} in {where}"
        for what, secret in secrets.items()
        for where, text in places.items()
        if secret in text
    ]
    assert not leaks, leaks
