"""The bot protocol's pure parts: answers parsed or refused with a reason, buttons as
numbered text and a customer's choice mapped back to its payload, hand-off keywords as
whole words, hand-offs read from ``custom``; and classification applying the bot's hints."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from consumers.bot_protocol import (
    Button,
    InvalidAnswer,
    asks_for_person,
    chosen_payload,
    handoff_of,
    outgoing,
    parse_answer,
    resolved_of,
    with_choices,
)
from consumers.classify import compile_config, decide
from consumers.conversations import origin
from omniroute.infra.config_loader import parse_config
from schemas.config import DEFAULT_HANDOFF_KEYWORDS
from schemas.events import ConversationOpened
from tests.support import BUSINESS, CONFIG_YAML, ENVIRON


def _answer(value: Any) -> bytes:
    return orjson.dumps(value)


def test_an_answer_is_a_list_of_bot_messages_keeping_unknown_fields() -> None:
    messages = parse_answer(
        _answer(
            [
                {"recipient_id": "c1", "text": "Oi"},
                {"recipient_id": "c1", "image": "https://x.example/a.png", "attachment": 1},
                {"recipient_id": "c1", "buttons": [{"title": "Sim", "payload": "/sim"}]},
            ]
        )
    )
    assert [m.text for m in messages] == ["Oi", None, None]
    assert messages[1].image == "https://x.example/a.png"
    assert messages[1].model_extra == {"attachment": 1}
    assert messages[2].buttons == [Button(title="Sim", payload="/sim")]
    assert parse_answer(b"[]") == []


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"[{", "not JSON"),
        (b'{"text": "hi"}', "expected a list of messages, got dict"),
        (b'"hi"', "expected a list of messages, got str"),
        (_answer([{"text": 3}]), "0.text: Input should be a valid string"),
        (_answer([{"buttons": [{"title": "x"}]}]), "0.buttons.0.payload: Field required"),
        (_answer([{"text": "x"}] * 51), "51 messages (at most 50)"),
    ],
)
def test_an_invalid_answer_says_why(body: bytes, why: str) -> None:
    with pytest.raises(InvalidAnswer) as caught:
        parse_answer(body)
    assert str(caught.value) == why


def test_buttons_become_numbered_choices_after_the_text() -> None:
    buttons = [Button(title="Yes", payload="/yes"), Button(title="No", payload="/no")]
    assert with_choices("Did it help?", buttons) == "Did it help?\n1. Yes\n2. No"
    assert with_choices(None, buttons) == "1. Yes\n2. No"
    assert with_choices("Plain", []) == "Plain"


@pytest.mark.parametrize(
    ("reply", "payload"),
    [
        ("1", "/yes"),
        (" 2. ", "/no"),
        ("2)", "/no"),
        ("no", "/no"),  # the title, any case
        ("3", None),  # no third button
        ("0", None),
        ("1 please", None),  # free text goes to the bot as written
        ("yes and more", None),
    ],
)
def test_a_reply_naming_a_button_maps_to_its_payload(reply: str, payload: str | None) -> None:
    buttons = [{"title": "Yes", "payload": "/yes"}, {"title": "No", "payload": "/no"}]
    assert chosen_payload(reply, buttons) == payload


@pytest.mark.parametrize(
    ("text", "keyword"),
    [
        ("I want a HUMAN now", "human"),
        ("quero falar com um atendente!", "atendente"),
        ("Agent?", "agent"),
        ("agente de viagens", None),  # not the whole word
        ("humanity", None),
        ("personal data", None),
        ("olá", None),
    ],
)
def test_hand_off_keywords_are_whole_words_in_any_case(text: str, keyword: str | None) -> None:
    assert asks_for_person(text, DEFAULT_HANDOFF_KEYWORDS) == keyword


def test_the_first_handoff_in_custom_is_read_and_a_malformed_one_still_hands_off() -> None:
    messages = parse_answer(
        _answer(
            [
                {"text": "ok", "custom": {"handoff": False}},
                {"custom": {"handoff": True, "variables": {"order": 7}, "skills": {"a": 2}}},
            ]
        )
    )
    found = handoff_of(messages)
    assert found is not None and found.variables == {"order": 7} and found.skills == {"a": 2}
    bad = parse_answer(
        _answer([{"custom": {"handoff": True, "variables": {"x": 1}, "skills": "no"}}])
    )
    found = handoff_of(bad)
    assert found is not None and found.variables == {"x": 1} and found.skills == {}
    assert handoff_of(parse_answer(_answer([{"custom": {"handoff": "yes"}}]))) is None


@pytest.mark.parametrize(
    ("custom", "resolved"),
    [
        ({"resolved": True}, True),
        ({"resolved": True, "note": "faq:hours"}, True),
        ({"resolved": "true"}, False),  # exactly true, as handoff
        ({"resolved": 1}, False),
        ({"end": True}, False),  # one documented key, no aliases
        ({"handoff": True}, False),
        (None, False),
    ],
)
def test_an_answer_resolves_with_custom_resolved_true(
    custom: dict[str, Any] | None, resolved: bool
) -> None:
    messages = parse_answer(_answer([{"text": "Até logo!"}, {"custom": custom}]))
    assert resolved_of(messages) is resolved
    # The custom alone sends nothing: the customer gets the text only.
    assert [m.body for m in outgoing(messages)] == ["Até logo!"]


def test_what_the_customer_gets_of_an_answer() -> None:
    messages = parse_answer(
        _answer(
            [
                {"text": "Menu", "image": "https://x.example/m.png"},
                {"custom": {"handoff": True}},
                {"text": "Pick", "buttons": [{"title": "A", "payload": "/a"}]},
            ]
        )
    )
    sent = outgoing(messages)
    assert [(m.body, m.media_urls) for m in sent] == [
        ("Menu", ["https://x.example/m.png"]),
        ("Pick\n1. A", []),
    ]
    assert sent[1].buttons == [{"title": "A", "payload": "/a"}]


def test_an_events_bot_url_is_the_origin_only() -> None:
    assert origin("https://bot.example:8443/hooks/SECRET/webhook?k=v") == "https://bot.example:8443"
    assert origin("http://rasa:5005/webhooks/rest/webhook") == "http://rasa:5005"


# --- classification with the bot's hints ---------------------------------------------------

HINT_YAML = CONFIG_YAML  # support-pt: billing rules (skills billing 5, priority 5) → billing


def _opened(body: str) -> ConversationOpened:
    return ConversationOpened(
        conversation_id="c",
        contact_id="k",
        business_number=BUSINESS,
        customer="+5511988887777",
        workstream="support-pt",
        first_message_id="m",
        first_message_sid="SM1",
        first_message_body=body,
        opened_at=datetime(2026, 3, 2, 15, tzinfo=UTC),
    )


def _decide(body: str, **kw: Any) -> Any:
    config = parse_config(HINT_YAML, "c.yaml", ENVIRON)
    now = datetime(2026, 3, 2, 15, tzinfo=UTC)  # a Monday, 12:00 in São Paulo
    return decide(config, compile_config(config), "contoso", _opened(body), now, **kw)


def test_the_bots_skills_merge_at_the_higher_proficiency_and_its_higher_priority_wins() -> None:
    hint = {"reason": "bot", "skills": {"billing": 2, "vip": 3}, "priority": 9, "queue": None}
    decision = _decide("meu boleto", bot=hint)
    assert decision.result.skills == {"billing": 5, "vip": 3}
    assert decision.result.priority == 9 and decision.queue == "billing"
    assert any("priority 9" in n for n in decision.notes)
    lower = _decide("meu boleto", bot={**hint, "priority": 1})
    assert lower.result.priority == 5


def test_the_bots_queue_replaces_the_route_when_configured() -> None:
    decision = _decide("meu boleto", bot={"reason": "bot", "queue": "general"})
    assert decision.queue == "general" and decision.result.route is None
    unknown = _decide("meu boleto", bot={"reason": "bot", "queue": "nowhere"})
    assert unknown.queue == "billing"
    assert any("'nowhere' is not configured" in n for n in unknown.notes)


def test_rules_see_what_the_bot_collected() -> None:
    # The bot's skills are in the context the route-to-queue rules test.
    decision = _decide("oi", bot={"reason": "bot", "skills": {"billing": 1}})
    assert decision.queue == "billing"
    assert _decide("oi").queue == "general"
