"""The scripted Rasa REST bots answer over real HTTP what each script says."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest

from tests.bot_servers import (
    REST_PATH,
    BotServer,
    bot_server,
    buttons,
    by_message,
    delayed,
    echo,
    failing,
    handoff,
    image,
    malformed,
    not_a_list,
    sequence,
    silent,
    texts,
)


async def post(
    bot: BotServer, message: str, headers: dict[str, str] | None = None, **kw: Any
) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            bot.url,
            json={"sender": "c-1", "message": message, "metadata": {"message_id": "m-1"}},
            headers=headers,
            **kw,
        ) as response,
    ):
        return response.status, await response.read()


async def answer(bot: BotServer, message: str) -> Any:
    status, body = await post(bot, message)
    assert status == 200, body
    return orjson.loads(body)


async def test_echo_records_each_call_with_its_headers() -> None:
    async with bot_server(echo()) as bot:
        assert bot.url.startswith("http://127.0.0.1:") and bot.url.endswith(REST_PATH)
        assert await answer(bot, "hello") == [{"recipient_id": "c-1", "text": "echo: hello"}]
        await answer(bot, "again")
    assert bot.messages == ["hello", "again"]
    assert bot.calls[0].metadata == {"message_id": "m-1"}
    assert bot.calls[0].headers["content-type"] == "application/json"


async def test_token_is_checked_and_refused_calls_are_recorded() -> None:
    async with bot_server(texts("ok"), token="s3cret") as bot:
        assert (await post(bot, "x"))[0] == 401
        assert (await post(bot, "x", headers={"Authorization": "Bearer wrong"}))[0] == 401
        status, _ = await post(bot, "x", headers={"Authorization": "Bearer s3cret"})
        assert status == 200
    assert [c.headers.get("Authorization") for c in bot.calls] == [
        None,
        "Bearer wrong",
        "Bearer s3cret",
    ]


async def test_failing_then_answers() -> None:
    async with bot_server(failing(2, status=502, then=texts("up"))) as bot:
        assert (await post(bot, "a"))[0] == 502
        assert (await post(bot, "a"))[0] == 502
        assert await answer(bot, "a") == [{"recipient_id": "c-1", "text": "up"}]


async def test_delay_outlasts_a_client_timeout_and_does_not_hold_shutdown() -> None:
    async with bot_server(delayed(30)) as bot:
        with pytest.raises(asyncio.TimeoutError):
            await post(bot, "slow", timeout=aiohttp.ClientTimeout(total=0.2))
        await bot.wait_calls(1)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 2


async def test_malformed_and_not_a_list() -> None:
    async with bot_server(malformed()) as bot:
        status, body = await post(bot, "x")
        assert status == 200 and body.startswith(b'[{"recipient_id"')
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(body)
    async with bot_server(not_a_list()) as bot:
        assert await answer(bot, "x") == {"recipient_id": "c-1", "text": "not a list"}


async def test_handoff_buttons_image_and_silence() -> None:
    async with bot_server(
        handoff(variables={"order": "123"}, skills={"orders": 3}, priority=7, queue="vip")
    ) as bot:
        assert await answer(bot, "x") == [
            {"recipient_id": "c-1", "text": "Transferring you to an agent."},
            {
                "recipient_id": "c-1",
                "custom": {
                    "handoff": True,
                    "variables": {"order": "123"},
                    "skills": {"orders": 3},
                    "priority": 7,
                    "queue": "vip",
                },
            },
        ]
    async with bot_server(buttons("Pick", [("Yes", "/affirm"), ("No", "/deny")])) as bot:
        (message,) = await answer(bot, "x")
        assert message["buttons"] == [
            {"title": "Yes", "payload": "/affirm"},
            {"title": "No", "payload": "/deny"},
        ]
    async with bot_server(image("https://example.com/a.png", text="Look")) as bot:
        assert [m.get("image") for m in await answer(bot, "x")] == [
            None,
            "https://example.com/a.png",
        ]
    async with bot_server(silent()) as bot:
        assert await answer(bot, "x") == []


async def test_sequence_and_by_message_choose_the_answer() -> None:
    async with bot_server(sequence(texts("first"), texts("later"))) as bot:
        got = [(await answer(bot, "x"))[0]["text"] for _ in range(3)]
    assert got == ["first", "later", "later"]
    async with bot_server(by_message({"/yes": texts("great")})) as bot:
        assert (await answer(bot, "/yes"))[0]["text"] == "great"
        assert (await answer(bot, "other"))[0]["text"] == "echo: other"


async def test_a_body_that_is_not_a_json_object_is_refused() -> None:
    async with bot_server(echo()) as bot, aiohttp.ClientSession() as session:
        async with session.post(bot.url, data=b"not json") as response:
            assert response.status == 400
        assert bot.calls[0].body is None
