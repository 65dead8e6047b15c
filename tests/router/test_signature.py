"""Signature checks against vectors made with Twilio's own validator (shared data)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any, Literal

import pytest
from aiohttp.test_utils import TestClient, TestServer
from multidict import MultiDict
from prometheus_client import REGISTRY
from pydantic import SecretStr
from twilio.request_validator import RequestValidator

from omniroute.infra.config_loader import LiveConfig, load_config
from omniroute.infra.settings import Settings
from router.app import create_app
from router.signature import signed_with, signing_key, valid_signature
from router.state import BUS
from tests.support import CONFIG_YAML, ENVIRON, inbound_form, signed_post

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


# --- token rotation ----------------------------------------------------------------------------

OLD_TOKEN = "old-auth-token-a1b2c3d4e5f6"
NEW_TOKEN = "new-auth-token-f6e5d4c3b2a1"
URL = "https://omniroute.example.com/twilio/contoso/inbound"
FORM = MultiDict([("Body", "oi"), ("MessageSid", "SM" + "0" * 32)])


def twilio_headers(token: str, url: str = URL, form: MultiDict[str] = FORM) -> dict[str, str]:
    return {"X-Twilio-Signature": RequestValidator(token).compute_signature(url, form)}


def test_signed_with_names_the_token_that_signed() -> None:
    tokens: list[tuple[Literal["current", "previous"], SecretStr]] = [
        ("current", SecretStr(NEW_TOKEN)),
        ("previous", SecretStr(OLD_TOKEN)),
    ]
    assert signed_with(twilio_headers(NEW_TOKEN), URL, FORM, tokens, {}) == "current"
    assert signed_with(twilio_headers(OLD_TOKEN), URL, FORM, tokens, {}) == "previous"
    assert signed_with(twilio_headers("someone-else"), URL, FORM, tokens, {}) is None
    assert signed_with({}, URL, FORM, tokens, {}) is None
    assert signed_with(twilio_headers(OLD_TOKEN), URL, FORM, tokens[:1], {}) is None
    assert signed_with(twilio_headers(NEW_TOKEN), URL, FORM, [], {}) is None


def test_signed_with_a_shared_key_checks_that_key_only() -> None:
    vector = next(v for v in VECTORS if v.get("headers") and v["expected_valid"])
    headers = {**vector["headers"], "X-Twilio-Signature": vector["signature"]}
    secret = SecretStr(vector["auth_token"])
    params = (
        vector["raw_body"]
        if vector["content_type"] == "application/json"
        else MultiDict([tuple(p) for p in vector["params"]])
    )
    keys = {"webhooks_sharedkey_XXXX": secret}
    tokens: list[tuple[Literal["current", "previous"], SecretStr]] = [("current", secret)]
    assert signed_with(headers, vector["url"], params, tokens, keys) == "shared_key"
    # The key the header names is unknown: the auth token is not tried in its place.
    assert signed_with(headers, vector["url"], params, tokens, {}) is None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def signatures(account: str, token: str) -> float:
    value = REGISTRY.get_sample_value(
        "omniroute_webhook_signatures_total", {"account": account, "token": token}
    )
    return value or 0.0


async def test_the_router_accepts_the_previous_token_during_the_overlap_only(
    settings: Settings, tmp_path: Path
) -> None:
    """A real router whose configuration names a token file: the file rotated and reloaded,
    webhooks signed with either token pass during the overlap, only the new one after; the
    metric says which token signed, and no token ever reaches the router's answers."""
    account = "rot" + uuid.uuid4().hex[:8]
    text = CONFIG_YAML.replace("name: contoso", f"name: {account}").replace(
        "auth_token_env: TEST_TWILIO_TOKEN_CONTOSO", "auth_token_file: secrets/token"
    )
    (tmp_path / "secrets").mkdir()
    token_file = tmp_path / "secrets" / "token"
    token_file.write_text(OLD_TOKEN + "\n")
    path = tmp_path / "omniroute.yaml"
    path.write_text(text)
    clock = Clock()
    live = LiveConfig(load_config(path, ENVIRON), path, token_overlap=60, clock=clock)
    inbound = f"/twilio/{account}/inbound"
    before = {label: signatures(account, label) for label in ("current", "previous", "none")}

    async def post(token: str) -> int:
        body, headers = signed_post(inbound, inbound_form(), token)
        response = await client.post(inbound, data=body, headers=headers)
        answer = await response.text()
        assert OLD_TOKEN not in answer and NEW_TOKEN not in answer
        return response.status

    async with TestClient(TestServer(create_app(settings, live))) as client:
        async with asyncio.timeout(10):
            await client.app[BUS].wait_ready()
        assert [await post(OLD_TOKEN), await post(NEW_TOKEN)] == [200, 403]

        token_file.write_text(NEW_TOKEN + "\n")
        live.reload(ENVIRON)
        clock.now = 59.9
        assert [await post(NEW_TOKEN), await post(OLD_TOKEN), await post("x")] == [200, 200, 403]

        clock.now = 60.0
        assert [await post(NEW_TOKEN), await post(OLD_TOKEN)] == [200, 403]

        metrics = await (await client.get("/metrics")).text()
    counted = {label: signatures(account, label) - before[label] for label in before}
    assert counted == {"current": 3, "previous": 1, "none": 3}
    assert f'omniroute_webhook_signatures_total{{account="{account}",token="previous"}}' in metrics
    assert OLD_TOKEN not in metrics and NEW_TOKEN not in metrics
