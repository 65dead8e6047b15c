"""Customer simulation: signed inbound WhatsApp webhooks posted to the router."""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from omniroute.twilio_emulator.runtime import SESSION_KEY, STATE_KEY, bad_request, log
from omniroute.twilio_emulator.state import (
    API_VERSION,
    EmulatorState,
    InboundMessage,
    StoredMedia,
    new_sid,
)
from omniroute.twilio_emulator.webhooks import Webhook, deliver

PHONE_SENDER = re.compile(r"^whatsapp:\+(\d+)$")
MEDIA_TYPES = {"image": "image", "video": "video", "audio": "audio"}


class MediaSpec(BaseModel):
    """One attachment of a simulated customer message."""

    content_type: str
    data_base64: str


class CustomerMessage(BaseModel):
    """Body of ``POST /_emulator/customers/send``."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    account_sid: str
    url: str
    from_: str = Field(alias="from")
    to: str
    body: str = ""
    profile_name: str | None = None
    media: list[MediaSpec] = Field(default_factory=list)
    extra: dict[str, str | int | float] = Field(default_factory=dict)
    message_sid: str | None = None
    repeat: int = Field(default=1, ge=1, le=50)


def message_type(spec: CustomerMessage) -> str:
    """Twilio's ``MessageType`` for the message: text, image, video, audio, document, …"""
    if spec.media:
        major = spec.media[0].content_type.split("/", 1)[0]
        return MEDIA_TYPES.get(major, "document")
    if "Latitude" in spec.extra:
        return "location"
    if "ButtonPayload" in spec.extra:
        return "button"
    return "text"


def _decode_media(spec: CustomerMessage) -> list[tuple[str, bytes]]:
    try:
        return [
            (m.content_type, base64.b64decode(m.data_base64, validate=True)) for m in spec.media
        ]
    except (binascii.Error, ValueError):
        raise bad_request("media data_base64 is not valid base64") from None


def build_form(
    state: EmulatorState, spec: CustomerMessage, message_sid: str, base_url: str
) -> dict[str, str]:
    """Build the inbound webhook form exactly as Twilio posts it; store the media it names."""
    form: dict[str, str] = {
        "SmsMessageSid": message_sid,
        "NumMedia": str(len(spec.media)),
    }
    if spec.profile_name is not None:
        form["ProfileName"] = spec.profile_name
    form["MessageType"] = message_type(spec)
    form["SmsSid"] = message_sid
    phone = PHONE_SENDER.fullmatch(spec.from_)
    if phone:
        form["WaId"] = phone.group(1)
    else:
        form["ExternalUserId"] = spec.from_.removeprefix("whatsapp:")
    form |= {
        "SmsStatus": "received",
        "Body": spec.body,
        "To": spec.to,
        "NumSegments": "1",
        "ReferralNumMedia": "0",
        "MessageSid": message_sid,
        "AccountSid": spec.account_sid,
        "From": spec.from_,
        "ApiVersion": API_VERSION,
    }
    for index, (content_type, data) in enumerate(_decode_media(spec)):
        media_sid = new_sid("ME")
        state.media[media_sid] = StoredMedia(
            spec.account_sid, message_sid, media_sid, content_type, data, state.now()
        )
        form[f"MediaContentType{index}"] = content_type
        form[f"MediaUrl{index}"] = (
            f"{base_url}/{API_VERSION}/Accounts/{spec.account_sid}"
            f"/Messages/{message_sid}/Media/{media_sid}"
        )
    form |= {key: str(value) for key, value in spec.extra.items()}
    return form


async def _parse(request: web.Request) -> CustomerMessage:
    try:
        return CustomerMessage.model_validate(await request.json())
    except (ValueError, ValidationError) as exc:
        raise bad_request(str(exc)) from None


def _log_message(state: EmulatorState, spec: CustomerMessage, message_sid: str) -> None:
    # Twilio logs the message when it arrives, before (and whatever comes of) the webhook:
    # a message whose webhook never reached the router is still in the Messages list.
    state.record_customer_message(spec.account_sid, spec.to, spec.from_)
    state.log_inbound(
        InboundMessage(
            message_sid,
            spec.account_sid,
            spec.to,
            spec.from_,
            spec.body,
            len(spec.media),
            state.now(),
        )
    )


def media_base(request: web.Request) -> str:
    """Where customers' media URLs point: the configured public URL, never the request's
    Host header (a caller may name any host there, and the router hands the account's
    credentials only to its configured Twilio API host). Twilio's media URLs always name its
    API host (https://www.twilio.com/docs/messaging/api/media-resource). Without a
    configured URL, the address this request arrived on (the socket's, not a header)."""
    configured = request.app[STATE_KEY].public_url
    if configured:
        return configured.rstrip("/")
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not sockname:
        raise web.HTTPInternalServerError(text="the emulator has no public URL configured")
    host, port = sockname[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def send_customer_message(request: web.Request) -> web.Response:
    """``POST /_emulator/customers/send``: post a signed inbound webhook to the router.

    The message is logged first (it stays in the Messages list whatever the delivery gives).
    ``repeat`` N delivers the same webhook (same form, signature and idempotency token) N
    times, as a Twilio resend would, each delivery following Twilio's retry rules. Answers
    200 with the router's statuses, or 502 as soon as a delivery got no HTTP answer at all.
    """
    spec = await _parse(request)
    state = request.app[STATE_KEY]
    token = state.accounts.get(spec.account_sid)
    if token is None:
        return web.json_response({"error": f"unknown account {spec.account_sid}"}, status=404)
    message_sid = spec.message_sid or new_sid("MM" if spec.media else "SM")
    form = build_form(state, spec, message_sid, media_base(request))
    _log_message(state, spec, message_sid)
    webhook = Webhook(
        kind="inbound",
        url=spec.url,
        form=form,
        auth_token=token,
        message_sid=message_sid,
        idempotency_token=f"{spec.account_sid}-{uuid.uuid4()}",
    )
    statuses: list[int] = []
    bodies: list[str] = []
    attempts: list[int] = []
    for _ in range(spec.repeat):
        delivery = await deliver(request.app[SESSION_KEY], state, webhook)
        attempts.append(delivery.attempts)
        if delivery.last.http_status is None:
            return web.json_response(
                {
                    "message_sid": message_sid,
                    "error": delivery.last.error,
                    "form": form,
                    "statuses": statuses,
                    "attempts": attempts,
                },
                status=502,
            )
        statuses.append(delivery.last.http_status)
        bodies.append(delivery.last.body)
    log.info(
        "emulator.customer_message_sent",
        url=webhook.url,
        message_sid=message_sid,
        statuses=statuses,
        attempts=attempts,
    )
    answer: dict[str, Any] = {
        "message_sid": message_sid,
        "status": statuses[0] if spec.repeat == 1 else statuses,
        "body": bodies[0] if spec.repeat == 1 else bodies,
        "statuses": statuses,
        "attempts": attempts,
        "form": form,
    }
    return web.json_response(answer)
