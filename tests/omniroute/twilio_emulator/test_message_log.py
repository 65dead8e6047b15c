"""Twilio's Messages list, fetch and Media list, read through the official twilio client."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from twilio.base.exceptions import TwilioException
from twilio.rest import Client

from omniroute.twilio_emulator import EmulatorState
from tests.omniroute.twilio_emulator.conftest import (
    BUSINESS,
    CUSTOMER,
    OTHER_SID,
    OTHER_TOKEN,
    SID,
    START,
    TOKEN,
    FakeClock,
    Receiver,
    auth,
    customer_sends,
    get_json,
)

pytestmark = pytest.mark.timeout(30)

OTHER_CUSTOMER = "whatsapp:+5511977776666"
CREDENTIALS = auth(SID, TOKEN)
LIST_KEYS = {
    "end",
    "first_page_uri",
    "next_page_uri",
    "page",
    "page_size",
    "previous_page_uri",
    "start",
    "uri",
}


async def _inbound(
    http: aiohttp.ClientSession,
    api_url: str,
    receiver: Receiver,
    customer: str = CUSTOMER,
    **fields: Any,
) -> str:
    """A customer message delivered to the receiver; returns its sid."""
    status, answer = await customer_sends(
        http, api_url, receiver.url("/inbound"), **{"from": customer}, **fields
    )
    assert status == 200, answer
    sid: str = answer["message_sid"]
    return sid


async def _one_a_second(
    http: aiohttp.ClientSession, api_url: str, receiver: Receiver, clock: FakeClock, count: int
) -> list[str]:
    """``count`` customer messages, a second apart; their sids, oldest first."""
    sids = []
    for n in range(count):
        sids.append(await _inbound(http, api_url, receiver, body=f"m{n}"))
        clock.now += timedelta(seconds=1)
    return sids


def _path(api_url: str, uri: str) -> str:
    return api_url.rstrip("/") + uri


async def test_lists_both_directions_newest_first(
    client: Client,
    http: aiohttp.ClientSession,
    api_url: str,
    receiver: Receiver,
    clock: FakeClock,
) -> None:
    first = await _inbound(http, api_url, receiver, body="oi")
    clock.now += timedelta(minutes=1)
    reply = await client.messages.create_async(to=CUSTOMER, from_=BUSINESS, body="olá!")
    clock.now += timedelta(minutes=1)
    second = await _inbound(http, api_url, receiver, body="tudo bem?")
    same_second = await _inbound(http, api_url, receiver, body="e aí?")  # a tie: log order

    listed = await client.messages.list_async()

    assert [m.sid for m in listed] == [same_second, second, reply.sid, first]
    by_sid = {m.sid: m for m in listed}
    assert (by_sid[first].direction, by_sid[first].status) == ("inbound", "received")
    assert (by_sid[first].from_, by_sid[first].to, by_sid[first].body) == (
        CUSTOMER,
        BUSINESS,
        "oi",
    )
    assert by_sid[first].date_sent == START
    assert by_sid[reply.sid].direction == "outbound-api"
    assert by_sid[first].subresource_uris["media"].endswith(f"/Messages/{first}/Media.json")
    fetched = await client.messages(reply.sid).fetch_async()
    assert (fetched.sid, fetched.direction) == (reply.sid, "outbound-api")


async def test_a_message_whose_webhook_failed_is_still_listed(
    client: Client, http: aiohttp.ClientSession, api_url: str, closed_port: int
) -> None:
    status, answer = await customer_sends(http, api_url, f"http://127.0.0.1:{closed_port}/in")
    assert status == 502

    [listed] = await client.messages.list_async()
    assert (listed.sid, listed.direction, listed.status) == (
        answer["message_sid"],
        "inbound",
        "received",
    )
    fetched = await client.messages(answer["message_sid"]).fetch_async()
    assert fetched.body == "Olá"


async def test_pages_of_two_over_five_messages(
    client: Client,
    http: aiohttp.ClientSession,
    api_url: str,
    receiver: Receiver,
    clock: FakeClock,
) -> None:
    newest_first = (await _one_a_second(http, api_url, receiver, clock, 5))[::-1]

    assert [m.sid for m in await client.messages.list_async(page_size=2)] == newest_first
    streamed = [m.sid async for m in await client.messages.stream_async(page_size=2, limit=3)]
    assert streamed == newest_first[:3]

    pages = []
    first_path = f"/2010-04-01/Accounts/{SID}/Messages.json?PageSize=2"
    status, _ = await get_json(http, _path(api_url, first_path), headers=auth(SID, "wrong"))
    assert status == 401
    path: str | None = first_path
    while path is not None:
        status, page = await get_json(http, _path(api_url, path), headers=CREDENTIALS)
        assert status == 200 and set(page) == LIST_KEYS | {"messages"}
        pages.append(page)
        path = page["next_page_uri"]

    assert [[m["sid"] for m in p["messages"]] for p in pages] == [
        newest_first[0:2],
        newest_first[2:4],
        newest_first[4:],
    ]
    assert [(p["page"], p["page_size"], p["start"], p["end"]) for p in pages] == [
        (0, 2, 0, 1),
        (1, 2, 2, 3),
        (2, 2, 4, 4),
    ]
    first, second, last = pages
    assert first["previous_page_uri"] is None and last["next_page_uri"] is None
    assert first["first_page_uri"] == f"/2010-04-01/Accounts/{SID}/Messages.json?PageSize=2&Page=0"
    assert second["uri"] == first["next_page_uri"]
    assert parse_qs(urlsplit(first["next_page_uri"]).query) == {
        "PageSize": ["2"],
        "Page": ["1"],
        "PageToken": ["PA" + newest_first[1]],
    }
    status, back = await get_json(
        http, _path(api_url, second["previous_page_uri"]), headers=CREDENTIALS
    )
    assert [m["sid"] for m in back["messages"]] == newest_first[0:2]


async def test_a_page_token_is_a_cursor_new_messages_do_not_shift_pages(
    client: Client,
    http: aiohttp.ClientSession,
    api_url: str,
    receiver: Receiver,
    clock: FakeClock,
) -> None:
    sids = await _one_a_second(http, api_url, receiver, clock, 3)

    page = await client.messages.page_async(page_size=2)
    assert [m.sid for m in page] == [sids[2], sids[1]]
    newer = await _inbound(http, api_url, receiver, body="arrived meanwhile")
    following = await page.next_page_async()

    assert following is not None
    assert [m.sid for m in following] == [sids[0]]
    assert await following.next_page_async() is None
    assert (await client.messages.list_async(limit=1))[0].sid == newer


async def test_filters_to_and_from(
    client: Client, http: aiohttp.ClientSession, api_url: str, receiver: Receiver
) -> None:
    from_customer = await _inbound(http, api_url, receiver)
    from_other = await _inbound(http, api_url, receiver, customer=OTHER_CUSTOMER)
    to_customer = await client.messages.create_async(to=CUSTOMER, from_=BUSINESS, body="a")
    to_other = await client.messages.create_async(to=OTHER_CUSTOMER, from_=BUSINESS, body="b")

    assert [m.sid for m in await client.messages.list_async(to=CUSTOMER)] == [to_customer.sid]
    assert [m.sid for m in await client.messages.list_async(from_=OTHER_CUSTOMER)] == [from_other]
    assert {m.sid for m in await client.messages.list_async(to=BUSINESS)} == {
        from_customer,
        from_other,
    }
    assert {m.sid for m in await client.messages.list_async(from_=BUSINESS)} == {
        to_customer.sid,
        to_other.sid,
    }
    assert await client.messages.list_async(to=CUSTOMER, from_=CUSTOMER) == []
    # A filtered page keeps its filters in the URIs a client follows.
    page = await client.messages.page_async(to=BUSINESS, page_size=1)
    assert page.next_page_url is not None and "To=whatsapp%3A%2B5511999990000" in (
        page.next_page_url
    )
    following = await page.next_page_async()
    assert following is not None and [m.sid for m in following] == [from_customer]


async def test_date_sent_filters(
    client: Client,
    http: aiohttp.ClientSession,
    api_url: str,
    receiver: Receiver,
    clock: FakeClock,
) -> None:
    clock.now = datetime(2025, 1, 5, 23, 59, 59, tzinfo=UTC)
    day_before = await _inbound(http, api_url, receiver)
    clock.now = datetime(2025, 1, 6, 0, 0, 0, tzinfo=UTC)
    midnight = await _inbound(http, api_url, receiver)
    clock.now = datetime(2025, 1, 6, 10, 0, 0, 500_000, tzinfo=UTC)
    ten = await _inbound(http, api_url, receiver)
    clock.now = datetime(2025, 1, 7, 8, 0, 0, tzinfo=UTC)
    next_day = await _inbound(http, api_url, receiver)

    async def listed(**filters: Any) -> list[str]:
        return [m.sid for m in await client.messages.list_async(**filters)]

    # DateSent: that UTC day (a datetime's time is ignored).
    assert await listed(date_sent=datetime(2025, 1, 6, 15, 0, tzinfo=UTC)) == [ten, midnight]
    assert await listed(date_sent="2025-01-06") == [ten, midnight]
    # A date is a whole day, inclusive: on or before its end, on or after its start.
    assert await listed(date_sent_before="2025-01-06") == [ten, midnight, day_before]
    assert await listed(date_sent_after="2025-01-06") == [next_day, ten, midnight]
    # A datetime (twilio-python sends YYYY-MM-DDTHH:MM:SSZ) is that instant, inclusive, to
    # the second Twilio shows.
    at_ten = datetime(2025, 1, 6, 10, 0, 0, tzinfo=UTC)
    assert await listed(date_sent_before=at_ten) == [ten, midnight, day_before]
    assert await listed(date_sent_after=at_ten) == [next_day, ten]
    assert await listed(date_sent_after=at_ten + timedelta(seconds=1)) == [next_day]
    assert await listed(
        date_sent_after=datetime(2025, 1, 6, tzinfo=UTC),
        date_sent_before=datetime(2025, 1, 6, 23, 59, 59, tzinfo=UTC),
    ) == [ten, midnight]

    # twilio-python turns a page that is not 200 into a TwilioException with the response.
    with pytest.raises(TwilioException) as caught:
        await client.messages.list_async(date_sent_after="yesterday")
    response = caught.value.args[1]
    assert response.status_code == 400 and json.loads(response.text)["code"] == 20001


async def test_an_outbound_message_not_sent_is_dated_by_its_creation(
    client: Client, state: EmulatorState, clock: FakeClock
) -> None:
    # No customer message first: outside the window, it fails without ever being sent.
    message = await client.messages.create_async(to=CUSTOMER, from_=BUSINESS, body="oi?")
    clock.now += timedelta(days=1)

    [listed] = await client.messages.list_async(date_sent=START)
    assert listed.sid == message.sid and listed.date_sent is None
    assert await client.messages.list_async(date_sent=clock.now) == []
    assert state.messages[message.sid].date_sent() is None


async def test_page_size_is_capped_and_accounts_are_separate(
    client: Client, http: aiohttp.ClientSession, api_url: str, receiver: Receiver
) -> None:
    await _inbound(http, api_url, receiver)
    url = f"{api_url}2010-04-01/Accounts/{SID}/Messages.json"

    status, page = await get_json(http, url, params={"PageSize": "5000"}, headers=CREDENTIALS)
    assert status == 200 and page["page_size"] == 1000 and len(page["messages"]) == 1
    status, page = await get_json(http, url, params={"PageSize": "many"}, headers=CREDENTIALS)
    assert page["page_size"] == 50
    other = f"{api_url}2010-04-01/Accounts/{OTHER_SID}/Messages.json"
    status, _ = await get_json(http, other, headers=CREDENTIALS)
    assert status == 404
    status, page = await get_json(http, other, headers=auth(OTHER_SID, OTHER_TOKEN))
    assert status == 200 and page["messages"] == []


async def test_media_list_of_a_customer_message(
    client: Client, http: aiohttp.ClientSession, api_url: str, receiver: Receiver
) -> None:
    image, pdf = b"\xff\xd8\xff\xe0 fake jpeg", b"%PDF-1.4"
    media = [
        {"content_type": "image/jpeg", "data_base64": base64.b64encode(image).decode()},
        {"content_type": "application/pdf", "data_base64": base64.b64encode(pdf).decode()},
    ]
    sid = await _inbound(http, api_url, receiver, media=media, body="")

    [message] = await client.messages.list_async()
    assert (message.sid, message.num_media) == (sid, "2")
    listed = await client.messages(sid).media.list_async()
    assert [(m.content_type, m.parent_sid, m.account_sid) for m in listed] == [
        ("image/jpeg", sid, SID),
        ("application/pdf", sid, SID),
    ]
    assert all(m.date_created == START for m in listed)

    status, page = await get_json(
        http, _path(api_url, message.subresource_uris["media"]), headers=CREDENTIALS
    )
    assert status == 200 and set(page) == LIST_KEYS | {"media_list"}
    assert page["next_page_uri"] is None
    first = page["media_list"][0]
    assert first["uri"] == f"/2010-04-01/Accounts/{SID}/Messages/{sid}/Media/{first['sid']}.json"
    status, resource = await get_json(http, _path(api_url, first["uri"]), headers=CREDENTIALS)
    assert status == 200 and resource == first
    async with http.get(
        _path(api_url, first["uri"].removesuffix(".json")), headers=CREDENTIALS
    ) as response:
        assert await response.read() == image

    reply = await client.messages.create_async(to=CUSTOMER, from_=BUSINESS, body="obrigado")
    assert await client.messages(reply.sid).media.list_async() == []
