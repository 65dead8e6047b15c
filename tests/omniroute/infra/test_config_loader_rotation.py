"""Auth token rotation in ``LiveConfig``: a reload that changes an account's token keeps the
previous one accepted for the overlap, then only the current one."""

from __future__ import annotations

import logging
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
import structlog.testing
from pydantic import SecretStr

from omniroute.errors import ConfigError
from omniroute.infra import config_loader
from omniroute.infra.config_loader import LiveConfig, load_config

OLD = "old-token-1a2b3c-secret"
NEW = "new-token-4d5e6f-secret"
NEWER = "newer-token-7a8b9c-secret"
OVERLAP = 600.0

ACCOUNT = """\
  - name: {name}
    account_sid: AC0000000000000000000000000000000{n}
    auth_token_file: secrets/{name}
    numbers:
      - {{name: Support, number: "+551199999000{n}", workstream: support}}
"""
TAIL = """\
workstreams:
  - {name: support, fallback_queue: general}
queues:
  - {name: general}
"""


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Deployment:
    """A configuration file with its accounts' token files, and the process's LiveConfig."""

    def __init__(self, folder: Path, overlap: float = OVERLAP) -> None:
        self.folder = folder
        self.clock = Clock()
        self.accounts: dict[str, str] = {}
        self.write(contoso=OLD)
        self.live = LiveConfig(
            load_config(self.path, {}), self.path, token_overlap=overlap, clock=self.clock
        )

    @property
    def path(self) -> Path:
        return self.folder / "omniroute.yaml"

    def write(self, **tokens: str) -> None:
        (self.folder / "secrets").mkdir(exist_ok=True)
        for name, token in tokens.items():
            (self.folder / "secrets" / name).write_text(token + "\n")
        accounts = "".join(
            ACCOUNT.format(name=name, n=n) for n, name in enumerate(sorted(tokens), start=1)
        )
        self.path.write_text("accounts:\n" + accounts + TAIL)

    def reload(self, **tokens: str) -> None:
        self.write(**tokens)
        self.live.reload({})

    def accepted(self, account: str = "contoso") -> list[tuple[str, str]]:
        return [(label, t.get_secret_value()) for label, t in self.live.accepted_tokens(account)]


@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    return Deployment(tmp_path)


def test_only_the_current_token_before_any_rotation(deployment: Deployment) -> None:
    assert deployment.accepted() == [("current", OLD)]
    deployment.reload(contoso=OLD)  # a reload that changes nothing rotates nothing
    assert deployment.accepted() == [("current", OLD)]


def test_the_previous_token_is_accepted_until_the_overlap_ends(deployment: Deployment) -> None:
    deployment.reload(contoso=NEW)
    assert deployment.accepted() == [("current", NEW), ("previous", OLD)]
    deployment.clock.now += OVERLAP - 0.001
    assert deployment.accepted() == [("current", NEW), ("previous", OLD)]
    deployment.clock.now += 0.001
    assert deployment.accepted() == [("current", NEW)]


def test_the_overlap_runs_from_the_change_not_from_later_reloads(
    deployment: Deployment,
) -> None:
    deployment.reload(contoso=NEW)
    deployment.clock.now += OVERLAP / 2
    deployment.reload(contoso=NEW)  # unrelated reload: the previous token is kept, same end
    assert deployment.accepted() == [("current", NEW), ("previous", OLD)]
    deployment.clock.now += OVERLAP / 2
    assert deployment.accepted() == [("current", NEW)]


def test_a_second_rotation_keeps_only_the_token_it_replaced(deployment: Deployment) -> None:
    deployment.reload(contoso=NEW)
    deployment.clock.now += 10
    deployment.reload(contoso=NEWER)
    assert deployment.accepted() == [("current", NEWER), ("previous", NEW)]
    deployment.clock.now += OVERLAP - 5  # past the first rotation's end, within the second's
    assert deployment.accepted() == [("current", NEWER), ("previous", NEW)]


def test_rotating_back_does_not_keep_the_current_token_as_previous(
    deployment: Deployment,
) -> None:
    deployment.reload(contoso=NEW)
    deployment.reload(contoso=OLD)
    assert deployment.accepted() == [("current", OLD), ("previous", NEW)]


def test_a_refused_reload_keeps_both_tokens(deployment: Deployment) -> None:
    deployment.reload(contoso=NEW)
    (deployment.folder / "secrets" / "contoso").write_text("")
    with pytest.raises(ConfigError) as raised:
        deployment.live.reload({})
    assert "is empty" in raised.value.problems[0]
    assert deployment.accepted() == [("current", NEW), ("previous", OLD)]


def test_no_overlap_means_no_previous_token(tmp_path: Path) -> None:
    deployment = Deployment(tmp_path, overlap=0)
    deployment.reload(contoso=NEW)
    assert deployment.accepted() == [("current", NEW)]


def test_accounts_added_and_removed(deployment: Deployment) -> None:
    deployment.reload(contoso=NEW, fabrikam=NEWER)
    assert deployment.accepted("fabrikam") == [("current", NEWER)]
    deployment.reload(fabrikam=NEWER)
    assert deployment.accepted("contoso") == []
    deployment.reload(contoso=OLD, fabrikam=NEWER)  # back, with no memory of its old token
    assert deployment.accepted("contoso") == [("current", OLD)]
    assert deployment.accepted("nobody") == []


def test_in_process_apply_rotates_like_a_reload(deployment: Deployment) -> None:
    current = deployment.live.current
    account = current.accounts[0].model_copy(update={"auth_token": SecretStr(NEW)})
    deployment.live.apply(current.model_copy(update={"accounts": [account]}))
    assert deployment.accepted() == [("current", NEW), ("previous", OLD)]


@pytest.fixture
def captured_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[MutableMapping[str, Any]]]:
    """The config loader's log entries, whatever an earlier test did to structlog's global
    configuration: a fresh logger (the module's may be cached by a CLI run in this process)
    and structlog's own capture (structlog.testing.capture_logs)."""
    previous = structlog.get_config()
    # An earlier CLI test may have left every logger filtered at "critical" (the CLI quiets
    # the drivers so), which capture_logs, replacing only the processors, would not undo.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    monkeypatch.setattr(config_loader, "log", structlog.get_logger("omniroute.config"))
    try:
        with structlog.testing.capture_logs() as entries:
            yield entries
    finally:
        structlog.configure(**previous)


def test_the_rotation_is_logged_without_either_token(
    deployment: Deployment, captured_logs: list[MutableMapping[str, Any]]
) -> None:
    deployment.reload(contoso=NEW)
    deployment.reload(contoso=NEWER)
    rotated = [e for e in captured_logs if e["event"] == "config.token_rotated"]
    assert [(e["account"], e["previous_accepted_for"], e["log_level"]) for e in rotated] == [
        ("contoso", OVERLAP, "info"),
        ("contoso", OVERLAP, "info"),
    ]
    written = repr(captured_logs)
    assert OLD not in written and NEW not in written and NEWER not in written
