"""The configuration hash: the same configuration, the same hash wherever it is loaded; any
change, a secret's included, a different one; and nothing of a secret in what is hashed."""

from __future__ import annotations

import re

from omniroute.infra.config_hash import HASH_LENGTH, _canonical, config_hash
from omniroute.infra.config_loader import parse_config
from tests.support import AUTH_TOKEN, CONFIG_YAML, ENVIRON

SOURCE = "omniroute.yaml"
BOT = (
    "    fallback_queue: general\n"
    "    bot:\n"
    "      url: http://rasa:5005/webhooks/rest/webhook\n"
    "      token_env: BOT_TOKEN\n"
)


def _hash(text: str = CONFIG_YAML, **environ: str) -> str:
    return config_hash(parse_config(text, SOURCE, {**ENVIRON, **environ}))


def test_the_same_configuration_has_the_same_short_hash() -> None:
    first = _hash()
    assert re.fullmatch(f"[0-9a-f]{{{HASH_LENGTH}}}", first)
    assert _hash() == first
    # Where the file is and how its mappings are laid out do not matter, only what it says.
    elsewhere = parse_config(CONFIG_YAML, "/etc/omniroute/omniroute.yaml", ENVIRON)
    assert config_hash(elsewhere) == first
    reordered = CONFIG_YAML.replace(
        "  - {name: billing, priority: 5}", "  - {priority: 5, name: billing}"
    )
    assert reordered != CONFIG_YAML and _hash(reordered) == first


def test_a_rotated_secret_changes_the_hash_although_the_file_did_not() -> None:
    base = _hash()
    assert _hash(TEST_TWILIO_TOKEN_CONTOSO="rotated-token-0123456789abcdef") != base
    assert _hash(TEST_TWILIO_SHARED_KEY="another-shared-key") != base
    with_bot = CONFIG_YAML.replace("    fallback_queue: general\n", BOT, 1)
    assert _hash(with_bot, BOT_TOKEN="one") != _hash(with_bot, BOT_TOKEN="two")


def test_any_setting_changes_the_hash() -> None:
    base = _hash()
    assert _hash(CONFIG_YAML.replace("{name: billing, priority: 5}", "{name: billing}")) != base
    assert _hash(CONFIG_YAML.replace("value: urgente", "value: urgent")) != base
    removed = CONFIG_YAML.replace(
        '      - {name: Sandbox, number: "+14155238886", workstream: support-en, sandbox: true}\n',
        "",
    )
    assert removed != CONFIG_YAML and _hash(removed) != base


def test_what_is_hashed_holds_digests_of_the_secrets_never_the_secrets() -> None:
    with_bot = CONFIG_YAML.replace("    fallback_queue: general\n", BOT, 1)
    config = parse_config(with_bot, SOURCE, {**ENVIRON, "BOT_TOKEN": "bot-token-secret-42"})
    document = repr(_canonical(config))
    for secret in (*ENVIRON.values(), "bot-token-secret-42"):
        assert secret not in document
    assert document.count("secret-sha256") == 4  # two auth tokens, one webhook key, the bot's
    assert AUTH_TOKEN not in config_hash(config)
