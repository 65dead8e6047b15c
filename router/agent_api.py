"""The agent API: profile and presence, offers, pick mode, own conversations, close and
transfer. An agent sees and acts on its own offers and conversations only; anything else
is a 404, so existence never leaks."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from omniroute.domain.conversation import (
    ConversationRef,
    WorkConflict,
    accept_offer,
    assign,
    claim_capacity,
    close_conversation,
    end_offer,
    release_assignment,
    transfer_to_agent,
    transfer_to_queue,
)
from omniroute.domain.window import window
from omniroute.infra.outbox import add_to_outbox
from router.auth import current_agent
from router.responses import error, invalid_body
from router.state import CONFIG, STORE
from schemas.api import CloseRequest, PresenceUpdate, TransferRequest
from schemas.events import (
    AgentPresenceChanged,
    ConversationEnded,
    EventType,
    new_event,
    utcnow,
)

PRESENCES = ("available", "busy", "dnd", "away", "offline")


def _json(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    return value


def _uuid(value: str) -> str | None:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def _not_found(what: str) -> web.Response:
    return error(404, "not_found", f"no such {what}")


async def _body(request: web.Request, model: type[BaseModel]) -> BaseModel | web.Response:
    try:
        raw = await request.json() if request.body_exists else {}
    except ValueError:
        return error(400, "invalid_json", "the body is not JSON")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        return invalid_body(exc)


def _agent_out(agent: Any) -> dict[str, Any]:
    out: dict[str, Any] = _json(
        {
            "id": agent["id"],
            "name": agent["name"],
            "language": agent["language"],
            "queues": list(agent["queues"]),
            "skills": agent["skills"],
            "capacity": agent["capacity_units"],
            "used": agent["used_units"],
            "presence": agent["presence"],
        }
    )
    return out


async def me(request: web.Request) -> web.Response:
    return web.json_response(_agent_out(await current_agent(request)))


async def set_presence(request: web.Request) -> web.Response:
    agent = await current_agent(request)
    body = await _body(request, PresenceUpdate)
    if isinstance(body, web.Response):
        return body
    assert isinstance(body, PresenceUpdate)
    now = utcnow()
    async with request.app[STORE].transaction() as conn:
        previous = await conn.fetchval(
            "SELECT presence FROM agents WHERE id = $1 FOR UPDATE", agent["id"]
        )
        row = await conn.fetchrow(
            "UPDATE agents SET presence = $2, updated_at = $3 WHERE id = $1 RETURNING *",
            agent["id"],
            body.presence,
            now,
        )
        if previous != body.presence:
            data = AgentPresenceChanged(
                agent_id=str(agent["id"]),
                presence=body.presence,
                previous=previous,
                queues=list(agent["queues"]),
            )
            await add_to_outbox(
                conn,
                [
                    new_event(
                        EventType.AGENT_PRESENCE_CHANGED,
                        account="*",
                        key=(str(agent["id"]), now.isoformat()),
                        data=data.model_dump(mode="json"),
                        occurred_at=now,
                    )
                ],
            )
    return web.json_response(_agent_out(row))


async def my_offers(request: web.Request) -> web.Response:
    agent = await current_agent(request)
    pool = await request.app[STORE].pool()
    rows = await pool.fetch(
        "SELECT o.id, o.conversation_id, o.expires_at, o.created_at, c.queue, c.customer,"
        " c.priority, c.skills FROM offers o JOIN conversations c ON c.id = o.conversation_id"
        " WHERE o.agent_id = $1 AND o.state = 'pending' ORDER BY o.created_at",
        agent["id"],
    )
    return web.json_response([_json(dict(r)) for r in rows])


async def _decide_offer(request: web.Request, outcome: str) -> web.Response:
    agent = await current_agent(request)
    offer_id = _uuid(request.match_info["offer_id"])
    if offer_id is None:
        return _not_found("offer")
    try:
        async with request.app[STORE].transaction() as conn:
            now = utcnow()
            if outcome == "accepted":
                event = await accept_offer(conn, offer_id, str(agent["id"]), now)
            else:
                event = await end_offer(conn, offer_id, str(agent["id"]), "declined", now)
            await add_to_outbox(conn, [event])
    except WorkConflict as exc:
        if exc.code == "not_found":
            return _not_found("offer")
        return error(409, exc.code, str(exc))
    return web.json_response(
        {"offer_id": offer_id, "state": outcome, "conversation_id": event.conversation_id}
    )


async def accept(request: web.Request) -> web.Response:
    return await _decide_offer(request, "accepted")


async def decline(request: web.Request) -> web.Response:
    return await _decide_offer(request, "declined")


_PICKABLE = """
SELECT c.id, c.queue, c.priority, c.queued_at, c.skills, c.customer, c.workstream, c.units
FROM conversations c
WHERE c.state = 'queued' AND c.queue = $1
  AND NOT EXISTS (SELECT 1 FROM jsonb_each_text(c.skills) s
                  WHERE COALESCE(($2::jsonb ->> s.key)::int, 0) < s.value::int)
