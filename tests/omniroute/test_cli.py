"""The command line as operators use it: a real `omniroute run` process fed by the Twilio
emulator, `accounts`, `config check` and `migrate`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import asyncpg

from omniroute.twilio_emulator import EmulatorState, start_emulator
from tests.conftest import Infra
from tests.support import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    BUSINESS,
    CONFIG_YAML,
    ENVIRON,
    new_customer,
    wait_for,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    port = _free_port()
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
        OMNIROUTE_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{_free_port()}/",
        OMNIROUTE_BROKER_CONNECT_TIMEOUT="0.5",
    )
    code, out, err = await _cli("reconcile", env=no_broker)
    assert (code, out) == (1, "")
    assert err.strip().splitlines() == ["omniroute reconcile: the broker is unreachable"]
    no_database = _env(
        infra,
        config,
        OMNIROUTE_DATABASE_URL=f"postgresql://127.0.0.1:{_free_port()}/omniroute",
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
            "url": f"http://127.0.0.1:{_free_port()}/twilio/contoso/inbound",  # nobody there
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
