"""Agents send messages through the window gate, and read their customers' attachments.

``POST /api/conversations/{id}/messages`` stores the message and publishes
``message.send-requested``; the ``outbound`` stage sends it. Outside the 24-hour window a
free-text or media message is refused at once (422 ``window_closed`` with the templates
that can be used) and recorded as rejected. An ``Idempotency-Key`` makes a retry return
the first answer without sending anything new (``omniroute.domain.idempotency``: the same
key with another body is a 422 ``idempotency_key_reused``).

``GET …/messages/{message_id}/media/{n}`` fetches a customer's attachment from Twilio with
the account's credentials, which are only ever sent to the configured Twilio API host.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
from aiohttp import web

from omniroute.domain import idempotency
from omniroute.domain.window import gate, window
from omniroute.errors import IdempotencyError
from omniroute.infra.ids import new_id
from omniroute.infra.metrics import GATE_REJECTIONS
from omniroute.infra.outbox import add_to_outbox
from router.requests import (
    as_uuid,
    idempotency_key,
    keyed,
    own_conversation,
    parse_body,
    refused,
)
from router.responses import error
from router.routes import Content, Route
from router.state import CONFIG, SETTINGS, STORE
from schemas.api import ErrorBody, ErrorDetail, MessageAccepted, Window
from schemas.events import (
    EventType,
    MessageRejected,
    MessageSendRequested,
    new_event,
    utcnow,
)
from schemas.messages import SendMessage

HTTP = web.AppKey("media_http", aiohttp.ClientSession)
TAGS = ("agent",)

# What ties a message to Twilio's side, read alike by the agent's thread and the admin's
# conversation: its sid, the quick-reply button a customer tapped (the webhook's ButtonPayload
# and ButtonText, kept in ``attributes`` by the conversations stage), and every status
# callback in the order the router received them (the status stage appends them in the order
# its replicas happen to commit, which concurrent callbacks can swap).
TWILIO_COLUMNS = """twilio_sid,
    (SELECT COALESCE(jsonb_agg(step ORDER BY (step ->> 'received_at')::timestamptz), '[]')
     FROM jsonb_array_elements(status_history) AS step) AS status_history,
    attributes ->> 'button_payload' AS button_payload,
    attributes ->> 'button_text' AS button_text"""


async def media_session_ctx(app: web.Application) -> AsyncIterator[None]:
    timeout = aiohttp.ClientTimeout(total=app[SETTINGS].twilio_timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        app[HTTP] = session
        yield


async def send(request: web.Request) -> web.Response:
    agent, conv = await own_conversation(request)
    key = idempotency_key(request)
    body = await parse_body(request, SendMessage)
    once = keyed(request, key, idempotency.agent_scope(agent["id"]), body)
    try:
        return await _send(request, agent["id"], conv, body, once)
    except IdempotencyError as exc:
        raise refused(exc) from None


async def _send(
    request: web.Request,
    agent_id: uuid.UUID,
    conv: asyncpg.Record,
    body: SendMessage,
    once: idempotency.IdempotentRequest | None,
) -> web.Response:
    now = utcnow()
    config = request.app[CONFIG].current
    workstream = config.workstream(conv["workstream"])
    async with request.app[STORE].transaction() as conn:
        # The key first: a double click waits here for the first click's answer.
        if once is not None and (
            replay := await idempotency.claim(
                conn, once, wait=request.app[SETTINGS].idempotency_wait
            )
        ):
            return web.json_response(replay.body, status=replay.status)
        state = await conn.fetchrow(
            "SELECT last_customer_message_at, window_closed_at, language FROM conversations"
            " WHERE id = $1 FOR UPDATE",
            conv["id"],
        )
        assert state is not None  # the agent's own conversation, just read
        current = window(state["last_customer_message_at"], now, state["window_closed_at"])
        template = body.template
        verdict = gate(
            workstream,
            current,
            text=body.text,
            media_urls=body.media_urls,
            template=template.name if template else None,
            language=(template.language if template else None) or state["language"],
            variables=template.variables if template else {},
            language_asked=template is not None and template.language is not None,
        )
        message_id = str(new_id())
        rendered = verdict.rendered
        await conn.execute(
            "INSERT INTO messages (id, conversation_id, direction, body, media, status,"
            " received_at, agent_id, kind, template, error_code, error_message)"
            " VALUES ($1, $2, 'outbound', $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            message_id,
            conv["id"],
            rendered.text if rendered else (body.text or ""),
            [{"url": u} for u in body.media_urls],
            "requested" if verdict.allowed else "rejected",
            now,
            agent_id,
            body.kind,
            {
                "name": rendered.template,
                "language": rendered.language,
                "content_sid": rendered.content_sid,
                "variables": rendered.variables,
            }
            if rendered
            else None,
            None if verdict.allowed else verdict.reason,
            verdict.message,
        )
        win = Window(open=current.open, closes_at=current.closes_at)
        answer: MessageAccepted | ErrorBody
        if verdict.allowed:
            data: Any = MessageSendRequested(
                message_id=message_id, agent_id=str(agent_id), kind=body.kind, requested_at=now
            )
            kind, status = EventType.MESSAGE_SEND_REQUESTED, 202
            answer = MessageAccepted.model_validate(
                {"id": message_id, "status": "requested", "window": win}
            )
        else:
            GATE_REJECTIONS.labels(verdict.reason or "rejected").inc()
            data = MessageRejected(
                message_id=message_id,
                reason=verdict.reason or "rejected",
                message=verdict.message,
                templates=verdict.templates,
            )
            kind, status = EventType.MESSAGE_REJECTED, 422
            answer = ErrorBody(
                error=ErrorDetail(
                    code=verdict.reason or "rejected",
                    message=verdict.message or "",
                    details={
                        "message_id": message_id,
                        "templates": verdict.templates,
                        **({"languages": verdict.languages} if verdict.languages else {}),
                        "window": win.model_dump(mode="json"),
                    },
                )
            )
        await add_to_outbox(
            conn,
            [
                new_event(
                    kind,
                    account=conv["account"],
                    key=(message_id,),
                    data=data.model_dump(mode="json"),
                    occurred_at=now,
                    conversation_id=str(conv["id"]),
                )
            ],
        )
        payload = answer.model_dump(mode="json")
        if once is not None:
            await idempotency.remember(conn, once, idempotency.Answer(status, payload))
    return web.json_response(payload, status=status)


async def media(request: web.Request) -> web.StreamResponse:
    _, conv = await own_conversation(request)
    message_id = as_uuid(request.match_info["message_id"])
    try:
        index = int(request.match_info["n"])
    except ValueError:
        index = -1
    pool = await request.app[STORE].pool()
    row = await pool.fetchrow(
        "SELECT media FROM messages WHERE id = $1 AND conversation_id = $2"
        " AND direction = 'inbound'",
        message_id,
        conv["id"],
    )
    if row is None or not 0 <= index < len(row["media"]):
        return error(404, "not_found", "no such attachment")
    config = request.app[CONFIG].current
    workstream = config.workstream(conv["workstream"])
    if workstream is not None and not workstream.attachments.customers:
        return error(404, "not_found", "attachments from customers are not allowed here")
    url = row["media"][index]["url"]
    twilio = urlsplit(str(request.app[SETTINGS].twilio_api_url))
    target = urlsplit(url)
    if (target.scheme, target.netloc) != (twilio.scheme, twilio.netloc):
        # Never hand the account's credentials to a host a webhook named.
        return error(502, "foreign_media_host", "the attachment is not on Twilio's media host")
    account = config.account(conv["account"])
    if account is None or account.auth_token is None:
        return error(502, "account_unavailable", "the account's credentials are not configured")
    auth = aiohttp.encode_basic_auth(account.account_sid, account.auth_token.get_secret_value())
    session = request.app[HTTP]
    try:
        async with session.get(
            url, headers={"Authorization": auth}, allow_redirects=False
        ) as upstream:
            if upstream.status in (301, 302, 303, 307, 308) and "Location" in upstream.headers:
                # Twilio redirects to its storage with a signed URL: follow without credentials.
                async with session.get(upstream.headers["Location"]) as stored:
                    return await _relay(request, stored)
            return await _relay(request, upstream)
    except (aiohttp.ClientError, TimeoutError) as exc:
        # Before the answer started: say so. (Once streaming, the connection just ends.)
        return error(502, "media_unavailable", f"Twilio unreachable: {type(exc).__name__}")


# Raster images a browser may show inline. Anything else (SVG and HTML included, which can
# carry script) is served as a download: the attachment is the customer's, the origin is
# ours, and the console's session cookie signs the agent in on it.
INLINE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


def media_headers(content_type: str) -> dict[str, str]:
    """Headers that keep a customer's file inert on the router's origin: never sniffed
    (X-Content-Type-Options), never a document with script (a sandboxing CSP, MDN
    "CSP: sandbox"), not cached by shared caches, and a download unless a plain image."""
    kind = content_type.split(";", 1)[0].strip().lower() or "application/octet-stream"
    inline = kind in INLINE_TYPES
    return {
        "Content-Type": kind if inline else "application/octet-stream",
        "Content-Disposition": "inline" if inline else "attachment",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
        "Cache-Control": "private, no-store",
    }


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    if upstream.status != 200:
        return error(502, "media_unavailable", f"Twilio answered {upstream.status}")
    response = web.StreamResponse(
        headers=media_headers(upstream.headers.get("Content-Type", "application/octet-stream"))
    )
    await response.prepare(request)
    async for chunk in upstream.content.iter_chunked(64 * 1024):
        await response.write(chunk)
    await response.write_eof()
    return response


ROUTES = [
    Route(
        "POST",
        "/api/conversations/{conversation_id}/messages",
        send,
        "sendMessage",
        "Send text, media or a template; outside the window only a template (422 otherwise)",
        TAGS,
        "agentToken",
        {202: MessageAccepted},
        errors=(400, 404, 409, 422),
        request=SendMessage,
        idempotency_key=True,
    ),
    Route(
        "GET",
        "/api/conversations/{conversation_id}/messages/{message_id}/media/{n}",
        media,
        "getMessageMedia",
        "A customer's attachment, fetched from Twilio",
        TAGS,
        "agentToken",
        {200: Content("application/octet-stream", {"type": "string", "format": "binary"})},
        errors=(404, 502),
    ),
]
