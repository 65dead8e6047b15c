"""The example FAQ bot over real HTTP: Rasa's REST request and answer shapes, both languages,
the order number remembered, hand-offs with what it collected, deduplication by message id,
the bearer token."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from examples.faq_bot import HEALTH_PATH, REST_PATH, create_app
from tests.support import free_port

TOKEN = "faq-bot-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "faq_bot.py"


@pytest.fixture
async def bot() -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(create_app(TOKEN))) as client:
        yield client


class Conversation:
    """One sender talking to the bot, each message with a fresh message id."""

    def __init__(self, client: TestClient[Any, Any], language: str = "pt-BR") -> None:
        self.client = client
        self.sender = str(uuid.uuid4())
        self.language = language

    async def say(self, text: str, message_id: str | None = None) -> list[dict[str, Any]]:
        response = await self.client.post(
            REST_PATH,
            json={
                "sender": self.sender,
                "message": text,
                "metadata": {
                    "message_id": message_id or str(uuid.uuid4()),
                    "customer": "whatsapp:+5511988887777",
                    "language": self.language,
                    "workstream": "support-pt",
                    "variables": {},
                    "media": [],
                },
            },
            headers=AUTH,
        )
        assert response.status == 200, await response.text()
        answer: list[dict[str, Any]] = await response.json()
        assert all(m["recipient_id"] == self.sender for m in answer)
        return answer


def texts(answer: list[dict[str, Any]]) -> list[str]:
    return [m["text"] for m in answer if "text" in m]


def custom(answer: list[dict[str, Any]]) -> dict[str, Any] | None:
    found = [m["custom"] for m in answer if "custom" in m]
    assert len(found) <= 1
    return found[0] if found else None


async def test_greeting_offers_the_topics_as_buttons_in_the_conversation_language(
    bot: TestClient[Any, Any],
) -> None:
    (menu,) = await Conversation(bot).say("Oi!")
    assert "horário" in menu["text"]
    assert [b["payload"] for b in menu["buttons"]] == ["/hours", "/order", "/returns", "/agent"]
    (menu,) = await Conversation(bot, language="en").say("hello")
    assert "opening hours" in menu["text"]
    assert menu["buttons"][3] == {"title": "Talk to an agent", "payload": "/agent"}


async def test_faq_answers_in_portuguese_and_english(bot: TestClient[Any, Any]) -> None:
    pt = Conversation(bot)
    assert "segunda a sexta" in texts(await pt.say("Qual o horário de atendimento?"))[0]
    assert "30 dias" in texts(await pt.say("/returns"))[0]
    # The customer's own words outweigh the workstream's language.
    en = Conversation(bot, language="pt-BR")
    assert "Monday to Friday" in texts(await en.say("What are your opening hours?"))[0]
    assert "30 days" in texts(await en.say("and refunds?"))[0]


async def test_order_status_asks_for_the_number_and_remembers_it(
    bot: TestClient[Any, Any],
) -> None:
    chat = Conversation(bot)
    assert texts(await chat.say("Quero saber do meu pedido")) == ["Qual é o número do seu pedido?"]
    assert "não encontrei" in texts(await chat.say("não sei"))[0].lower()
    (status,) = texts(await chat.say("é o 12345"))
    assert status.startswith("Pedido 12345: ")
    # Asked again, it answers from memory without asking for the number.
    assert texts(await chat.say("/order"))[0].startswith("Pedido 12345: ")
    answer = await chat.say("quero falar com alguém")
    assert texts(answer) == ["Certo, vou transferir você para um atendente."]
    assert custom(answer) == {
        "handoff": True,
        "variables": {
            "topic": "orders",
            "order": "12345",
            "language": "pt",
            "handoff_reason": "customer_asked",
        },
        "skills": {"orders": 3},
        "priority": 3,
    }


@pytest.mark.parametrize("words", ["agent", "Atendente, por favor", "I want a HUMAN", "/agent"])
async def test_asking_for_a_person_hands_off(bot: TestClient[Any, Any], words: str) -> None:
    handoff = custom(await Conversation(bot).say(words))
    assert handoff is not None and handoff["handoff"] is True
    assert handoff["variables"]["topic"] == "general"
    assert "skills" not in handoff and "order" not in handoff["variables"]


async def test_a_word_containing_agent_is_not_a_request_for_one(
    bot: TestClient[Any, Any],
) -> None:
    assert custom(await Conversation(bot, language="en").say("my agenda for returns")) is None


async def test_two_messages_not_understood_hand_off(bot: TestClient[Any, Any]) -> None:
    chat = Conversation(bot)
    first = await chat.say("xyzzy")
    assert custom(first) is None and first[0]["buttons"]
    handoff = custom(await chat.say("plugh"))
    assert handoff is not None
    assert handoff["variables"]["handoff_reason"] == "not_understood"


async def test_the_same_message_id_gets_the_same_answer_not_a_second_turn(
    bot: TestClient[Any, Any],
) -> None:
    chat = Conversation(bot)
    first = await chat.say("xyzzy", message_id="m-1")
    # Asked again with the same id (a retry): the same answer, and still one miss, so an
    # unknown message next does not reach the hand-off threshold twice over.
    assert await chat.say("xyzzy", message_id="m-1") == first
    assert await chat.say("xyzzy", message_id="m-1") == first
    handoff = custom(await chat.say("plugh", message_id="m-2"))
    assert handoff is not None  # the second distinct miss, not the fourth
    # Another sender may use the same message id: its own turn.
    other = Conversation(bot)
    assert custom(await other.say("/agent", message_id="m-1")) is not None


async def test_the_token_is_required_when_configured(bot: TestClient[Any, Any]) -> None:
    body = {"sender": "s", "message": "oi"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = await bot.post(REST_PATH, json=body, headers=headers)
        assert response.status == 401
        error = (await response.json())["error"]
        assert error["code"] == "unauthorized" and TOKEN not in str(error)
    assert (await bot.post(REST_PATH, json=body, headers=AUTH)).status == 200
    # Health needs no token, as Rasa's channel health route.
    health = await bot.get(HEALTH_PATH)
    assert health.status == 200 and await health.json() == {"status": "ok"}


async def test_without_a_token_anyone_may_call() -> None:
    async with TestClient(TestServer(create_app(None))) as client:
        response = await client.post(REST_PATH, json={"sender": "s", "message": "oi"})
        assert response.status == 200


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"sender": "s"}', b'{"sender": 1, "message": "oi"}'],
)
async def test_requests_that_are_not_rasa_messages_are_refused(
    bot: TestClient[Any, Any], body: bytes
) -> None:
    response = await bot.post(REST_PATH, data=body, headers=AUTH)
    assert response.status == 400
    assert (await response.json())["error"]["code"] in {"invalid_json", "invalid_message"}


async def test_the_script_serves_on_the_given_port_with_the_token_from_the_environment() -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "--port",
        str(port),
        "--token-env",
        "FAQ_TEST_TOKEN",
        env={**os.environ, "FAQ_TEST_TOKEN": TOKEN},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(10):
                while True:
                    with contextlib.suppress(aiohttp.ClientConnectionError):
                        async with session.get(url + HEALTH_PATH) as health:
                            if health.status == 200:
                                break
                    await asyncio.sleep(0.05)
            message = {"sender": "s", "message": "agent"}
            async with session.post(url + REST_PATH, json=message) as refused:
                assert refused.status == 401
            async with session.post(url + REST_PATH, json=message, headers=AUTH) as response:
                answer = await response.json()
        assert answer[-1]["custom"]["handoff"] is True
    finally:
        process.terminate()
        await process.wait()


async def test_a_thank_you_resolves_the_conversation(bot: TestClient[Any, Any]) -> None:
    talk = Conversation(bot)
    assert custom(await talk.say("Qual o horário de atendimento?")) is None
    done = await talk.say("Obrigada, tchau!")
    assert custom(done) == {"resolved": True}
    assert "Por nada" in texts(done)[0]
    # Thanks with a question is the question.
    assert custom(await Conversation(bot).say("Obrigado, e o horário?")) is None
