"""Every exception omniroute raises on purpose across a module's edge, in one place.

(A module's private control flow, such as the runner's "not for this stage", stays with it.)
"""

from __future__ import annotations

from collections.abc import Collection


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


class NotYetStored(TransientError):
    """What the event needs is not there yet, and another part will bring it: the row
    another stage stores (a customer message the conversations stage has not stored), or a
    reload this process has not applied. Not a failure: the runtime holds the message and
    retries it in place, without counting it toward the delivery limit, until the event is
    ``consumers.runtime.NOT_YET_PATIENCE`` old; then it is dead-lettered with the reason."""


class UnknownAccountSid(OmnirouteError):
    """A webhook's AccountSid is not the account its URL names."""


class UnknownNumber(OmnirouteError):
    """A webhook's business number is not configured for its account."""


class IngressUnavailable(OmnirouteError):
    """Neither the broker nor the database could take a webhook's event: answer 503."""


class WorkConflict(OmnirouteError):
    """The state changed under the caller (offer gone, no capacity, not yours)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class UnknownQueues(OmnirouteError):
    """Queue names that the loaded configuration does not define."""

    def __init__(self, unknown: list[str], known: Collection[str]) -> None:
        self.unknown = unknown
        self.known = sorted(known)
        super().__init__(
            f"unknown queue{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}"
            f" (configured: {', '.join(self.known) or 'none'})"
        )


class IdempotencyError(OmnirouteError):
    """A request's ``Idempotency-Key`` cannot be honoured; ``status`` and ``code`` say how
    the API answers."""

    status = 400
    code = "invalid_idempotency_key"


class InvalidKey(IdempotencyError):
    """Empty, or longer than ``MAX_KEY_LENGTH``."""


class KeyReused(IdempotencyError):
    """The key already answered another request."""

    status = 422
    code = "idempotency_key_reused"


class KeyInUse(IdempotencyError):
    """The request holding the key is still in progress."""

    status = 409
    code = "idempotency_key_in_use"


class ListenFailed(OmnirouteError):
    """The HTTP port could not be bound (in use, not permitted, no such address)."""
