"""What Twilio's debugger would show about webhook deliveries: 11200 for every failed attempt.

Twilio logs error 11200 ("HTTP retrieval failure") in the account's debugger each time a
webhook request fails: no connection, no answer in time, or an answer that is not 2xx. The
emulator keeps the same records so tests can see the webhooks production would have lost.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

HTTP_RETRIEVAL_FAILURE = 11200
#: The newest records kept; older ones are dropped (a long-running emulator stays bounded).
FAILURE_LOG_LIMIT = 10_000

WebhookKind = Literal["inbound", "status"]
WEBHOOK_KINDS: tuple[WebhookKind, ...] = ("inbound", "status")


@dataclass(frozen=True)
class WebhookFailure:
    """One failed delivery attempt of one webhook.

    ``url`` is the URL requested (without the overrides fragment); ``final`` says no attempt
    follows; ``http_status`` is the answer's status, or None when there was no answer, and
    then ``error`` names what happened (``ClientConnectorError``, ``TimeoutError``, …).
    """

    url: str
    kind: WebhookKind
    message_sid: str
    attempt: int
    final: bool
    http_status: int | None
    error: str | None
    at: datetime

    def to_json(self) -> dict[str, Any]:
        """Return the record as ``GET /_emulator/webhook-failures`` lists it."""
        return {
            "error_code": HTTP_RETRIEVAL_FAILURE,
            "url": self.url,
            "kind": self.kind,
            "message_sid": self.message_sid,
            "attempt": self.attempt,
            "final": self.final,
            "http_status": self.http_status,
            "error": self.error,
            "at": self.at.isoformat(),
        }


@dataclass
class WebhookLog:
    """Failed attempts (newest ``FAILURE_LOG_LIMIT``) and per-kind delivery counters."""

    failures: deque[WebhookFailure] = field(default_factory=lambda: deque(maxlen=FAILURE_LOG_LIMIT))
    delivered: Counter[str] = field(default_factory=Counter)
    failed_attempts: Counter[str] = field(default_factory=Counter)
    given_up: Counter[str] = field(default_factory=Counter)

    def record_failure(self, failure: WebhookFailure) -> None:
        """Remember a failed attempt; a final one also counts the webhook as given up."""
        self.failures.append(failure)
        self.failed_attempts[failure.kind] += 1
        if failure.final:
            self.given_up[failure.kind] += 1

    def record_delivery(self, kind: WebhookKind) -> None:
        """Count a webhook answered 2xx."""
        self.delivered[kind] += 1

    def matching(
        self, kind: str | None = None, message_sid: str | None = None
    ) -> list[WebhookFailure]:
        """Failures, oldest first, of ``kind`` and ``message_sid`` when given."""
        return [
            failure
            for failure in self.failures
            if (kind is None or failure.kind == kind)
            and (message_sid is None or failure.message_sid == message_sid)
        ]

    def summary(self) -> dict[str, dict[str, int]]:
        """Per kind: webhooks delivered, failed attempts, webhooks given up."""
        counters = {
            "delivered": self.delivered,
            "failed_attempts": self.failed_attempts,
            "given_up": self.given_up,
        }
        return {
            name: {kind: counter[kind] for kind in WEBHOOK_KINDS}
            for name, counter in counters.items()
        }

    def clear(self) -> None:
        """Forget every record and counter."""
        self.failures.clear()
        self.delivered.clear()
        self.failed_attempts.clear()
        self.given_up.clear()
