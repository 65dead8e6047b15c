"""The emulated Messages REST API: create, fetch, list, and customer media."""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web
from multidict import MultiDict, MultiMapping

from omniroute.twilio_emulator.auth import authenticate
from omniroute.twilio_emulator.callbacks import (
    DELIVERED_AND_READ,
    StatusStep,
    failure,
    run_status_progression,
)
from omniroute.twilio_emulator.message_log import MessageFilter, find_message, newest_first
from omniroute.twilio_emulator.paging import PageRequest, page_body
from omniroute.twilio_emulator.runtime import STATE_KEY, log, spawn
from omniroute.twilio_emulator.state import EmulatorState, OutboundMessage, new_sid
from omniroute.twilio_emulator.twilio_errors import TwilioApiError, not_found_error

#: ``whatsapp:+E164`` or a business-scoped user id such as ``whatsapp:US.13491208655302741918``.
WHATSAPP_ADDRESS = re.compile(r"^whatsapp:(\+[1-9]\d{5,14}|[A-Z]{2}(\.[A-Za-z0-9]+){1,3})$")
OUTSIDE_WINDOW = 63016
JSON_SUFFIX = ".json"


def is_whatsapp_address(value: str) -> bool:
    """Whether ``value`` is a WhatsApp channel address the emulator accepts."""
    return WHATSAPP_ADDRESS.fullmatch(value) is not None


def _parse_variables(raw: str | None) -> dict[str, Any] | None:
    if raw is None or raw == "":
        return None
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise TwilioApiError(400, 21656, "The ContentVariables Parameter is invalid.")
    return parsed


def _validate(form: MultiMapping[str]) -> None:
    to = form.get("To")
    if not to:
        raise TwilioApiError(400, 21604, "A 'To' phone number is required.")
    if not is_whatsapp_address(to):
        raise TwilioApiError(400, 21211, f"Invalid 'To' Phone Number: {to}")
    sender = form.get("From")
    if not sender and not form.get("MessagingServiceSid"):
        raise TwilioApiError(400, 21603, "A 'From' phone number is required.")
    if sender and not is_whatsapp_address(sender):
        raise TwilioApiError(400, 21212, f"Invalid 'From' Phone Number: {sender}")
    if not (form.get("Body") or "MediaUrl" in form or form.get("ContentSid")):
        raise TwilioApiError(400, 21602, "Message body is required.")


def _render_template(state: EmulatorState, content_sid: str, variables: dict[str, Any]) -> str:
    text = state.templates.get(content_sid)
    if text is None:
        rendered = json.dumps(variables, sort_keys=True, ensure_ascii=False)
        return f"{content_sid} {rendered}" if variables else content_sid
    for name, value in variables.items():
        text = text.replace("{{" + str(name) + "}}", str(value))
    return text


def _new_message(
    state: EmulatorState, account_sid: str, form: MultiMapping[str]
) -> OutboundMessage:
    content_sid = form.get("ContentSid") or None
    variables = _parse_variables(form.get("ContentVariables"))
    body = form.get("Body", "")
    if content_sid and not body:
        body = _render_template(state, content_sid, variables or {})
    return OutboundMessage(
        sid=new_sid("SM"),
        account_sid=account_sid,
        to=form["To"],
        from_=form.get("From") or None,
        messaging_service_sid=form.get("MessagingServiceSid") or None,
        body=body,
        media_urls=form.getall("MediaUrl") if "MediaUrl" in form else [],
        content_sid=content_sid,
        content_variables=variables,
        status_callback=form.get("StatusCallback") or None,
        created_at=state.now(),
    )


