"""Automated messages (greeting, attachments not allowed, …): the text in the conversation's
language, sent through the outbound stage like any message, so the 24-hour gate applies.
Outside the window only the workstream's template for it may go; without one the message is
recorded as skipped, never sent as free text."""

from __future__ import annotations

import uuid
from datetime import datetime

from omniroute.domain.window import render
from omniroute.infra.store import Connection
from schemas.config import AutomatedMessage, Workstream
from schemas.events import Envelope, EventType, MessageSendRequested, new_event


def text_for(message: AutomatedMessage, language: str | None, fallback: str) -> str:
    """The text in ``language``, else its base language, else the workstream's, else any."""
    for candidate in (language, (language or "").split("-")[0], fallback):
        if candidate and candidate in message.text:
            return message.text[candidate]
        base = next((k for k in message.text if k.split("-")[0] == candidate), None)
        if candidate and base:
            return message.text[base]
    return next(iter(message.text.values()))


class _Keep(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def fill(text: str, values: dict[str, str]) -> str:
    """``{customer_name}``, ``{agent_name}``, ``{queue_position}``… filled; unknown kept."""
    try:
        return text.format_map(_Keep(values))
    except (ValueError, IndexError):
        return text  # braces that are not placeholders: leave the text as written


async def queue_automated(
    conn: Connection,
    *,
    account: str,
    conversation_id: str,
    workstream: Workstream,
    kind: str,
    language: str | None,
    window_open: bool,
    now: datetime,
    key: str,
    placeholders: dict[str, str] | None = None,
    message: AutomatedMessage | None = None,
) -> list[Envelope]:
    """Store the automated message and ask the outbound stage to send it (or record a skip).

    ``key`` makes it idempotent: the same cause (e.g. the customer message) stores one.
    """
    if message is None:  # else given by the caller (e.g. the survey question)
        message = workstream.automated_messages.get(kind)  # type: ignore[call-overload]
    if message is None:
        return []
    message_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"automated:{kind}:{key}"))
    template = None
    status = "requested"
    body = fill(text_for(message, language, workstream.language), placeholders or {})
    if not window_open:
        found = workstream.template(message.template) if message.template else None
        rendered = render(found, language, {}) if found else None
        if rendered is None or isinstance(rendered, str):
            status = "skipped"  # never free text outside the window
        else:
            body = rendered.text
            template = {
                "name": rendered.template,
                "language": rendered.language,
                "content_sid": rendered.content_sid,
                "variables": {},
            }
    inserted = await conn.fetchval(
        "INSERT INTO messages (id, conversation_id, direction, body, status, received_at, kind,"
        " template, error_message) VALUES ($1, $2, 'outbound', $3, $4, $5, $6, $7, $8)"
        " ON CONFLICT (id) DO NOTHING RETURNING id",
        message_id,
        conversation_id,
        body,
        status,
        now,
        "template" if template else "system",
        template,
        None if status == "requested" else f"{kind}: window closed and no template",
    )
    if inserted is None or status != "requested":
        return []
    data = MessageSendRequested(
        message_id=message_id, kind="system", requested_at=now, automated=kind
    )
    return [send_requested(data, account=account, conversation_id=conversation_id)]


def send_requested(
    data: MessageSendRequested,
    *,
    account: str,
    conversation_id: str,
    correlation_id: str | None = None,
    causation_id: str | None = None,
) -> Envelope:
    """The ``message.send-requested`` event for a stored outbound message: the outbound
    stage sends it through the 24-hour gate. Its id derives from the message's."""
    return new_event(
        EventType.MESSAGE_SEND_REQUESTED,
        account=account,
        key=(data.message_id,),
        data=data.model_dump(mode="json"),
        occurred_at=data.requested_at,
        conversation_id=conversation_id,
        correlation_id=correlation_id,
        causation_id=causation_id,
    )
