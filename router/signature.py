"""X-Twilio-Signature checks with the official ``twilio`` validator.

The URL Twilio signed is rebuilt from the configured public URL plus the request's path and
query (never from the Host header or scheme the proxy forwarded), and every parameter
received is signed over, blank and repeated ones included. The validator itself tries the
URL with and without the default port, as Twilio signs either way.

During a token rotation an account has two auth tokens (``LiveConfig.accepted_tokens``): the
request is checked against each, every comparison in constant time, and the answer says
which one signed, for the metrics.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from multidict import MultiDict
from pydantic import SecretStr
from twilio.request_validator import (
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)

__all__ = [
    "SIGNATURE_HEADER",
    "SIGNATURE_SETTINGS_HEADER",
    "SignedWith",
    "signed_with",
    "signing_key",
    "valid_signature",
]

# The secret that signed a request: the account's current or previous auth token, or a
# shared webhook key (X-Twilio-Webhooks-Signature-Settings).
SignedWith = Literal["current", "previous", "shared_key"]


def _key_id(settings: str) -> str | None:
    return next(
        (
            value.strip()
            for name, _, value in (p.partition("=") for p in settings.split(","))
            if name.strip() == "key"
        ),
        None,
    )


def signing_key(
    headers: Mapping[str, str], auth_token: SecretStr, shared_keys: Mapping[str, SecretStr]
) -> tuple[SecretStr | None, str]:
    """The secret and algorithm a request was signed with.

    Without ``X-Twilio-Webhooks-Signature-Settings`` it is the auth token with HMAC-SHA1.
    With it, the named shared key and algorithm; an unknown key id gives ``None``.
    """
    settings = headers.get(SIGNATURE_SETTINGS_HEADER, "")
    algorithm = get_signature_algorithm(settings)
    key_id = _key_id(settings)
    if key_id is None:
        return auth_token, algorithm
    return shared_keys.get(key_id), algorithm


def signed_with(
    headers: Mapping[str, str],
    url: str,
    params: MultiDict[str] | str,
    tokens: Sequence[tuple[Literal["current", "previous"], SecretStr]],
    shared_keys: Mapping[str, SecretStr],
) -> SignedWith | None:
    """Which secret signed this request, or ``None`` when none did (refuse it).

    ``tokens`` are the account's accepted auth tokens, current first, so the usual request
    costs one HMAC. A request naming a shared key is checked against that key only.
    """
    signature = headers.get(SIGNATURE_HEADER)
    settings = headers.get(SIGNATURE_SETTINGS_HEADER, "")
    algorithm = get_signature_algorithm(settings)
    key_id = _key_id(settings)
    if key_id is not None:
        key = shared_keys.get(key_id)
        return "shared_key" if valid_signature(url, params, signature, key, algorithm) else None
    for label, token in tokens:
        if valid_signature(url, params, signature, token, algorithm):
            return label
    return None


def valid_signature(
    url: str,
    params: MultiDict[str] | str,
    signature: str | None,
    secret: SecretStr | None,
    algorithm: str,
) -> bool:
    """True when ``signature`` is Twilio's signature of ``url`` + ``params`` under ``secret``.

    ``params`` is the form as a multi-dict, or the raw body for JSON requests (signed
    through the ``bodySHA256`` query parameter).
    """
    if not signature or secret is None:
        return False
    validator = RequestValidator(secret.get_secret_value())
    if isinstance(params, MultiDict):
        # Fast path: Twilio signed exactly this URL (the usual case). The validator's own
        # ``validate`` always computes two HMACs (URL with and without the port); one is
        # enough when the first matches, and any other case gets the full check below.
        with contextlib.suppress(ValueError):  # an unknown algorithm: validate says no
            expected = validator.compute_signature(url, params, algorithm)
            if hmac.compare_digest(expected.encode(), signature.encode()):
                return True
    if isinstance(params, str) and "bodySHA256" not in parse_qs(urlsplit(url).query):
        return False  # a raw body is only signed through bodySHA256 (the validator would crash)
    return bool(validator.validate(url, params, signature, algorithm))
