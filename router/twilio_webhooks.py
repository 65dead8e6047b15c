"""``POST /twilio/{account}/inbound`` and ``/status``: Twilio's form posts become events.

Order of checks: unknown account → 404; body over the limit → 413; signature → 403 (before
the form is interpreted); malformed form → 400; number not configured → 404. The answer is
200 (empty TwiML) once the event is durable: confirmed by the broker or, when the broker
is away or slow, written to the PostgreSQL spool (``router.ingress``). Twilio does not
retry a 5xx, so 503 is left for when neither can take it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Literal, get_args
from urllib.parse import parse_qsl

import structlog
from aiohttp import web
from multidict import MultiDict
from pydantic import ValidationError
from yarl import query_to_pairs

from omniroute.domain.webhook_events import inbound_event, status_event
from omniroute.errors import IngressUnavailable, UnknownAccountSid, UnknownNumber
from omniroute.infra.metrics import (
    PUBLISH_CONFIRM,
    WEBHOOK_DURATION,
    WEBHOOK_SIGNATURES,
    WEBHOOKS,
)
from router.responses import EMPTY_TWIML, empty_twiml, error, invalid
from router.routes import Content, Route
from router.signature import signed_with
from router.state import CONFIG, INGRESS, SETTINGS
from schemas.config import Account
from schemas.events import Envelope
from schemas.twilio import InboundMessageForm, StatusCallbackForm

log = structlog.get_logger("omniroute.router")

FORM_TYPE = "application/x-www-form-urlencoded"
Outcome = Literal[
    "accepted",
    "spooled",
    "not_found",
    "too_large",
    "forbidden",
    "malformed",
    "unsupported",
    "unavailable",
]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)
ACCEPTED_LOG = logging.DEBUG
REJECTED_LOG: dict[Outcome, int] = {"unavailable": logging.ERROR, "spooled": logging.DEBUG}


class Rejected(Exception):
    """A webhook answered with an error; carries the response."""

    def __init__(self, response: web.Response, outcome: Outcome) -> None:
        super().__init__(outcome)
        self.response = response
        self.outcome = outcome


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise Rejected(
            error(413, "payload_too_large", f"body over {limit} bytes", limit=limit), "too_large"
        )
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise Rejected(
            error(413, "payload_too_large", f"body over {limit} bytes", limit=limit), "too_large"
        )
    return body


def _parse_form(body: bytes) -> MultiDict[str]:
    """The url-encoded form, strictly: every field has ``=``, every escape is UTF-8.

    yarl's parser (the one aiohttp uses, in C) does the work; it replaces undecodable escapes
    with U+FFFD, so only a form that shows one is parsed again by the strict stdlib parser
    to tell a real U+FFFD from a bad escape.
    """
    try:
        text = body.decode("utf-8")
        if not text:
            return MultiDict()
        if not all("=" in field for field in text.split("&")):
            raise ValueError("a form field without '='")
        pairs = query_to_pairs(text, encoding="utf-8")
        if any("\ufffd" in key or "\ufffd" in value for key, value in pairs):
            pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise Rejected(
            error(400, "malformed_form", "body is not a UTF-8 url-encoded form"), "malformed"
        ) from None
    return MultiDict(pairs)


def _forbidden() -> web.Response:
    return error(403, "invalid_signature", "X-Twilio-Signature does not match this request")


def _signed(request: web.Request, account: Account, url: str, params: MultiDict[str] | str) -> bool:
    """Signed by the account's current or (during a rotation) previous auth token, or one
    of its shared keys; counted by which, or ``none``."""
    tokens = request.app[CONFIG].accepted_tokens(account.name)
    signer = signed_with(request.headers, url, params, tokens, account.webhook_keys)
    WEBHOOK_SIGNATURES.labels(account.name, signer or "none").inc()
    return signer is not None


async def _authenticated_form(request: web.Request, account: Account) -> MultiDict[str]:
    """Read the body and check Twilio's signature over the public URL; the form if valid."""
    settings = request.app[SETTINGS]
    body = await _read_body(request, settings.max_body_bytes)
    url = settings.public_base() + request.path_qs
    is_form = request.content_type == FORM_TYPE
    if is_form:
        try:
            params: MultiDict[str] | str = _parse_form(body)
        except Rejected:
            # Twilio never sends a malformed form: unless the request is signed (over the URL
            # alone, all that can be checked), it is refused as unsigned, not as malformed.
            if _signed(request, account, url, MultiDict()):
                raise
            raise Rejected(_forbidden(), "forbidden") from None
    else:
        try:
            params = body.decode("utf-8")
        except UnicodeDecodeError:
            # Not text: nothing a bodySHA256 signature could be checked against honestly.
            WEBHOOK_SIGNATURES.labels(account.name, "none").inc()
            raise Rejected(_forbidden(), "forbidden") from None
    if not _signed(request, account, url, params):
        raise Rejected(_forbidden(), "forbidden")
    if not isinstance(params, MultiDict):
        raise Rejected(error(415, "unsupported_media_type", f"expected {FORM_TYPE}"), "unsupported")
    if b"%00" in body:
        # Signed as sent; but no database stores U+0000 in text, so the event carries U+FFFD
        # (WhatsApp never sends NUL: only a caller holding the auth token could).
        params = MultiDict(
            (k.replace("\x00", "\ufffd"), v.replace("\x00", "\ufffd")) for k, v in params.items()
        )
    return params


