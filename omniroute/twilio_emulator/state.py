"""The emulator's in-memory state: accounts, messages, media, faults and window memory."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any, Literal

from omniroute.twilio_emulator.debugger import WebhookLog

API_VERSION = "2010-04-01"
WINDOW = timedelta(hours=24)

Clock = Callable[[], datetime]
FaultMode = Literal["response", "callback"]


def utc_now() -> datetime:
    """Return the current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def new_sid(prefix: str) -> str:
    """Return a Twilio-style sid: a two-letter prefix and 32 lowercase hex digits."""
    return prefix + secrets.token_hex(16)


def rfc2822(moment: datetime) -> str:
    """Format a datetime the way Twilio's REST API does (``Thu, 24 Aug 2023 05:01:45 +0000``)."""
    return format_datetime(moment.astimezone(UTC))


@dataclass
class StatusChange:
    """One step of a message's status history."""

    status: str
    at: datetime
    error_code: int | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the step as plain JSON."""
        return {"status": self.status, "at": self.at.isoformat(), "error_code": self.error_code}


@dataclass
class OutboundMessage:
    """A message created through ``POST …/Messages.json``."""

    sid: str
    account_sid: str
    to: str
    from_: str | None
    messaging_service_sid: str | None
    body: str
    media_urls: list[str]
    content_sid: str | None
    content_variables: dict[str, Any] | None
    status_callback: str | None
    created_at: datetime
    status: str = "queued"
    updated_at: datetime | None = None
    error_code: int | None = None
    error_message: str | None = None
    history: list[StatusChange] = field(default_factory=list)
    #: Position in the emulator's message log (set by ``EmulatorState.log_outbound``).
    sequence: int = 0

    def advance(
        self,
        status: str,
        at: datetime,
        error_code: int | None = None,
        error_message: str | None = None,
    ) -> None:
        """Move the message to ``status`` and append the step to its history."""
        self.status = status
        self.updated_at = at
        if error_code is not None:
            self.error_code = error_code
            self.error_message = error_message
        self.history.append(StatusChange(status, at, error_code))

    def date_sent(self) -> datetime | None:
        """When Twilio sent the message (its ``sent`` step), or None before that."""
        return next((c.at for c in self.history if c.status == "sent"), None)

    def uri(self) -> str:
        """Return the resource's path, as Twilio reports it in ``uri``."""
        return f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{self.sid}.json"

    def to_resource(self) -> dict[str, Any]:
        """Return the message shaped like Twilio's Message resource JSON."""
        base = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{self.sid}"
        updated = self.updated_at or self.created_at
        sent = self.date_sent()
        return {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": self.body,
            "date_created": rfc2822(self.created_at),
            "date_sent": rfc2822(sent) if sent else None,
            "date_updated": rfc2822(updated),
            "direction": "outbound-api",
            "error_code": self.error_code,
            "error_message": self.error_message,
            "from": self.from_,
            "messaging_service_sid": self.messaging_service_sid,
            "num_media": str(len(self.media_urls)),
            "num_segments": "1",
            "price": None,
            "price_unit": "USD",
            "sid": self.sid,
            "status": self.status,
            "subresource_uris": {
                "media": f"{base}/Media.json",
                "feedback": f"{base}/Feedback.json",
            },
            "to": self.to,
            "uri": self.uri(),
        }

    def to_record(self) -> dict[str, Any]:
        """Return the message as the emulator's own listing shows it (resource + extras)."""
        return {
            **self.to_resource(),
            "media_urls": list(self.media_urls),
            "content_sid": self.content_sid,
            "content_variables": self.content_variables,
            "status_callback": self.status_callback,
            "history": [change.to_json() for change in self.history],
        }


@dataclass
class InboundMessage:
    """A simulated customer message, as Twilio would store it."""

    sid: str
    account_sid: str
    to: str
    from_: str
    body: str
    num_media: int
    created_at: datetime
    #: Position in the emulator's message log (set by ``EmulatorState.log_inbound``).
    sequence: int = 0

    def date_sent(self) -> datetime:
        """When Twilio posted the inbound webhook: when the message was received."""
        return self.created_at

    def to_resource(self) -> dict[str, Any]:
        """Return the message shaped like Twilio's Message resource JSON."""
        base = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{self.sid}"
        stamp = rfc2822(self.created_at)
        return {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": self.body,
            "date_created": stamp,
            "date_sent": stamp,
            "date_updated": stamp,
            "direction": "inbound",
            "error_code": None,
            "error_message": None,
            "from": self.from_,
            "messaging_service_sid": None,
            "num_media": str(self.num_media),
            "num_segments": "1",
            "price": None,
            "price_unit": "USD",
            "sid": self.sid,
            "status": "received",
            "subresource_uris": {"media": f"{base}/Media.json"},
            "to": self.to,
            "uri": f"{base}.json",
        }


