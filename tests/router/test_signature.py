"""Signature checks against vectors made with Twilio's own validator (shared data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from multidict import MultiDict
from pydantic import SecretStr

from router.signature import signing_key, valid_signature

# A copy of shared/data/twilio-signature-vectors.json (signed with twilio-python 9.13's own
# RequestValidator), kept in the repo so the suite runs on any machine.
VECTORS_FILE = Path(__file__).resolve().parents[1] / "data" / "twilio-signature-vectors.json"
VECTORS: list[dict[str, Any]] = json.loads(VECTORS_FILE.read_text())


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vectors(vector: dict[str, Any]) -> None:
    secret = SecretStr(vector["auth_token"])
    headers = vector.get("headers", {})
    key_id_secret = {"webhooks_sharedkey_XXXX": secret}
    key, algorithm = signing_key(headers, secret, key_id_secret)
    params: MultiDict[str] | str
    if vector["content_type"] == "application/json":
        params = vector["raw_body"]
    else:
        params = MultiDict([tuple(p) for p in vector["params"]])
    assert (
        valid_signature(vector["url"], params, vector["signature"], key, algorithm)
        is (vector["expected_valid"])
    )


def test_missing_signature_is_invalid() -> None:
    assert not valid_signature(
        "https://x.example/a", MultiDict(), None, SecretStr("t"), "HMAC_SHA1"
    )


def test_unknown_shared_key_id_has_no_secret() -> None:
    headers = {"X-Twilio-Webhooks-Signature-Settings": "key=unknown,algorithm=HMAC_SHA256"}
    key, algorithm = signing_key(headers, SecretStr("token"), {})
    assert key is None and algorithm == "HMAC_SHA256"
