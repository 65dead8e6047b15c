"""``Idempotency-Key``: one semantics for every API call that takes one.

A key names one request of one caller. The first request with a key claims it and its
answer is remembered, in the same transaction as the request's effects; then:

- the same key with the same request (method, path and body) answers what the first one
  answered, status and body, and does nothing again;
- the same key with another request is refused: ``KeyReused`` (422
  ``idempotency_key_reused``);
- the same key while the first request is still in progress waits for it (a double click
  gets the first answer); past ``wait`` (the setting ``idempotency_wait``) it is refused:
  ``KeyInUse`` (409 ``idempotency_key_in_use``);
- an empty key or one longer than ``MAX_KEY_LENGTH`` is ``InvalidKey`` (400
  ``invalid_idempotency_key``).

Keys are scoped per caller (``ADMIN_SCOPE``, ``agent_scope(agent_id)``): two agents'
keys never meet. The table keeps a hash of the key, never the key; fields of an answer
that must not be readable from the database (an agent's token) are stored sealed with the
key itself, so only a retry that presents the key gets them back.

Every function runs on the caller's connection, inside the caller's transaction: a claim
whose transaction rolls back is no claim, and a request that fails leaves its key free.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from omniroute.errors import InvalidKey, KeyInUse, KeyReused
from omniroute.infra.store import Connection

MAX_KEY_LENGTH = 200
# How long a retry waits for the request that holds its key before it is told 409.
IN_PROGRESS_WAIT = 5.0
ADMIN_SCOPE = "admin"
_IN_PROGRESS = 0  # the status of a claimed key whose answer is not written yet


@dataclass(frozen=True)
class Answer:
    """What the first request answered: HTTP status and JSON body."""

    status: int
    body: Any


@dataclass(frozen=True)
class IdempotentRequest:
    """One caller's request under one key."""

    scope: str
    key: str
    fingerprint: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(b"omniroute.idempotency\x00" + self.key.encode()).hexdigest()


def agent_scope(agent_id: object) -> str:
    return f"agent:{agent_id}"


def checked_key(raw: str | None, max_length: int = MAX_KEY_LENGTH) -> str | None:
    """The header's key, or None without one. Raises ``InvalidKey``."""
    if raw is None:
        return None
    if not 0 < len(raw) <= max_length:
        raise InvalidKey(f"an Idempotency-Key has 1 to {max_length} characters")
    return raw


def fingerprint(method: str, path: str, body: Any) -> str:
    """A hash of the request a key answers: two requests alike in these are the same request
    (``body`` as parsed JSON, so key order and spacing do not matter)."""
    canonical = orjson.dumps([method.upper(), path, body], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


async def claim(
    conn: Connection, request: IdempotentRequest, *, wait: float | None = None
) -> Answer | None:
    """Claim the key for this request (None: go ahead, then ``remember`` the answer), or the
    answer remembered for it.

    The claim is an insert: a request with the same key waits on it, up to ``wait``
    seconds (default ``IN_PROGRESS_WAIT``), until the first transaction ends. Raises
    ``KeyReused``, ``KeyInUse``; after ``KeyInUse`` the transaction is aborted and must be
    left.
    """
    wait = IN_PROGRESS_WAIT if wait is None else wait
    previous = await conn.fetchval(
        "SELECT current_setting('lock_timeout') AS previous,"
        " set_config('lock_timeout', $1, true) AS now",
        f"{max(1, round(wait * 1000))}ms",
    )
    try:
        claimed = await conn.fetchval(
            "INSERT INTO idempotency_keys (scope, key, status, body, fingerprint)"
            " VALUES ($1, $2, $3, '{}', $4) ON CONFLICT (scope, key) DO NOTHING RETURNING true",
            request.scope,
            request.digest,
            _IN_PROGRESS,
            request.fingerprint,
        )
    except asyncpg.exceptions.LockNotAvailableError:
        raise KeyInUse("a request with this Idempotency-Key is in progress") from None
    await conn.execute("SELECT set_config('lock_timeout', $1, true)", previous)
    if claimed:
        return None
    row = await conn.fetchrow(
        "SELECT status, body, fingerprint, sealed FROM idempotency_keys"
        " WHERE scope = $1 AND key = $2",
        request.scope,
        request.digest,
    )
    if row is None or row["status"] == _IN_PROGRESS:
        raise KeyInUse("a request with this Idempotency-Key is in progress")
    if row["fingerprint"] != request.fingerprint:
        raise KeyReused("this Idempotency-Key was used with another request")
    body = row["body"]
    sealed: Mapping[str, str] = row["sealed"]
    if sealed:
        body = dict(body) | {name: _unseal(value, request.key) for name, value in sealed.items()}
    return Answer(row["status"], body)


async def remember(
    conn: Connection, request: IdempotentRequest, answer: Answer, *, sealed: Collection[str] = ()
) -> None:
    """Keep the answer to a claimed key; the ``sealed`` fields of a JSON object answer are
    stored sealed with the key, not as they are."""
    body = answer.body
    seals: dict[str, str] = {}
    if sealed:
        seals = {name: _seal(str(body[name]), request.key) for name in sealed if name in body}
        body = {name: value for name, value in body.items() if name not in seals}
    await conn.execute(
        "UPDATE idempotency_keys SET status = $3, body = $4, sealed = $5"
        " WHERE scope = $1 AND key = $2",
        request.scope,
        request.digest,
        answer.status,
        body,
        seals,
    )


def _keystream(key: str, length: int) -> bytes:
    blocks = (length + 31) // 32
    stream = b"".join(
        hmac.new(key.encode(), b"omniroute.sealed" + n.to_bytes(4, "big"), hashlib.sha256).digest()
        for n in range(blocks)
    )
    return stream[:length]


def _seal(value: str, key: str) -> str:
    raw = value.encode()
    return bytes(a ^ b for a, b in zip(raw, _keystream(key, len(raw)), strict=True)).hex()


def _unseal(sealed: str, key: str) -> str:
    raw = bytes.fromhex(sealed)
    return bytes(a ^ b for a, b in zip(raw, _keystream(key, len(raw)), strict=True)).decode()
