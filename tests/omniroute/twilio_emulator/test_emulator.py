"""The Twilio emulator, driven by the real official twilio async client."""

from __future__ import annotations

import base64
import re
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import pytest
from twilio.base.exceptions import TwilioRestException
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from omniroute.infra.twilio_gateway import close_client, make_client
from omniroute.twilio_emulator import EmulatorState, start_emulator
from tests.omniroute.twilio_emulator.conftest import (
    BUSINESS,
    CUSTOMER,
    OTHER_SID,
    OTHER_TOKEN,
    SID,
    TOKEN,
    USERNAME_CUSTOMER,
    Captured,
    FakeClock,
    Receiver,
    auth,
    customer_sends,
    post_json,
)

pytestmark = pytest.mark.timeout(30)


async def _customer_writes(
    http: aiohttp.ClientSession, api_url: str, receiver: Receiver, **fields: Any
) -> dict[str, Any]:
    status, answer = await customer_sends(
        http, api_url, receiver.url("/twilio/contoso/inbound"), **fields
    )
    assert status == 200, answer
    return answer


async def _statuses(receiver: Receiver, count: int) -> list[Captured]:
    return [await receiver.next() for _ in range(count)]


async def test_create_message_answers_twilio_message_resource(
    client: Client, http: aiohttp.ClientSession, api_url: str
) -> None:
    message = await client.messages.create_async(to=CUSTOMER, from_=BUSINESS, body="Oi!")

    assert re.fullmatch(r"SM[0-9a-f]{32}", message.sid)
    assert message.account_sid == SID
    assert (message.to, message.from_, message.body) == (CUSTOMER, BUSINESS, "Oi!")
    assert message.status == "queued"
    assert message.direction == "outbound-api"
    assert (message.num_media, message.num_segments) == ("0", "1")
    assert message.error_code is None and message.error_message is None
    assert message.price is None
    assert message.api_version == "2010-04-01"
    assert message.uri == f"/2010-04-01/Accounts/{SID}/Messages/{message.sid}.json"
    assert isinstance(message.date_created, datetime)
    assert "media" in message.subresource_uris

    credentials = auth(SID, TOKEN)
    # Listing is a real route now (Twilio's Messages list): it wants credentials too.
    async with http.get(f"{api_url}2010-04-01/Accounts/{SID}/Messages.json") as response:
        assert response.status == 401
        assert (await response.json())["code"] == 20003
    async with http.get(f"{api_url.rstrip('/')}{message.uri}", headers=credentials) as response:
        raw = await response.json()
    assert parsedate_to_datetime(raw["date_created"]).tzinfo is not None
    assert raw["date_created"].endswith("+0000")


async def test_media_urls_and_templates_are_recorded(
    client: Client, http: aiohttp.ClientSession, api_url: str, state: EmulatorState
) -> None:
    state.templates["HX1"] = "Olá {{1}}, seu pedido {{2}} saiu."
    with_media = await client.messages.create_async(
        to=CUSTOMER,
        from_=BUSINESS,
        media_url=["https://example.com/a.jpg", "https://example.com/b.pdf"],
    )
    template = await client.messages.create_async(
        to=CUSTOMER,
        from_=BUSINESS,
        content_sid="HX1",
        content_variables='{"1": "Ana", "2": "42"}',
    )
    unknown = await client.messages.create_async(
        to=CUSTOMER, messaging_service_sid="MG" + "0" * 32, content_sid="HX9"
    )

    assert with_media.num_media == "2"
    assert template.body == "Olá Ana, seu pedido 42 saiu."
    assert unknown.body == "HX9" and unknown.from_ is None
    async with http.get(f"{api_url}_emulator/messages") as response:
        records = await response.json()
    assert records[0]["media_urls"] == ["https://example.com/a.jpg", "https://example.com/b.pdf"]
    assert records[1]["content_sid"] == "HX1"
    assert records[1]["content_variables"] == {"1": "Ana", "2": "42"}


async def test_wrong_token_is_rejected_with_20003(api_url: str) -> None:
    twilio = make_client(SID, "not-the-token", api_url)
    try:
        with pytest.raises(TwilioRestException) as caught:
            await twilio.messages.create_async(to=CUSTOMER, from_=BUSINESS, body="x")
    finally:
        await close_client(twilio)
    assert caught.value.status == 401
    assert caught.value.code == 20003


