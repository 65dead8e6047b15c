"""What the agent's conversation view reads: the thread says who wrote each message (the
customer, an agent, the router's automated messages), its kind, template and delivery
history; the detail names the templates as they would go out here (language, text,
variables), when wrap-up ends, whether agents may attach files, and the rules that placed it.

Conversations and messages are written straight to the database as the stages would leave
them, so each field is checked against a known row; the close goes through the real API."""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from omniroute.infra.config_loader import LiveConfig, parse_config
from tests.support import BUSINESS, CONFIG_YAML, ENVIRON, new_agent, new_customer

Client = TestClient[Any, Any]

TEMPLATES = (
    "    lifecycle: {wrap_up: 2m}\n"
    "    attachments: {customers: true, agents: false}\n"
    "    templates:\n"
    "      - name: order_update\n"
    "        default_language: pt-BR\n"
    "        languages:\n"
    "          pt-BR:\n"
    f"            content_sid: HX{'a1' * 16}\n"
    '            text: "Olá {{1}}, seu pedido {{2}} saiu."\n'
    "          en:\n"
    f"            content_sid: HX{'b2' * 16}\n"
    '            text: "Hi {{1}}, your order {{2}} shipped."\n'
    "      - name: hello\n"
    "        default_language: en\n"
    "        languages:\n"
    "          en:\n"
    f"            content_sid: HX{'c3' * 16}\n"
    '            text: "Hello {{ name }}, {{name}}!"\n'
)
VIEW_YAML = CONFIG_YAML.replace("  - name: support-en\n", TEMPLATES + "  - name: support-en\n", 1)
TRACE = {
    "matched": [{"ruleset": "topics", "rule": "billing", "why": "body contains boleto"}],
    "route": {"ruleset": "routing", "rule": "billing", "why": "skills.billing exists"},
    "fallback": False,
    "errors": [],
    "notes": [],
    "out_of_hours": False,
}


@pytest.fixture
def config() -> LiveConfig:
    return LiveConfig(parse_config(VIEW_YAML, "view.yaml", ENVIRON))


async def _conversation(
    db: asyncpg.Pool,
    agent_id: str,
    *,
    language: str = "pt-BR",
    classification: dict[str, Any] | None = None,
) -> str:
    """An active conversation of ``agent_id`` in support-pt, as classify and an accept
    leave it."""
    contact_id, conversation_id = uuid.uuid4(), uuid.uuid4()
    customer, now = new_customer(), datetime.now(UTC)
    await db.execute(
        "INSERT INTO contacts (id, account, address, profile_name)"
        " VALUES ($1, 'contoso', $2, 'Ana')",
        contact_id,
        customer,
    )
    await db.execute(
        "INSERT INTO conversations (id, account, business_number, customer, contact_id,"
        " workstream, state, opened_at, last_customer_message_at, queue, agent_id,"
        " assigned_at, language, classification, skills, priority)"
        " VALUES ($1, 'contoso', $2, $3, $4, 'support-pt', 'active', $5, $5, 'billing', $6,"
        " $5, $7, $8, '{\"billing\": 5}', 5)",
        conversation_id,
        BUSINESS,
        customer,
        contact_id,
        now,
        agent_id,
        language,
        classification,
    )
    return str(conversation_id)


async def _message(db: asyncpg.Pool, conversation_id: str, at: datetime, **fields: Any) -> str:
    message_id = str(uuid.uuid4())
    row = {"direction": "outbound", "body": "", "status": "requested", **fields}
    names = ", ".join(row)
    slots = ", ".join(f"${n}" for n in range(4, 4 + len(row)))
    await db.execute(
        f"INSERT INTO messages (id, conversation_id, received_at, {names})"
        f" VALUES ($1, $2, $3, {slots})",
        message_id,
        conversation_id,
        at,
        *row.values(),
    )
    return message_id


