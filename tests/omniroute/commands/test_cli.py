"""The command line as operators use it: a real `omniroute run` process fed by the Twilio
emulator, `accounts`, `config check` and `migrate`, and every user error as one line on
stderr with a non-zero exit, never a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import uuid
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

from omniroute.twilio_emulator import EmulatorState, start_emulator
from tests.conftest import Infra
from tests.support import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    BUSINESS,
    CONFIG_YAML,
    ENVIRON,
    free_port,
    new_customer,
    wait_for,
)


async def _cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "omniroute",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


def _env(infra: Infra, config: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        **ENVIRON,
        "OMNIROUTE_AMQP_URL": infra.amqp_url,
        "OMNIROUTE_DATABASE_URL": infra.database_url,
        "OMNIROUTE_CONFIG": str(config),
        # Loopback only: never Twilio's real API (a test that needs it passes the emulator's).
        "OMNIROUTE_TWILIO_API_URL": "http://127.0.0.1:9",
        **extra,
    }


async def test_run_process_end_to_end_and_no_secret_in_logs(
    infra: Infra, db: asyncpg.Pool, tmp_path: Path
) -> None:
    config = tmp_path / "omniroute.yaml"
    config.write_text(CONFIG_YAML)
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    log = tmp_path / "run.log"
    emulator = await start_emulator(EmulatorState(accounts={ACCOUNT_SID: AUTH_TOKEN}))
    env = _env(
        infra,
        config,
        OMNIROUTE_HTTP_PORT=str(port),
        OMNIROUTE_PUBLIC_URL=public,
        OMNIROUTE_LOG_LEVEL="debug",
        OMNIROUTE_LOG_FORMAT="json",
        OMNIROUTE_TWILIO_API_URL=emulator.url,
    )
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "omniroute",
            "run",
            env=env,
            stdout=stderr,
            stderr=stderr,
        )
    customer = new_customer()
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                try:
                    async with http.get(f"{public}/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(ready, timeout=30, interval=0.2)
            send = {
                "account_sid": ACCOUNT_SID,
                "url": f"{public}/twilio/contoso/inbound",
                "from": f"whatsapp:{customer}",
                "to": f"whatsapp:{BUSINESS}",
                "body": "oi, tudo bem?",
                "profile_name": "Bia",
                "repeat": 2,  # Twilio resending the same webhook
            }
            async with http.post(f"{emulator.url}/_emulator/customers/send", json=send) as r:
                assert (await r.json())["statuses"] == [200, 200]
            forged = {"MessageSid": "SM" + "a" * 32, "Body": "x"}
            async with http.post(
                f"{public}/twilio/contoso/inbound",
                data=forged,
                headers={"X-Twilio-Signature": "bm9wZQ=="},
            ) as r:
                assert r.status == 403
            async with http.get(f"{public}/metrics") as r:
                assert "omniroute_webhooks_total" in await r.text()

        count = "SELECT count(*) FROM conversations c JOIN messages m ON m.conversation_id = c.id"
        await wait_for(lambda: db.fetchval(count + " WHERE c.customer = $1", customer), 20)
        assert await db.fetchval(count + " WHERE c.customer = $1", customer) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await proc.wait()
        await emulator.close()
    assert proc.returncode == 0
    logs = log.read_text()
    assert "webhook.handled" in logs and "stage.handled" in logs
    # The router and its stage child both write JSON lines only, libraries' logs included.
    lines = [json.loads(line) for line in logs.splitlines() if line.strip()]
    assert {line["event"] for line in lines} >= {"stages.child_started", "reconcile.pass"}
    for secret in (AUTH_TOKEN, *ENVIRON.values()):
        assert secret not in logs


async def test_accounts_prints_the_urls_for_the_twilio_console(
    infra: Infra, tmp_path: Path
) -> None:
    config = tmp_path / "omniroute.yaml"
    config.write_text(CONFIG_YAML)
    env = _env(infra, config, OMNIROUTE_PUBLIC_URL="https://chat.example.com")
    for name in ENVIRON:
        env.pop(name)  # printing URLs needs no secret
    code, out, _ = await _cli("accounts", env=env)
    assert code == 0
    overrides = "#ct=3000&rt=10000&tt=15000&rc=2&rp=ct,rt,5xx"
    assert f"https://chat.example.com/twilio/contoso/inbound{overrides}" in out
    assert f"https://chat.example.com/twilio/contoso/status{overrides}" in out
    assert f"https://chat.example.com/twilio/fabrikam/inbound{overrides}" in out
    assert f"whatsapp:{BUSINESS}" in out
    assert out.count("fallback URL:") == 3  # one per number


async def test_config_check_names_file_line_and_field(infra: Infra, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG_YAML.replace('number: "+5511999990000"', 'number: "5511-9999"'))
    code, out, err = await _cli("config", "check", str(bad), env=_env(infra, bad))
    assert code == 1
    line = next(n for n, text in enumerate(bad.read_text().splitlines(), 1) if "5511-9999" in text)
    assert f"{bad}:{line}: accounts[0].numbers[0].number: expected an E.164 number" in err

    good = tmp_path / "good.yaml"
    good.write_text(CONFIG_YAML)
    code, out, err = await _cli("config", "check", str(good), env=_env(infra, good))
    assert code == 0, err
    assert "2 account(s), 3 number(s)" in out


async def test_config_check_reports_a_missing_secret(infra: Infra, tmp_path: Path) -> None:
    config = tmp_path / "omniroute.yaml"
    config.write_text(CONFIG_YAML)
    env = _env(infra, config)
    env.pop("TEST_TWILIO_TOKEN_FABRIKAM")
    code, _, err = await _cli("config", "check", str(config), env=env)
    assert code == 1
    assert "TEST_TWILIO_TOKEN_FABRIKAM is not set" in err


async def test_migrate_is_idempotent(infra: Infra, tmp_path: Path) -> None:
    config = tmp_path / "omniroute.yaml"
    config.write_text(CONFIG_YAML)
    code, out, err = await _cli("migrate", "--create-database", env=_env(infra, config))
    assert code == 0, err
    assert "database exists" in out
    assert "none (up to date)" in out


async def test_status_reports_every_stage(infra: Infra, tmp_path: Path) -> None:
    import json

    from omniroute.infra.bus import Bus
    from tests.conftest import make_settings

    bus = Bus.from_settings(make_settings(infra))  # declares the topology
    await bus.start()
    await bus.wait_ready()
    await bus.close()
    config = tmp_path / "omniroute.yaml"
    config.write_text(CONFIG_YAML)
    code, out, err = await _cli("status", "--json", env=_env(infra, config))
    assert code == 0, err
    rows = {row["stage"]: row for row in json.loads(out)}
    assert {"conversations", "classify", "distribute", "outbound", "status"} <= set(rows)
    assert all(
        row["ready"] is not None and row["dead_letters"] is not None for row in rows.values()
    )


async def test_reconcile_refuses_bad_arguments_with_one_line(infra: Infra, tmp_path: Path) -> None:
    config = tmp_path / "omniroute.yaml"
    config.write_text(CONFIG_YAML)
    env = _env(infra, config)
    code, out, err = await _cli("reconcile", "--since", "yesterday-ish", env=env)
    assert (code, out) == (2, "")
    assert err.strip().splitlines() == [
        "omniroute reconcile: --since 'yesterday-ish' is not an ISO time"
        " (e.g. 2025-01-31T09:00:00Z)"
    ]
    code, out, err = await _cli("reconcile", "--account", "northwind", env=env)
    assert (code, out) == (2, "")
    assert err.strip().splitlines() == [
        "omniroute reconcile: unknown account 'northwind' (configured: contoso, fabrikam)"
    ]


async def test_reconcile_says_in_one_line_what_is_unreachable(infra: Infra, tmp_path: Path) -> None:
    config = tmp_path / "omniroute.yaml"
    config.write_text(CONFIG_YAML)
    no_broker = _env(
        infra,
        config,
        OMNIROUTE_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        OMNIROUTE_BROKER_CONNECT_TIMEOUT="0.5",
    )
    code, out, err = await _cli("reconcile", env=no_broker)
    assert (code, out) == (1, "")
    assert err.strip().splitlines() == ["omniroute reconcile: the broker is unreachable"]
    no_database = _env(
        infra,
        config,
        OMNIROUTE_DATABASE_URL=f"postgresql://127.0.0.1:{free_port()}/omniroute",
        OMNIROUTE_DB_CONNECT_TIMEOUT="0.5",
    )
    code, out, err = await _cli("reconcile", env=no_database)
    assert (code, out) == (1, "")
    assert err.strip().splitlines() == ["omniroute reconcile: the database is unreachable"]


async def test_reconcile_prints_a_line_per_number_and_the_statuses(
    infra: Infra, tmp_path: Path
) -> None:
    config = tmp_path / "omniroute.yaml"
    config.write_text(CONFIG_YAML)
    emulator = await start_emulator(EmulatorState(accounts={ACCOUNT_SID: AUTH_TOKEN}))
    try:
        customer = new_customer()
        send = {
            "account_sid": ACCOUNT_SID,
            "url": f"http://127.0.0.1:{free_port()}/twilio/contoso/inbound",  # nobody there
            "from": f"whatsapp:{customer}",
            "to": f"whatsapp:{BUSINESS}",
            "body": "oi?",
        }
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{emulator.url}/_emulator/customers/send", json=send) as r,
        ):
            assert r.status == 502
        env = _env(infra, config, OMNIROUTE_TWILIO_API_URL=emulator.url)
        since = "2020-01-01T00:00:00+00:00"
        code, out, err = await _cli("reconcile", "--account", "contoso", "--since", since, env=env)
    finally:
        await emulator.close()
    assert code == 0, err
    lines = out.splitlines()
    assert f"contoso {BUSINESS}: 1 in Twilio's log, 0 stored, 1 injected" in lines
    assert "contoso +14155238886: 0 in Twilio's log, 0 stored, 0 injected" in lines
    assert lines[-1].startswith("statuses: ") and "checked with Twilio" in lines[-1]


def _one_line(err: str) -> str:
    """The single line a user error writes on stderr."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


