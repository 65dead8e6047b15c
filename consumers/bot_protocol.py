"""Rasa's REST channel protocol, as the bot stage speaks it: pure functions over plain data.

Rasa's ``RestInput`` channel (``rest:`` in credentials.yml) takes ``POST
/webhooks/rest/webhook`` with ``{"sender": "<id>", "message": "<text>", "metadata": {...}}``
and answers a JSON list of bot messages such as ``[{"text": "Hey"}, {"image":
"http://…"}]``, each addressed by ``recipient_id``, with ``buttons`` (``[{"title",
"payload"}]``) and ``custom`` (any JSON object) alongside; a button's ``payload`` is what the
client sends back as the next ``message``
(https://rasa.com/docs/reference/channels/your-own-website/ "RestInput",
https://rasa.com/docs/reference/api/pro/http-api/channel-webhooks/post-user-message-from-a-rest-channel).

What omniroute adds on top, in ``custom``: ``{"handoff": true, "variables": {...},
"skills": {...}, "priority": n, "queue": "name"}`` hands the conversation to agents;
``{"resolved": true}`` ends it at the bot (``resolved_of``).
WhatsApp free text has no buttons, so buttons become numbered choices after the text, and
a customer's reply naming a number goes to the bot as that button's payload.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

# What a customer's reply to numbered choices may look like: "2", " 2. ", "2)".
CHOICE = re.compile(r"^\s*(?P<n>\d{1,2})\s*[.)]?\s*$")
MAX_ANSWER_MESSAGES = 50  # more bot messages than this in one answer is not a chat reply


class Button(BaseModel):
    model_config = ConfigDict(extra="allow")

    title: str
    payload: str


class BotMessage(BaseModel):
    """One message of the bot's answer; unknown fields (``attachment``, …) are kept."""

    model_config = ConfigDict(extra="allow")

    recipient_id: str | None = None
    text: str | None = None
    image: str | None = None
    buttons: list[Button] = Field(default_factory=list)
    custom: dict[str, Any] | None = None


class HandoffRequest(BaseModel):
    """``custom`` asking for agents, with what the bot collected (others are ignored)."""

    model_config = ConfigDict(extra="allow")

    handoff: bool = False
    variables: dict[str, Any] = Field(default_factory=dict)
    skills: dict[str, int] = Field(default_factory=dict)
    priority: int | None = None
    queue: str | None = None


_ANSWER: TypeAdapter[list[BotMessage]] = TypeAdapter(list[BotMessage])


class InvalidAnswer(ValueError):
    """The bot answered 200 with something that is not a list of bot messages."""


def parse_answer(body: bytes) -> list[BotMessage]:
    """The bot's answer; raises InvalidAnswer saying what is wrong (never echoing secrets:
    only the answer's own text, shortened)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidAnswer("not JSON") from None
    if not isinstance(value, list):
        raise InvalidAnswer(f"expected a list of messages, got {type(value).__name__}")
    if len(value) > MAX_ANSWER_MESSAGES:
        raise InvalidAnswer(f"{len(value)} messages (at most {MAX_ANSWER_MESSAGES})")
    try:
        return _ANSWER.validate_python(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidAnswer(f"{where}: {first['msg']}"[:200]) from None


def handoff_of(messages: Iterable[BotMessage]) -> HandoffRequest | None:
    """The first ``custom`` with ``handoff: true``, or None. A malformed hand-off (skills
    that are not numbers, …) still hands off, without the parts that do not validate."""
    for message in messages:
        custom = message.custom or {}
        if custom.get("handoff") is not True:
            continue
        try:
            return HandoffRequest.model_validate(custom)
        except ValidationError:
            variables = custom.get("variables")
            return HandoffRequest(
                handoff=True, variables=variables if isinstance(variables, dict) else {}
            )
    return None


def resolved_of(messages: Iterable[BotMessage]) -> bool:
    """Whether a ``custom`` of the answer says the bot resolved the conversation:
    ``{"resolved": true}`` (exactly ``true``, as ``handoff``).

    One key, no aliases. Rasa defines no "end of conversation" message: ``custom`` is
    whatever the bot's action sends with ``dispatcher.utter_message(json_message=...)``
    (https://rasa.com/docs/reference/channels/your-own-website/), so the key is ours to name.
    Other stacks name the same signal differently — Bot Framework's ``endOfConversation``
    activity, which "means the channel or bot has ended the conversation"
    (https://learn.microsoft.com/en-us/bot-framework/rest-api/bot-framework-rest-direct-line-3-0-end-conversation),
    Dialogflow ES's ``endInteraction`` parameter
    (https://docs.cloud.google.com/agent-assist/docs/handoff-es), Rocket.Chat's Rasa app's
    ``close-chat`` action (a call back to the chat server, not a message field) — none of
    them a key a Rasa bot already sends, so an alias would be one more name to document
    without sparing anyone a change."""
    return any((message.custom or {}).get("resolved") is True for message in messages)


def with_choices(text: str | None, buttons: Sequence[Button]) -> str:
    """The text with its buttons as numbered choices: ``"Did it help?\\n1. Yes\\n2. No"``."""
    lines = [text] if text else []
    lines += [f"{n}. {button.title}" for n, button in enumerate(buttons, start=1)]
    return "\n".join(lines)


def chosen_payload(reply: str, buttons: Sequence[dict[str, Any]]) -> str | None:
    """The payload of the button a reply names (by its number, or its title in any case),
    None when it names none."""
    match = CHOICE.match(reply)
    if match is not None:
        index = int(match["n"]) - 1
        if 0 <= index < len(buttons):
            return str(buttons[index]["payload"])
        return None
    wanted = reply.strip().casefold()
    for button in buttons:
        if str(button.get("title", "")).strip().casefold() == wanted:
            return str(button["payload"])
    return None


def asks_for_person(text: str, keywords: Sequence[str]) -> str | None:
    """The hand-off keyword the customer wrote (a whole word, any case), or None."""
    for keyword in keywords:
        if re.search(rf"(?<!\w){re.escape(keyword)}(?!\w)", text, re.IGNORECASE):
            return keyword
    return None


@dataclass(frozen=True)
class Outgoing:
    """One message for the customer made of a bot message: its text (buttons as choices)
    and media."""

    body: str
    media_urls: list[str] = field(default_factory=list)
    buttons: list[dict[str, str]] = field(default_factory=list)


def outgoing(messages: Iterable[BotMessage]) -> list[Outgoing]:
    """What the customer gets: a text (with its choices), an image (with the text of the
    same bot message as its caption); ``custom`` alone sends nothing."""
    out: list[Outgoing] = []
    for message in messages:
        body = with_choices(message.text, message.buttons)
        media = [message.image] if message.image else []
        if not body and not media:
            continue
        buttons = [{"title": b.title, "payload": b.payload} for b in message.buttons]
        out.append(Outgoing(body, media, buttons))
    return out