async def test_unknown_account_path_is_404_20404(client: Client) -> None:
    with pytest.raises(TwilioRestException) as caught:
        await client.api.v2010.accounts("AC" + "f" * 32).messages.create_async(
            to=CUSTOMER, from_=BUSINESS, body="x"
        )
    assert (caught.value.status, caught.value.code) == (404, 20404)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"to": "+5511988887777", "from_": BUSINESS, "body": "x"}, 21211),
        ({"to": "whatsapp:abc", "from_": BUSINESS, "body": "x"}, 21211),
        ({"to": CUSTOMER, "from_": BUSINESS}, 21602),
        ({"to": CUSTOMER, "body": "x"}, 21603),
        (
            {"to": CUSTOMER, "from_": BUSINESS, "content_sid": "HX1", "content_variables": "["},
            21656,
        ),
    ],
)
async def test_invalid_requests_get_twilio_400s(
    client: Client, fields: dict[str, str], code: int
) -> None:
    with pytest.raises(TwilioRestException) as caught:
        await client.messages.create_async(**fields)
    assert (caught.value.status, caught.value.code) == (400, code)


async def test_injected_429_then_success(
    client: Client, http: aiohttp.ClientSession, api_url: str
) -> None:
    fault = {"status": 429, "code": 20429, "message": "Too Many Requests", "count": 1}
    status, _ = await post_json(http, f"{api_url}_emulator/faults", fault)
    assert status == 201

    with pytest.raises(TwilioRestException) as caught:
        await client.messages.create_async(to=CUSTOMER, from_=BUSINESS, body="1")
    assert (caught.value.status, caught.value.code) == (429, 20429)
    assert "Too Many Requests" in caught.value.msg

    message = await client.messages.create_async(to=CUSTOMER, from_=BUSINESS, body="1")
    assert message.status == "queued"
    async with http.get(f"{api_url}_emulator/rejected") as response:
        assert [r["code"] for r in await response.json()] == [20429]


async def test_injected_500_and_to_filter(
    client: Client, http: aiohttp.ClientSession, api_url: str
) -> None:
    other = "whatsapp:+5511977776666"
    fault = {
        "status": 500,
        "code": 20500,
        "message": "Internal Server Error",
        "count": 2,
        "to": other,
    }
    await post_json(http, f"{api_url}_emulator/faults", fault)

    assert (await client.messages.create_async(to=CUSTOMER, from_=BUSINESS, body="a")).sid
    for _ in range(2):
        with pytest.raises(TwilioRestException) as caught:
            await client.messages.create_async(to=other, from_=BUSINESS, body="b")
        assert (caught.value.status, caught.value.code) == (500, 20500)
    assert (await client.messages.create_async(to=other, from_=BUSINESS, body="c")).sid


async def test_status_callbacks_are_signed_and_ordered(
    client: Client, http: aiohttp.ClientSession, api_url: str, receiver: Receiver
) -> None:
    await _customer_writes(http, api_url, receiver)
    await receiver.next()  # the inbound webhook itself
    callback = receiver.url("/twilio/contoso/status")

    message = await client.messages.create_async(
        to=CUSTOMER, from_=BUSINESS, body="Oi", status_callback=callback
    )
    captured = await _statuses(receiver, 3)

    assert [c.form["MessageStatus"] for c in captured] == ["sent", "delivered", "read"]
    for item in captured:
        assert item.url == callback
        signature = item.headers["X-Twilio-Signature"]
        assert RequestValidator(TOKEN).validate(callback, item.form, signature)
        assert not RequestValidator(OTHER_TOKEN).validate(callback, item.form, signature)
        assert item.form["MessageSid"] == item.form["SmsSid"] == message.sid
        assert item.form["SmsStatus"] == item.form["MessageStatus"]
        assert item.form["AccountSid"] == SID
        assert (item.form["From"], item.form["To"]) == (BUSINESS, CUSTOMER)
        assert item.form["ApiVersion"] == "2010-04-01"
        assert item.form["ChannelToAddress"] == "+5511988887777"
        assert item.form["ChannelPrefix"] == "whatsapp"
        assert "ErrorCode" not in item.form

    fetched = await client.messages(message.sid).fetch_async()
    assert fetched.status == "read"
    async with http.get(f"{api_url}_emulator/messages") as response:
        [record] = await response.json()
    assert [h["status"] for h in record["history"]] == ["queued", "sent", "delivered", "read"]


