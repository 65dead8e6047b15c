"""A reload that tells the truth: every running process answers what it did, and
`omniroute config reload` exits 0 only when every live one runs the same configuration.

Services run in this process against the real broker and database (each with its own bus,
store and registry row), and `omniroute serve` / `omniroute consume` run as real processes
for the command line's own test.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from omniroute.commands.reload import BIND_FAILED, ReloadReport, request_reload
from omniroute.commands.service import Service
from omniroute.infra import config_loader
from omniroute.infra.config_hash import config_hash
from omniroute.infra.config_loader import LiveConfig, load_config
from omniroute.infra.settings import Settings
from schemas.config import Config
from schemas.events import ConfigReloadAnswered, Envelope, EventType
from tests.conftest import Infra
from tests.support import AUTH_TOKEN, CONFIG_YAML, ENVIRON, tap, wait_for

pytestmark = pytest.mark.integration

TOKEN_LINE = "    auth_token_env: TEST_TWILIO_TOKEN_CONTOSO\n"
ROTATED = "rotated-auth-token-fedcba9876543210"


def _with_token_file(path: Path, token: str) -> Path:
    """The test configuration with contoso's token in a secret file beside it."""
    secret = path.parent / f"{path.stem}-contoso-token"
    secret.write_text(token + "\n")
    assert TOKEN_LINE in CONFIG_YAML
    path.write_text(CONFIG_YAML.replace(TOKEN_LINE, f"    auth_token_file: {secret.name}\n"))
    return secret


def _expected_hash(path: Path) -> str:
    return config_hash(load_config(path, ENVIRON))


StartService = Callable[..., Awaitable[Service]]


@pytest.fixture
async def start_service(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, db: asyncpg.Pool
) -> AsyncIterator[StartService]:
    """Services in this process, each like a process of its own (bus, store, registry row)."""
    for name, value in ENVIRON.items():  # a reload reads secrets from the process environment
        monkeypatch.setenv(name, value)
    own = Settings.model_validate(
        {**settings.model_dump(), "http_port": 0, "http_host": "127.0.0.1", "reconcile_interval": 0}
    )
    started: list[Service] = []

    async def start(path: Path, stages: list[str], *, serve_http: bool = False) -> Service:
        live = LiveConfig(load_config(path, os.environ), path)
        service = Service(own, live, stages, serve_http=serve_http)
        started.append(service)
        await service.start()
        await wait_for(lambda: _registered(service, db), timeout=10)
        return service

    yield start
    for service in started:
        await service.stop()


async def _registered(service: Service, db: asyncpg.Pool) -> bool:
    """Its row is in the registry: a reload asked from now on waits for its answer."""
    heartbeat = service._heartbeat
    if heartbeat is None or heartbeat._task is None:
        return False
    row = await db.fetchval("SELECT 1 FROM processes WHERE id = $1", heartbeat.identity.id)
    return row is not None


def _mine(report: ReloadReport, *services: Service) -> dict[str, ConfigReloadAnswered]:
    """The answers of these services (other tests' services may share the database)."""
    ids = {s._heartbeat.identity.id for s in services if s._heartbeat is not None}
    return {k: v for k, v in report.answers.items() if k in ids}