async def test_version_and_plain_help(infra: Infra, tmp_path: Path) -> None:
    env = _env(infra, tmp_path / "omniroute.yaml")
    code, out, err = await _cli("--version", env=env)
    assert (code, out.strip(), err) == (0, f"omniroute {metadata.version('omniroute')}", "")
    code, out, _ = await _cli("--help", env=env)
    assert code == 0 and "``" not in out and "consume" in out
    code, out, _ = await _cli("consume", "--help", env=env)
    assert code == 0 and "conversations, classify, distribute" in out
    code, out, _ = await _cli("dead-letters", "--help", env=env)
    assert "(default: 100)" in out and "list, show, replay or purge" in out


def test_the_stage_choices_are_the_stages_that_can_run() -> None:
    from consumers.registry import STAGES
    from omniroute.commands.cli import parser

    assert parser().parse_args(["consume", *STAGES]).stages == list(STAGES)


async def test_migrate_says_in_one_line_what_is_wrong_with_the_database(
    infra: Infra, tmp_path: Path
) -> None:
    config = tmp_path / "omniroute.yaml"
    parts = urlsplit(infra.database_url)
    name = f"omniroute_missing_{uuid.uuid4().hex[:8]}"
    missing = urlunsplit(parts._replace(path=f"/{name}"))
    code, out, err = await _cli("migrate", env=_env(infra, config, OMNIROUTE_DATABASE_URL=missing))
    assert (code, out) == (1, "")
    assert _one_line(err) == (
        f"omniroute migrate: database {name!r} does not exist on PostgreSQL at"
        f" {parts.hostname}:{parts.port or 5432} (omniroute migrate --create-database creates it)"
    )
    port = free_port()
    nobody = _env(infra, config, OMNIROUTE_DATABASE_URL=f"postgresql://127.0.0.1:{port}/x")
    code, out, err = await _cli("migrate", env=nobody)
    assert (code, out) == (1, "")
    assert _one_line(err) == (
        f"omniroute migrate: cannot reach PostgreSQL at 127.0.0.1:{port}: Connection refused"
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["consume", "nope"],
            "omniroute consume: argument STAGE: invalid choice: 'nope' (choose from",
        ),
        (
            ["dead-letters", "list", "nope"],
            "omniroute dead-letters: argument STAGE: invalid choice: 'nope' (choose from",
        ),
        (
            [
                "classify",
                "--from",
                "whatsapp:+5511988887777",
                "--to",
                f"whatsapp:{BUSINESS}",
                "--at",
                "tomorrow",
            ],
            "omniroute classify: --at 'tomorrow' is not an ISO time (e.g. 2025-01-31T09:00:00Z)",
        ),
        (["bogus"], "omniroute: argument COMMAND: invalid choice: 'bogus'"),
    ],
)
async def test_bad_arguments_are_one_line_and_exit_2(
    infra: Infra, tmp_path: Path, args: list[str], expected: str
) -> None:
    config = tmp_path / "omniroute.yaml"
    config.write_text(CONFIG_YAML)
    code, out, err = await _cli(*args, env=_env(infra, config))
    assert (code, out) == (2, "")
    assert _one_line(err).startswith(expected)
    if args[0] in ("consume", "dead-letters"):
        assert "conversations" in err and "lifecycle" in err  # the valid stages


