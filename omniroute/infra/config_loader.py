"""Load and validate the YAML configuration; errors name the file, line and field."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import SecretStr, ValidationError

from omniroute.errors import ConfigError
from schemas.config import Config

Loc = tuple[str | int, ...]
T = TypeVar("T")


def _lines(node: yaml.Node, path: Loc, out: dict[Loc, int]) -> None:
    """Record the 1-based line of every key and item in the document."""
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*path, str(key.value))
            out[child] = key.start_mark.line + 1
            _lines(value, child, out)
            out[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _lines(item, (*path, index), out)


def _line_of(loc: Loc, lines: dict[Loc, int]) -> int:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return 1


def _field(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def parse_config(
    text: str, source: str, environ: Mapping[str, str], *, require_secrets: bool = True
) -> Config:
    """Validate configuration text; raise ConfigError listing every problem.

    ``environ`` supplies the secrets named by ``auth_token_env`` / ``webhook_keys_env`` and
    the bots' ``token_env``.
    With ``require_secrets=False`` (``config check`` on a build machine) a missing secret
    is not an error.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # One line: the problem and where (PyYAML's str() adds the source snippet).
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        column = f", column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        why = f"{context}, {problem}" if context else problem
        raise ConfigError([f"{source}:{line}: not valid YAML{column}: {why}"]) from None
    if not isinstance(data, dict) or node is None:
        raise ConfigError([f"{source}:1: expected a mapping with an 'accounts' list"])
    lines: dict[Loc, int] = {}
    _lines(node, (), lines)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = _yaml_loc(tuple(error["loc"]), lines)
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{source}:{_line_of(loc, lines)}: {_field(loc)}: {message}")
        raise ConfigError(problems) from None
    references = config.reference_problems()
    if references:
        raise ConfigError(
            [f"{source}:{_line_of(loc, lines)}: {_field(loc)}: {msg}" for loc, msg in references]
        )
    return _with_secrets(config, source, lines, environ, require_secrets)


_UNION_TAGS = frozenset({"test", "all", "any", "not"})


def _yaml_loc(loc: Loc, lines: dict[Loc, int]) -> Loc:
    """Drop the tags pydantic adds for tagged unions (conditions), keeping YAML's path."""
    out: Loc = ()
    for index, part in enumerate(loc):
        following = loc[index + 1] if index + 1 < len(loc) else None
        if part in _UNION_TAGS and (
            part == "test"
            or following == part
            or (*out, part) not in lines
            or (
                isinstance(following, str)
                and following not in _UNION_TAGS
                and (*out, part, following) not in lines
            )
        ):
            continue  # pydantic's tag for the union member, not a YAML key
        out = (*out, part)
    return out


def _with_secrets(
    config: Config,
    source: str,
    lines: dict[Loc, int],
    environ: Mapping[str, str],
    require_secrets: bool,
) -> Config:
    problems: list[str] = []
    accounts = []
    for index, account in enumerate(config.accounts):
        token = environ.get(account.auth_token_env)
        if not token and require_secrets:
            loc: Loc = ("accounts", index, "auth_token_env")
            problems.append(
                f"{source}:{_line_of(loc, lines)}: accounts[{index}].auth_token_env: "
                f"environment variable {account.auth_token_env} is not set"
            )
        keys = {}
        for key_id, env in account.webhook_keys_env.items():
            secret = environ.get(env)
            if secret:
                keys[key_id] = SecretStr(secret)
            elif require_secrets:
                loc = ("accounts", index, "webhook_keys_env", key_id)
                problems.append(
                    f"{source}:{_line_of(loc, lines)}: accounts[{index}].webhook_keys_env."
                    f"{key_id}: environment variable {env} is not set"
                )
        accounts.append(
            account.model_copy(
                update={"auth_token": SecretStr(token) if token else None, "webhook_keys": keys}
            )
        )
    workstreams = []
    for index, workstream in enumerate(config.workstreams):
        bot = workstream.bot
        if bot is None or bot.token_env is None:
            workstreams.append(workstream)
            continue
        token = environ.get(bot.token_env)
        if not token and require_secrets:
            loc = ("workstreams", index, "bot", "token_env")
            problems.append(
                f"{source}:{_line_of(loc, lines)}: workstreams[{index}].bot.token_env: "
                f"environment variable {bot.token_env} is not set"
            )
        resolved = bot.model_copy(update={"token": SecretStr(token) if token else None})
        workstreams.append(workstream.model_copy(update={"bot": resolved}))
    if problems:
        raise ConfigError(problems)
    return config.model_copy(update={"accounts": accounts, "workstreams": workstreams})


def load_config(path: Path, environ: Mapping[str, str], *, require_secrets: bool = True) -> Config:
    """Read and validate the configuration file at ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read configuration: {exc.strerror}"]) from None
    return parse_config(text, str(path), environ, require_secrets=require_secrets)


class LiveConfig:
    """The current configuration, swapped atomically on reload (SIGHUP).

    Work in flight keeps the ``Config`` object it started with; new work sees the new one.
    """

    def __init__(self, config: Config, path: Path | None = None) -> None:
        self.current = config
        self.path = path
        self._derived: dict[str, tuple[Config, object]] = {}

    def derive(self, key: str, build: Callable[[Config], T]) -> T:
        """``build(current)``, computed once per loaded configuration (e.g. compiled rules)."""
        config = self.current
        cached = self._derived.get(key)
        if cached is None or cached[0] is not config:
            cached = (config, build(config))
            self._derived[key] = cached
        return cached[1]  # type: ignore[return-value]

    def reload(self, environ: Mapping[str, str]) -> Config:
        """Re-read the file; on error keep the current configuration and raise ConfigError."""
        if self.path is None:
            return self.current
        self.current = load_config(self.path, environ)
        return self.current
