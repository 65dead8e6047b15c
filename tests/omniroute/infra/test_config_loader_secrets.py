"""Secrets read from files by the loader: every load and reload reads them again, and every
problem names the configuration's file, line and field and the secret file's path, never
what the file holds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr

from omniroute.errors import ConfigError
from omniroute.infra.config_loader import load_config, parse_config
from omniroute.infra.secret_files import MAX_SECRET_BYTES

TOKEN = "tok-file-7d1e5b2c-super-secret"
KEY = "whk-file-9a0c-also-secret"
BOT_TOKEN = "bot-file-3f3f-secret"

CONFIG = """\
accounts:
  - name: contoso
    account_sid: AC00000000000000000000000000000001
    auth_token_file: {token_file}
    webhook_keys_file: {keys_file}
    numbers:
      - {{name: Support, number: "+5511999990000", workstream: support}}
workstreams:
  - name: support
    fallback_queue: general
    bot: {{url: "http://127.0.0.1:5005/webhooks/rest/webhook", token_file: {bot_file}}}
queues:
  - {{name: general}}
"""


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def deployment(
    folder: Path,
    *,
    token: str | bytes = TOKEN + "\n",
    keys: str | bytes = f"# shared webhook keys\nkey-1 = {KEY}\n\n",
    bot: str | bytes = BOT_TOKEN,
    token_file: str = "secrets/twilio_contoso",
) -> Path:
    """A configuration file with relative secret paths, and the secret files beside it."""
    write(folder / "secrets" / "twilio_contoso", token)
    write(folder / "secrets" / "webhook_keys", keys)
    write(folder / "secrets" / "bot", bot)
    text = CONFIG.format(
        token_file=token_file, keys_file="secrets/webhook_keys", bot_file="secrets/bot"
    )
    return write(folder / "omniroute.yaml", text)


def problems(path: Path, *, require_secrets: bool = True) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load_config(path, {}, require_secrets=require_secrets)
    return raised.value.problems


def line_of(path: Path, needle: str) -> int:
    lines = path.read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if needle in line)


def assert_no_secret(messages: list[str]) -> None:
    for message in messages:
        for secret in (TOKEN, KEY, BOT_TOKEN):
            assert secret not in message


def test_secrets_come_from_files_relative_to_the_configuration(tmp_path: Path) -> None:
    config = load_config(deployment(tmp_path), {})
    account = config.accounts[0]
    assert account.auth_token == SecretStr(TOKEN)  # one trailing newline dropped
    assert {k: v.get_secret_value() for k, v in account.webhook_keys.items()} == {"key-1": KEY}
    bot = config.workstreams[0].bot
    assert bot is not None and bot.token == SecretStr(BOT_TOKEN)


def test_an_absolute_path_is_read_as_written(tmp_path: Path) -> None:
    secret = write(tmp_path / "elsewhere" / "token", TOKEN)
    path = deployment(tmp_path / "conf", token_file=str(secret))
    assert load_config(path, {}).accounts[0].auth_token == SecretStr(TOKEN)


def test_only_one_trailing_newline_is_dropped(tmp_path: Path) -> None:
    config = load_config(deployment(tmp_path, token=f"{TOKEN}\r\n"), {})
    assert config.accounts[0].auth_token == SecretStr(TOKEN)
    config = load_config(deployment(tmp_path, token=f" {TOKEN}\n\n"), {})
    assert config.accounts[0].auth_token == SecretStr(f" {TOKEN}\n")


def test_parse_config_reads_files_relative_to_its_base(tmp_path: Path) -> None:
    path = deployment(tmp_path)
    config = parse_config(path.read_text(), "inline.yaml", {}, base=tmp_path)
    assert config.accounts[0].auth_token == SecretStr(TOKEN)


def test_a_missing_file_names_the_field_and_the_path(tmp_path: Path) -> None:
    path = deployment(tmp_path)
    (tmp_path / "secrets" / "twilio_contoso").unlink()
    secret = tmp_path / "secrets" / "twilio_contoso"
    assert problems(path) == [
        f"{path}:{line_of(path, 'auth_token_file')}: accounts[0].auth_token_file: "
        f"secret file {secret} does not exist"
    ]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("", "is empty"),
        ("\n", "is empty"),
        (b"\xff\xfe" + TOKEN.encode(), "is not UTF-8 text"),
        ("x" * (MAX_SECRET_BYTES + 1), f"is larger than {MAX_SECRET_BYTES} bytes"),
    ],
    ids=["empty", "only-a-newline", "not-utf8", "too-large"],
)
def test_an_unusable_token_file_is_refused(
    tmp_path: Path, content: str | bytes, reason: str
) -> None:
    path = deployment(tmp_path, token=content)
    secret = tmp_path / "secrets" / "twilio_contoso"
    assert problems(path) == [
        f"{path}:{line_of(path, 'auth_token_file')}: accounts[0].auth_token_file: "
        f"secret file {secret} {reason}"
    ]


def test_an_unreadable_file_gives_the_reason_not_the_content(tmp_path: Path) -> None:
    path = deployment(tmp_path)
    secret = tmp_path / "secrets" / "twilio_contoso"
    secret.unlink()
    secret.mkdir()  # root reads any file, but nobody reads a directory as one
    (found,) = problems(path)
    assert found.startswith(f"{path}:{line_of(path, 'auth_token_file')}: ")
    assert f"secret file {secret} is a directory, not a regular file" in found


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (f"key-1 = {KEY}\n{KEY}\n", "line 2: expected key_id=secret"),
        (f"key-1={KEY}\n=orphan\n", "line 2: expected key_id=secret"),
        (f"key-1=\nkey-2={KEY}\n", "line 1: expected key_id=secret"),
        (f"key 1={KEY}\n", "line 1: expected key_id=secret"),
        (f"key-1={KEY}\n# again\nkey-1={KEY}x\n", "line 3: key key-1 given twice"),
        ("# nothing but a comment\n\n", "has no key_id=secret line"),
    ],
    ids=["bare-secret", "no-key-id", "no-secret", "space-in-id", "duplicate", "no-keys"],
)
def test_a_malformed_keys_file_names_its_line_never_its_content(
    tmp_path: Path, content: str, reason: str
) -> None:
    path = deployment(tmp_path, keys=content)
    secret = tmp_path / "secrets" / "webhook_keys"
    found = problems(path)
    assert found == [
        f"{path}:{line_of(path, 'webhook_keys_file')}: accounts[0].webhook_keys_file: "
        f"secret file {secret}{',' if reason.startswith('line') else ''} {reason}"
    ]
    assert_no_secret(found)


def test_every_broken_secret_is_reported_at_once(tmp_path: Path) -> None:
    path = deployment(tmp_path, token="", keys="garbage-without-equals\n", bot="")
    found = problems(path)
    assert [p.split(": ")[1] for p in found] == [
        "accounts[0].auth_token_file",
        "accounts[0].webhook_keys_file",
        "workstreams[0].bot.token_file",
    ]
    assert line_of(path, "bot:") == int(found[2].split(":")[1])


def test_without_required_secrets_absent_files_pass_but_malformed_ones_do_not(
    tmp_path: Path,
) -> None:
    path = deployment(tmp_path, token="", bot="")
    (tmp_path / "secrets" / "webhook_keys").unlink()
    config = load_config(path, {}, require_secrets=False)
    assert config.accounts[0].auth_token is None and config.accounts[0].webhook_keys == {}
    write(tmp_path / "secrets" / "webhook_keys", "not a key line\n")
    (found,) = problems(path, require_secrets=False)
    assert "accounts[0].webhook_keys_file" in found and "line 1" in found


def test_files_are_read_again_at_every_load(tmp_path: Path) -> None:
    path = deployment(tmp_path)
    assert load_config(path, {}).accounts[0].auth_token == SecretStr(TOKEN)
    write(tmp_path / "secrets" / "twilio_contoso", "rotated-token\n")
    assert load_config(path, {}).accounts[0].auth_token == SecretStr("rotated-token")


def test_environment_and_files_mix_across_accounts(tmp_path: Path) -> None:
    path = deployment(tmp_path)
    text = path.read_text().replace(
        "queues:",
        "  - name: other\n    fallback_queue: general\nqueues:",
    )
    text = text.replace(
        "workstreams:",
        "  - name: fabrikam\n"
        "    account_sid: AC00000000000000000000000000000002\n"
        "    auth_token_env: FABRIKAM_TOKEN\n"
        "    numbers:\n"
        '      - {name: Sales, number: "+442071838750", workstream: other}\n'
        "workstreams:",
    )
    write(path, text)
    config = load_config(path, {"FABRIKAM_TOKEN": "env-token"})
    assert [a.auth_token for a in config.accounts] == [SecretStr(TOKEN), SecretStr("env-token")]
    (found,) = problems(path)
    assert "accounts[1].auth_token_env: environment variable FABRIKAM_TOKEN is not set" in found


def test_secrets_from_files_never_reach_a_dump(tmp_path: Path) -> None:
    config = load_config(deployment(tmp_path), {})
    rendered = [repr(config), config.model_dump_json(), str(config.model_dump(mode="json"))]
    assert_no_secret(rendered)
    assert "secrets/twilio_contoso" in config.model_dump_json()  # the path is not a secret


def test_a_secret_file_the_process_cannot_open_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path = deployment(tmp_path)
    secret = tmp_path / "secrets" / "bot"
    secret.unlink()
    os.symlink(secret, secret)  # a symlink loop: open() fails with ELOOP
    (found,) = problems(path)
    assert f"workstreams[0].bot.token_file: cannot read secret file {secret}:" in found


@pytest.mark.timeout(10)  # before the fix, open() waited for a writer forever
def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    path = deployment(tmp_path)
    secret = tmp_path / "secrets" / "twilio_contoso"
    secret.unlink()
    os.mkfifo(secret)
    for require_secrets in (True, False):  # not a missing secret: a wrong kind of file
        (found,) = problems(path, require_secrets=require_secrets)
        assert found.endswith(
            f"accounts[0].auth_token_file: secret file {secret} is a named pipe, not a regular file"
        )


def test_a_device_is_refused(tmp_path: Path) -> None:
    path = deployment(tmp_path, token_file="/dev/null")  # read as empty, before the fix
    (found,) = problems(path, require_secrets=False)
    assert "secret file /dev/null is a device, not a regular file" in found


def test_symlinks_are_followed_as_kubernetes_mounts_secrets(tmp_path: Path) -> None:
    """A mounted secret is ``name -> ..data/name``, ``..data -> ..<timestamp>``; rotating it
    swaps ``..data``."""
    mount = tmp_path / "mount"
    write(mount / "..2024_01_01" / "twilio_contoso", TOKEN)
    write(mount / "..2024_02_01" / "twilio_contoso", "rotated\n")
    os.symlink("..2024_01_01", mount / "..data")
    os.symlink("..data/twilio_contoso", mount / "twilio_contoso")
    path = deployment(tmp_path / "conf", token_file=str(mount / "twilio_contoso"))
    assert load_config(path, {}).accounts[0].auth_token == SecretStr(TOKEN)
    os.symlink("..2024_02_01", mount / "..data.new")
    os.replace(mount / "..data.new", mount / "..data")
    assert load_config(path, {}).accounts[0].auth_token == SecretStr("rotated")


PASTED = [
    "0123456789abcdef0123456789abcdef",  # a Twilio auth token: 32 hex
    "Zq3xW9pL2vB7nK4m",  # mixed case
    "hzx4kq8v2nmw7p3r",  # lowercase, no separator, longer than 12
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib3QifQ.c2lnbmF0dXJl",  # a JWT
    "k3y/with+slash=",  # base64, split by its slash
]


@pytest.mark.parametrize("pasted", PASTED, ids=["hex", "mixed", "lower", "jwt", "base64"])
def test_a_token_pasted_into_a_file_field_never_appears_in_the_error(
    tmp_path: Path, pasted: str
) -> None:
    path = deployment(tmp_path, token_file=pasted)
    (found,) = problems(path)
    assert "accounts[0].auth_token_file: secret file " in found and "does not exist" in found
    for part in [pasted, *pasted.split("/")]:
        assert part not in found.split(": ", 2)[2], found
    assert f"secret file {tmp_path}/…(" in found  # where it looked, as far as that exists
    (absolute,) = problems(deployment(tmp_path, token_file=f"/tmp/{pasted}"))
    assert pasted.split("/")[0] not in absolute and "secret file /tmp/…(" in absolute


def test_a_missing_file_with_a_plain_name_is_shown_as_written(tmp_path: Path) -> None:
    path = deployment(tmp_path, token_file="absent/twilio_contoso_token.txt")
    (found,) = problems(path)
    assert found.endswith(f"secret file {tmp_path}/absent/twilio_contoso_token.txt does not exist")
