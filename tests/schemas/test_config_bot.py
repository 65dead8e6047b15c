"""A workstream's bot in the configuration: its defaults, its token read from the
environment (never the file, never dumped), and every problem reported with the file, line
and field, as ``omniroute config check`` shows them."""

from __future__ import annotations

import pytest

from omniroute.errors import ConfigError
from omniroute.infra.config_loader import parse_config
from tests.schemas.test_config_model import ENVIRON, SOURCE, VALID, edit, line_of, reported

BOT_TOKEN = "bot-token-7c1e-secret"
WITH_BOT = edit(
    "    fallback_queue: general\n",
    "    fallback_queue: general\n"
    "    bot:\n"
    "      url: http://rasa:5005/webhooks/rest/webhook\n"
    "      token_env: BOT_TOKEN\n"
    "      timeout: 5s\n"
    "      max_turns: 4\n"
    "      handoff_on_error: false\n"
    "      greeting: {pt-BR: Olá}\n",
)
BOT_ENVIRON = {**ENVIRON, "BOT_TOKEN": BOT_TOKEN}


def _problems(text: str, environ: dict[str, str] = BOT_ENVIRON) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SOURCE, environ)
    return info.value.problems


def test_a_bot_parses_with_its_token_from_the_environment() -> None:
    bot = parse_config(WITH_BOT, SOURCE, BOT_ENVIRON).workstreams[0].bot
    assert bot is not None
    assert str(bot.url) == "http://rasa:5005/webhooks/rest/webhook"
    assert bot.timeout == 5.0 and bot.max_turns == 4 and bot.handoff_on_error is False
    assert bot.greeting == {"pt-BR": "Olá"}
    assert bot.token is not None and bot.token.get_secret_value() == BOT_TOKEN
    assert bot.buttons == "text"
    assert bot.handoff_keywords == ["agent", "human", "person", "atendente", "humano"]
    dumped = parse_config(WITH_BOT, SOURCE, BOT_ENVIRON).model_dump_json()
    assert BOT_TOKEN not in dumped and "token_env" in dumped


def test_defaults_and_no_bot() -> None:
    minimal = edit("      token_env: BOT_TOKEN\n", "", WITH_BOT)
    for line in ("      timeout: 5s\n", "      max_turns: 4\n", "      handoff_on_error: false\n"):
        minimal = edit(line, "", minimal)
    bot = parse_config(minimal, SOURCE, ENVIRON).workstreams[0].bot
    assert bot is not None and bot.token is None
    assert bot.timeout == 10.0 and bot.max_turns == 10 and bot.handoff_on_error is True
    assert parse_config(VALID, SOURCE, ENVIRON).workstreams[0].bot is None
    assert bot.close_after == 1800.0  # half an hour at the bot without a word: closed


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("10m", 600.0), ("2h", 7200.0), ("45", 45.0), ("0", None), ("0s", None), ("null", None)],
)
def test_close_after_is_a_duration_and_zero_or_null_turns_it_off(
    value: str, seconds: float | None
) -> None:
    text = edit(
        "      max_turns: 4\n", f"      max_turns: 4\n      close_after: {value}\n", WITH_BOT
    )
    bot = parse_config(text, SOURCE, BOT_ENVIRON).workstreams[0].bot
    assert bot is not None and bot.close_after == seconds


def test_a_close_after_that_is_not_a_duration_names_its_line_and_field() -> None:
    text = edit("      max_turns: 4\n", "      max_turns: 4\n      close_after: later\n", WITH_BOT)
    [problem] = _problems(text)
    assert "workstreams[0].bot.close_after" in problem and "later" in problem


def test_a_missing_token_variable_is_reported_with_its_line() -> None:
    problems = _problems(WITH_BOT, ENVIRON)
    assert reported(
        problems,
        line_of(WITH_BOT, "token_env: BOT_TOKEN"),
        "workstreams[0].bot.token_env",
        "environment variable BOT_TOKEN is not set",
    )
    # config check on a build machine: secrets not required
    assert parse_config(WITH_BOT, SOURCE, ENVIRON, require_secrets=False).workstreams[0].bot


@pytest.mark.parametrize(
    ("old", "new", "needle", "path", "message"),
    [
        (
            "      url: http://rasa:5005/webhooks/rest/webhook\n",
            "      url: rasa webhook\n",
            "url: rasa webhook",
            "workstreams[0].bot.url",
            "URL",
        ),
        (
            "      timeout: 5s\n",
            "      timeout: 0s\n",
            "timeout: 0s",
            "workstreams[0].bot.timeout",
            "longer than 0",
        ),
        (
            "      timeout: 5s\n",
            "      timeout: soon\n",
            "timeout: soon",
            "workstreams[0].bot.timeout",
            "duration",
        ),
        (
            "      max_turns: 4\n",
            "      max_turns: 0\n",
            "max_turns: 0",
            "workstreams[0].bot.max_turns",
            "greater than or equal to 1",
        ),
        (
            "      token_env: BOT_TOKEN\n",
            "      token_env: bot-token\n",
            "token_env: bot-token",
            "workstreams[0].bot.token_env",
            "environment variable name",
        ),
        (
            "      max_turns: 4\n",
            "      max_turns: 4\n      buttons: template\n",
            "buttons: template",
            "workstreams[0].bot.buttons",
            "'text'",
        ),
        (
            "      max_turns: 4\n",
            "      max_turns: 4\n      tiemout: 3s\n",
            "tiemout: 3s",
            "workstreams[0].bot.tiemout",
            "Extra inputs are not permitted",
        ),
        (
            "      max_turns: 4\n",
            "      max_turns: 4\n      handoff_keywords: [agent, ' ']\n",
            "handoff_keywords",
            "workstreams[0].bot.handoff_keywords",
            "cannot be empty",
        ),
    ],
)
def test_bot_problems_name_line_and_field(
    old: str, new: str, needle: str, path: str, message: str
) -> None:
    text = edit(old, new, WITH_BOT)
    problems = _problems(text)
    assert reported(problems, line_of(text, needle), path, message), problems


def test_a_token_written_in_the_file_is_an_error() -> None:
    text = edit("      token_env: BOT_TOKEN\n", "      token: inline-secret\n", WITH_BOT)
    problems = _problems(text)
    assert reported(problems, line_of(text, "bot:"), "workstreams[0].bot", "secrets do not belong")
    assert not any("inline-secret" in p for p in problems)
