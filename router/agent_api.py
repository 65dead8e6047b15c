"""The agent API: profile and presence, offers, pick mode, own conversations, close and
transfer. An agent sees and acts on its own offers and conversations only; anything else
is a 404, so existence never leaks."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
from aiohttp import web
from pydantic import BaseModel

from omniroute.domain.agents import agent_out, offline_requeue, update_agent
from omniroute.domain.conversation import (
    ConversationRef,
    accept_offer,
    assign,
    claim_capacity,
    end_by_agent,
    end_offer,
    transfer_to_agent,
    transfer_to_queue,
    wait_for_customer,
)
from omniroute.domain.window import language_for, placeholders, window
from omniroute.errors import WorkConflict
from omniroute.infra.outbox import add_to_outbox
from router.auth import current_agent
from router.messages_api import TWILIO_COLUMNS
from router.requests import not_found, own_conversation, parse_body, path_id
from router.responses import error
from router.routes import Many, Route
from router.state import CONFIG, STORE
from schemas.api import (
    AgentConversation,
    AgentMessage,
    AgentProfile,
    AgentUpdate,
    AttachmentPolicy,
    ClassificationTrace,
    CloseRequest,
    ConversationMoved,
    ConversationSummary,
    Offer,
    OfferDecision,
    PresenceUpdate,
    QueueItem,
    TemplateChoice,
    TransferRequest,
    Window,
)
from schemas.config import Attachments, Template
from schemas.events import (
    EventType,
    utcnow,
)

TAGS = ("agent",)


def _answer(model: BaseModel, status: int = 200) -> web.Response:
    """``model`` as the JSON answer; fields the handler did not set are left out."""
    return web.json_response(model.model_dump(mode="json", exclude_unset=True), status=status)


def _profile(agent: asyncpg.Record) -> AgentProfile:
    """The calling agent's view of itself: the admin's view of it, fewer fields."""
    fields = agent_out(agent).model_dump(include=set(AgentProfile.model_fields))
    return AgentProfile.model_validate(fields)


async def me(request: web.Request) -> web.Response:
    return _answer(_profile(await current_agent(request)))


async def set_presence(request: web.Request) -> web.Response:
    """Going offline ends the agent's pending offers (and, where the workstream's policy is
    ``requeue``, sends its conversations back to their queues)."""
    agent = await current_agent(request)
    body = await parse_body(request, PresenceUpdate)
    requeue = offline_requeue(request.app[CONFIG].current)
    async with request.app[STORE].transaction() as conn:
        changed = await update_agent(
            conn,
            str(agent["id"]),
            AgentUpdate(presence=body.presence),
            now=utcnow(),
            requeue_workstreams=requeue,
        )
    assert changed is not None  # the caller's own row (removal is a soft delete)
    return _answer(_profile(changed.after))


async def my_offers(request: web.Request) -> web.Response:
    agent = await current_agent(request)
    pool = await request.app[STORE].pool()
    rows = await pool.fetch(
        "SELECT o.id, o.conversation_id, o.expires_at, o.created_at, c.queue, c.customer,"
        " ct.profile_name AS customer_name, c.priority, c.skills"
        " FROM offers o JOIN conversations c ON c.id = o.conversation_id"
        " JOIN contacts ct ON ct.id = c.contact_id"
        " WHERE o.agent_id = $1 AND o.state = 'pending' ORDER BY o.created_at",
        agent["id"],
    )
    offers = [Offer.model_validate(dict(r)) for r in rows]
    return web.json_response([offer.model_dump(mode="json") for offer in offers])


async def _decide_offer(request: web.Request, outcome: str) -> web.Response:
    agent = await current_agent(request)
    offer_id = path_id(request, "offer_id", "offer")
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
            raise not_found("offer") from None
        return error(409, exc.code, str(exc))
    decision = {"offer_id": offer_id, "state": outcome, "conversation_id": event.conversation_id}
    return _answer(OfferDecision.model_validate(decision))


async def accept(request: web.Request) -> web.Response:
    return await _decide_offer(request, "accepted")


async def decline(request: web.Request) -> web.Response:
    return await _decide_offer(request, "declined")


_PICKABLE = """
SELECT c.id, c.queue, c.priority, c.queued_at, c.skills, c.customer, c.workstream, c.units,
       ct.profile_name AS customer_name
