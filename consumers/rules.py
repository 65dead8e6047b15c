"""The rule engine: work classification rulesets and route-to-queue rules, compiled once per
configuration load into plain predicates, evaluated over a flat context.

Pure: no I/O, no clock. Evaluation never raises on odd data (a number where text was
expected, nan): such a test is false. A missing field equals nothing: eq, in, contains,
matches and comparisons are false, ne and not_in true, exists false. No route match falls
back to the workstream's fallback queue.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from schemas.config import Workstream
from schemas.rules import All, AnyOf, Not, Outputs, Test

Context = Mapping[str, Any]
Predicate = Callable[[Context], bool]


@lru_cache(maxsize=4096)
def fold(text: str) -> str:
    """Case- and accent-insensitive form of a text: 'Ação' → 'acao'.

    Cached: one classification folds the same body once per test, and NFKD is not cheap.
    """
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


@dataclass(frozen=True)
class Compiled:
    """A condition ready to evaluate, with the words an admin reads in the trace."""

    test: Predicate
    text: str


_NUMERIC = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$")


_INTEGER = re.compile(r"^\s*[+-]?\d+\s*$")


def _number(value: Any) -> int | float | None:
    """A number for numeric comparison: integers exactly (long ids stay distinct), finite
    floats; None for anything else (nan and infinities compare as nothing)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        if _INTEGER.match(value):
            return int(value)
        if _NUMERIC.match(value):
            number = float(value)
            return number if math.isfinite(number) else None
    return None


