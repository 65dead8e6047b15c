"""``omniroute agents add|list|set|remove`` against the real database.

The arguments go through the real parser (``add_agents_parser``) and ``cmd_agents`` runs
its own event loop, as it does under ``omniroute``; so these tests are synchronous.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from omniroute.commands.agents_cli import add_agents_parser, cmd_agents
from omniroute.domain.agents import agent_by_token
from omniroute.infra.settings import Settings
from omniroute.infra.store import Connection, Store
from tests.conftest import Infra, make_settings
from tests.support import CONFIG_YAML

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "omniroute.yaml"
    path.write_text(CONFIG_YAML, encoding="utf-8")
    return path


@pytest.fixture
def cli_settings(infra: Infra, config_file: Path) -> Settings:
    return make_settings(infra, config=config_file)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="omniroute")
    add_agents_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], cli_settings: Settings) -> Run:
    def run(*argv: str, settings: Settings | None = None) -> tuple[int, str, str]:
        code = cmd_agents(_parse("agents", *argv), settings or cli_settings)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _in_db(settings: Settings, query: Callable[[Connection], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``query`` on a connection, on a loop of its own (the test is synchronous)."""

    async def main() -> Any:
        store = Store(settings.database_url.get_secret_value(), max_size=1)
        try:
            async with store.transaction() as conn:
                return await query(conn)
        finally:
            await store.close()

    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        return runner.run(main())


def _listed(run: Run) -> dict[str, dict[str, Any]]:
    code, out, _ = run("list", "--json")
    assert code == 0
    return {a["id"]: a for a in json.loads(out)}


def _name() -> str:
    return f"cli-{uuid.uuid4().hex[:10]}"


def test_add_list_set_remove(run: Run, cli_settings: Settings) -> None:
    name = _name()
    code, out, err = run(
        "add", name, "--queue", "general", "--queue", "billing", "--skill", "billing=7",
        "--capacity", "2", "--language", "pt-BR",
    )  # fmt: skip
    assert code == 0, err
    token = re.search(r"^token \(shown once\): (omr_\S+)$", out, re.MULTILINE)
    assert token is not None
    row = next(line for line in out.splitlines() if name in line)
    agent_id = row.split()[0]
    assert row.split()[1:] == [name, "offline", "0/2", "general,billing", "billing=7", "pt-BR"]
    found = _in_db(cli_settings, lambda conn: agent_by_token(conn, token[1]))
    assert found is not None and str(found["id"]) == agent_id

    listed = _listed(run)[agent_id]
    assert "token" not in listed and "token_hash" not in listed
    assert (listed["name"], listed["queues"], listed["capacity"]) == (
        name,
        ["general", "billing"],
        2,
    )
    code, out, _ = run("list", "--queue", "billing")
    assert code == 0 and name in out and out.splitlines()[0].split()[0] == "ID"
    assert token[1] not in out

    code, out, err = run(
        "set", agent_id, "--capacity", "0", "--skill", "billing=9", "--skill", "sales=2",
        "--presence", "away",
    )  # fmt: skip
    assert code == 0, err
    assert "presence offline → away" in out
    changed = _listed(run)[agent_id]
    assert changed["skills"] == {"billing": 9, "sales": 2}
    assert (changed["capacity"], changed["presence"]) == (0, "away")
    assert changed["queues"] == ["general", "billing"]
    code, out, err = run("set", agent_id, "--name", name + "-renamed", "--queue", "sales")
    assert code == 0, err
    assert "presence" not in out
    assert _listed(run)[agent_id]["queues"] == ["sales"]

    code, out, _ = run("remove", agent_id)
    assert code == 0 and agent_id in out
    assert agent_id not in _listed(run)
    assert _in_db(cli_settings, lambda conn: agent_by_token(conn, token[1])) is None
    for argv in (("remove", agent_id), ("set", agent_id, "--capacity", "1")):
        code, _, err = run(*argv)
        assert code == 1 and f"no agent with id {agent_id}" in err


def test_invalid_input_is_refused_with_the_reason(run: Run) -> None:
    name = _name()
    code, _, err = run("add", name, "--queue", "general", "--queue", "nowhere", "--capacity", "1")
    assert code == 1
    assert "unknown queue: nowhere" in err and "general" in err
    code, _, err = run("add", name, "--skill", "billing=11", "--capacity", "1")
    assert code == 1 and "invalid skills.billing" in err
    code, _, err = run("add", name, "--capacity", "-1")
    assert code == 1 and "invalid capacity" in err
    assert name not in json.dumps(_listed(run))

    code, _, err = run("set", str(uuid.uuid4()))
    assert code == 1 and "at least one field" in err
    code, _, err = run("set", "not-an-id", "--capacity", "1")
    assert code == 1 and "no agent with id not-an-id" in err
    code, _, err = run("remove", "not-an-id")
    assert code == 1

    for argv in (
        ("add", name, "--skill", "billing", "--capacity", "1"),
        ("add", name),  # --capacity is required
        ("set", "x", "--presence", "asleep"),
    ):
        with pytest.raises(SystemExit):
            _parse("agents", *argv)


def test_without_a_config_file_queues_are_not_checked(
    run: Run, infra: Infra, tmp_path: Path
) -> None:
    settings = make_settings(infra, config=tmp_path / "missing.yaml")
    code, out, err = run(
        "add", _name(), "--queue", "unconfigured", "--capacity", "0", settings=settings
    )
    assert code == 0
    assert "missing.yaml not found; queue names are not checked" in err
    agent_id = next(line for line in out.splitlines() if "unconfigured" in line).split()[0]
    assert run("remove", agent_id)[0] == 0


def test_an_unreachable_database_is_reported(run: Run, infra: Infra) -> None:
    settings = make_settings(
        infra, database_url="postgresql://127.0.0.1:1/nowhere", db_connect_timeout=1.0
    )
    code, _, err = run("list", settings=settings)
    assert code == 1 and "database unreachable" in err