FROM conversations c JOIN contacts ct ON ct.id = c.contact_id
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
        raise not_found("queue")
    pool = await request.app[STORE].pool()
    rows = await pool.fetch(_PICKABLE, queue, agent["skills"])
    free = agent["capacity_units"] - agent["used_units"]
    items = [QueueItem(**dict(r), fits_capacity=r["units"] <= free) for r in rows]
    return web.json_response([item.model_dump(mode="json") for item in items])


async def pick(request: web.Request) -> web.Response:
    agent = await current_agent(request)
    conversation_id = path_id(request, "item_id", "queue item")
    now = utcnow()
    async with request.app[STORE].transaction() as conn:
        row = await conn.fetchrow(
            "SELECT id, account, queue, state, units, correlation_id, last_event_id"
            " FROM conversations WHERE id = $1"
            " AND queue = ANY($2::text[]) FOR UPDATE",
            conversation_id,
            list(agent["queues"]),
        )
        if row is None:
            raise not_found("queue item")
        if row["state"] != "queued":
            return error(409, "already_taken", "the conversation is no longer waiting")
        if not await claim_capacity(conn, str(agent["id"]), row["units"], now):
            return error(409, "no_capacity", "you have no free capacity for this conversation")
        conv = ConversationRef(
            conversation_id,
            row["account"],
            row["queue"],
            row["correlation_id"],
            row["last_event_id"],
        )
        await add_to_outbox(
            conn, [await assign(conn, conv, str(agent["id"]), row["units"], "pick", now)]
        )
    return _answer(ConversationMoved(conversation_id=row["id"], state="active"))


def _window(
    last_customer_message_at: datetime, now: datetime, closed_at: datetime | None = None
) -> Window:
    current = window(last_customer_message_at, now, closed_at)
    return Window(open=current.open, closes_at=current.closes_at)


async def my_conversations(request: web.Request) -> web.Response:
    agent = await current_agent(request)
    pool = await request.app[STORE].pool()
    rows = await pool.fetch(
        "SELECT c.id, c.customer, ct.profile_name AS customer_name, c.state, c.queue,"
        " c.priority, c.assigned_at, c.last_customer_message_at, c.window_closed_at"
        " FROM conversations c JOIN contacts ct ON ct.id = c.contact_id"
        " WHERE c.agent_id = $1 AND c.state IN ('active', 'waiting', 'wrap-up')"
        " ORDER BY c.assigned_at",
        agent["id"],
    )
    now = utcnow()
    summaries = [
        ConversationSummary(
            **dict(r), window=_window(r["last_customer_message_at"], now, r["window_closed_at"])
        )
        for r in rows
    ]
    return web.json_response([summary.model_dump(mode="json") for summary in summaries])


def _template_choice(template: Template, language: str | None) -> TemplateChoice:
    """``template`` as it would go out in a conversation in ``language``."""
    chosen = language_for(template, language)
    text = template.languages[chosen].text
    return TemplateChoice(
        name=template.name,
        languages=sorted(template.languages),
        language=chosen,
        text=text,
        variables=placeholders(text),
    )


def _classification(trace: dict[str, Any] | None) -> ClassificationTrace | None:
    if trace is None:
        return None
    return ClassificationTrace(
        matched=trace.get("matched") or [],
        route=trace.get("route"),
        fallback=bool(trace.get("fallback")),
    )


