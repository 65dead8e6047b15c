"""A short fingerprint of a loaded configuration, so an operator can see which processes run
the same one (``omniroute config reload``, ``omniroute status``).

The hash covers the configuration as resolved, secrets included: a token rotated in its
secret file, with the YAML unchanged, is a different configuration, and a process that has
not re-read the file yet must show a different hash. Secrets enter only as their own
SHA-256 digests, so the hash (twelve hex digits of a digest over digests) reveals nothing
about them.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from pydantic import BaseModel, SecretStr

from schemas.config import Config

HASH_LENGTH = 12  # hex digits: enough to tell a handful of configurations apart at a glance


def config_hash(config: Config) -> str:
    """The first ``HASH_LENGTH`` hex digits of SHA-256 over the resolved configuration."""
    document = orjson.dumps(_canonical(config), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(document).hexdigest()[:HASH_LENGTH]


def _secret_digest(secret: SecretStr) -> str:
    # Domain-separated, so the digest of a secret here is not the plain SHA-256 of its value.
    return hashlib.sha256(b"omniroute-secret\x00" + secret.get_secret_value().encode()).hexdigest()


def _canonical(value: Any) -> Any:
    """JSON-able data for ``value`` with every field, those excluded from dumps too (the
    resolved secrets are ``exclude=True``), and each secret replaced by its digest."""
    if isinstance(value, SecretStr):
        return {"secret-sha256": _secret_digest(value)}
    if isinstance(value, BaseModel):
        return {name: _canonical(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((_canonical(v) for v in value), key=repr)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)  # paths, times, enums: their text is what the file said
