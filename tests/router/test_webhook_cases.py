"""Webhook cases as data (tests/data/webhooks/*.json), replayed against the real router.

Each case names the request (path, form or raw body, how it is signed) and what must come
of it: the HTTP status, the error code, and the event a downstream service would see on
the exchange. Adding a case is adding a JSON object.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from aiohttp.test_utils import TestClient
from multidict import MultiDict
from twilio.request_validator import RequestValidator

from omniroute.infra.settings import Settings
from tests.support import (
    AUTH_TOKEN,
    ENVIRON,
    PUBLIC_URL,
    EventTap,
    about,
    inbound_form,
    new_sid,
    signed_post,
    tap,
)

CASES_DIR = Path(__file__).resolve().parents[1] / "data" / "webhooks"
CASES = [
    pytest.param(case, id=f"{path.stem}: {case['label']}")
    for path in sorted(CASES_DIR.glob("*.json"))
    for case in json.loads(path.read_text(encoding="utf-8"))
]
SHARED_KEY = ENVIRON["TEST_TWILIO_SHARED_KEY"]


def _fill(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, replacement in names.items():
            value = value.replace("{" + key + "}", replacement)
        return value
    if isinstance(value, list):
        return [_fill(v, names) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, names) for k, v in value.items()}
    return value


def _request(case: dict[str, Any]) -> tuple[str, bytes, dict[str, str]]:
    """Path, body and headers for a case, signed as the case says."""
    path: str = case["path"]
    headers: dict[str, str] = {}
    signing = case.get("signature", "valid")
    if "raw_body_hex" in case:
        body = bytes.fromhex(case["raw_body_hex"])
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        if signing == "url-only":  # all a sender of an unparseable body could sign
            headers["X-Twilio-Signature"] = RequestValidator(AUTH_TOKEN).compute_signature(
                PUBLIC_URL + path, {}
            )
        return path, body, headers
    if "json_body" in case:
        text = json.dumps(case["json_body"])
        path += "?bodySHA256=" + hashlib.sha256(text.encode()).hexdigest()
        headers["Content-Type"] = "application/json"
        headers["X-Twilio-Signature"] = RequestValidator(AUTH_TOKEN).compute_signature(
            PUBLIC_URL + path, {}
        )
        return path, text.encode(), headers
    form = [tuple(pair) for pair in case.get("form", [])]
    url = case.get("signed_url", PUBLIC_URL + path)
    token, algorithm = AUTH_TOKEN, None
    if signing == "wrong-token":
        token = "not-the-right-token"
    elif signing.startswith("hmac-sha256"):
        key_id = "webhooks_sharedkey_test" if signing == "hmac-sha256" else "nope"
        headers["X-Twilio-Webhooks-Signature-Settings"] = f"key={key_id},algorithm=HMAC_SHA256"
        token, algorithm = SHARED_KEY, "HMAC_SHA256"
    signature = RequestValidator(token).compute_signature(url, MultiDict(form), algorithm)
    if signing == "none":
        signature = None
    elif signing.startswith("raw:"):
        signature = signing.removeprefix("raw:")
    if signature is not None:
        headers["X-Twilio-Signature"] = signature
    for key, value in case.get("tamper", {}).items():
        form = [(k, value if k == key else v) for k, v in form]
    form += [tuple(pair) for pair in case.get("inject", [])]
    headers["Content-Type"] = "application/x-www-form-urlencoded"
    return path, urlencode(form).encode(), headers


def assert_subset(expected: Any, actual: Any, where: str = "event") -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: expected an object, got {actual!r}"
        for key, value in expected.items():
            assert key in actual, f"{where}.{key} missing from {sorted(actual)}"
            assert_subset(value, actual[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), (
            f"{where}: expected {len(expected)} items, got {actual!r}"
        )
        for index, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_subset(e, a, f"{where}[{index}]")
    else:
        assert actual == expected, f"{where}: expected {expected!r}, got {actual!r}"


@pytest.fixture
async def spy(settings: Settings) -> AsyncIterator[EventTap]:
    async with tap(settings.amqp_url.get_secret_value(), "message.*") as events:
        yield events


@pytest.mark.parametrize("case", CASES)
async def test_webhook_case(
    case: dict[str, Any], router: TestClient[Any, Any], spy: EventTap
) -> None:
    names = {"sid": "SM" + uuid.uuid4().hex, "mmsid": "MM" + uuid.uuid4().hex}
    case = _fill(case, names)
    path, body, headers = _request(case)
    response = await router.request(case.get("method", "POST"), path, data=body, headers=headers)
    expect = case["expect"]
    text = await response.text()
    assert response.status == expect["status"], text
    if "body_contains" in expect:
        assert expect["body_contains"] in text
    if response.status == 200:
        assert response.content_type == "text/xml"
    if "error_code" in expect:
        assert json.loads(text)["error"]["code"] == expect["error_code"]
    sids = set(names.values())
    ours = lambda e: (e.get("data") or {}).get("message_sid") in sids
    if "event" in expect:
        event = await spy.next(where=ours)
        for field in ("id", "type", "version", "occurred_at", "account", "correlation_id"):
            assert event.get(field) is not None, f"envelope field {field} missing"
        assert event["data"]["message_sid"] in names.values()
        assert_subset(expect["event"], event)
    else:
        await spy.expect_none(within=0.2, where=ours)


async def test_a_nul_in_a_signed_form_reaches_the_event_as_a_replacement_character(
    router: TestClient[Any, Any], settings: Settings
) -> None:
    """PostgreSQL stores no U+0000 in text: the event carries U+FFFD, so the conversations
    stage stores the message instead of dead-lettering an accepted webhook."""
    sid = new_sid()
    form = inbound_form(sid=sid, body="olá\x00mundo")
    body, headers = signed_post("/twilio/contoso/inbound", form)
    async with tap(settings.amqp_url.get_secret_value(), "message.received") as spy:
        response = await router.post("/twilio/contoso/inbound", data=body, headers=headers)
        assert response.status == 200
        event = await spy.next(where=about(sid=sid))
    assert event["data"]["body"] == "olá\ufffdmundo"
    assert "\x00" not in orjson.dumps(event).decode()
