"""Status progression of created messages and the signed status callbacks Twilio sends."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

from aiohttp import web

from omniroute.twilio_emulator.runtime import SESSION_KEY, STATE_KEY, log
from omniroute.twilio_emulator.state import API_VERSION, OutboundMessage
from omniroute.twilio_emulator.webhooks import Webhook, deliver

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
    """POST one signed status callback under Twilio's webhook rules (see ``webhooks``).

    As on Twilio, a callback answered 5xx is not retried unless the StatusCallback URL's
    overrides fragment asks for it; failures are recorded (11200), never raised.
    """
    url = message.status_callback
    if url is None:
        return
    state = app[STATE_KEY]
    webhook = Webhook(
        kind="status",
        url=url,
        form=callback_form(message, step),
        auth_token=state.accounts[message.account_sid],
        message_sid=message.sid,
        idempotency_token=str(uuid.uuid4()),
    )
    await deliver(app[SESSION_KEY], state, webhook)


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