ORDER BY c.priority DESC, c.queued_at
LIMIT 100
"""


async def queue_items(request: web.Request) -> web.Response:
    """Pick mode: what this agent may take from a queue it belongs to."""
    agent = await current_agent(request)
    queue = request.match_info["queue"]
    if queue not in agent["queues"]:
        return _not_found("queue")
    pool = await request.app[STORE].pool()
    rows = await pool.fetch(_PICKABLE, queue, agent["skills"])
    free = agent["capacity_units"] - agent["used_units"]
    items = [_json(dict(r)) | {"fits_capacity": r["units"] <= free} for r in rows]
    return web.json_response(items)


async def pick(request: web.Request) -> web.Response:
    agent = await current_agent(request)
    conversation_id = _uuid(request.match_info["item_id"])
    if conversation_id is None:
        return _not_found("queue item")
    now = utcnow()
    async with request.app[STORE].transaction() as conn:
        row = await conn.fetchrow(
            "SELECT id, account, queue, state, units FROM conversations WHERE id = $1"
            " AND queue = ANY($2::text[]) FOR UPDATE",
            conversation_id,
            list(agent["queues"]),
        )
        if row is None:
            return _not_found("queue item")
        if row["state"] != "queued":
            return error(409, "already_taken", "the conversation is no longer waiting")
        if not await claim_capacity(conn, str(agent["id"]), row["units"], now):
            return error(409, "no_capacity", "you have no free capacity for this conversation")
        conv = ConversationRef(conversation_id, row["account"], row["queue"])
        await add_to_outbox(
            conn, [await assign(conn, conv, str(agent["id"]), row["units"], "pick", now)]
        )
    return web.json_response({"conversation_id": conversation_id, "state": "active"})


_CONVERSATION = """
SELECT c.id, c.account, c.business_number, c.customer, c.workstream, c.state, c.queue,
       c.agent_id,
       c.skills, c.priority, c.severity, c.language, c.variables, c.opened_at,
       c.assigned_at, c.last_customer_message_at, c.window_closed_at, ct.profile_name
FROM conversations c JOIN contacts ct ON ct.id = c.contact_id
WHERE c.id = $1 AND c.agent_id = $2 AND c.state IN ('active', 'waiting', 'wrap-up')
"""


def _window(
    last_customer_message_at: datetime, now: datetime, closed_at: datetime | None = None
) -> dict[str, Any]:
    current = window(last_customer_message_at, now, closed_at)
    return {"open": current.open, "closes_at": current.closes_at.isoformat()}


async def my_conversations(request: web.Request) -> web.Response:
    agent = await current_agent(request)
    pool = await request.app[STORE].pool()
    rows = await pool.fetch(
        "SELECT id, customer, state, queue, priority, assigned_at, last_customer_message_at,"
        " window_closed_at FROM conversations"
        " WHERE agent_id = $1 AND state IN ('active', 'waiting', 'wrap-up')"
        " ORDER BY assigned_at",
        agent["id"],
    )
    now = utcnow()
    return web.json_response(
        [
            _json(dict(r))
            | {"window": _window(r["last_customer_message_at"], now, r["window_closed_at"])}
            for r in rows
        ]
    )


async def _own_conversation(request: web.Request) -> tuple[Any, Any] | web.Response:
    agent = await current_agent(request)
    conversation_id = _uuid(request.match_info["conversation_id"])
    if conversation_id is None:
        return _not_found("conversation")
    pool = await request.app[STORE].pool()
    row = await pool.fetchrow(_CONVERSATION, conversation_id, agent["id"])
    if row is None:
        return _not_found("conversation")
    return agent, row


async def conversation(request: web.Request) -> web.Response:
    found = await _own_conversation(request)
    if isinstance(found, web.Response):
        return found
    _, row = found
    workstream = request.app[CONFIG].current.workstream(row["workstream"])
    current = _window(row["last_customer_message_at"], utcnow(), row["window_closed_at"])
    templates = [
        {"name": t.name, "languages": sorted(t.languages)}
        for t in (workstream.templates if workstream else [])
    ]
    return web.json_response(_json(dict(row)) | {"window": current, "templates": templates})


async def conversation_messages(request: web.Request) -> web.Response:
    found = await _own_conversation(request)
    if isinstance(found, web.Response):
        return found
    _, row = found
    pool = await request.app[STORE].pool()
    messages = await pool.fetch(
        "SELECT id, direction, body, media, status, received_at FROM messages"
        " WHERE conversation_id = $1 ORDER BY received_at, id",
        row["id"],
    )
    workstream = request.app[CONFIG].current.workstream(row["workstream"])
    hide = workstream is not None and not workstream.attachments.customers
    return web.json_response([_shown(dict(m), hide) for m in messages])


def _shown(message: dict[str, Any], hide_customer_media: bool) -> Any:
    """A message as the agent sees it: customers' media hidden where the workstream takes
    none (the customer was told)."""
    if hide_customer_media and message["direction"] == "inbound" and message["media"]:
        message = message | {"media": [], "media_hidden": len(message["media"])}
    return _json(message)


async def close(request: web.Request) -> web.Response:
    found = await _own_conversation(request)
    if isinstance(found, web.Response):
        return found
    _, row = found
    body = await _body(request, CloseRequest)
    if isinstance(body, web.Response):
        return body
    assert isinstance(body, CloseRequest)
    now = utcnow()
    workstream = request.app[CONFIG].current.workstream(row["workstream"])
    wrap_up = workstream.lifecycle.wrap_up if workstream else 0.0
    async with request.app[STORE].transaction() as conn:
        state = await conn.fetchval(
            "SELECT state FROM conversations WHERE id = $1 FOR UPDATE", row["id"]
        )
        if state == "closed":
            return error(409, "already_closed", "the conversation is closed")
        if wrap_up > 0 and state != "wrap-up":
            # Ended by the agent: wrap-up holds the capacity until the timer or a second close.
            until = now + timedelta(seconds=wrap_up)
            await conn.execute(
                "UPDATE conversations SET state = 'wrap-up', wrap_up_until = $2,"
                " close_reason = $3, updated_at = now() WHERE id = $1",
                row["id"],
                until,
                body.reason,
            )
            ended = ConversationEnded(
                agent_id=str(row["agent_id"]), workstream=row["workstream"], until=until
            )
            event = new_event(
                EventType.CONVERSATION_ENDED,
                account=row["account"],
                key=(str(row["id"]),),
                data=ended.model_dump(mode="json"),
                occurred_at=now,
                conversation_id=str(row["id"]),
            )
            new_state = "wrap-up"
        else:
            event = await close_conversation(conn, str(row["id"]), body.reason, now)
            new_state = "closed"
        await add_to_outbox(conn, [event])
    return web.json_response({"conversation_id": str(row["id"]), "state": new_state})


async def wait(request: web.Request) -> web.Response:
    """Park an active conversation waiting for the customer: capacity released, the
    customer's next message brings it back (offered to this agent first)."""
    found = await _own_conversation(request)
    if isinstance(found, web.Response):
        return found
    agent, row = found
    now = utcnow()
    async with request.app[STORE].transaction() as conn:
        state = await conn.fetchval(
            "SELECT state FROM conversations WHERE id = $1 FOR UPDATE", row["id"]
        )
        if state != "active":
            return error(409, "not_active", f"the conversation is {state}, not active")
        await release_assignment(conn, str(row["id"]), now)
        await conn.execute(
            "UPDATE conversations SET state = 'waiting', updated_at = now() WHERE id = $1",
            row["id"],
        )
        event = new_event(
            EventType.CONVERSATION_WAITING,
            account=row["account"],
            key=(str(row["id"]), now.isoformat()),
            data={"agent_id": str(agent["id"]), "waiting_since": now.isoformat()},
            occurred_at=now,
            conversation_id=str(row["id"]),
        )
        await add_to_outbox(conn, [event])
    return web.json_response({"conversation_id": str(row["id"]), "state": "waiting"})


