"""Work classification and route-to-queue rules, as configuration (no evaluation here).

A condition is a test of one context field (``{field, op, value}``) or a composition
(``{all: [...]}``, ``{any: [...]}``, ``{not: {...}}``). Rulesets run in order; each has a hit
policy (first match or all matches) and its rules' outputs set skills, priority, severity,
language and context variables that later rulesets and the routing rules see.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    field_validator,
    model_validator,
)

RuleName = Annotated[str, StringConstraints(min_length=1, max_length=100)]

# Fields a condition may test. ``variables.<name>`` and ``skills.<name>`` are open-ended.
CONTEXT_FIELDS: dict[str, str] = {
    "account": "the account's name",
    "business_number": "our WhatsApp number, E.164",
    "number_name": "the configured name of our number",
    "workstream": "the workstream the number feeds",
    "sandbox": "true when the number is Twilio's sandbox",
    "customer": "the customer's address: +E164, or a business-scoped user id",
    "customer.country_code": "the customer's calling code, e.g. 55 (none for user ids)",
    "customer.region": "the customer's ISO region, e.g. BR (none for user ids)",
    "profile_name": "the customer's WhatsApp profile name",
    "body": "the text of the first message",
    "has_media": "the first message has attachments",
    "media_count": "how many attachments the first message has",
    "language": "the conversation's language (the workstream's, or set by a ruleset)",
    "priority": "the priority set by earlier rulesets (default 0)",
    "severity": "the severity set by earlier rulesets (default normal)",
    "time": "local time HH:MM in the workstream's time zone",
    "weekday": "local weekday mon … sun in the workstream's time zone",
    "date": "local date YYYY-MM-DD in the workstream's time zone",
}
OPEN_PREFIXES = ("variables.", "skills.")
Operator = Literal[
    "eq", "ne", "in", "not_in", "contains", "matches", "gt", "ge", "lt", "le", "exists"
]
Scalar = str | int | float | bool


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Test(_Strict):
    """One test of one context field."""

    field: str
    op: Operator
    value: Scalar | list[Scalar] | None = None
    case_sensitive: bool = Field(
        default=False, description="text compares ignore case and accents unless true"
    )

    @field_validator("field")
    @classmethod
    def _known_field(cls, value: str) -> str:
        if value in CONTEXT_FIELDS or (
            value.startswith(OPEN_PREFIXES) and len(value.split(".", 1)[1]) > 0
        ):
            return value
        known = ", ".join([*CONTEXT_FIELDS, "variables.<name>", "skills.<name>"])
        raise ValueError(f"unknown field {value!r}; expected one of {known}")

    @field_validator("op", mode="before")
    @classmethod
    def _dash_alias(cls, value: Any) -> Any:
        return "not_in" if value == "not-in" else value

    @model_validator(mode="after")
    def _value_fits_op(self) -> Test:
        if self.op in ("in", "not_in"):
            if not isinstance(self.value, list) or not self.value:
                raise ValueError(f"op {self.op} needs a non-empty list as value")
        elif self.op == "exists":
            if self.value is not None and not isinstance(self.value, bool):
                raise ValueError("op exists takes true or false (or no value)")
        elif isinstance(self.value, list) or self.value is None:
            raise ValueError(f"op {self.op} needs a single value")
        if self.field in ("time", "date") and self.op != "exists":
            values = self.value if isinstance(self.value, list) else [self.value]
            shape = r"^\d{2}:\d{2}$" if self.field == "time" else r"^\d{4}-\d{2}-\d{2}$"
            for value in values:
                if not isinstance(value, str) or not re.match(shape, value):
                    example = "'18:00'" if self.field == "time" else "'2026-12-25'"
                    raise ValueError(
                        f"{self.field} values are quoted text such as {example} "
                        f"(YAML reads an unquoted 18:00 as the number 1080), got {value!r}"
                    )
        if self.op == "matches":
            try:
                re.compile(str(self.value))
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return self


class All(_Strict):
    all: list[Condition] = Field(min_length=1)


class AnyOf(_Strict):
    any: list[Condition] = Field(min_length=1)


class Not(_Strict):
    not_: Condition = Field(alias="not")


def _condition_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return {Test: "test", All: "all", AnyOf: "any", Not: "not"}.get(type(value))
    if isinstance(value, dict):
        for key in ("all", "any", "not"):
            if key in value:
                return key
        return "test"
    return None


Condition = Annotated[
    Annotated[Test, Tag("test")]
    | Annotated[All, Tag("all")]
    | Annotated[AnyOf, Tag("any")]
    | Annotated[Not, Tag("not")],
    Discriminator(
        _condition_kind,
        custom_error_type="condition",
        custom_error_message="expected a condition: {field, op, value} or all/any/not",
    ),
]
All.model_rebuild()
AnyOf.model_rebuild()
Not.model_rebuild()


class Outputs(_Strict):
    """What a matching rule sets."""

    skills: dict[str, int] = Field(
        default_factory=dict, description="skill → minimum proficiency (1-10)"
    )
    priority: int | None = Field(default=None, ge=0, le=1000)
    severity: Literal["low", "normal", "high", "critical"] | None = None
    language: str | None = None
    variables: dict[str, Scalar] = Field(default_factory=dict)

    @field_validator("skills")
    @classmethod
    def _proficiency(cls, value: dict[str, int]) -> dict[str, int]:
        for skill, level in value.items():
            if not 1 <= level <= 10:
                raise ValueError(f"skill {skill}: proficiency must be 1-10, got {level}")
        return value


class Rule(_Strict):
    name: RuleName
    when: Condition | None = Field(default=None, description="no condition: always matches")
    then: Outputs


class Ruleset(_Strict):
    name: RuleName
    hit_policy: Literal["first", "all"] = "first"
    rules: list[Rule] = Field(min_length=1)


class RouteRule(_Strict):
    name: RuleName
    when: Condition | None = None
    queue: str