def _validation_error(exc: ValidationError) -> web.Response:
    return error(
        400,
        "malformed_form",
        "the form is not a valid Twilio webhook",
        fields=invalid(exc, whole="(form)"),
    )


def _account(request: web.Request) -> Account:
    name = request.match_info["account"]
    account = request.app[CONFIG].current.account(name)
    if account is None:
        raise Rejected(error(404, "unknown_account", f"no account named {name!r}"), "not_found")
    return account


def _inbound_event(account: Account, form: MultiDict[str], received_at: datetime) -> Envelope:
    try:
        return inbound_event(account, form, received_at)
    except ValidationError as exc:
        raise Rejected(_validation_error(exc), "malformed") from None
    except UnknownAccountSid as exc:
        raise Rejected(error(404, "unknown_account", str(exc)), "not_found") from None
    except UnknownNumber as exc:
        raise Rejected(error(404, "unknown_number", str(exc)), "not_found") from None


def _status_event(account: Account, form: MultiDict[str], received_at: datetime) -> Envelope:
    try:
        return status_event(account, form, received_at)
    except ValidationError as exc:
        raise Rejected(_validation_error(exc), "malformed") from None


EventBuilder = Callable[[Account, MultiDict[str], datetime], Envelope]


def _webhook(kind: str, build: EventBuilder) -> Callable[[web.Request], Awaitable[web.Response]]:
    # Metric children resolved once, not per request.
    counted = {outcome: WEBHOOKS.labels(kind, outcome) for outcome in OUTCOMES}
    duration = WEBHOOK_DURATION.labels(kind)

    async def handler(request: web.Request) -> web.Response:
        started = time.perf_counter()
        received_at = datetime.now(UTC)
        message_sid: str | None = None
        outcome: Outcome
        try:
            account = _account(request)
            form = await _authenticated_form(request, account)
            message_sid = form.get("MessageSid")
            event = build(account, form, received_at)
            confirm_started = time.perf_counter()
            try:
                kept = await request.app[INGRESS].keep(event, kind)
            except IngressUnavailable as exc:
                raise Rejected(
                    error(503, "unavailable", "neither the broker nor the database took it"),
                    "unavailable",
                ) from exc
            if kept == "published":
                PUBLISH_CONFIRM.observe(time.perf_counter() - confirm_started)
            response, outcome = empty_twiml(), "accepted" if kept == "published" else "spooled"
        except Rejected as rejected:
            response, outcome = rejected.response, rejected.outcome
        elapsed = time.perf_counter() - started
        counted[outcome].inc()
        duration.observe(elapsed)
        # Accepted webhooks are counted in metrics and carried by their event; a log line
        # each would cost a fifth of the router's throughput, so they log at debug level.
        level = ACCEPTED_LOG if outcome == "accepted" else REJECTED_LOG.get(outcome, logging.INFO)
        log.log(
            level,
            "webhook.handled",
            webhook=kind,
            account=request.match_info["account"],
            message_sid=message_sid,
            request_id=request.headers.get("I-Twilio-Idempotency-Token"),
            outcome=outcome,
            status=response.status,
            duration_ms=round(elapsed * 1000, 2),
        )
        return response

    return handler


inbound = _webhook("inbound", _inbound_event)
status = _webhook("status", _status_event)


TWIML = Content("text/xml", example=EMPTY_TWIML)
# Signed with the account's auth token (the signature header), no bearer token.
ERRORS = (400, 403, 404, 413, 415, 503)
ROUTES = [
    Route(
        "POST",
        "/twilio/{account}/inbound",
        inbound,
        "receiveInboundMessage",
        "A customer's WhatsApp message (Twilio's inbound webhook)",
        ("twilio",),
        None,
        {200: TWIML},
        errors=ERRORS,
        form=InboundMessageForm,
    ),
    Route(
        "POST",
        "/twilio/{account}/status",
        status,
        "receiveStatusCallback",
        "A message's delivery status (Twilio's status callback)",
        ("twilio",),
        None,
        {200: TWIML},
        errors=ERRORS,
        form=StatusCallbackForm,
    ),
]
