"""Status progression of created messages and the signed status callbacks Twilio sends."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from omniroute.twilio_emulator.runtime import SESSION_KEY, STATE_KEY, log, post_signed_form
from omniroute.twilio_emulator.state import API_VERSION, OutboundMessage

CALLBACK_ATTEMPTS = 3

ERROR_MESSAGES = {
    63016: "Failed to send freeform message because you are outside the allowed window. "
    "If you are using WhatsApp, please use a Message Template.",
}


@dataclass(frozen=True)
class StatusStep:
    """One status the message moves to, with the error code on failure."""

    status: str
    error_code: int | None = None
    error_message: str | None = None


DELIVERED_AND_READ = (StatusStep("sent"), StatusStep("delivered"), StatusStep("read"))


def failure(error_code: int, status: str = "failed", message: str | None = None) -> StatusStep:
    """Return a failing step (``failed``/``undelivered``) carrying ``error_code``."""
    return StatusStep(status, error_code, message or ERROR_MESSAGES.get(error_code))


def callback_form(message: OutboundMessage, step: StatusStep) -> dict[str, str]:
    """Build the form Twilio posts to a message's StatusCallback for ``step``."""
    form = {
        "MessageSid": message.sid,
        "SmsSid": message.sid,
        "MessageStatus": step.status,
        "SmsStatus": step.status,
        "AccountSid": message.account_sid,
        "To": message.to,
        "ApiVersion": API_VERSION,
        "ChannelToAddress": message.to.removeprefix("whatsapp:"),
        "ChannelPrefix": "whatsapp",
    }
    if message.from_ is not None:
        form["From"] = message.from_
    if message.messaging_service_sid is not None:
        form["MessagingServiceSid"] = message.messaging_service_sid
    if step.error_code is not None:
        form["ErrorCode"] = str(step.error_code)
    return form


async def deliver_callback(
    app: web.Application, message: OutboundMessage, step: StatusStep
) -> None:
    """POST one signed status callback, retrying a few times; failures are logged, not raised."""
    state = app[STATE_KEY]
    url = message.status_callback
    if url is None:
        return
    form = callback_form(message, step)
    token = state.accounts[message.account_sid]
    idempotency = str(uuid.uuid4())
    for attempt in range(1, CALLBACK_ATTEMPTS + 1):
        try:
            status, _ = await post_signed_form(app[SESSION_KEY], url, form, token, idempotency)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning(
                "emulator.callback_failed",
                url=url,
                message_sid=message.sid,
                message_status=step.status,
                attempt=attempt,
                error=type(exc).__name__,
            )
        else:
            if status < 500:
                if status >= 400:
                    log.warning(
                        "emulator.callback_rejected",
                        url=url,
                        message_sid=message.sid,
                        message_status=step.status,
                        http_status=status,
                    )
                return
            log.warning(
                "emulator.callback_failed",
                url=url,
                message_sid=message.sid,
                message_status=step.status,
                attempt=attempt,
                http_status=status,
            )
        await asyncio.sleep(max(state.callback_delay, 0.01) * attempt)
    log.error(
        "emulator.callback_given_up", url=url, message_sid=message.sid, message_status=step.status
    )


async def run_status_progression(
    app: web.Application, message: OutboundMessage, steps: tuple[StatusStep, ...]
) -> None:
    """Move ``message`` through ``steps``, one per callback delay, sending each callback."""
    state = app[STATE_KEY]
    try:
        for step in steps:
            await asyncio.sleep(state.callback_delay)
            message.advance(step.status, state.now(), step.error_code, step.error_message)
            log.debug(
                "emulator.status_changed",
                message_sid=message.sid,
                message_status=step.status,
                error_code=step.error_code,
            )
            await deliver_callback(app, message, step)
    except Exception:
        log.exception("emulator.status_progression_crashed", message_sid=message.sid)