@dataclass(frozen=True)
class StoredMedia:
    """The bytes of one customer attachment."""

    account_sid: str
    message_sid: str
    sid: str
    content_type: str
    data: bytes
    created_at: datetime = field(default_factory=utc_now)

    def uri(self) -> str:
        """Return the Media resource's path, as Twilio reports it in ``uri``."""
        return (
            f"/{API_VERSION}/Accounts/{self.account_sid}"
            f"/Messages/{self.message_sid}/Media/{self.sid}.json"
        )

    def to_resource(self) -> dict[str, Any]:
        """Return the media shaped like Twilio's Media resource JSON."""
        stamp = rfc2822(self.created_at)
        return {
            "sid": self.sid,
            "account_sid": self.account_sid,
            "parent_sid": self.message_sid,
            "content_type": self.content_type,
            "date_created": stamp,
            "date_updated": stamp,
            "uri": self.uri(),
        }


@dataclass
class Fault:
    """An error to inject into the next matching create call(s)."""

    status: int
    code: int
    message: str
    count: int = 1
    to: str | None = None
    mode: FaultMode = "response"
    callback_status: str = "failed"

    def matches(self, to: str) -> bool:
        """Whether this fault applies to a message for ``to``."""
        return self.count > 0 and (self.to is None or self.to == to)


@dataclass
class EmulatorState:
    """Everything the emulator remembers; one instance per app, no globals.

    ``accounts`` maps Account SID to auth token (change it to rotate a token: webhooks are
    signed with the token current when they are sent, as Twilio signs with the primary).
    ``templates`` optionally maps a ContentSid to its approved text (``{{1}}`` placeholders)
    so template sends get a readable body. ``public_url`` is where the emulator's API is
    reached (what the router's ``OMNIROUTE_TWILIO_API_URL`` names); customers' media URLs are
    built on it, as Twilio's always name its API host whoever posted the message.
    """

    accounts: dict[str, str]
    callback_delay: float = 0.05
    public_url: str | None = None
    clock: Clock = field(default=utc_now)
    messages: dict[str, OutboundMessage] = field(default_factory=dict)
    inbound: dict[str, InboundMessage] = field(default_factory=dict)
    media: dict[str, StoredMedia] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    windows: dict[tuple[str, str, str], datetime] = field(default_factory=dict)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    templates: dict[str, str] = field(default_factory=dict)
    webhooks: WebhookLog = field(default_factory=WebhookLog)
    _sequence: itertools.count[int] = field(
        default_factory=lambda: itertools.count(1), init=False, repr=False
    )

    def now(self) -> datetime:
        """Return the emulator clock's current time."""
        return self.clock()

    def log_outbound(self, message: OutboundMessage) -> None:
        """Store a created message in the message log (after any it already holds)."""
        message.sequence = next(self._sequence)
        self.messages[message.sid] = message

    def log_inbound(self, message: InboundMessage) -> None:
        """Store a customer message in the message log (after any it already holds).

        Idempotent on the sid: a message already logged (a resend of the same webhook) is
        kept as first received.
        """
        if message.sid not in self.inbound:
            message.sequence = next(self._sequence)
            self.inbound[message.sid] = message

    def reset(self) -> None:
        """Forget messages, media, faults, rejections, window memory and webhook records.

        Accounts and templates stay.
        """
        self.messages.clear()
        self.inbound.clear()
        self.media.clear()
        self.faults.clear()
        self.windows.clear()
        self.rejected.clear()
        self.webhooks.clear()

    def take_fault(self, to: str) -> Fault | None:
        """Consume one use of the first pending fault that applies to ``to``."""
        for fault in self.faults:
            if fault.matches(to):
                fault.count -= 1
                if fault.count <= 0:
                    self.faults.remove(fault)
                return fault
        return None

    def record_customer_message(self, account_sid: str, business: str, customer: str) -> None:
        """Remember that ``customer`` just wrote to ``business`` (opens/renews the window)."""
        self.windows[(account_sid, business, customer)] = self.now()

    def window_open(self, account_sid: str, business: str | None, customer: str) -> bool:
        """Whether ``customer`` wrote to ``business`` (any number if None) in the last 24 h."""
        now = self.now()
        for (account, number, who), at in self.windows.items():
            if account != account_sid or who != customer:
                continue
            if (business is None or number == business) and now - at < WINDOW:
                return True
        return False
