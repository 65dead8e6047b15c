"""The emulator's own control endpoints under ``/_emulator``: faults, listings, reset, health."""

from __future__ import annotations

from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from omniroute.twilio_emulator.debugger import WEBHOOK_KINDS
from omniroute.twilio_emulator.runtime import STATE_KEY, bad_request, cancel_background_tasks
from omniroute.twilio_emulator.state import Fault


class FaultSpec(BaseModel):
    """Body of ``POST /_emulator/faults``."""

    model_config = ConfigDict(extra="forbid")

    status: int = Field(default=400, ge=100, le=599)
    code: int
    message: str = "Injected fault"
    count: int = Field(default=1, ge=1)
    to: str | None = None
    mode: Literal["response", "callback"] = "response"
    callback_status: Literal["failed", "undelivered"] = "failed"


async def add_fault(request: web.Request) -> web.Response:
    """``POST /_emulator/faults``: queue an error for the next matching create call(s)."""
    try:
        spec = FaultSpec.model_validate(await request.json())
    except (ValueError, ValidationError) as exc:
        raise bad_request(str(exc)) from None
    fault = Fault(**spec.model_dump())
    request.app[STATE_KEY].faults.append(fault)
    return web.json_response({"pending": len(request.app[STATE_KEY].faults)}, status=201)


async def list_messages(request: web.Request) -> web.Response:
    """``GET /_emulator/messages``: every created message with its status history."""
    state = request.app[STATE_KEY]
    return web.json_response([message.to_record() for message in state.messages.values()])


async def list_inbound(request: web.Request) -> web.Response:
    """``GET /_emulator/inbound``: every simulated customer message."""
    state = request.app[STATE_KEY]
    return web.json_response([message.to_resource() for message in state.inbound.values()])


async def list_rejected(request: web.Request) -> web.Response:
    """``GET /_emulator/rejected``: create calls answered with an injected error."""
    return web.json_response(request.app[STATE_KEY].rejected)


async def list_webhook_failures(request: web.Request) -> web.Response:
    """``GET /_emulator/webhook-failures``: failed webhook attempts (11200), oldest first.

    Optional filters ``?kind=inbound|status`` and ``?message_sid=…``; an unknown kind is 400.
    """
    kind = request.query.get("kind")
    if kind is not None and kind not in WEBHOOK_KINDS:
        raise bad_request(f"kind must be one of {', '.join(WEBHOOK_KINDS)}")
    failures = request.app[STATE_KEY].webhooks.matching(kind, request.query.get("message_sid"))
    return web.json_response([failure.to_json() for failure in failures])


async def webhook_summary(request: web.Request) -> web.Response:
    """``GET /_emulator/webhooks``: per kind, webhooks delivered, failed attempts, given up."""
    return web.json_response(request.app[STATE_KEY].webhooks.summary())


async def reset(request: web.Request) -> web.Response:
    """``POST /_emulator/reset``: cancel pending callbacks; forget messages, faults, windows
    and webhook records."""
    await cancel_background_tasks(request.app)
    request.app[STATE_KEY].reset()
    return web.json_response({"status": "reset"})


async def health(request: web.Request) -> web.Response:
    """``GET /_emulator/health``."""
    state = request.app[STATE_KEY]
    return web.json_response(
        {"status": "ok", "accounts": len(state.accounts), "messages": len(state.messages)}
    )