async def test_callback_mode_fault_answers_201_then_fails(
    client: Client, http: aiohttp.ClientSession, api_url: str, receiver: Receiver
) -> None:
    await _customer_writes(http, api_url, receiver)
    await receiver.next()
    fault = {"status": 400, "code": 63016, "mode": "callback", "message": "Outside window"}
    await post_json(http, f"{api_url}_emulator/faults", fault)
    fault = {"code": 21610, "mode": "callback", "callback_status": "undelivered"}
    await post_json(http, f"{api_url}_emulator/faults", fault)
    callback = receiver.url("/status")

    first = await client.messages.create_async(
        to=CUSTOMER, from_=BUSINESS, body="x", status_callback=callback
    )
    assert first.status == "queued"
    failed = await receiver.next()
    second = await client.messages.create_async(
        to=CUSTOMER, from_=BUSINESS, body="y", status_callback=callback
    )
    undelivered = await receiver.next()

    assert (failed.form["MessageSid"], failed.form["MessageStatus"]) == (first.sid, "failed")
    assert failed.form["ErrorCode"] == "63016"
    assert failed.signature_valid
    assert undelivered.form["MessageSid"] == second.sid
    assert (undelivered.form["MessageStatus"], undelivered.form["ErrorCode"]) == (
        "undelivered",
        "21610",
    )
    fetched = await client.messages(first.sid).fetch_async()
    assert (fetched.status, fetched.error_code) == ("failed", 63016)


async def test_free_form_outside_window_fails_with_63016(
    client: Client,
    http: aiohttp.ClientSession,
    api_url: str,
    receiver: Receiver,
    clock: FakeClock,
) -> None:
    callback = receiver.url("/status")

    never_wrote = await client.messages.create_async(
        to=CUSTOMER, from_=BUSINESS, body="hello?", status_callback=callback
    )
    assert never_wrote.status == "queued"
    got = await receiver.next()
    assert (got.form["MessageStatus"], got.form["ErrorCode"]) == ("failed", "63016")

    await _customer_writes(http, api_url, receiver)
    await receiver.next()
    clock.now += timedelta(hours=23, minutes=59)
    await client.messages.create_async(
        to=CUSTOMER, from_=BUSINESS, body="still open", status_callback=callback
    )
    assert [c.form["MessageStatus"] for c in await _statuses(receiver, 3)] == [
        "sent",
        "delivered",
        "read",
    ]

    clock.now += timedelta(hours=1)
    await client.messages.create_async(
        to=CUSTOMER, from_=BUSINESS, body="too late", status_callback=callback
    )
    got = await receiver.next()
    assert (got.form["MessageStatus"], got.form["ErrorCode"]) == ("failed", "63016")

    await client.messages.create_async(
        to=CUSTOMER, from_=BUSINESS, content_sid="HX1", status_callback=callback
    )
    assert [c.form["MessageStatus"] for c in await _statuses(receiver, 3)] == [
        "sent",
        "delivered",
        "read",
    ]


async def test_customer_message_from_phone_sender(
    http: aiohttp.ClientSession, api_url: str, receiver: Receiver
) -> None:
    answer = await _customer_writes(
        http, api_url, receiver, profile_name="Maria", extra={"OriginalRepliedMessageSid": "SMx"}
    )
    got = await receiver.next()

    assert got.signature_valid
    assert answer["status"] == 200 and answer["body"] == "<Response/>"
    sid = answer["message_sid"]
    assert re.fullmatch(r"SM[0-9a-f]{32}", sid)
    assert got.form == answer["form"]
    assert got.form == {
        "SmsMessageSid": sid,
        "NumMedia": "0",
        "ProfileName": "Maria",
        "MessageType": "text",
        "SmsSid": sid,
        "WaId": "5511988887777",
        "SmsStatus": "received",
        "Body": "Olá",
        "To": BUSINESS,
        "NumSegments": "1",
        "ReferralNumMedia": "0",
        "MessageSid": sid,
        "AccountSid": SID,
        "From": CUSTOMER,
        "ApiVersion": "2010-04-01",
        "OriginalRepliedMessageSid": "SMx",
    }
    assert got.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
    assert got.headers["I-Twilio-Idempotency-Token"]


async def test_customer_message_from_username_sender_with_empty_body(
    http: aiohttp.ClientSession, api_url: str, receiver: Receiver
) -> None:
    answer = await _customer_writes(http, api_url, receiver, **{"from": USERNAME_CUSTOMER}, body="")
    got = await receiver.next()

    assert got.signature_valid and answer["status"] == 200
    assert "WaId" not in got.form
    assert got.form["ExternalUserId"] == "US.13491208655302741918"
    assert got.form["From"] == USERNAME_CUSTOMER
    assert got.form["Body"] == ""


