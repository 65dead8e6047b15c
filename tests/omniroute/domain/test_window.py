"""The 24-hour window gate as plain functions over a fixed clock: window edges, Twilio's
63016, what may be sent inside and outside the window, and template rendering."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from omniroute.domain.window import (
    MAX_MEDIA,
    Rendered,
    Verdict,
    Window,
    gate,
    media_problem,
    placeholders,
    render,
    window,
)
from schemas.config import Template, Workstream

T = datetime(2026, 3, 10, 12, 0, 0, tzinfo=UTC)
SID_PT = "HX" + "1" * 32
SID_EN = "HX" + "2" * 32
SID_ES = "HX" + "3" * 32
SID_NAMED = "HX" + "4" * 32

ORDER_UPDATE: dict[str, Any] = {
    "name": "order_update",
    "default_language": "en",
    "languages": {
        "en": {"content_sid": SID_EN, "text": "Hi {{1}}, your order {{2}} shipped."},
        "pt-BR": {"content_sid": SID_PT, "text": "Olá {{1}}, seu pedido {{2}} saiu."},
    },
}
FOLLOW_UP: dict[str, Any] = {
    "name": "follow_up",
    "default_language": "es",
    "languages": {
        "es": {"content_sid": SID_ES, "text": "Hola {{ name }}, ¿{{name}} sigue ahí?"},
    },
}


def _workstream(
    *, agents: bool = True, templates: list[dict[str, Any]] | None = None
) -> Workstream:
    return Workstream.model_validate(
        {
            "name": "support-pt",
            "language": "pt-BR",
            "fallback_queue": "general",
            "attachments": {"customers": True, "agents": agents},
            "templates": [ORDER_UPDATE, FOLLOW_UP] if templates is None else templates,
        }
    )


def _template(data: dict[str, Any]) -> Template:
    return Template.model_validate(data)


OPEN = window(T, T + timedelta(hours=1))
CLOSED = window(T, T + timedelta(hours=25))


def _gate(
    current: Window,
    *,
    text: str | None = None,
    media_urls: list[str] | None = None,
    template: str | None = None,
    language: str | None = None,
    variables: dict[str, str] | None = None,
    workstream: Workstream | None = None,
) -> Verdict:
    return gate(
        workstream or _workstream(),
        current,
        text=text,
        media_urls=media_urls or [],
        template=template,
        language=language,
        variables=variables or {},
    )


# --- the window ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("after", "is_open"),
    [
        (timedelta(0), True),
        (timedelta(hours=23, minutes=59, seconds=59), True),
        (timedelta(hours=23, minutes=59, seconds=59, microseconds=999_999), True),
        (timedelta(hours=24), False),
        (timedelta(hours=24, seconds=1), False),
        (timedelta(days=3), False),
    ],
)
def test_window_edges(after: timedelta, is_open: bool) -> None:
    current = window(T, T + after)
    assert current.open is is_open
    assert current.closes_at == T + timedelta(hours=24)


def test_closes_at_is_exactly_24_hours_after_the_last_customer_message() -> None:
    last = datetime(2026, 12, 31, 23, 30, 15, 123456, tzinfo=UTC)
    assert window(last, last).closes_at == datetime(2027, 1, 1, 23, 30, 15, 123456, tzinfo=UTC)


def test_63016_after_the_last_customer_message_closes_the_window() -> None:
    said = T + timedelta(hours=2)
    current = window(T, T + timedelta(hours=3), closed_by_twilio_at=said)
    assert current == Window(False, said)
    # Even right after Twilio said so, and long before 24 h.
    assert not window(T, said, closed_by_twilio_at=said).open


def test_a_customer_message_after_63016_reopens_the_window() -> None:
    said = T - timedelta(hours=1)
    current = window(T, T + timedelta(hours=3), closed_by_twilio_at=said)
    assert current == Window(True, T + timedelta(hours=24))
    assert not window(T, T + timedelta(hours=24), closed_by_twilio_at=said).open


# --- the gate: free text and media -------------------------------------------------------


def test_free_text_inside_the_window_is_allowed() -> None:
    verdict = _gate(OPEN, text="Olá, como posso ajudar?")
    assert verdict.allowed and verdict.reason is None and verdict.rendered is None


def test_free_text_outside_the_window_is_refused_with_the_templates() -> None:
    verdict = _gate(CLOSED, text="Ainda está aí?")
    assert not verdict.allowed
    assert verdict.reason == "window_closed"
    assert verdict.templates == ["order_update", "follow_up"]
    assert verdict.message and "template" in verdict.message


def test_media_outside_the_window_is_refused_as_window_closed() -> None:
    verdict = _gate(CLOSED, media_urls=["https://cdn.example.com/a.jpg"])
    assert (verdict.allowed, verdict.reason) == (False, "window_closed")


def test_window_closed_by_twilio_refuses_free_text_inside_24_hours() -> None:
    current = window(T, T + timedelta(hours=1), closed_by_twilio_at=T + timedelta(minutes=30))
    assert _gate(current, text="oi").reason == "window_closed"


@pytest.mark.parametrize("text", ["", "   ", "\n\t", None])
def test_an_empty_message_is_refused(text: str | None) -> None:
    verdict = _gate(OPEN, text=text)
    assert (verdict.allowed, verdict.reason) == (False, "empty_message")


def test_media_inside_the_window_when_agents_may_send_attachments() -> None:
    urls = [
        "https://cdn.example.com/photo.JPG",
        "http://cdn.example.com/doc.pdf?signature=abc",
        "https://cdn.example.com/voice.ogg",
    ]
    assert _gate(OPEN, media_urls=urls).allowed
    assert _gate(OPEN, text="veja", media_urls=urls[:1]).allowed
    assert media_problem(urls) is None


def test_media_refused_when_the_workstream_forbids_agent_attachments() -> None:
    verdict = _gate(
        OPEN,
        text="veja",
        media_urls=["https://cdn.example.com/a.jpg"],
        workstream=_workstream(agents=False),
    )
    assert (verdict.allowed, verdict.reason) == (False, "attachments_not_allowed")
    # Free text is still fine there.
    assert _gate(OPEN, text="oi", workstream=_workstream(agents=False)).allowed


@pytest.mark.parametrize(
    "url",
    [
        "ftp://cdn.example.com/a.jpg",
        "file:///etc/passwd.txt",
        "cdn.example.com/a.jpg",
        "https:///a.jpg",
        "https://cdn.example.com/run.exe",
        "https://cdn.example.com/no-extension",
        "https://cdn.example.com/a.jpg.zip",
        "javascript:alert(1)",
    ],
)
def test_invalid_media_is_refused(url: str) -> None:
    verdict = _gate(OPEN, media_urls=["https://cdn.example.com/ok.png", url])
    assert (verdict.allowed, verdict.reason) == (False, "invalid_media")
    assert verdict.message and url in verdict.message


def test_more_than_ten_attachments_are_refused() -> None:
    urls = [f"https://cdn.example.com/{n}.jpg" for n in range(MAX_MEDIA + 1)]
    assert MAX_MEDIA == 10
    assert _gate(OPEN, media_urls=urls[:MAX_MEDIA]).allowed
    verdict = _gate(OPEN, media_urls=urls)
    assert (verdict.allowed, verdict.reason) == (False, "invalid_media")
    assert verdict.message and "10" in verdict.message


# --- the gate: templates ---------------------------------------------------------------


@pytest.mark.parametrize("current", [OPEN, CLOSED], ids=["inside", "outside"])
def test_a_template_is_always_allowed(current: Window) -> None:
    verdict = _gate(
        current, template="order_update", language="pt-BR", variables={"1": "Ana", "2": "A-17"}
    )
    assert verdict.allowed
    assert verdict.rendered == Rendered(
        "order_update",
        "pt-BR",
        SID_PT,
        "Olá Ana, seu pedido A-17 saiu.",
        {"1": "Ana", "2": "A-17"},
    )


@pytest.mark.parametrize("current", [OPEN, CLOSED], ids=["inside", "outside"])
def test_an_unknown_template_is_refused(current: Window) -> None:
    verdict = _gate(current, template="nope", variables={"1": "x"})
    assert (verdict.allowed, verdict.reason) == (False, "unknown_template")
    assert verdict.templates == ["order_update", "follow_up"]
    assert verdict.message and "nope" in verdict.message


@pytest.mark.parametrize("asked", ["de", "fr-FR", "pt"])
def test_a_language_the_template_does_not_define_is_refused_naming_its_languages(
    asked: str,
) -> None:
    """Asked for by name, a language is not silently swapped for another."""
    verdict = gate(
        _workstream(),
        CLOSED,
        text=None,
        media_urls=[],
        template="order_update",
        language=asked,
        variables={"1": "Ana", "2": "7"},
        language_asked=True,
    )
    assert (verdict.allowed, verdict.reason) == (False, "unknown_template_language")
    assert verdict.languages == ["en", "pt-BR"]
    assert verdict.message and asked in verdict.message and "en, pt-BR" in verdict.message


def test_bad_template_variables_are_refused_as_invalid_variables() -> None:
    verdict = _gate(CLOSED, template="order_update", language="en", variables={"1": "Ana"})
    assert (verdict.allowed, verdict.reason) == (False, "invalid_variables")
    assert verdict.message and "missing 2" in verdict.message


# --- render ----------------------------------------------------------------------------


def test_render_uses_the_conversations_language() -> None:
    rendered = render(_template(ORDER_UPDATE), "pt-BR", {"1": "Ana", "2": "7"})
    assert isinstance(rendered, Rendered)
    assert (rendered.language, rendered.content_sid) == ("pt-BR", SID_PT)
    assert rendered.text == "Olá Ana, seu pedido 7 saiu."


@pytest.mark.parametrize("language", [None, "", "de", "fr-FR"])
def test_render_falls_back_to_the_templates_default_language(language: str | None) -> None:
    rendered = render(_template(ORDER_UPDATE), language, {"1": "Ann", "2": "7"})
    assert isinstance(rendered, Rendered)
    assert (rendered.language, rendered.content_sid) == ("en", SID_EN)
    assert rendered.text == "Hi Ann, your order 7 shipped."


def test_render_base_language_when_the_default_has_another_base() -> None:
    # follow_up has only es; es-MX shares the base and the default anyway.
    rendered = render(_template(FOLLOW_UP), "es-MX", {"name": "Ana"})
    assert isinstance(rendered, Rendered) and rendered.language == "es"


@pytest.mark.parametrize("language", ["pt", "pt-PT"])
def test_render_base_language_pt_picks_pt_br(language: str) -> None:
    rendered = render(_template(ORDER_UPDATE), language, {"1": "Ana", "2": "7"})
    assert isinstance(rendered, Rendered)
    assert (rendered.language, rendered.content_sid) == ("pt-BR", SID_PT)


def test_render_names_missing_and_unknown_variables() -> None:
    problem = render(_template(ORDER_UPDATE), "en", {"2": "7", "3": "x", "name": "y"})
    assert isinstance(problem, str)
    assert "order_update (en)" in problem
    assert "takes variables 1, 2" in problem
    assert "missing 1" in problem
    assert "unknown 3, name" in problem


def test_render_checks_the_number_of_variables() -> None:
    template = _template(ORDER_UPDATE)
    assert isinstance(render(template, "en", {}), str)
    assert isinstance(render(template, "en", {"1": "a"}), str)
    assert isinstance(render(template, "en", {"1": "a", "2": "b", "3": "c"}), str)
    assert isinstance(render(template, "en", {"1": "a", "2": "b"}), Rendered)


def test_a_template_without_placeholders_takes_no_variables() -> None:
    template = _template(
        {
            "name": "hello",
            "default_language": "en",
            "languages": {"en": {"content_sid": SID_EN, "text": "Hello!"}},
        }
    )
    assert render(template, "en", {}) == Rendered("hello", "en", SID_EN, "Hello!", {})
    problem = render(template, "en", {"1": "x"})
    assert isinstance(problem, str) and "takes variables none" in problem and "unknown 1" in problem


def test_render_substitutes_repeated_and_spaced_placeholders() -> None:
    rendered = render(_template(FOLLOW_UP), None, {"name": "Ana"})
    assert isinstance(rendered, Rendered)
    assert rendered.text == "Hola Ana, ¿Ana sigue ahí?"
    assert rendered.variables == {"name": "Ana"}


def test_render_does_not_expand_placeholders_inside_values() -> None:
    rendered = render(_template(ORDER_UPDATE), "en", {"1": "{{2}}", "2": "\\1 $x"})
    assert isinstance(rendered, Rendered)
    assert rendered.text == "Hi {{2}}, your order \\1 $x shipped."


def test_placeholders_in_order_of_first_appearance() -> None:
    assert placeholders("{{2}} {{ 1 }} {{2}} {{name_x}} {{1}}") == ["2", "1", "name_x"]
    assert placeholders("no variables, {single} {{ }} {{a-b}}") == []
