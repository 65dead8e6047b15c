"""Load and validate the YAML configuration; errors name the file, line and field."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import structlog
import yaml
from pydantic import SecretStr, ValidationError

from omniroute.errors import ConfigError
from omniroute.infra.secret_files import SecretFileError, parse_keys, read_secret
from schemas.config import Account, Config, Workstream

log = structlog.get_logger("omniroute.config")

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
    text: str,
    source: str,
    environ: Mapping[str, str],
    *,
    require_secrets: bool = True,
    base: Path | None = None,
) -> Config:
    """Validate configuration text; raise ConfigError listing every problem.

    ``environ`` supplies the secrets named by ``auth_token_env`` / ``webhook_keys_env`` and
    the bots' ``token_env``; ``*_file`` secrets are read now, relative paths from ``base``
    (default: the folder of ``source``, the configuration file).
    With ``require_secrets=False`` (``config check`` on a build machine) a missing secret
    (variable unset, file absent or empty) is not an error; a malformed one still is.
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
    folder = Path(source).parent if base is None else base
    return _with_secrets(config, _Secrets(source, lines, environ, folder, require_secrets))


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


class _Secrets:
    """Resolves every secret the configuration names, collecting problems as it goes.

    A problem names the configuration's file, line and field, and the variable or secret
    file's path; never a secret's value.
    """

    def __init__(
        self,
        source: str,
        lines: dict[Loc, int],
        environ: Mapping[str, str],
        base: Path,
        require: bool,
    ) -> None:
        self.source, self.lines, self.environ = source, lines, environ
        self.base, self.require = base, require
        self.problems: list[str] = []

    def _problem(self, loc: Loc, message: str) -> None:
        self.problems.append(f"{self.source}:{_line_of(loc, self.lines)}: {_field(loc)}: {message}")

    def env(self, loc: Loc, name: str) -> SecretStr | None:
        value = self.environ.get(name)
        if value:
            return SecretStr(value)
        if self.require:
            self._problem(loc, f"environment variable {name} is not set")
        return None

    def _read(self, loc: Loc, written: Path, parse: Callable[[str, Path], T]) -> T | None:
        path = self.base / written  # an absolute path stays as written
        try:
            return parse(read_secret(path), path)
        except SecretFileError as exc:
            if self.require or not exc.absent:
                self._problem(loc, str(exc))
            return None

    def file(self, loc: Loc, written: Path) -> SecretStr | None:
        return self._read(loc, written, lambda text, _: SecretStr(text))

    def keys_file(self, loc: Loc, written: Path) -> dict[str, SecretStr]:
        return self._read(loc, written, parse_keys) or {}

    def account(self, index: int, account: Account) -> Account:
        at: Loc = ("accounts", index)
        if account.auth_token_file is not None:
            token = self.file((*at, "auth_token_file"), account.auth_token_file)
        else:
            assert account.auth_token_env is not None  # the model requires one of the two
            token = self.env((*at, "auth_token_env"), account.auth_token_env)
        if account.webhook_keys_file is not None:
            keys = self.keys_file((*at, "webhook_keys_file"), account.webhook_keys_file)
        else:
            keys = {}
            for key_id, env in account.webhook_keys_env.items():
                secret = self.env((*at, "webhook_keys_env", key_id), env)
                if secret is not None:
                    keys[key_id] = secret
        return account.model_copy(update={"auth_token": token, "webhook_keys": keys})

    def workstream(self, index: int, workstream: Workstream) -> Workstream:
        bot = workstream.bot
        if bot is None:
            return workstream
        at: Loc = ("workstreams", index, "bot")
        if bot.token_file is not None:
            token = self.file((*at, "token_file"), bot.token_file)
        elif bot.token_env is not None:
            token = self.env((*at, "token_env"), bot.token_env)
        else:
            return workstream
        return workstream.model_copy(update={"bot": bot.model_copy(update={"token": token})})


def _with_secrets(config: Config, secrets: _Secrets) -> Config:
    accounts = [secrets.account(i, account) for i, account in enumerate(config.accounts)]
    workstreams = [secrets.workstream(i, w) for i, w in enumerate(config.workstreams)]
    if secrets.problems:
        raise ConfigError(secrets.problems)
    return config.model_copy(update={"accounts": accounts, "workstreams": workstreams})