async def transfer(request: web.Request) -> web.Response:
    found = await _own_conversation(request)
    if isinstance(found, web.Response):
        return found
    agent, row = found
    body = await _body(request, TransferRequest)
    if isinstance(body, web.Response):
        return body
    assert isinstance(body, TransferRequest)
    config = request.app[CONFIG].current
    if body.queue is not None and config.queue(body.queue) is None:
        return error(422, "unknown_queue", f"no queue named {body.queue!r}")
    now = utcnow()
    try:
        async with request.app[STORE].transaction() as conn:
            if body.queue is not None:
                changes = [
                    await transfer_to_queue(conn, str(row["id"]), body.queue, str(agent["id"]), now)
                ]
            else:
                workstream = config.workstream(row["workstream"])
                timeout = workstream.distribution.offer_timeout if workstream else 60.0
                changes = await transfer_to_agent(
                    conn, str(row["id"]), str(body.agent_id), str(agent["id"]), timeout, now
                )
            await add_to_outbox(conn, changes)
    except WorkConflict as exc:
        status = 404 if exc.code == "not_found" else 409
        return error(status, exc.code, str(exc))
    target = {"queue": body.queue} if body.queue else {"agent_id": str(body.agent_id)}
    state = "queued" if body.queue else "offered"
    return web.json_response({"conversation_id": str(row["id"]), "state": state} | target)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/me", me)
    app.router.add_put("/api/me/presence", set_presence)
    app.router.add_get("/api/me/offers", my_offers)
    app.router.add_post("/api/offers/{offer_id}/accept", accept)
    app.router.add_post("/api/offers/{offer_id}/decline", decline)
    app.router.add_get("/api/queues/{queue}/items", queue_items)
    app.router.add_post("/api/queue-items/{item_id}/pick", pick)
    app.router.add_get("/api/me/conversations", my_conversations)
    app.router.add_get("/api/conversations/{conversation_id}", conversation)
    app.router.add_get("/api/conversations/{conversation_id}/messages", conversation_messages)
    app.router.add_post("/api/conversations/{conversation_id}/close", close)
    app.router.add_post("/api/conversations/{conversation_id}/transfer", transfer)
    app.router.add_post("/api/conversations/{conversation_id}/wait", wait)
