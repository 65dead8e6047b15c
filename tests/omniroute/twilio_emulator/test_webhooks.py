"""Webhook delivery follows Twilio's rules: sent once, retried only as the URL's overrides say.

Real local servers stand in for the router: one answering as scripted (503, then 200), a
closed port (connection refused) and a stalling one (read timeout).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from omniroute.twilio_emulator import EmulatorState
from tests.omniroute.twilio_emulator.conftest import (
    BUSINESS,
    CUSTOMER,
    TOKEN,
    WAIT,
    Receiver,
    customer_sends,
    get_json,
)
from tests.support import wait_for

pytestmark = pytest.mark.timeout(60)


async def _failures(
    http: aiohttp.ClientSession, api_url: str, **filters: str
) -> list[dict[str, Any]]:
    status, records = await get_json(http, f"{api_url}_emulator/webhook-failures", params=filters)
    assert status == 200, records
    result: list[dict[str, Any]] = records
    return result


# --- inbound webhooks ----------------------------------------------------------------------


async def test_a_5xx_answer_is_final_by_default(
    http: aiohttp.ClientSession, api_url: str, receiver: Receiver
) -> None:
    receiver.answers = [503, 200]
    url = receiver.url("/twilio/inbound")

    status, answer = await customer_sends(http, api_url, url)

    assert status == 200
    assert (answer["status"], answer["statuses"], answer["attempts"]) == (503, [503], [1])
    assert len(receiver.seen) == 1
    [record] = await _failures(http, api_url)
    assert record == {
        "error_code": 11200,
        "url": url,
        "kind": "inbound",
        "message_sid": answer["message_sid"],
        "attempt": 1,
        "final": True,
        "http_status": 503,
        "error": None,
        "at": record["at"],
    }


async def test_a_refused_connection_is_retried_once(
    http: aiohttp.ClientSession, api_url: str, closed_port: int
) -> None:
    url = f"http://127.0.0.1:{closed_port}/twilio/inbound"

    status, answer = await customer_sends(http, api_url, url)

    # Same answer as before the retry rules: 502 with the error, the form, no statuses.
    assert status == 502
    assert (answer["error"], answer["statuses"], answer["attempts"]) == (
        "ClientConnectorError",
        [],
        [2],
    )
    assert answer["form"]["MessageSid"] == answer["message_sid"]
    records = await _failures(http, api_url, message_sid=answer["message_sid"])
    assert [(r["attempt"], r["final"], r["error"], r["http_status"]) for r in records] == [
        (1, False, "ClientConnectorError", None),
        (2, True, "ClientConnectorError", None),
    ]
    assert {r["url"] for r in records} == {url}


@pytest.mark.parametrize(
    ("answers", "fragment", "attempts", "statuses"),
    [
        ([503] * 6, "#rc=3&rp=5xx", 4, [503]),
        ([503, 200], "#rc=3&rp=5xx", 2, [200]),
        ([404, 200], "#rp=5xx", 1, [404]),
        ([404, 500, 200], "#rc=5&rp=4xx,5xx", 3, [200]),
        ([429, 200], "#rp=all", 2, [200]),
    ],
)
async def test_the_retry_policy_of_the_fragment_is_followed(
    http: aiohttp.ClientSession,
    api_url: str,
    receiver: Receiver,
    answers: list[int],
    fragment: str,
    attempts: int,
    statuses: list[int],
) -> None:
    receiver.answers = list(answers)

    status, answer = await customer_sends(http, api_url, receiver.url("/in") + fragment)

    assert status == 200
    assert (answer["statuses"], answer["attempts"]) == (statuses, [attempts])
    assert len(receiver.seen) == attempts
    records = await _failures(http, api_url)
    delivered = statuses[0] // 100 == 2
    assert len(records) == attempts - delivered
    assert [r["final"] for r in records] == [False] * (attempts - 1) + [True] * (not delivered)


async def test_retries_repeat_the_request_exactly_and_never_send_the_fragment(
    http: aiohttp.ClientSession, api_url: str, receiver: Receiver
) -> None:
    receiver.answers = [500, 502]
    target = receiver.url("/twilio/contoso/inbound?tenant=br")
    fragment = "#ct=1000&rc=2&rp=5xx&e=ashburn&sni=y"

    _, answer = await customer_sends(http, api_url, target + fragment)

    assert answer["statuses"] == [200]
    first, *retries = receiver.seen
    assert len(retries) == 2
    for request in receiver.seen:
        assert "#" not in request.raw_path and request.url == target
        assert request.raw_path.endswith("/twilio/contoso/inbound?tenant=br")
        assert request.signature_valid
        assert request.form == first.form == answer["form"]
        signature = request.headers["X-Twilio-Signature"]
        assert RequestValidator(TOKEN).validate(target, request.form, signature)
        assert not RequestValidator(TOKEN).validate(target + fragment, request.form, signature)
    assert len({r.headers["I-Twilio-Idempotency-Token"] for r in receiver.seen}) == 1
    assert len({r.headers["X-Twilio-Signature"] for r in receiver.seen}) == 1
    assert {r["url"] for r in await _failures(http, api_url)} == {target}


async def test_a_read_timeout_is_final_by_default_and_retried_with_rp_rt(
    http: aiohttp.ClientSession, api_url: str, receiver: Receiver
) -> None:
    receiver.stall = WAIT
    url = receiver.url("/slow")

    status, answer = await customer_sends(http, api_url, url + "#rt=200")
    assert (status, answer["error"], answer["attempts"]) == (502, "TimeoutError", [1])

    status, answer = await customer_sends(http, api_url, url + "#rt=200&rc=2&rp=rt")
    assert (status, answer["error"], answer["attempts"]) == (502, "TimeoutError", [3])
    assert len(receiver.seen) == 4
    records = await _failures(http, api_url, message_sid=answer["message_sid"])
    assert [(r["attempt"], r["final"], r["error"]) for r in records] == [
        (1, False, "TimeoutError"),
        (2, False, "TimeoutError"),
        (3, True, "TimeoutError"),
    ]


async def test_the_total_time_bounds_every_attempt_together(
    http: aiohttp.ClientSession, api_url: str, receiver: Receiver
) -> None:
    receiver.stall = WAIT
    loop = asyncio.get_running_loop()
    started = loop.time()

    status, answer = await customer_sends(
        http, api_url, receiver.url("/slow") + "#rt=300&tt=700&rc=5&rp=rt"
    )

    elapsed = loop.time() - started
    assert status == 502 and answer["error"] == "TimeoutError"
    assert 0.6 <= elapsed < 1.5, elapsed  # 5 retries of 300 ms would need 1.8 s
    assert answer["attempts"] == [3] == [len(receiver.seen)]
    records = await _failures(http, api_url)
    assert [r["final"] for r in records] == [False, False, True]


async def test_repeat_sends_independent_deliveries_of_the_same_webhook(
    http: aiohttp.ClientSession, api_url: str, receiver: Receiver
) -> None:
    receiver.answers = [503, 503]

    status, answer = await customer_sends(http, api_url, receiver.url("/in"), repeat=3)

    assert status == 200
    assert (answer["statuses"], answer["attempts"]) == ([503, 503, 200], [1, 1, 1])
    assert len({r.headers["I-Twilio-Idempotency-Token"] for r in receiver.seen}) == 1
    assert [r["final"] for r in await _failures(http, api_url)] == [True, True]


# --- status callbacks ------------------------------------------------------------------------


async def _window_open(http: aiohttp.ClientSession, api_url: str, receiver: Receiver) -> None:
    """A customer writes first, so free-form messages are sent (sent, delivered, read)."""
    status, _ = await customer_sends(http, api_url, receiver.url("/inbound"))
    assert status == 200
    await receiver.next()


async def test_a_status_callback_answered_5xx_is_not_retried(
    client: Client,
    http: aiohttp.ClientSession,
    api_url: str,
    receiver: Receiver,
    state: EmulatorState,
) -> None:
    await _window_open(http, api_url, receiver)
    receiver.answers = [503, 503, 503]

    message = await client.messages.create_async(
        to=CUSTOMER, from_=BUSINESS, body="Oi", status_callback=receiver.url("/status")
    )

    async def all_three_failed() -> bool:
        return len(await _failures(http, api_url, kind="status")) == 3

    await wait_for(all_three_failed, WAIT, 0.01)
    callbacks = receiver.seen[1:]
    assert [c.form["MessageStatus"] for c in callbacks] == ["sent", "delivered", "read"]
    records = await _failures(http, api_url, kind="status", message_sid=message.sid)
    assert [(r["attempt"], r["final"], r["http_status"]) for r in records] == [(1, True, 503)] * 3
    assert await _failures(http, api_url, kind="inbound") == []
    assert state.messages[message.sid].status == "read"  # Twilio's side moved on regardless


async def test_a_status_callback_fragment_asks_for_5xx_retries(
    client: Client, http: aiohttp.ClientSession, api_url: str, receiver: Receiver
) -> None:
    await _window_open(http, api_url, receiver)
    receiver.answers = [503, 500]
    callback = receiver.url("/status")

    await client.messages.create_async(
        to=CUSTOMER, from_=BUSINESS, body="Oi", status_callback=callback + "#rc=2&rp=5xx"
    )
    captured = [await receiver.next() for _ in range(5)]

    assert [c.form["MessageStatus"] for c in captured] == [
        "sent",
        "sent",
        "sent",
        "delivered",
        "read",
    ]
    assert all(c.url == callback and c.signature_valid for c in captured)
    tokens = [c.headers["I-Twilio-Idempotency-Token"] for c in captured]
    assert tokens[0] == tokens[1] == tokens[2] != tokens[3] != tokens[4]
    records = await _failures(http, api_url, kind="status")
    assert [(r["attempt"], r["final"]) for r in records] == [(1, False), (2, False)]


async def test_an_unreachable_status_callback_is_tried_twice_per_status(
    client: Client, http: aiohttp.ClientSession, api_url: str, receiver: Receiver, closed_port: int
) -> None:
    await _window_open(http, api_url, receiver)
    callback = f"http://127.0.0.1:{closed_port}/status"

    message = await client.messages.create_async(
        to=CUSTOMER, from_=BUSINESS, body="Oi", status_callback=callback
    )

    async def six_failures() -> bool:
        return len(await _failures(http, api_url, message_sid=message.sid)) == 6

    await wait_for(six_failures, WAIT, 0.01)  # two attempts for each of three callbacks
    records = await _failures(http, api_url, message_sid=message.sid)
    assert [(r["attempt"], r["final"]) for r in records] == [(1, False), (2, True)] * 3
    assert {(r["kind"], r["url"], r["error"]) for r in records} == {
        ("status", callback, "ClientConnectorError")
    }


# --- the control API -------------------------------------------------------------------------


async def test_summary_filters_and_reset(
    http: aiohttp.ClientSession, api_url: str, receiver: Receiver, closed_port: int
) -> None:
    receiver.answers = [500]
    _, failed = await customer_sends(http, api_url, receiver.url("/in"))
    _, delivered = await customer_sends(http, api_url, receiver.url("/in"))
    await customer_sends(http, api_url, f"http://127.0.0.1:{closed_port}/in")

    status, summary = await get_json(http, f"{api_url}_emulator/webhooks")
    assert status == 200
    assert summary == {
        "delivered": {"inbound": 1, "status": 0},
        "failed_attempts": {"inbound": 3, "status": 0},
        "given_up": {"inbound": 2, "status": 0},
    }
    assert len(await _failures(http, api_url, kind="inbound")) == 3
    assert await _failures(http, api_url, kind="status") == []
    assert len(await _failures(http, api_url, message_sid=failed["message_sid"])) == 1
    assert await _failures(http, api_url, message_sid=delivered["message_sid"]) == []
    status, body = await get_json(
        http, f"{api_url}_emulator/webhook-failures", params={"kind": "voice"}
    )
    assert status == 400 and "error" in body

    async with http.post(f"{api_url}_emulator/reset") as response:
        assert response.status == 200
    assert await _failures(http, api_url) == []
    _, summary = await get_json(http, f"{api_url}_emulator/webhooks")
    assert summary["failed_attempts"] == {"inbound": 0, "status": 0}
    _, health = await get_json(http, f"{api_url}_emulator/health")
    assert health == {"status": "ok", "accounts": 2, "messages": 0}