async def conversation(request: web.Request) -> web.Response:
    _, row = await own_conversation(request)
    workstream = request.app[CONFIG].current.workstream(row["workstream"])
    current = _window(row["last_customer_message_at"], utcnow(), row["window_closed_at"])
    templates = [
        _template_choice(t, row["language"]) for t in (workstream.templates if workstream else [])
    ]
    pool = await request.app[STORE].pool()
    extra = await pool.fetchrow(
        "SELECT wrap_up_until, classification FROM conversations WHERE id = $1", row["id"]
    )
    assert extra is not None  # the agent's own conversation, just read (never deleted)
    policy = workstream.attachments if workstream else Attachments()
    detail = AgentConversation(
        **dict(row),
        window=current,
        templates=templates,
        wrap_up_until=extra["wrap_up_until"] if row["state"] == "wrap-up" else None,
        attachments=AttachmentPolicy(customers=policy.customers, agents=policy.agents),
        classification=_classification(extra["classification"]),
    )
    return _answer(detail)


# Who wrote a message: inbound is the customer's; outbound with an agent is that agent's;
# outbound of origin 'bot' the workstream's bot's (the agent reads the bot's transcript);
# outbound without either is the router's own (automated messages, the survey question).
_MESSAGES = f"""
SELECT id, direction,
       CASE WHEN direction = 'inbound' THEN 'customer'
            WHEN agent_id IS NOT NULL THEN 'agent'
            WHEN origin = 'bot' THEN 'bot' ELSE 'automated' END AS sender,
       agent_id, kind, template ->> 'name' AS template, body, media, status, error_code,
       error_message, received_at, {TWILIO_COLUMNS}
FROM messages
WHERE conversation_id = $1
ORDER BY received_at, id
"""


async def conversation_messages(request: web.Request) -> web.Response:
    _, row = await own_conversation(request)
    pool = await request.app[STORE].pool()
    messages = await pool.fetch(_MESSAGES, row["id"])
    workstream = request.app[CONFIG].current.workstream(row["workstream"])
    hide = workstream is not None and not workstream.attachments.customers
    shown = [_shown(AgentMessage.model_validate(dict(m)), hide) for m in messages]
    return web.json_response([m.model_dump(mode="json", exclude_unset=True) for m in shown])


def _shown(message: AgentMessage, hide_customer_media: bool) -> AgentMessage:
    """A message as the agent sees it: customers' media hidden where the workstream takes
    none (the customer was told)."""
    if hide_customer_media and message.direction == "inbound" and message.media:
        hidden = len(message.media)
        return AgentMessage.model_validate(
            message.model_dump() | {"media": [], "media_hidden": hidden}
        )
    return message


async def close(request: web.Request) -> web.Response:
    _, row = await own_conversation(request)
    body = await parse_body(request, CloseRequest)
    now = utcnow()
    workstream = request.app[CONFIG].current.workstream(row["workstream"])
    wrap_up = workstream.lifecycle.wrap_up if workstream else 0.0
    async with request.app[STORE].transaction() as conn:
        try:
            event = await end_by_agent(
                conn, str(row["id"]), str(row["agent_id"]), body.reason, wrap_up, now
            )
        except WorkConflict as exc:
            return error(409, exc.code, str(exc))
        await add_to_outbox(conn, [event])
    new_state = "wrap-up" if event.type == EventType.CONVERSATION_ENDED else "closed"
    return _answer(ConversationMoved(conversation_id=row["id"], state=new_state))


async def wait(request: web.Request) -> web.Response:
    """Park an active conversation waiting for the customer: capacity released, the
    customer's next message brings it back (offered to this agent first)."""
    agent, row = await own_conversation(request)
    now = utcnow()
    async with request.app[STORE].transaction() as conn:
        try:
            event = await wait_for_customer(conn, str(row["id"]), str(agent["id"]), now)
        except WorkConflict as exc:
            return error(409, exc.code, str(exc))
        await add_to_outbox(conn, [event])
    return _answer(ConversationMoved(conversation_id=row["id"], state="waiting"))