async def test_customer_resend_posts_identical_signed_requests(
    http: aiohttp.ClientSession, api_url: str, receiver: Receiver
) -> None:
    sid = "SM" + "a" * 32
    answer = await _customer_writes(http, api_url, receiver, message_sid=sid, repeat=3)
    posts = [await receiver.next() for _ in range(3)]

    assert answer["message_sid"] == sid
    assert answer["status"] == [200, 200, 200]
    assert all(p.form == posts[0].form and p.form["MessageSid"] == sid for p in posts)
    assert len({p.headers["X-Twilio-Signature"] for p in posts}) == 1
    assert len({p.headers["I-Twilio-Idempotency-Token"] for p in posts}) == 1


async def test_customer_with_wrong_router_token_gets_router_403(
    http: aiohttp.ClientSession, api_url: str, receiver: Receiver
) -> None:
    receiver.token = "the router knows another token"
    answer = await _customer_writes(http, api_url, receiver)
    assert not (await receiver.next()).signature_valid
    assert answer["status"] == 403


async def test_customer_media_is_served_with_basicauth(
    http: aiohttp.ClientSession, api_url: str, receiver: Receiver
) -> None:
    image = b"\xff\xd8\xff\xe0 fake jpeg"
    media = [
        {"content_type": "image/jpeg", "data_base64": base64.b64encode(image).decode()},
        {"content_type": "application/pdf", "data_base64": base64.b64encode(b"%PDF").decode()},
    ]
    answer = await _customer_writes(http, api_url, receiver, media=media, body="")
    got = await receiver.next()

    assert got.signature_valid
    assert re.fullmatch(r"MM[0-9a-f]{32}", answer["message_sid"])
    assert (got.form["NumMedia"], got.form["MessageType"]) == ("2", "image")
    assert got.form["MediaContentType0"] == "image/jpeg"
    assert got.form["MediaContentType1"] == "application/pdf"
    media_url = got.form["MediaUrl0"]
    assert media_url.startswith(
        f"{api_url}2010-04-01/Accounts/{SID}/Messages/{answer['message_sid']}/Media/ME"
    )

    async with http.get(media_url) as response:
        assert response.status == 401
        assert (await response.json())["code"] == 20003
    async with http.get(media_url, headers=auth(SID, "wrong")) as response:
        assert response.status == 401
    async with http.get(media_url, headers=auth(OTHER_SID, OTHER_TOKEN)) as response:
        assert response.status == 404
        assert (await response.json())["code"] == 20404
    async with http.get(media_url, headers=auth(SID, TOKEN)) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "image/jpeg"
        assert await response.read() == image
    async with http.get(got.form["MediaUrl1"], headers=auth(SID, TOKEN)) as response:
        assert await response.read() == b"%PDF"


async def test_customer_simulation_rejects_bad_requests(
    http: aiohttp.ClientSession, api_url: str, receiver: Receiver
) -> None:
    url = f"{api_url}_emulator/customers/send"
    base = {"account_sid": SID, "url": receiver.url("/in"), "from": CUSTOMER, "to": BUSINESS}
    assert (await post_json(http, url, {**base, "account_sid": "ACnope"}))[0] == 404
    assert (await post_json(http, url, {**base, "repeat": 0}))[0] == 400
    bad_media = {**base, "media": [{"content_type": "image/png", "data_base64": "!!"}]}
    assert (await post_json(http, url, bad_media))[0] == 400
    assert receiver.requests.empty()


async def test_unreachable_callback_url_is_logged_not_fatal(
    client: Client,
    http: aiohttp.ClientSession,
    api_url: str,
    receiver: Receiver,
    closed_port: int,
) -> None:
    dead_port = closed_port
    await _customer_writes(http, api_url, receiver)
    await receiver.next()

    await client.messages.create_async(
        to=CUSTOMER, from_=BUSINESS, body="a", status_callback=f"http://127.0.0.1:{dead_port}/s"
    )
    await client.messages.create_async(
        to=CUSTOMER, from_=BUSINESS, body="b", status_callback=receiver.url("/status")
    )
    assert [c.form["MessageStatus"] for c in await _statuses(receiver, 3)] == [
        "sent",
        "delivered",
        "read",
    ]
    async with http.get(f"{api_url}_emulator/health") as response:
        assert (await response.json())["status"] == "ok"


