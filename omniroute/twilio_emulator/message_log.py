"""The account's message log as Twilio's Messages list shows it: which messages, in what order.

Both directions are listed: customer messages (``inbound``, listed from the moment they
arrive, whatever became of their webhook) and created ones (``outbound-api``). Newest first
by ``date_sent``, or ``date_created`` for a message not sent (yet); log order breaks ties.

Date filters (Twilio: "``YYYY-MM-DD`` to find Messages with a specific sent_date,
``<=YYYY-MM-DD`` on and before a specific date, ``>=YYYY-MM-DD`` on and after"). The query
parameters are named ``DateSent``, ``DateSent<`` and ``DateSent>``; twilio-python sends a
``datetime`` as ``YYYY-MM-DDTHH:MM:SSZ``. The emulator's reading:

- ``DateSent``: the UTC day of the value (a datetime's time is ignored);
- ``DateSent<`` / ``DateSent>`` with a date: inclusive of that whole UTC day (on or before
  its end, on or after its start);
- with a datetime: inclusive of that instant (sent at or before it, at or after it).

Times are compared to the second, the precision Twilio shows. A message never sent is
filtered by its creation time, as it is ordered.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from omniroute.twilio_emulator.state import EmulatorState, InboundMessage, OutboundMessage
from omniroute.twilio_emulator.twilio_errors import TwilioApiError

Message = OutboundMessage | InboundMessage

DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
DAY = timedelta(days=1)
#: Twilio's code for a malformed request parameter (answered with HTTP 400).
INVALID_PARAMETER = 20001
FILTER_NAMES = ("To", "From", "DateSent", "DateSent<", "DateSent>")


def log_time(message: Message) -> datetime:
    """The time a message is ordered and date-filtered by: sent, else created."""
    return message.date_sent() or message.created_at


def find_message(state: EmulatorState, account_sid: str, sid: str) -> Message | None:
    """The account's message ``sid``, created or received, or None."""
    found: Message | None = state.messages.get(sid) or state.inbound.get(sid)
    return found if found is not None and found.account_sid == account_sid else None


def newest_first(state: EmulatorState, account_sid: str) -> list[Message]:
    """Every message of the account, newest first."""
    messages: list[Message] = [
        *(m for m in state.messages.values() if m.account_sid == account_sid),
        *(m for m in state.inbound.values() if m.account_sid == account_sid),
    ]
    return sorted(messages, key=lambda m: (log_time(m), m.sequence), reverse=True)


@dataclass(frozen=True)
class Bound:
    """A date filter's value: a UTC instant, and whether it was a date (a whole day)."""

    at: datetime
    whole_day: bool

    @classmethod
    def parse(cls, name: str, raw: str) -> Bound:
        """Read ``YYYY-MM-DD`` or an ISO-8601 datetime (naive means UTC); 400 otherwise."""
        try:
            if DATE_ONLY.fullmatch(raw):
                day = date.fromisoformat(raw)
                return cls(datetime(day.year, day.month, day.day, tzinfo=UTC), True)
            moment = datetime.fromisoformat(raw)
        except ValueError:
            raise TwilioApiError(400, INVALID_PARAMETER, f"Invalid {name}: {raw}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return cls(moment.astimezone(UTC), False)

    def day_start(self) -> datetime:
        """Midnight UTC starting the value's day."""
        return self.at.replace(hour=0, minute=0, second=0, microsecond=0)


@dataclass(frozen=True)
class MessageFilter:
    """The filters of a Messages list request; None means not filtered."""

    to: str | None = None
    from_: str | None = None
    sent_on: Bound | None = None
    sent_before: Bound | None = None
    sent_after: Bound | None = None
    #: The filter parameters as received, for the page URIs.
    params: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> MessageFilter:
        """Read ``To``, ``From``, ``DateSent``, ``DateSent<``, ``DateSent>``; 400 if malformed."""

        def bound(name: str) -> Bound | None:
            raw = query.get(name)
            return Bound.parse(name, raw) if raw else None

        return cls(
            to=query.get("To") or None,
            from_=query.get("From") or None,
            sent_on=bound("DateSent"),
            sent_before=bound("DateSent<"),
            sent_after=bound("DateSent>"),
            params=tuple((name, query[name]) for name in FILTER_NAMES if query.get(name)),
        )

    def matches(self, message: Message) -> bool:
        """Whether ``message`` passes every filter given."""
        if self.to is not None and message.to != self.to:
            return False
        if self.from_ is not None and message.from_ != self.from_:
            return False
        return self._dates_match(log_time(message).astimezone(UTC).replace(microsecond=0))

    def _dates_match(self, sent: datetime) -> bool:
        if self.sent_on is not None and sent.date() != self.sent_on.at.date():
            return False
        before, after = self.sent_before, self.sent_after
        if before is not None and not (
            sent < before.day_start() + DAY if before.whole_day else sent <= before.at
        ):
            return False
        return after is None or sent >= (after.day_start() if after.whole_day else after.at)
