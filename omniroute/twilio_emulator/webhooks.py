"""Signed webhook delivery as Twilio does it, for inbound webhooks and status callbacks alike.

Twilio's rules (https://www.twilio.com/docs/usage/webhooks/webhooks-connection-overrides),
which :mod:`connection_overrides` reads from the URL's fragment:

- a webhook is sent once; it is retried (``rc`` times, default 1) only when the attempt
  failed in a way the retry policy ``rp`` names (default ``ct``: the connection failed).
  An HTTP 5xx answer is final unless the URL says ``rp=5xx`` (or ``all``);
- all attempts share one time budget (``tt``); each has its own connect (``ct``) and read
  (``rt``) timeouts;
- the fragment is never sent, and the signature covers the URL without it;
- a retry is the same request: same form, same signature, same ``I-Twilio-Idempotency-Token``.

Every failed attempt is recorded as Twilio's debugger would (error 11200); nothing raises.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp

from omniroute.twilio_emulator.connection_overrides import (
    FailureClass,
    split_webhook_url,
)
from omniroute.twilio_emulator.debugger import WebhookFailure, WebhookKind
from omniroute.twilio_emulator.runtime import log, sign
from omniroute.twilio_emulator.state import EmulatorState

USER_AGENT = "TwilioProxy/1.1"
CONNECTION_FAILED = "ClientConnectorError"
TIMED_OUT = "TimeoutError"


@dataclass(frozen=True)
class Webhook:
    """One webhook to deliver. ``url`` is as configured: it may end in an overrides fragment."""

    kind: WebhookKind
    url: str
    form: dict[str, str]
    auth_token: str
    message_sid: str
    idempotency_token: str


@dataclass(frozen=True)
class Attempt:
    """What one HTTP attempt gave: an answer (status and body) or an error, and its class."""

    http_status: int | None
    body: str
    error: str | None
    failure: FailureClass | None


@dataclass(frozen=True)
class Delivery:
    """The outcome of a webhook: how many attempts were made and the last one, which decided."""

    attempts: int
    last: Attempt


def _answer_class(status: int) -> FailureClass | None:
    if 200 <= status < 300:
        return None
    if 400 <= status < 500:
        return "4xx"
    if 500 <= status < 600:
        return "5xx"
    return "other"


async def _attempt(
    session: aiohttp.ClientSession,
    url: str,
    form: dict[str, str],
    headers: dict[str, str],
    limits: aiohttp.ClientTimeout,
) -> Attempt:
    # Order matters: aiohttp's connect timeout is also a TimeoutError, and a refused
    # connection is also a ClientError.
    try:
        async with session.post(url, data=form, headers=headers, timeout=limits) as response:
            body = await response.text()
    except aiohttp.ClientConnectorError:
        return Attempt(None, "", CONNECTION_FAILED, "ct")
    except aiohttp.ConnectionTimeoutError:
        return Attempt(None, "", TIMED_OUT, "ct")
    except TimeoutError:  # the read timeout, or the total budget ran out
        return Attempt(None, "", TIMED_OUT, "rt")
    except aiohttp.ClientError as exc:  # e.g. the server closed the connection unanswered
        return Attempt(None, "", type(exc).__name__, "other")
    return Attempt(response.status, body, None, _answer_class(response.status))


def signed_headers(webhook: Webhook, url: str) -> dict[str, str]:
    """The headers Twilio sends with ``webhook`` to ``url`` (the URL without fragment)."""
    return {
        "X-Twilio-Signature": sign(webhook.auth_token, url, webhook.form),
        "I-Twilio-Idempotency-Token": webhook.idempotency_token,
        "User-Agent": USER_AGENT,
        "Accept": "*/*",
    }


async def deliver(
    session: aiohttp.ClientSession, state: EmulatorState, webhook: Webhook
) -> Delivery:
    """POST ``webhook`` as a signed form, retrying only as its URL's overrides allow.

    Records each failed attempt in ``state.webhooks`` (and each delivery in its counters);
    never raises for a network or HTTP failure. Cancellation propagates.
    """
    url, overrides = split_webhook_url(webhook.url)
    headers = signed_headers(webhook, url)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + overrides.total_time
    number = 0
    while True:
        number += 1
        limits = overrides.client_timeout(deadline - loop.time())
        attempt = await _attempt(session, url, webhook.form, headers, limits)
        if attempt.failure is None:
            state.webhooks.record_delivery(webhook.kind)
            return Delivery(number, attempt)
        retry = (
            overrides.retries(attempt.failure)
            and number <= overrides.retry_count
            and loop.time() < deadline
        )
        state.webhooks.record_failure(
            WebhookFailure(
                url=url,
                kind=webhook.kind,
                message_sid=webhook.message_sid,
                attempt=number,
                final=not retry,
                http_status=attempt.http_status,
                error=attempt.error,
                at=state.now(),
            )
        )
        log.warning(
            "emulator.webhook_failed",
            kind=webhook.kind,
            url=url,
            message_sid=webhook.message_sid,
            attempt=number,
            final=not retry,
            http_status=attempt.http_status,
            error=attempt.error,
        )
        if not retry:
            return Delivery(number, attempt)