async def test_reset_forgets_messages_faults_and_windows(
    client: Client, http: aiohttp.ClientSession, api_url: str, receiver: Receiver
) -> None:
    await _customer_writes(http, api_url, receiver)
    await receiver.next()
    await client.messages.create_async(to=CUSTOMER, from_=BUSINESS, body="before reset")
    await post_json(http, f"{api_url}_emulator/faults", {"status": 503, "code": 20503})

    async with http.post(f"{api_url}_emulator/reset") as response:
        assert response.status == 200
    async with http.get(f"{api_url}_emulator/messages") as response:
        assert await response.json() == []

    message = await client.messages.create_async(
        to=CUSTOMER, from_=BUSINESS, body="window forgotten", status_callback=receiver.url("/s")
    )
    got = await receiver.next()
    assert (got.form["MessageSid"], got.form["ErrorCode"]) == (message.sid, "63016")


async def test_bad_fault_spec_is_400(http: aiohttp.ClientSession, api_url: str) -> None:
    status, body = await post_json(http, f"{api_url}_emulator/faults", {"mode": "sometimes"})
    assert status == 400 and "error" in body


async def test_start_emulator_on_a_free_port() -> None:
    running = await start_emulator(EmulatorState(accounts={SID: TOKEN}))
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{running.url}/_emulator/health") as response,
        ):
            assert (await response.json()) == {"status": "ok", "accounts": 1, "messages": 0}
        twilio = make_client(SID, TOKEN, running.url + "/")
        try:
            assert twilio.api.base_url == running.url
            sent = await twilio.messages.create_async(to=CUSTOMER, from_=BUSINESS, body="hi")
        finally:
            await close_client(twilio)
        assert sent.sid in running.state.messages
    finally:
        await running.close()


async def _media_url_sent_via(
    http: aiohttp.ClientSession, api_url: str, receiver: Receiver, host: str
) -> str:
    """A customer's image, the control call made with ``Host: host``; its MediaUrl0."""
    media = [{"content_type": "image/png", "data_base64": base64.b64encode(b"png").decode()}]
    payload = {
        "account_sid": SID,
        "url": receiver.url("/twilio/contoso/inbound"),
        "from": CUSTOMER,
        "to": BUSINESS,
        "body": "",
        "media": media,
    }
    async with http.post(
        f"{api_url}_emulator/customers/send", json=payload, headers={"Host": host}
    ) as response:
        assert response.status == 200, await response.text()
    return (await receiver.next()).form["MediaUrl0"]


async def test_media_urls_name_the_configured_public_url_not_the_host_header(
    http: aiohttp.ClientSession, api_url: str, receiver: Receiver, state: EmulatorState
) -> None:
    # The router reaches the emulator by another name than the caller did (compose's
    # service name): the media URL must be the one the router's credentials may go to.
    state.public_url = "http://twilio-emulator.internal:8081/"
    url = await _media_url_sent_via(http, api_url, receiver, "attacker.example:4444")
    assert url.startswith(f"http://twilio-emulator.internal:8081/2010-04-01/Accounts/{SID}/")
    path = url.removeprefix("http://twilio-emulator.internal:8081")
    async with http.get(f"{api_url.rstrip('/')}{path}", headers=auth(SID, TOKEN)) as response:
        assert (response.status, await response.read()) == (200, b"png")


async def test_without_a_public_url_media_urls_name_the_listening_address(
    http: aiohttp.ClientSession, api_url: str, receiver: Receiver, state: EmulatorState
) -> None:
    assert state.public_url is None
    url = await _media_url_sent_via(http, api_url, receiver, "attacker.example:4444")
    assert "attacker.example" not in url
    assert url.startswith(f"{api_url}2010-04-01/Accounts/{SID}/Messages/")


async def test_started_emulator_takes_its_public_url_or_its_address() -> None:
    named = await start_emulator(EmulatorState(accounts={SID: TOKEN}, public_url="http://tw:1"))
    bound = await start_emulator(EmulatorState(accounts={SID: TOKEN}))
    try:
        assert named.state.public_url == "http://tw:1"
        assert bound.state.public_url == bound.url
    finally:
        await named.close()
        await bound.close()


async def test_a_rotated_token_signs_the_next_webhook(
    http: aiohttp.ClientSession, api_url: str, receiver: Receiver, state: EmulatorState
) -> None:
    # Twilio signs with the account's primary token: once the secondary is promoted, the
    # next webhook carries the new token's signature.
    state.accounts[SID] = "the promoted secondary token"
    receiver.token = "the promoted secondary token"
    answer = await _customer_writes(http, api_url, receiver)
    assert (await receiver.next()).signature_valid and answer["status"] == 200