def strip_accents(text: str) -> str:
    """Accents removed, case kept: for regular expressions, whose escapes are case-sensitive
    (``\\S`` is not ``\\s``), so only the subject and literal letters lose their accents."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


@dataclass(frozen=True)
class _Expected:
    """A configured value prepared once at compile time for fast comparisons."""

    raw: Any
    number: int | float | None
    text: str

    @classmethod
    def of(cls, value: Any, exact: bool) -> _Expected:
        text = str(value) if exact else fold(str(value))
        return cls(value, _number(value), text)


def _equals(actual: Any, expected: _Expected, exact: bool) -> bool:
    if isinstance(actual, bool) or isinstance(expected.raw, bool):
        return actual is expected.raw or (
            isinstance(actual, str) and fold(actual) == str(expected.raw).lower()
        )
    if expected.number is not None:
        number = _number(actual)
        if number is not None:
            return number == expected.number
    if isinstance(actual, str | int | float):
        return (str(actual) if exact else fold(str(actual))) == expected.text
    return bool(actual == expected.raw)


def _same(actual: Any, expected: Any, case_sensitive: bool) -> bool:
    return _equals(actual, _Expected.of(expected, case_sensitive), case_sensitive)


def _order(actual: Any, expected: Any) -> int | None:
    """-1/0/1 comparing numbers as numbers and texts (e.g. times 'HH:MM') as texts."""
    a, e = _number(actual), _number(expected)
    if a is not None and e is not None:
        return (a > e) - (a < e)
    if isinstance(actual, str) and isinstance(expected, str):
        return (actual > expected) - (actual < expected)
    return None


def _present(value: Any) -> bool:
    return value is not None and value != "" and value != [] and value != {}


def _compile_test(test: Test) -> Compiled:
    name, op, expected, exact = test.field, test.op, test.value, test.case_sensitive

    def value(ctx: Context) -> Any:
        return ctx.get(name)

    predicate: Predicate
    if op == "exists":
        want = expected is not False
        predicate = lambda ctx: _present(value(ctx)) is want
        return Compiled(predicate, f"{name} {'exists' if want else 'does not exist'}")
    if op in ("eq", "ne"):
        negate = op == "ne"
        one = _Expected.of(expected, exact)
        predicate = lambda ctx: _equals(value(ctx), one, exact) is not negate
    elif op in ("in", "not_in"):
        options = [
            _Expected.of(v, exact) for v in (expected if isinstance(expected, list) else [expected])
        ]
        negate = op == "not_in"
        predicate = lambda ctx: (
            any(_equals(value(ctx), option, exact) for option in options) is not negate
        )
    elif op == "contains":
        needle = str(expected) if exact else fold(str(expected))
        predicate = lambda ctx: _contains(value(ctx), needle, exact)
    elif op == "matches":
        source = str(expected) if exact else strip_accents(str(expected))
        pattern = re.compile(source, 0 if exact else re.IGNORECASE)
        predicate = lambda ctx: _matches(value(ctx), pattern, exact)
    else:
        accept = {"gt": (1,), "ge": (0, 1), "lt": (-1,), "le": (-1, 0)}[op]
        predicate = lambda ctx: _order(value(ctx), expected) in accept
    return Compiled(predicate, f"{name} {op.replace('_', '-')} {expected!r}")


def _contains(actual: Any, needle: str, exact: bool) -> bool:
    if isinstance(actual, str):
        return needle in (actual if exact else fold(actual))
    if isinstance(actual, list | tuple | set | frozenset):
        return any(_same(item, needle, exact) for item in actual)
    return False


def _matches(actual: Any, pattern: re.Pattern[str], exact: bool) -> bool:
    if isinstance(actual, bool) or actual is None:
        return False
    if isinstance(actual, str | int | float):
        text = str(actual)
        return pattern.search(text if exact else strip_accents(text)) is not None
    return False


def compile_condition(condition: Test | All | AnyOf | Not | None) -> Compiled:
    """Compile a condition tree once; the result is called per conversation."""
    if condition is None:
        return Compiled(lambda ctx: True, "always")
    if isinstance(condition, Test):
        return _compile_test(condition)
    if isinstance(condition, Not):
        inner = compile_condition(condition.not_)
        return Compiled(lambda ctx: not inner.test(ctx), f"not ({inner.text})")
    parts = [
        compile_condition(c)
        for c in (condition.all if isinstance(condition, All) else condition.any)
    ]
    if isinstance(condition, All):
        return Compiled(
            lambda ctx: all(p.test(ctx) for p in parts), " and ".join(f"({p.text})" for p in parts)
        )
    return Compiled(
        lambda ctx: any(p.test(ctx) for p in parts), " or ".join(f"({p.text})" for p in parts)
    )


@dataclass(frozen=True)
class CompiledRule:
    ruleset: str
    name: str
    when: Compiled
    then: Outputs


@dataclass(frozen=True)
class CompiledRuleset:
    name: str
    hit_policy: str
    rules: tuple[CompiledRule, ...]


@dataclass(frozen=True)
class CompiledRoute:
    name: str
    when: Compiled
    queue: str


@dataclass(frozen=True)
class CompiledWorkstream:
    name: str
    language: str
    fallback_queue: str
    rulesets: tuple[CompiledRuleset, ...]
    routes: tuple[CompiledRoute, ...]


def compile_workstream(workstream: Workstream) -> CompiledWorkstream:
    return CompiledWorkstream(
        name=workstream.name,
        language=workstream.language,
        fallback_queue=workstream.fallback_queue,
        rulesets=tuple(
            CompiledRuleset(
                rs.name,
                rs.hit_policy,
                tuple(
                    CompiledRule(rs.name, r.name, compile_condition(r.when), r.then)
                    for r in rs.rules
                ),
            )
            for rs in workstream.classification
        ),
        routes=tuple(
            CompiledRoute(r.name, compile_condition(r.when), r.queue) for r in workstream.routing
        ),
    )


@dataclass(frozen=True)
class Match:
    ruleset: str
    rule: str
    why: str


@dataclass
class Classification:
    """The outcome, with the trace an admin reads to see why."""

    queue: str
    skills: dict[str, int] = field(default_factory=dict)
    priority: int = 0
    severity: str = "normal"
    language: str = "en"
    variables: dict[str, Any] = field(default_factory=dict)
    matched: list[Match] = field(default_factory=list)
    route: Match | None = None
    fallback: bool = False
    errors: list[str] = field(default_factory=list)

    def trace(self) -> dict[str, Any]:
        return {
            "matched": [m.__dict__ for m in self.matched],
            "route": self.route.__dict__ if self.route else None,
            "fallback": self.fallback,
            "errors": self.errors,
        }


def _apply(outputs: Outputs, ctx: dict[str, Any], result: Classification) -> None:
    for skill, level in outputs.skills.items():
        result.skills[skill] = level
        ctx[f"skills.{skill}"] = level
    for key, value in outputs.variables.items():
        result.variables[key] = value
        ctx[f"variables.{key}"] = value
    if outputs.priority is not None:
        result.priority = ctx["priority"] = outputs.priority
    if outputs.severity is not None:
        result.severity = ctx["severity"] = outputs.severity
    if outputs.language is not None:
        result.language = ctx["language"] = outputs.language


def _holds(compiled: Compiled, ctx: Context, where: str, result: Classification) -> bool:
    try:
        return compiled.test(ctx)
    except Exception as exc:  # a rule must never take a conversation down
        result.errors.append(f"{where}: {type(exc).__name__}: {exc}")
        return False


def _whole(value: Any) -> int:
    number = _number(value)
    return int(number) if number is not None else 0


def classify(workstream: CompiledWorkstream, context: Context) -> Classification:
    """Run the rulesets in order, then the route-to-queue rules; deterministic."""
    ctx: dict[str, Any] = dict(context)
    ctx.setdefault("priority", 0)
    ctx.setdefault("severity", "normal")
    ctx.setdefault("language", workstream.language)
    result = Classification(
        queue=workstream.fallback_queue,
        priority=_whole(ctx["priority"]),
        severity=str(ctx["severity"]),
        language=str(ctx["language"]),
    )
    for ruleset in workstream.rulesets:
        for rule in ruleset.rules:
            if _holds(rule.when, ctx, f"{ruleset.name}/{rule.name}", result):
                _apply(rule.then, ctx, result)
                result.matched.append(Match(ruleset.name, rule.name, rule.when.text))
                if ruleset.hit_policy == "first":
                    break
    for route in workstream.routes:
        if _holds(route.when, ctx, f"routing/{route.name}", result):
            result.queue = route.queue
            result.route = Match("routing", route.name, route.when.text)
            return result
    result.fallback = True
    return result