async def test_a_missing_config_file_or_a_bad_setting_is_one_line(
    infra: Infra, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere.yaml"
    env = _env(infra, missing)
    for args in (["accounts"], ["classify", "--from", "whatsapp:+1", "--to", "whatsapp:+2"]):
        code, out, err = await _cli(*args, env=env)
        assert (code, out) == (2, "")
        assert _one_line(err) == (
            f"config error: {missing}: cannot read configuration: No such file or directory"
        )
    code, out, err = await _cli("accounts", "--config", str(tmp_path), env=env)
    assert (code, _one_line(err)) == (
        2,
        f"config error: {tmp_path}: cannot read configuration: Is a directory",
    )
    code, out, err = await _cli("status", env=_env(infra, missing, OMNIROUTE_HTTP_PORT="80a"))
    assert (code, out) == (2, "")
    assert _one_line(err).startswith("omniroute: OMNIROUTE_HTTP_PORT: Input should be")


async def test_an_unreachable_broker_is_one_line(infra: Infra, tmp_path: Path) -> None:
    port = free_port()
    env = _env(
        infra, tmp_path / "x.yaml", OMNIROUTE_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{port}/"
    )
    code, out, err = await _cli("dead-letters", "list", "classify", env=env)
    assert (code, out) == (1, "")
    assert _one_line(err) == (
        f"omniroute dead-letters: cannot reach RabbitMQ at 127.0.0.1:{port}: Connection refused"
    )


@pytest.mark.parametrize("command", [["serve"], ["consume", "classify"]])
async def test_a_port_in_use_ends_the_process_at_once(
    infra: Infra, tmp_path: Path, command: list[str]
) -> None:
    config = tmp_path / "omniroute.yaml"
    config.write_text(CONFIG_YAML)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = _env(
            infra,
            config,
            OMNIROUTE_HTTP_HOST="127.0.0.1",
            OMNIROUTE_HTTP_PORT=str(port),
            OMNIROUTE_RECONCILE_INTERVAL="0",
        )
        async with asyncio.timeout(15):  # it used to hang here for ever
            code, out, err = await _cli(*command, env=env)
    assert (code, out) == (1, "")
    assert _one_line(err) == (
        f"omniroute {command[0]}: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
