"""The configuration model: one YAML file, validated here (no I/O in this module).

Secrets never live in the file: an account names the environment variable that holds its
auth token (``auth_token_env``); the loader resolves it into a ``SecretStr``.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    field_validator,
    model_validator,
)

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
    auth_token_env: str = Field(description="environment variable holding the auth token")
    webhook_keys_env: dict[str, str] = Field(
        default_factory=dict,
        description="HMAC-SHA256 webhook signing: shared key id → environment variable",
    )
    numbers: list[WhatsAppNumber] = Field(min_length=1)
    # Resolved by the loader from the environment, never read from the file.
    auth_token: SecretStr | None = Field(default=None, exclude=True)
    webhook_keys: dict[str, SecretStr] = Field(default_factory=dict, exclude=True)

    @field_validator("account_sid")
    @classmethod
    def _sid(cls, value: str) -> str:
        if not ACCOUNT_SID.match(value):
            raise ValueError("expected an Account SID: AC followed by 32 hex digits")
        return value

    @field_validator("auth_token_env")
    @classmethod
    def _env(cls, value: str) -> str:
        if not ENV_NAME.match(value):
            raise ValueError("expected an environment variable name such as TWILIO_AUTH_TOKEN")
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

    @field_validator("offer_timeout", mode="before")
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


class Workstream(Strict):
    name: Name
    language: str = "en"
    attachments: Attachments = Attachments()
    fallback_queue: Name
    distribution: Distribution = Distribution()
    templates: list[Template] = Field(default_factory=list)
    # Classification and routing rules are refined by the classify stage; kept as data here.
    classification: list[dict[str, object]] = Field(default_factory=list)
    routing: list[dict[str, object]] = Field(default_factory=list)


class Queue(Strict):
    name: Name
    assignment: Literal["highest_capacity", "round_robin", "least_active"] = "highest_capacity"
    priority: int = 0
    hours: dict[str, object] | None = None


class Config(Strict):
    accounts: list[Account] = Field(min_length=1)
    workstreams: list[Workstream] = Field(default_factory=list)
    queues: list[Queue] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> Config:
        names = [a.name for a in self.accounts]
        if len(set(names)) != len(names):
            raise ValueError("account names must be unique")
        all_numbers = [n.number for a in self.accounts for n in a.numbers]
        if len(set(all_numbers)) != len(all_numbers):
            raise ValueError("a WhatsApp number may belong to one account only")
        workstreams = {w.name for w in self.workstreams}
        queues = {q.name for q in self.queues}
        for account in self.accounts:
            for number in account.numbers:
                if number.workstream not in workstreams:
                    raise ValueError(
                        f"number {number.number} of account {account.name} feeds workstream "
                        f"{number.workstream!r}, which is not defined under workstreams"
                    )
        for workstream in self.workstreams:
            if workstream.fallback_queue not in queues:
                raise ValueError(
                    f"workstream {workstream.name} has fallback_queue "
                    f"{workstream.fallback_queue!r}, which is not defined under queues"
                )
        return self

    def account(self, name: str) -> Account | None:
        return next((a for a in self.accounts if a.name == name), None)

    def workstream(self, name: str) -> Workstream | None:
        return next((w for w in self.workstreams if w.name == name), None)
