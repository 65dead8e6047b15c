"""The configuration model: one YAML file, validated here (no I/O in this module).

Secrets never live in the file: an account names where its auth token is, an environment
variable (``auth_token_env``) or a file such as a mounted Docker or Kubernetes secret
(``auth_token_file``); the loader reads it, at every load and reload, into a ``SecretStr``.
"""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from schemas.rules import RouteRule, Ruleset
from schemas.twilio import ACCOUNT_SID, E164

Name = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$", strip_whitespace=True)
]
ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
DURATION = re.compile(r"^(?P<n>[0-9]+)(?P<unit>ms|s|m|h|d)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str | int | float) -> float:
    """``"60s"``, ``"5m"``, ``"2h"``, ``"1d"`` or a number of seconds → seconds."""
    if isinstance(value, int | float):
        return float(value)
    match = DURATION.match(value.strip())
    if not match:
        raise ValueError(f"expected a duration such as 30s, 5m, 2h or 1d, got {value!r}")
    return int(match["n"]) * _UNIT_SECONDS[match["unit"]]


Duration = Annotated[float, Field(ge=0)]


class Strict(BaseModel):
    """Configuration rejects unknown keys, so a typo is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class WhatsAppNumber(Strict):
    name: str = Field(min_length=1, max_length=100)
    number: str = Field(description="the WhatsApp sender in E.164, e.g. +5511999990000")
    workstream: Name
    sandbox: bool = False

    @field_validator("number")
    @classmethod
    def _e164(cls, value: str) -> str:
        if value.startswith("whatsapp:"):
            raise ValueError("write the number without the 'whatsapp:' prefix, e.g. +14155238886")
        if not E164.match(value):
            raise ValueError("expected an E.164 number such as +5511999990000")
        return value


class Account(Strict):
    name: Name = Field(description="URL segment: /twilio/<name>/inbound and /status")
    account_sid: str
    auth_token_env: str | None = Field(
        default=None,
        description="environment variable holding the auth token (this or auth_token_file)",
    )
    auth_token_file: Path | None = Field(
        default=None,
        description="file holding the auth token, e.g. a Docker or Kubernetes secret such as"
        " /run/secrets/twilio_contoso (relative to the configuration file); read again at"
        " every reload, one trailing newline ignored",
    )
    webhook_keys_env: dict[str, str] = Field(
        default_factory=dict,
        description="HMAC-SHA256 webhook signing: shared key id → environment variable",
    )
    webhook_keys_file: Path | None = Field(
        default=None,
        description="HMAC-SHA256 webhook signing keys from a file of 'key_id=secret' lines"
        " ('#' comments and blank lines ignored), instead of webhook_keys_env",
    )
    numbers: list[WhatsAppNumber] = Field(min_length=1)
    # Resolved by the loader from the environment or the files, never read from this file.
    auth_token: SkipJsonSchema[SecretStr | None] = Field(default=None, exclude=True)
    webhook_keys: SkipJsonSchema[dict[str, SecretStr]] = Field(default_factory=dict, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _no_secrets_in_file(cls, data: object) -> object:
        if isinstance(data, dict) and ("auth_token" in data or "webhook_keys" in data):
            raise ValueError(
                "secrets do not belong in the file: name where they are with auth_token_env or"
                " auth_token_file / webhook_keys_env or webhook_keys_file"
            )
        return data

    @model_validator(mode="after")
    def _one_source_per_secret(self) -> Account:
        if (self.auth_token_env is None) == (self.auth_token_file is None):
            raise ValueError(
                "give the auth token as exactly one of auth_token_env (an environment"
                " variable) or auth_token_file (a path)"
            )
        if self.webhook_keys_env and self.webhook_keys_file is not None:
            raise ValueError(
                "give webhook keys with webhook_keys_env or webhook_keys_file, not both"
            )
        return self

    @property
    def auth_token_source(self) -> str:
        """Where the auth token is read from, for messages (``$VAR`` or ``file PATH``)."""
        if self.auth_token_env is not None:
            return f"${self.auth_token_env}"
        return f"file {self.auth_token_file}"

    @field_validator("account_sid")
    @classmethod
    def _sid(cls, value: str) -> str:
        if not ACCOUNT_SID.match(value):
            raise ValueError("expected an Account SID: AC followed by 32 hex digits")
        return value

    @field_validator("auth_token_env")
    @classmethod
    def _env(cls, value: str | None) -> str | None:
        if value is not None and not ENV_NAME.match(value):
            raise ValueError("expected an environment variable name such as TWILIO_AUTH_TOKEN")
        return value

    @field_validator("auth_token_file", "webhook_keys_file")
    @classmethod
    def _path(cls, value: Path | None) -> Path | None:
        if value is not None and str(value) in ("", "."):
            raise ValueError("expected the path of a file such as /run/secrets/twilio_contoso")
        return value

    @model_validator(mode="after")
    def _unique_numbers(self) -> Account:
        seen: set[str] = set()
        for number in self.numbers:
            if number.number in seen:
                raise ValueError(f"number {number.number} is listed twice")
            seen.add(number.number)
        return self

    def find_number(self, number: str) -> WhatsAppNumber | None:
        return next((n for n in self.numbers if n.number == number), None)


class Attachments(Strict):
    customers: bool = True
    agents: bool = True


class Distribution(Strict):
    mode: Literal["push", "pick"] = "push"
    offer_timeout: Duration = 60.0
    units: int = Field(default=1, ge=1)
    keep_same_agent: bool = True
    auto_accept: bool = False
    reoffer_after: Duration = Field(
        default=30.0,
        description="when every eligible agent has declined (or let expire) the offer, the"
        " conversation waits in its queue this long before they are offered it again; an"
        " agent who has not declined it gets it at once",
    )
    on_agent_offline: Literal["keep", "requeue"] = Field(
        default="keep",
        description="an agent going offline keeps its conversations (keep), or they go back"
        " to their queues ahead of others (requeue); removing an agent always requeues",
    )

    @field_validator("offer_timeout", "reoffer_after", mode="before")
    @classmethod
    def _duration(cls, value: str | int | float) -> float:
        return parse_duration(value)


class TemplateLanguage(Strict):
    content_sid: str = Field(pattern=r"^HX[0-9a-fA-F]{32}$")
    text: str = Field(min_length=1)


class Template(Strict):
    name: Name
    default_language: str
    languages: dict[str, TemplateLanguage] = Field(min_length=1)

    @model_validator(mode="after")
    def _default_present(self) -> Template:
        if self.default_language not in self.languages:
            raise ValueError(
                f"default_language {self.default_language!r} has no entry under languages"
            )
        return self


AutomatedMessageKind = Literal[
    "greeting",
    "out_of_hours",
    "queued",
    "agent_joined",
    "agent_ended",
    "idle_reminder",
    "closed",
    "attachments_not_allowed",
    "overflow",
]


class AutomatedMessage(Strict):
    """A message the system sends by itself, per language, with ``{placeholders}``.

    Outside the 24-hour window only ``template`` (a template of the workstream) may be sent;
    without one the message is skipped and the skip recorded.
    """

    text: dict[str, str] = Field(min_length=1, description="language → text")
    template: Name | None = None


class Survey(Strict):
    question: dict[str, str] = Field(min_length=1, description="language → question")
    template: Name | None = Field(default=None, description="used outside the window")
    scale: int = Field(default=5, ge=2, le=10)
    expires_after: Duration = 86400.0

    @field_validator("expires_after", mode="before")
    @classmethod
    def _duration(cls, value: str | int | float) -> float:
        return parse_duration(value)


class Lifecycle(Strict):
    """Conversation lifecycle timers; durations as 30s, 5m, 2h, 1d (0: off / immediate)."""

    wrap_up: Duration = Field(
        default=0.0, description="capacity held after the agent ends (0: close at once)"
    )
    idle_reminder_after: Duration | None = Field(
        default=None, description="customer silent this long: send the idle_reminder message"
    )
    auto_close_after: Duration | None = Field(
        default=None, description="customer silent this long: close the conversation"
    )
    reopen_within: Duration | None = Field(
        default=None,
        description="a customer writing within this time after a close reopens the conversation",
    )

    @field_validator(
        "wrap_up", "idle_reminder_after", "auto_close_after", "reopen_within", mode="before"
    )
    @classmethod
    def _duration(cls, value: str | int | float | None) -> float | None:
        return None if value is None else parse_duration(value)

    @model_validator(mode="after")
    def _reminder_before_close(self) -> Lifecycle:
        if (
            self.idle_reminder_after is not None
            and self.auto_close_after is not None
            and self.idle_reminder_after >= self.auto_close_after
        ):
            raise ValueError("idle_reminder_after must be shorter than auto_close_after")
        return self


DEFAULT_HANDOFF_KEYWORDS = ("agent", "human", "person", "atendente", "humano")


class Bot(Strict):
    """A bot that talks to the customer before any agent does, over Rasa's REST channel
    protocol (``POST {"sender", "message", "metadata"}``, answered by a list of
    ``{"recipient_id", "text"?, "image"?, "buttons"?, "custom"?}``). The conversation waits
    in the ``bot`` state, out of every queue, until the bot hands it off (a ``custom``
    ``{"handoff": true, …}``), fails, runs out of turns, or the customer asks for a person;
    then it is classified like any conversation, with what the bot collected. Or it ends at
    the bot: resolved (a ``custom`` ``{"resolved": true}``), or the customer silent for
    ``close_after``.
    """

    url: AnyHttpUrl = Field(
        description="the bot's REST webhook, e.g. http://rasa:5005/webhooks/rest/webhook"
    )
    token_env: str | None = Field(
        default=None,
        description="environment variable holding a token sent as 'Authorization: Bearer …'",
    )
    token_file: Path | None = Field(
        default=None,
        description="file holding that token instead (relative to the configuration file),"
        " read again at every reload, one trailing newline ignored",
    )
    timeout: Duration = Field(
        default=10.0,
        description="for every attempt at one customer message together (retries included)",
    )
    max_turns: int = Field(
        default=10, ge=1, description="bot answers before the conversation goes to agents"
    )
    handoff_on_error: bool = Field(
        default=True,
        description="the bot failing (timeout, 5xx, refused, invalid answer) hands the"
        " conversation to agents; false: the message is retried and, at the delivery limit,"
        " dead-lettered with the reason",
    )
    handoff_keywords: list[str] = Field(
        default_factory=lambda: list(DEFAULT_HANDOFF_KEYWORDS),
        description="whole words (any case): the customer asking for a person goes to agents"
        " without the bot being asked",
    )
    greeting: dict[str, str] = Field(
        default_factory=dict,
        description="language → text sent as the bot's first message (none: no greeting)",
    )
    buttons: Literal["text"] = Field(
        default="text",
        description="text: buttons become numbered choices after the text ('1. Yes');"
        " the customer's '1' goes to the bot as that button's payload",
    )
    close_after: Duration | None = Field(
        default=1800.0,
        description="the customer silent this long after the bot's last answer (or their own"
        " last message) closes the conversation, reason bot_idle (0 or null: never; a"
        " conversation still at the bot otherwise stays open until the customer writes)",
    )
    # Resolved by the loader from the environment or token_file, never read from this file.
    token: SkipJsonSchema[SecretStr | None] = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _no_token_in_file(cls, data: object) -> object:
        if isinstance(data, dict) and "token" in data:
            raise ValueError(
                "secrets do not belong in the file: name where the bot's token is with"
                " token_env or token_file"
            )
        return data

    @model_validator(mode="after")
    def _one_token_source(self) -> Bot:
        if self.token_env is not None and self.token_file is not None:
            raise ValueError("give the bot's token with token_env or token_file, not both")
        if self.token_file is not None and str(self.token_file) in ("", "."):
            raise ValueError("expected the path of a file such as /run/secrets/bot_token")
        return self

    @field_validator("token_env")
    @classmethod
    def _env(cls, value: str | None) -> str | None:
        if value is not None and not ENV_NAME.match(value):
            raise ValueError("expected an environment variable name such as BOT_TOKEN")
        return value

    @field_validator("timeout", mode="before")
    @classmethod
    def _duration(cls, value: str | int | float) -> float:
        seconds = parse_duration(value)
        if seconds <= 0:
            raise ValueError("the bot's timeout must be longer than 0")
        return seconds

    @field_validator("close_after", mode="before")
    @classmethod
    def _idle(cls, value: str | int | float | None) -> float | None:
        seconds = None if value is None else parse_duration(value)
        return seconds or None  # 0: off

    @field_validator("handoff_keywords")
    @classmethod
    def _words(cls, value: list[str]) -> list[str]:
        words = [w.strip() for w in value]
        if any(not w for w in words):
            raise ValueError("a hand-off keyword cannot be empty")
        return words


class Workstream(Strict):
    name: Name
    language: str = "en"
    timezone: str = Field(default="UTC", description="for time/weekday/date in rules")
    attachments: Attachments = Attachments()
    fallback_queue: Name
    distribution: Distribution = Distribution()
    templates: list[Template] = Field(default_factory=list)
    automated_messages: dict[AutomatedMessageKind, AutomatedMessage] = Field(default_factory=dict)
    survey: Survey | None = None
    lifecycle: Lifecycle = Lifecycle()
    classification: list[Ruleset] = Field(default_factory=list)
    routing: list[RouteRule] = Field(default_factory=list)
    bot: Bot | None = Field(
        default=None, description="a bot that answers new conversations before agents do"
    )

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        return _known_timezone(value)

    def template(self, name: str) -> Template | None:
        return next((t for t in self.templates if t.name == name), None)

    def survey_question_message(self) -> AutomatedMessage:
        """The survey question in the shape of an automated message (text per language)."""
        assert self.survey is not None
        return AutomatedMessage(text=self.survey.question, template=self.survey.template)


WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
TIME_RANGE = re.compile(r"^(?P<start>[0-2][0-9]:[0-5][0-9])-(?P<end>[0-2][0-9]:[0-5][0-9])$")


def _known_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r}; expected e.g. America/Sao_Paulo") from None
    return value


class OutOfHours(Strict):
    action: Literal["queue", "transfer", "close"] = "queue"
    queue: Name | None = Field(default=None, description="for transfer: the queue to use")
    message: AutomatedMessageKind | None = Field(
        default="out_of_hours", description="automated message sent to the customer"
    )

    @model_validator(mode="after")
    def _transfer_has_queue(self) -> OutOfHours:
        if self.action == "transfer" and self.queue is None:
            raise ValueError("action transfer needs a queue")
        return self


class Hours(Strict):
    """Operating hours: weekly ranges in a time zone, minus holidays."""

    timezone: str
    weekly: dict[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"], list[str]] = Field(
        description="weekday → ranges such as 09:00-18:00 (22:00-02:00 crosses midnight)"
    )
    holidays: list[date] = Field(default_factory=list)
    out_of_hours: OutOfHours = OutOfHours()

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        return _known_timezone(value)

    @field_validator("weekly")
    @classmethod
    def _ranges(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for day, ranges in value.items():
            for text in ranges:
                match = TIME_RANGE.match(text)
                if (
                    not match
                    or not all(_minutes(match[p]) <= 24 * 60 for p in ("start", "end"))
                    or match["start"] == match["end"]
                ):
                    raise ValueError(f"{day}: {text!r} is not a time range such as 09:00-18:00")
        return value


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


class Overflow(Strict):
    """What a queue does when it overflows, as in unified routing: checked when work
    arrives (``max_waiting``, ``no_agents``) and periodically (``max_wait``)."""

    max_waiting: int | None = Field(
        default=None, ge=0, description="more than this many waiting when a conversation arrives"
    )
    max_wait: Duration | None = Field(
        default=None, description="a conversation has waited in the queue longer than this"
    )
    no_agents: bool = Field(
        default=False, description="no agent of the queue is available when it arrives"
    )
    action: Literal["transfer", "message", "end"] = Field(
        description="transfer: to ``queue``; message: send ``message`` and keep waiting;"
        " end: send ``message`` and close"
    )
    queue: Name | None = Field(default=None, description="for transfer: the queue to use")
    message: AutomatedMessageKind | None = Field(
        default="overflow", description="automated message sent to the customer"
    )

    @field_validator("max_wait", mode="before")
    @classmethod
    def _duration(cls, value: str | int | float | None) -> float | None:
        return None if value is None else parse_duration(value)

    @model_validator(mode="after")
    def _complete(self) -> Overflow:
        if self.max_waiting is None and self.max_wait is None and not self.no_agents:
            raise ValueError("overflow needs a condition: max_waiting, max_wait or no_agents")
        if self.action == "transfer" and self.queue is None:
            raise ValueError("action transfer needs a queue")
        return self


class Queue(Strict):
    name: Name
    assignment: Literal["highest_capacity", "round_robin", "least_active"] = "highest_capacity"
    priority: int = Field(default=0, description="work from higher-priority queues goes first")
    skill_matching: Literal["exact", "closest"] = "exact"
    relax_skills_after: Duration | None = Field(
        default=None, description="after this wait, any agent of the queue may take it"
    )
    hours: Hours | None = None
    overflow: Overflow | None = None

    @field_validator("relax_skills_after", mode="before")
    @classmethod
    def _duration(cls, value: str | int | float | None) -> float | None:
        return None if value is None else parse_duration(value)


Loc = tuple[str | int, ...]


class Config(Strict):
    accounts: list[Account] = Field(min_length=1)
    workstreams: list[Workstream] = Field(default_factory=list)
    queues: list[Queue] = Field(default_factory=list)
    fallback_queue: Name | None = Field(
        default=None,
        description="for conversations whose workstream no longer exists (default: first queue)",
    )

    def reference_problems(self) -> list[tuple[Loc, str]]:
        """Cross-references that do not resolve, each with where it is written."""
        problems: list[tuple[Loc, str]] = []
        problems += _duplicates("accounts", [a.name for a in self.accounts], "account name")
        problems += _duplicates("workstreams", [w.name for w in self.workstreams], "workstream")
        problems += _duplicates("queues", [q.name for q in self.queues], "queue")
        seen_numbers: dict[str, str] = {}
        workstreams = {w.name for w in self.workstreams}
        queues = {q.name for q in self.queues}
        for a, account in enumerate(self.accounts):
            for n, number in enumerate(account.numbers):
                loc: Loc = ("accounts", a, "numbers", n)
                if number.number in seen_numbers:
                    problems.append(
                        (
                            (*loc, "number"),
                            f"{number.number} already belongs to account "
                            f"{seen_numbers[number.number]}",
                        )
                    )
                seen_numbers.setdefault(number.number, account.name)
                if number.workstream not in workstreams:
                    problems.append(
                        (
                            (*loc, "workstream"),
                            f"workstream {number.workstream!r} is not defined under workstreams",
                        )
                    )
        for w, workstream in enumerate(self.workstreams):
            problems += _workstream_problems(("workstreams", w), workstream, queues)
        for q, queue in enumerate(self.queues):
            target = queue.hours.out_of_hours.queue if queue.hours else None
            if target is not None and target not in queues:
                problems.append(
                    (
                        ("queues", q, "hours", "out_of_hours", "queue"),
                        f"queue {target!r} is not defined under queues",
                    )
                )
            spill = queue.overflow.queue if queue.overflow else None
            if spill is not None and (spill not in queues or spill == queue.name):
                problems.append(
                    (
                        ("queues", q, "overflow", "queue"),
                        f"queue {spill!r} is not defined under queues"
                        if spill not in queues
                        else "a queue cannot overflow into itself",
                    )
                )
        if self.fallback_queue is not None and self.fallback_queue not in queues:
            problems.append((("fallback_queue",), f"queue {self.fallback_queue!r} is not defined"))
        if self.workstreams and not self.queues:
            problems.append((("queues",), "at least one queue is needed"))
        return problems

    def account(self, name: str) -> Account | None:
        return next((a for a in self.accounts if a.name == name), None)

    def workstream(self, name: str) -> Workstream | None:
        return next((w for w in self.workstreams if w.name == name), None)

    def queue(self, name: str) -> Queue | None:
        return next((q for q in self.queues if q.name == name), None)

    def default_queue(self) -> str | None:
        if self.fallback_queue is not None:
            return self.fallback_queue
        return self.queues[0].name if self.queues else None


def _duplicates(where: str, names: list[str], what: str) -> list[tuple[Loc, str]]:
    seen: set[str] = set()
    problems: list[tuple[Loc, str]] = []
    for index, name in enumerate(names):
        if name in seen:
            problems.append(((where, index, "name"), f"{what} {name!r} is defined twice"))
        seen.add(name)
    return problems


def _workstream_problems(
    loc: Loc, workstream: Workstream, queues: set[str]
) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    if workstream.fallback_queue not in queues:
        problems.append(
            (
                (*loc, "fallback_queue"),
                f"queue {workstream.fallback_queue!r} is not defined under queues",
            )
        )
    for r, rule in enumerate(workstream.routing):
        if rule.queue not in queues:
            problems.append(
                ((*loc, "routing", r, "queue"), f"queue {rule.queue!r} is not defined under queues")
            )
    templates = {t.name for t in workstream.templates}
    problems += _duplicates_at(loc, "templates", [t.name for t in workstream.templates], "template")
    problems += _duplicates_at(
        loc, "classification", [r.name for r in workstream.classification], "ruleset"
    )
    for kind, message in workstream.automated_messages.items():
        if message.template is not None and message.template not in templates:
            problems.append(
                (
                    (*loc, "automated_messages", kind, "template"),
                    f"template {message.template!r} is not defined in this workstream",
                )
            )
    if workstream.survey and workstream.survey.template not in (None, *templates):
        problems.append(
            (
                (*loc, "survey", "template"),
                f"template {workstream.survey.template!r} is not defined in this workstream",
            )
        )
    return problems


def _duplicates_at(loc: Loc, where: str, names: list[str], what: str) -> list[tuple[Loc, str]]:
    return [((*loc, *p_loc), message) for p_loc, message in _duplicates(where, names, what)]
