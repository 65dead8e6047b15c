"""Where the configuration says its secrets are: an environment variable or a file, exactly
one for an account's auth token, at most one for webhook keys and a bot's token; a secret
written in the file itself stays an error. Problems carry the file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from omniroute.errors import ConfigError
from omniroute.infra.config_loader import parse_config
from schemas.config import Account, Config
from tests.schemas.test_config_model import ENVIRON, SOURCE, VALID, edit, line_of, reported

ENV_LINE = "    auth_token_env: TOKEN_CONTOSO\n"
KEYS_LINE = "    webhook_keys_env: {key-1: WEBHOOK_KEY_CONTOSO}\n"
BOT = "    fallback_queue: general\n    bot:\n      url: http://rasa:5005/webhooks/rest/webhook\n"


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse_config(text, SOURCE, ENVIRON, require_secrets=False)
    return raised.value.problems


def test_a_token_file_instead_of_the_variable_parses() -> None:
    text = edit(ENV_LINE, "    auth_token_file: /run/secrets/twilio_contoso\n")
    config = parse_config(text, SOURCE, ENVIRON, require_secrets=False)
    account = config.accounts[0]
    assert account.auth_token_env is None
    assert account.auth_token_file == Path("/run/secrets/twilio_contoso")
    assert account.auth_token_source == "file /run/secrets/twilio_contoso"
    assert parse_config(VALID, SOURCE, ENVIRON).accounts[0].auth_token_source == "$TOKEN_CONTOSO"


def test_the_auth_token_needs_exactly_one_source() -> None:
    neither = edit(ENV_LINE, "")
    assert reported(
        problems_of(neither), line_of(neither, "- name: contoso"), "accounts[0]", "exactly one"
    )
    both = edit(ENV_LINE, ENV_LINE + "    auth_token_file: secrets/contoso\n")
    assert reported(
        problems_of(both), line_of(both, "- name: contoso"), "accounts[0]", "exactly one"
    )


def test_webhook_keys_from_the_environment_or_a_file_not_both() -> None:
    text = edit(KEYS_LINE, KEYS_LINE + "    webhook_keys_file: secrets/keys\n")
    assert reported(problems_of(text), line_of(text, "- name: contoso"), "accounts[0]", "not both")
    only_file = edit(KEYS_LINE, "    webhook_keys_file: secrets/keys\n")
    config = parse_config(only_file, SOURCE, ENVIRON, require_secrets=False)
    assert config.accounts[0].webhook_keys_file == Path("secrets/keys")


def test_a_bot_token_from_the_environment_or_a_file_not_both() -> None:
    text = edit(
        "    fallback_queue: general\n",
        BOT + "      token_env: BOT_TOKEN\n      token_file: secrets/bot\n",
    )
    assert reported(problems_of(text), line_of(text, "bot:"), "workstreams[0].bot", "not both")


@pytest.mark.parametrize("field", ["auth_token_file", "webhook_keys_file"])
def test_an_empty_path_is_refused(field: str) -> None:
    replaced = ENV_LINE if field == "auth_token_file" else KEYS_LINE
    text = edit(replaced, f'    {field}: ""\n')
    assert reported(problems_of(text), line_of(text, field), f"accounts[0].{field}", "path")


@pytest.mark.parametrize(
    ("replace", "by", "where", "field"),
    [
        (ENV_LINE, "    auth_token: inline-secret\n", "- name: contoso", "accounts[0]"),
        (KEYS_LINE, "    webhook_keys: {key-1: inline}\n", "- name: contoso", "accounts[0]"),
        (
            "    fallback_queue: general\n",
            BOT + "      token: inline\n",
            "bot:",
            "workstreams[0].bot",
        ),
    ],
    ids=["auth-token", "webhook-keys", "bot-token"],
)
def test_a_secret_written_in_the_file_is_still_an_error(
    replace: str, by: str, where: str, field: str
) -> None:
    text = edit(replace, by)
    found = problems_of(text)
    assert reported(found, line_of(text, where), field, "do not belong")
    assert "inline" not in " ".join(found)


def test_the_json_schema_offers_files_and_never_the_secrets() -> None:
    schema = Config.model_json_schema()
    account = schema["$defs"]["Account"]["properties"]
    assert {"auth_token_env", "auth_token_file", "webhook_keys_env", "webhook_keys_file"} <= set(
        account
    )
    assert "auth_token" not in account and "webhook_keys" not in account
    bot = schema["$defs"]["Bot"]["properties"]
    assert {"token_env", "token_file"} <= set(bot) and "token" not in bot


def test_the_model_alone_refuses_a_missing_source() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Account.model_validate(
            {
                "name": "x",
                "account_sid": "AC00000000000000000000000000000001",
                "numbers": [{"name": "n", "number": "+5511999990000", "workstream": "w"}],
            }
        )