async def test_the_thread_says_who_wrote_each_message_and_how_it_went(
    router: Client, db: asyncpg.Pool
) -> None:
    agent, auth = await new_agent(db)
    cid = await _conversation(db, agent)
    start = datetime.now(UTC)
    at = [start + timedelta(seconds=n) for n in range(5)]
    sid = f"SM{secrets.token_hex(16)}"
    history = [
        {"status": "sent", "error_code": None, "received_at": at[3].isoformat()},
        {"status": "delivered", "error_code": None, "received_at": at[4].isoformat()},
    ]
    # Written out of order: the thread is in the order the router received them.
    greeting = await _message(db, cid, at[1], body="Olá! Já vamos atender.", kind="system")
    inbound = await _message(
        db,
        cid,
        at[0],
        direction="inbound",
        body="meu boleto",
        status="received",
        twilio_sid=f"SM{secrets.token_hex(16)}",
        media=[{"url": "https://api.twilio.com/m/1", "content_type": "image/jpeg"}],
    )
    reply = await _message(
        db,
        cid,
        at[2],
        body="Vou verificar",
        status="delivered",
        agent_id=agent,
        kind="text",
        twilio_sid=sid,
        status_history=history,
    )
    template = await _message(
        db,
        cid,
        at[3],
        body="Olá Ana, seu pedido 42 saiu.",
        status="failed",
        agent_id=agent,
        kind="template",
        template={"name": "order_update", "language": "pt-BR", "variables": {}},
        error_code="63016",
        error_message="outside the allowed window",
    )
    skipped = await _message(
        db,
        cid,
        at[4],
        body="Tudo certo?",
        status="skipped",
        kind="system",
        error_message="idle_reminder: window closed and no template",
    )

    response = await router.get(f"/api/conversations/{cid}/messages", headers=auth)
    assert response.status == 200, await response.text()
    thread = await response.json()
    assert [m["id"] for m in thread] == [inbound, greeting, reply, template, skipped]
    by_id = {m["id"]: m for m in thread}
    assert [by_id[i]["sender"] for i in (inbound, greeting, reply, template, skipped)] == [
        "customer",
        "automated",
        "agent",
        "agent",
        "automated",
    ]
    assert by_id[inbound]["media"][0]["content_type"] == "image/jpeg"
    assert by_id[inbound]["agent_id"] is None and by_id[reply]["agent_id"] == agent
    assert [by_id[i]["kind"] for i in (greeting, reply, template)] == [
        "system",
        "text",
        "template",
    ]
    assert by_id[template]["template"] == "order_update" and by_id[reply]["template"] is None
    assert by_id[reply]["twilio_sid"] == sid
    assert [(s["status"], s["received_at"]) for s in by_id[reply]["status_history"]] == [
        ("sent", at[3].isoformat().replace("+00:00", "Z")),
        ("delivered", at[4].isoformat().replace("+00:00", "Z")),
    ]
    assert (by_id[template]["error_code"], by_id[template]["error_message"]) == (
        "63016",
        "outside the allowed window",
    )
    assert by_id[skipped]["status"] == "skipped"
    assert by_id[skipped]["error_message"].startswith("idle_reminder")


async def test_the_detail_names_templates_as_they_would_go_out_here(
    router: Client, db: asyncpg.Pool
) -> None:
    agent, auth = await new_agent(db)
    in_portuguese = await _conversation(db, agent, language="pt-BR", classification=TRACE)
    in_english = await _conversation(db, agent, language="en-GB")

    pt = await (await router.get(f"/api/conversations/{in_portuguese}", headers=auth)).json()
    assert {t["name"]: (t["language"], t["variables"]) for t in pt["templates"]} == {
        "order_update": ("pt-BR", ["1", "2"]),
        "hello": ("en", ["name"]),  # no Portuguese: its default
    }
    [order] = [t for t in pt["templates"] if t["name"] == "order_update"]
    assert order["text"] == "Olá {{1}}, seu pedido {{2}} saiu."
    assert order["languages"] == ["en", "pt-BR"]

    en = await (await router.get(f"/api/conversations/{in_english}", headers=auth)).json()
    languages = {t["name"]: t["language"] for t in en["templates"]}
    assert languages == {"order_update": "en", "hello": "en"}  # en-GB: its base language


async def test_the_detail_says_whether_agents_may_attach_and_why_it_is_here(
    router: Client, db: asyncpg.Pool
) -> None:
    agent, auth = await new_agent(db)
    classified = await _conversation(db, agent, classification=TRACE)
    unclassified = await _conversation(db, agent)

    detail = await (await router.get(f"/api/conversations/{classified}", headers=auth)).json()
    assert detail["attachments"] == {"customers": True, "agents": False}
    assert detail["classification"] == {
        "matched": [TRACE["matched"][0]],  # type: ignore[index]
        "route": TRACE["route"],
        "fallback": False,
    }
    assert (detail["queue"], detail["skills"], detail["priority"]) == ("billing", {"billing": 5}, 5)
    bare = await (await router.get(f"/api/conversations/{unclassified}", headers=auth)).json()
    assert bare["classification"] is None


async def test_wrap_up_says_when_it_ends(router: Client, db: asyncpg.Pool) -> None:
    agent, auth = await new_agent(db, capacity=2, used=1)
    cid = await _conversation(db, agent)
    before = await (await router.get(f"/api/conversations/{cid}", headers=auth)).json()
    assert before["state"] == "active" and before["wrap_up_until"] is None

    ended_at = datetime.now(UTC)
    closed = await router.post(f"/api/conversations/{cid}/close", headers=auth)
    assert closed.status == 200 and (await closed.json())["state"] == "wrap-up"

    after = await (await router.get(f"/api/conversations/{cid}", headers=auth)).json()
    until = datetime.fromisoformat(after["wrap_up_until"])
    assert after["state"] == "wrap-up"
    # The workstream's 2m wrap-up, from the moment the agent ended it.
    assert timedelta(minutes=2) <= until - ended_at < timedelta(minutes=2, seconds=5)
    stored = await db.fetchval("SELECT wrap_up_until FROM conversations WHERE id = $1", cid)
    assert until == stored