async def test_every_process_answers_with_the_hash_it_applied(
    start_service: StartService, settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "omniroute.yaml"
    secret = _with_token_file(path, AUTH_TOKEN)
    router = await start_service(path, [], serve_http=True)
    stages = await start_service(path, ["classify"])
    before = _expected_hash(path)
    assert router.config_hash() == stages.config_hash() == before

    secret.write_text(ROTATED + "\n")  # the YAML unchanged: only the secret file
    after = _expected_hash(path)
    assert after != before
    report = await request_reload(settings, wait=10)
    answers = _mine(report, router, stages)
    assert len(answers) == 2, report.lines()
    assert {(a.applied, a.hash, a.previous_hash, a.error) for a in answers.values()} == {
        (True, after, before, None)
    }
    roles = sorted((a.role, tuple(a.stages)) for a in answers.values())
    assert roles == [("consume", ("classify",)), ("serve", ())]
    assert router.config.current.account("contoso").auth_token.get_secret_value() == ROTATED  # type: ignore[union-attr]
    lines = [line for line in report.lines() if "applied, config" in line]
    assert any(f"applied, config {after} (was {before})" in line for line in lines)


async def test_a_broken_file_is_refused_with_its_problem_and_the_old_hash_stays(
    start_service: StartService, settings: Settings, tmp_path: Path, db: asyncpg.Pool
) -> None:
    path = tmp_path / "omniroute.yaml"
    secret = _with_token_file(path, AUTH_TOKEN)
    service = await start_service(path, ["classify"])
    before = service.config_hash()
    secret.unlink()  # the mounted secret is gone
    report = await request_reload(settings, wait=10)
    (answer,) = _mine(report, service).values()
    assert not answer.applied and answer.hash == answer.previous_hash == before
    assert answer.error is not None
    assert str(path) in answer.error and "auth_token_file" in answer.error
    assert str(secret) in answer.error  # names the secret file's path, never its content
    assert AUTH_TOKEN not in answer.error
    assert not report.ok
    assert "refused by" in report.verdict()
    assert any("refused, keeps config " + before in line for line in report.lines())
    stored = await db.fetchval(
        "SELECT config_hash FROM processes WHERE id = $1",
        service._heartbeat.identity.id,  # type: ignore[union-attr]
    )
    assert stored == before


async def test_differing_hashes_and_a_silent_process_fail_the_reload(
    start_service: StartService, settings: Settings, tmp_path: Path, db: asyncpg.Pool
) -> None:
    one, other = tmp_path / "one.yaml", tmp_path / "other.yaml"
    _with_token_file(one, AUTH_TOKEN)
    _with_token_file(other, ROTATED)  # a host whose secret was not rotated the same
    first = await start_service(one, ["classify"])
    second = await start_service(other, ["classify"])
    report = await request_reload(settings, wait=10)
    answers = _mine(report, first, second)
    assert len(answers) == 2 and all(a.applied for a in answers.values())
    assert len({a.hash for a in answers.values()}) == 2
    assert not report.ok and "different configurations" in report.verdict()

    # A process the registry lists but that does not answer (gone without a goodbye).
    heartbeat = second._heartbeat
    assert heartbeat is not None
    await db.execute(
        "INSERT INTO processes (id, host, pid, role, stages, config_hash, started_at,"
        " heartbeat_at) VALUES ('ghost:1:x', 'ghost', 1, 'consume', '{status}', 'abc', now(),"
        " now())"
    )
    try:
        report = await request_reload(settings, wait=1.5)
        assert [row.label for row in report.missing] == ["ghost:1:consume"]
        assert "no answer from 1 (ghost:1:consume)" in report.verdict()
        assert any(
            line.startswith("ghost:1:consume [status]: no answer within 1.5 s")
            for line in report.lines()
        )
    finally:
        await db.execute("DELETE FROM processes WHERE id = 'ghost:1:x'")


async def test_sighup_reloads_and_announces_the_answer_on_the_bus(
    start_service: StartService, settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "omniroute.yaml"
    secret = _with_token_file(path, AUTH_TOKEN)
    service = await start_service(path, ["classify"])
    async with tap(settings.amqp_url.get_secret_value(), EventType.CONFIG_RELOAD_ANSWERED) as seen:
        secret.write_text(ROTATED + "\n")
        service.reload_config()  # what SIGHUP calls

        me = service._heartbeat.identity.id  # type: ignore[union-attr]
        event = await seen.next(10, where=lambda e: e["data"].get("process_id") == me)
    envelope = Envelope.model_validate(event)
    answer = ConfigReloadAnswered.model_validate(envelope.data)
    assert answer.applied and answer.hash == _expected_hash(path) != answer.previous_hash
    assert envelope.account == "*" and envelope.causation_id is None
    assert (
        ROTATED not in envelope.model_dump_json() and AUTH_TOKEN not in envelope.model_dump_json()
    )


async def test_a_stage_that_cannot_bind_makes_the_answer_not_applied(
    start_service: StartService, settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "omniroute.yaml"
    secret = _with_token_file(path, AUTH_TOKEN)
    service = await start_service(path, ["lifecycle"])
    before = service.config_hash()
    (runner,) = service._runners

    async def broker_away() -> None:
        raise ConnectionError("channel closed")

    runner.follow_config = broker_away  # type: ignore[method-assign]
    secret.write_text(ROTATED + "\n")
    report = await request_reload(settings, wait=10)
    (answer,) = _mine(report, service).values()
    assert not answer.applied
    assert answer.hash == _expected_hash(path) != before == answer.previous_hash
    assert answer.error is not None and answer.error.startswith(BIND_FAILED)
    assert "stage lifecycle" in answer.error and "ConnectionError: channel closed" in answer.error
    assert not report.ok
    assert f"could not bind its queues: 1 ({answer.process})" in report.verdict()
    (line,) = [line for line in report.lines() if line.startswith(answer.process)]
    assert f"not applied, runs config {answer.hash} (was {before}) but its queues" in line
    assert "stage lifecycle could not bind" in line


async def test_a_token_pasted_as_a_file_path_stays_out_of_the_answer(
    start_service: StartService, settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "omniroute.yaml"
    _with_token_file(path, AUTH_TOKEN)
    service = await start_service(path, ["classify"])
    pasted = "0123456789abcdef0123456789abcdef"  # the token, pasted where its file goes
    text = path.read_text()
    path.write_text(
        text.replace("auth_token_file: omniroute-contoso-token", f"auth_token_file: {pasted}")
    )
    assert pasted in path.read_text()
    report = await request_reload(settings, wait=10)
    (answer,) = _mine(report, service).values()
    assert not answer.applied and answer.error is not None
    assert "auth_token_file" in answer.error and f"{tmp_path}/…(32 chars)" in answer.error
    assert pasted not in answer.error and all(pasted not in line for line in report.lines())


async def test_a_reload_reads_files_off_the_event_loop_and_swaps_on_it(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "omniroute.yaml"
    _with_token_file(path, AUTH_TOKEN)
    live = LiveConfig(load_config(path, ENVIRON), path)
    service = Service(settings, live, [], serve_http=False)  # not started: no bus, no registry
    for name, value in ENVIRON.items():
        monkeypatch.setenv(name, value)
    slow_disk = 0.5

    def slow_load(*args: object, **kwargs: object) -> Config:
        time.sleep(slow_disk)  # a slow mount (or, before the fix, a FIFO's open())
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    real_load = config_loader.load_config
    monkeypatch.setattr(config_loader, "load_config", slow_load)
    swapped_on: list[int] = []
    real_apply = live.apply

    def apply(config: Config) -> None:
        swapped_on.append(threading.get_ident())
        real_apply(config)

    monkeypatch.setattr(live, "apply", apply)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        answer = await service.reload()
    finally:
        ticker.cancel()
    assert ConfigReloadAnswered.model_validate(answer.data).applied
    assert ticks >= 10, ticks  # the loop kept running while the files were read
    assert swapped_on == [threading.get_ident()]  # the swap ran on the loop's thread


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


@pytest.mark.timeout(120)
async def test_the_cli_reports_each_real_process_and_exits_by_the_truth(
    infra: Infra, db: asyncpg.Pool, tmp_path: Path
) -> None:
    path = tmp_path / "omniroute.yaml"
    secret = _with_token_file(path, AUTH_TOKEN)
    env = {
        **os.environ,
        **ENVIRON,
        "OMNIROUTE_AMQP_URL": infra.amqp_url,
        "OMNIROUTE_DATABASE_URL": infra.database_url,
        "OMNIROUTE_CONFIG": str(path),
        "OMNIROUTE_TWILIO_API_URL": "http://127.0.0.1:9",
        "OMNIROUTE_HTTP_HOST": "127.0.0.1",
        "OMNIROUTE_HTTP_PORT": "0",
        "OMNIROUTE_RECONCILE_INTERVAL": "0",
        "OMNIROUTE_LOG_FORMAT": "json",
        "OMNIROUTE_LOG_LEVEL": "debug",
    }
    logs = tmp_path / "processes.log"
    procs: list[asyncio.subprocess.Process] = []
    with logs.open("wb") as sink:
        for command in (["serve"], ["consume", "classify"]):
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "omniroute", *command, env=env, stdout=sink, stderr=sink
                )
            )
    pids = [p.pid for p in procs]
    try:

        async def registered() -> bool:
            count = await db.fetchval(
                "SELECT count(*) FROM processes WHERE pid = ANY($1::int[])", pids
            )
            return bool(count == 2)

        await wait_for(registered, timeout=30, interval=0.2)
        before = _expected_hash(path)
        secret.write_text(ROTATED + "\n")
        after = _expected_hash(path)

        code, out, err = await _cli("config", "reload", "--wait", "10", env=env)
        assert code == 0, out + err
        mine = [line for line in out.splitlines() if any(f":{pid}:" in line for pid in pids)]
        assert len(mine) == 2, out
        assert all(f"applied, config {after} (was {before})" in line for line in mine)
        assert any(":serve: applied" in line for line in mine)
        assert any(":consume [classify]: applied" in line for line in mine)
        assert f"config {after}" in out.splitlines()[-1]

        code, out, err = await _cli("status", env=env)
        assert code == 0, err
        for pid in pids:
            assert any(f":{pid}:" in line and after in line for line in out.splitlines()), out

        secret.unlink()
        code, out, err = await _cli("config", "reload", "--wait", "10", env=env)
        assert code == 1
        mine = [line for line in out.splitlines() if any(f":{pid}:" in line for pid in pids)]
        assert len(mine) == 2, out
        assert all(f"refused, keeps config {after}: {path}:" in line for line in mine), out
        assert all(str(secret) in line for line in mine)
        assert err.startswith("omniroute config reload: reload not applied everywhere: refused by")

        secret.write_text(ROTATED + "\n")
        procs[1].send_signal(signal.SIGKILL)  # gone without a goodbye: its row stays live a while
        await procs[1].wait()
        code, out, err = await _cli("config", "reload", "--wait", "2", env=env)
        assert code == 1
        assert "no answer from 1 (" in err and f":{pids[1]}:consume)" in err
        assert f":{pids[0]}:serve: applied, config {after} (unchanged)" in out
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            for proc in procs:
                await proc.wait()
    assert procs[0].returncode == 0
    gone = await db.fetchval("SELECT count(*) FROM processes WHERE pid = $1", pids[0])
    assert gone == 0  # a clean stop leaves the registry
    text = logs.read_text()
    assert AUTH_TOKEN not in text and ROTATED not in text
    assert "config.reloaded" in text and "config.reload_failed" in text
