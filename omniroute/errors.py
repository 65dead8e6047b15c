"""Every exception omniroute raises on purpose, in one place."""

from __future__ import annotations


class OmnirouteError(Exception):
    """Base of omniroute's own errors."""


class ConfigError(OmnirouteError):
    """The configuration file is invalid; ``problems`` name file, line and field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class BrokerUnavailable(OmnirouteError):
    """The broker is unreachable or did not confirm a publish in time."""


class StoreUnavailable(OmnirouteError):
    """PostgreSQL is unreachable; the work should wait and be retried, not dead-lettered."""


class InvalidEvent(OmnirouteError):
    """An event cannot be handled as it stands (bad payload): dead-letter it at once."""


class TransientError(OmnirouteError):
    """Handling failed for a reason that may pass: redeliver, up to the delivery limit."""


class UnknownAccountSid(OmnirouteError):
    """A webhook's AccountSid is not the account its URL names."""


class UnknownNumber(OmnirouteError):
    """A webhook's business number is not configured for its account."""


class IngressUnavailable(OmnirouteError):
    """Neither the broker nor the database could take a webhook's event: answer 503."""