async def transfer(request: web.Request) -> web.Response:
    agent, row = await own_conversation(request)
    body = await parse_body(request, TransferRequest)
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
    if body.queue:
        moved = ConversationMoved(conversation_id=row["id"], state="queued", queue=body.queue)
    else:
        moved = ConversationMoved(
            conversation_id=row["id"], state="offered", agent_id=body.agent_id
        )
    return _answer(moved)


ROUTES = [
    Route(
        "GET", "/api/me", me, "getMe", "The calling agent", TAGS, "agentToken", {200: AgentProfile}
    ),
    Route(
        "PUT",
        "/api/me/presence",
        set_presence,
        "setMyPresence",
        "Set the calling agent's presence",
        TAGS,
        "agentToken",
        {200: AgentProfile},
        errors=(400, 422),
        request=PresenceUpdate,
    ),
    Route(
        "GET",
        "/api/me/offers",
        my_offers,
        "listMyOffers",
        "The calling agent's pending offers",
        TAGS,
        "agentToken",
        {200: Many(Offer)},
    ),
    Route(
        "POST",
        "/api/offers/{offer_id}/accept",
        accept,
        "acceptOffer",
        "Accept an offer",
        TAGS,
        "agentToken",
        {200: OfferDecision},
        errors=(404, 409),
    ),
    Route(
        "POST",
        "/api/offers/{offer_id}/decline",
        decline,
        "declineOffer",
        "Decline an offer",
        TAGS,
        "agentToken",
        {200: OfferDecision},
        errors=(404, 409),
    ),
    Route(
        "GET",
        "/api/queues/{queue}/items",
        queue_items,
        "listQueueItems",
        "Pick mode: the conversations waiting in one of the agent's queues",
        TAGS,
        "agentToken",
        {200: Many(QueueItem)},
        errors=(404,),
    ),
    Route(
        "POST",
        "/api/queue-items/{item_id}/pick",
        pick,
        "pickQueueItem",
        "Pick mode: take a waiting conversation",
        TAGS,
        "agentToken",
        {200: ConversationMoved},
        errors=(404, 409),
    ),
    Route(
        "GET",
        "/api/me/conversations",
        my_conversations,
        "listMyConversations",
        "The calling agent's conversations",
        TAGS,
        "agentToken",
        {200: Many(ConversationSummary)},
    ),
    Route(
        "GET",
        "/api/conversations/{conversation_id}",
        conversation,
        "getMyConversation",
        "A conversation, its window and the templates usable now",
        TAGS,
        "agentToken",
        {200: AgentConversation},
        errors=(404,),
    ),
    Route(
        "GET",
        "/api/conversations/{conversation_id}/messages",
        conversation_messages,
        "listMyConversationMessages",
        "A conversation's messages, oldest first",
        TAGS,
        "agentToken",
        {200: Many(AgentMessage)},
        errors=(404,),
    ),
    Route(
        "POST",
        "/api/conversations/{conversation_id}/close",
        close,
        "closeMyConversation",
        "End a conversation",
        TAGS,
        "agentToken",
        {200: ConversationMoved},
        errors=(400, 404, 409, 422),
        request=CloseRequest,
        request_required=False,
    ),
    Route(
        "POST",
        "/api/conversations/{conversation_id}/transfer",
        transfer,
        "transferMyConversation",
        "Transfer a conversation to a queue, or offer it to one agent",
        TAGS,
        "agentToken",
        {200: ConversationMoved},
        errors=(400, 404, 409, 422),
        request=TransferRequest,
    ),
    Route(
        "POST",
        "/api/conversations/{conversation_id}/wait",
        wait,
        "parkMyConversation",
        "Park my active conversation until the customer writes (capacity released)",
        TAGS,
        "agentToken",
        {200: ConversationMoved},
        errors=(404, 409),
    ),
]