def load_config(path: Path, environ: Mapping[str, str], *, require_secrets: bool = True) -> Config:
    """Read and validate the configuration file at ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read configuration: {exc.strerror}"]) from None
    return parse_config(text, str(path), environ, require_secrets=require_secrets)


TokenLabel = Literal["current", "previous"]
DEFAULT_TOKEN_OVERLAP = 900.0  # Settings.token_rotation_overlap's default, for callers without


class LiveConfig:
    """The current configuration, swapped atomically on reload (SIGHUP).

    Work in flight keeps the ``Config`` object it started with; new work sees the new one.

    Token rotation: when a reload changes an account's auth token, the previous one stays
    accepted for webhook signatures (``accepted_tokens``) for ``token_overlap`` seconds after
    that reload, since Twilio keeps signing with the old token until the operator promotes
    the new one and its change propagates. Only the token just replaced is kept: a second
    change within the overlap drops the one before. The overlap is this process's memory:
    a process started after the change knows only the current token.
    """

    def __init__(
        self,
        config: Config,
        path: Path | None = None,
        *,
        token_overlap: float = DEFAULT_TOKEN_OVERLAP,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.current = config
        self.path = path
        self.token_overlap = token_overlap
        self._clock = clock
        self._derived: dict[str, tuple[Config, object]] = {}
        # account name → (the auth token before the last change, accepted until clock())
        self._previous: dict[str, tuple[SecretStr, float]] = {}

    def derive(self, key: str, build: Callable[[Config], T]) -> T:
        """``build(current)``, computed once per loaded configuration (e.g. compiled rules)."""
        config = self.current
        cached = self._derived.get(key)
        if cached is None or cached[0] is not config:
            cached = (config, build(config))
            self._derived[key] = cached
        return cached[1]  # type: ignore[return-value]

    def load(self, environ: Mapping[str, str]) -> Config | None:
        """Read the file and its secret files again, without making the result current (None
        without a file). Touches no state, so a process runs it in a worker thread
        (``asyncio.to_thread``) and keeps file reads off its event loop, then calls ``apply``
        on the loop. Raises ConfigError."""
        if self.path is None:
            return None
        return load_config(self.path, environ)

    def reload(self, environ: Mapping[str, str]) -> Config:
        """Re-read the file and its secret files; on error keep the current configuration
        (and the tokens it accepts) and raise ConfigError. Synchronous: a running process
        uses ``load`` in a thread, then ``apply``."""
        config = self.load(environ)
        if config is not None:
            self.apply(config)
        return self.current

    def apply(self, config: Config) -> None:
        """Make ``config`` current, remembering each auth token it replaces (see the class).
        Call it from the thread that reads ``current`` (a process's event loop)."""
        now = self._clock()
        previous: dict[str, tuple[SecretStr, float]] = {}
        for account in config.accounts:
            new = account.auth_token
            old_account = self.current.account(account.name)
            old = old_account.auth_token if old_account is not None else None
            kept = self._previous.get(account.name)
            if old is not None and not _same(old, new):
                if self.token_overlap > 0:
                    previous[account.name] = (old, now + self.token_overlap)
                    log.info(
                        "config.token_rotated",
                        account=account.name,
                        previous_accepted_for=self.token_overlap,
                    )
            elif kept is not None and kept[1] > now and not _same(kept[0], new):
                previous[account.name] = kept
        self._previous = previous
        self.current = config

    def accepted_tokens(self, account_name: str) -> list[tuple[TokenLabel, SecretStr]]:
        """The auth tokens a webhook for this account may be signed with, current first:
        ``[("current", token)]``, plus ``("previous", token)`` within the overlap after a
        rotation. Empty for an unknown account or one whose token was not resolved."""
        account = self.current.account(account_name)
        if account is None:
            return []
        tokens: list[tuple[TokenLabel, SecretStr]] = []
        if account.auth_token is not None:
            tokens.append(("current", account.auth_token))
        kept = self._previous.get(account_name)
        if kept is not None and self._clock() < kept[1]:
            tokens.append(("previous", kept[0]))
        return tokens


def _same(a: SecretStr, b: SecretStr | None) -> bool:
    return b is not None and hmac.compare_digest(
        a.get_secret_value().encode(), b.get_secret_value().encode()
    )