def _planned_steps(state: EmulatorState, message: OutboundMessage) -> tuple[StatusStep, ...]:
    fault = state.take_fault(message.to)
    if fault is not None:
        if fault.mode == "response":
            state.rejected.append(
                {
                    "to": message.to,
                    "status": fault.status,
                    "code": fault.code,
                    "at": state.now().isoformat(),
                }
            )
            raise TwilioApiError(fault.status, fault.code, fault.message)
        return (failure(fault.code, fault.callback_status, fault.message),)
    customer = message.to
    if message.content_sid is None and not state.window_open(
        message.account_sid, message.from_, customer
    ):
        return (failure(OUTSIDE_WINDOW),)
    return DELIVERED_AND_READ


async def create_message(request: web.Request) -> web.Response:
    """``POST /2010-04-01/Accounts/{AccountSid}/Messages.json``."""
    account_sid = authenticate(request)
    state = request.app[STATE_KEY]
    posted = await request.post()
    form = MultiDict[str]((k, v) for k, v in posted.items() if isinstance(v, str))
    _validate(form)
    message = _new_message(state, account_sid, form)
    steps = _planned_steps(state, message)
    message.advance("queued", message.created_at)
    state.log_outbound(message)
    log.info(
        "emulator.message_created",
        message_sid=message.sid,
        to=message.to,
        template=message.content_sid is not None,
        planned=[s.status for s in steps],
    )
    spawn(request.app, run_status_progression(request.app, message, steps), f"status-{message.sid}")
    return web.json_response(message.to_resource(), status=201)


async def fetch_message(request: web.Request) -> web.Response:
    """``GET /2010-04-01/Accounts/{AccountSid}/Messages/{Sid}.json``: its current status."""
    account_sid = authenticate(request)
    message = find_message(request.app[STATE_KEY], account_sid, request.match_info["sid"])
    if message is None:
        raise not_found_error(request.path)
    return web.json_response(message.to_resource())


async def list_messages(request: web.Request) -> web.Response:
    """``GET /2010-04-01/Accounts/{AccountSid}/Messages.json``: the message log, newest first.

    Filters ``To``, ``From``, ``DateSent``, ``DateSent<``, ``DateSent>`` (see
    :mod:`message_log`); paging ``PageSize``, ``Page``, ``PageToken`` (see :mod:`paging`).
    """
    account_sid = authenticate(request)
    selection = MessageFilter.from_query(request.query)
    paging = PageRequest.from_query(request.query)
    messages = [
        message
        for message in newest_first(request.app[STATE_KEY], account_sid)
        if selection.matches(message)
    ]
    body = page_body(
        "messages",
        messages,
        lambda message: message.to_resource(),
        request.path,
        selection.params,
        paging,
    )
    return web.json_response(body)


async def list_media(request: web.Request) -> web.Response:
    """``GET …/Messages/{MessageSid}/Media.json``: a message's media, in attachment order.

    Only customer attachments are stored (the emulator never fetches a created message's
    ``MediaUrl``), so a created message lists none. An unknown message lists none either.
    """
    account_sid = authenticate(request)
    message_sid = request.match_info["message_sid"]
    media = [
        item
        for item in request.app[STATE_KEY].media.values()
        if item.account_sid == account_sid and item.message_sid == message_sid
    ]
    paging = PageRequest.from_query(request.query)
    body = page_body("media_list", media, lambda item: item.to_resource(), request.path, (), paging)
    return web.json_response(body)


async def fetch_media(request: web.Request) -> web.Response:
    """``GET …/Messages/{MessageSid}/Media/{MediaSid}``: the bytes; with ``.json``, the resource."""
    account_sid = authenticate(request)
    media_sid = request.match_info["media_sid"]
    as_resource = media_sid.endswith(JSON_SUFFIX)
    media = request.app[STATE_KEY].media.get(media_sid.removesuffix(JSON_SUFFIX))
    if (
        media is None
        or media.account_sid != account_sid
        or media.message_sid != request.match_info["message_sid"]
    ):
        raise not_found_error(request.path)
    if as_resource:
        return web.json_response(media.to_resource())
    return web.Response(body=media.data, headers={"Content-Type": media.content_type})
