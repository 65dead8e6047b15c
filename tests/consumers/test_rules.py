"""The pure rule engine: every operator, compositions, rulesets, routing, and properties.

No broker, no database, no clock: conditions are built through the pydantic models (as the
configuration loader does) and evaluated over plain dict contexts.
"""

from __future__ import annotations

import json
import math
import unicodedata
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.rules import (
    Classification,
    Compiled,
    CompiledWorkstream,
    classify,
    compile_condition,
    compile_workstream,
    fold,
)
from schemas import rules as rule_models
from schemas.config import Workstream
from schemas.rules import CONTEXT_FIELDS, Rule

FAST = settings(max_examples=200, deadline=None, database=None)


def cond(spec: dict[str, Any]) -> Compiled:
    """Compile one ``{field, op, value}`` test validated by the model."""
    return compile_condition(rule_models.Test.model_validate(spec))


def when(spec: dict[str, Any] | None) -> Compiled:
    """Compile any condition (test or all/any/not tree) as a rule's ``when`` parses it."""
    return compile_condition(Rule.model_validate({"name": "r", "when": spec, "then": {}}).when)


def workstream(spec: dict[str, Any]) -> CompiledWorkstream:
    return compile_workstream(Workstream.model_validate({"name": "ws", **spec}))


# --- operators ---------------------------------------------------------------------------------

NAN = float("nan")

OPERATOR_CASES = [
    # eq: texts ignore case and accents unless case_sensitive
    pytest.param({"field": "body", "op": "eq", "value": "boleto"}, "BOLETO", True, id="eq-case"),
    pytest.param({"field": "body", "op": "eq", "value": "acao"}, "Ação", True, id="eq-accent"),
    pytest.param({"field": "body", "op": "eq", "value": "Ação"}, "ACAO", True, id="eq-accent-cfg"),
    pytest.param({"field": "body", "op": "eq", "value": "straße"}, "STRASSE", True, id="eq-sz"),
    pytest.param({"field": "body", "op": "eq", "value": "boleto"}, "boletos", False, id="eq-diff"),
    pytest.param(
        {"field": "body", "op": "eq", "value": "boleto", "case_sensitive": True},
        "BOLETO",
        False,
        id="eq-cs-case",
    ),
    pytest.param(
        {"field": "body", "op": "eq", "value": "Ação", "case_sensitive": True},
        "Acao",
        False,
        id="eq-cs-accent",
    ),
    pytest.param(
        {"field": "body", "op": "eq", "value": "Ação", "case_sensitive": True},
        "Ação",
        True,
        id="eq-cs-same",
    ),
    pytest.param({"field": "media_count", "op": "eq", "value": 2}, 2, True, id="eq-int"),
    pytest.param({"field": "media_count", "op": "eq", "value": 2}, 3, False, id="eq-int-diff"),
    pytest.param({"field": "media_count", "op": "eq", "value": 2}, "2", True, id="eq-numstr"),
    pytest.param({"field": "media_count", "op": "eq", "value": "2"}, 2.0, True, id="eq-str-flt"),
    pytest.param({"field": "variables.x", "op": "eq", "value": 2.5}, " 2.50 ", True, id="eq-flt"),
    pytest.param({"field": "variables.x", "op": "eq", "value": "abc"}, 5, False, id="eq-txt-num"),
    pytest.param({"field": "sandbox", "op": "eq", "value": True}, True, True, id="eq-bool"),
    pytest.param({"field": "sandbox", "op": "eq", "value": True}, False, False, id="eq-bool-no"),
    pytest.param({"field": "sandbox", "op": "eq", "value": True}, "TRUE", True, id="eq-bool-str"),
    pytest.param({"field": "sandbox", "op": "eq", "value": False}, "false", True, id="eq-f-str"),
    pytest.param({"field": "sandbox", "op": "eq", "value": True}, 1, False, id="eq-bool-one"),
    pytest.param({"field": "media_count", "op": "eq", "value": 1}, True, False, id="eq-one-bool"),
    pytest.param({"field": "body", "op": "eq", "value": "x"}, None, False, id="eq-none"),
    pytest.param({"field": "body", "op": "eq", "value": "x"}, ["x"], False, id="eq-list"),
    # ne
    pytest.param({"field": "customer.region", "op": "ne", "value": "BR"}, "br", False, id="ne-ci"),
    pytest.param({"field": "customer.region", "op": "ne", "value": "BR"}, "PT", True, id="ne"),
    pytest.param({"field": "media_count", "op": "ne", "value": 5}, "5", False, id="ne-numstr"),
    pytest.param(
        {"field": "customer.region", "op": "ne", "value": "BR", "case_sensitive": True},
        "br",
        True,
        id="ne-cs",
    ),
    pytest.param({"field": "customer.region", "op": "ne", "value": "BR"}, None, True, id="ne-none"),
    # in / not_in
    pytest.param(
        {"field": "customer.region", "op": "in", "value": ["BR", "PT"]}, "pt", True, id="in-ci"
    ),
    pytest.param(
        {"field": "customer.region", "op": "in", "value": ["BR", "PT"]}, "US", False, id="in-no"
    ),
    pytest.param(
        {"field": "customer.region", "op": "in", "value": ["BR"], "case_sensitive": True},
        "br",
        False,
        id="in-cs",
    ),
    pytest.param(
        {"field": "body", "op": "in", "value": ["São Paulo"]}, "SAO PAULO", True, id="in-acc"
    ),
    pytest.param({"field": "priority", "op": "in", "value": [1, 2]}, "2", True, id="in-numstr"),
    pytest.param({"field": "priority", "op": "in", "value": [1, 2]}, 3, False, id="in-num-no"),
    pytest.param({"field": "sandbox", "op": "in", "value": [True]}, True, True, id="in-bool"),
    pytest.param(
        {"field": "customer.region", "op": "in", "value": ["BR"]}, None, False, id="in-none"
    ),
    pytest.param(
        {"field": "customer.region", "op": "not_in", "value": ["BR", "PT"]}, "US", True, id="nin"
    ),
    pytest.param(
        {"field": "customer.region", "op": "not_in", "value": ["BR", "PT"]},
        "pt",
        False,
        id="nin-ci",
    ),
    pytest.param(
        {"field": "customer.region", "op": "not-in", "value": ["BR", "PT"]},
        "US",
        True,
        id="nin-dash",
    ),
    pytest.param(
        {"field": "customer.region", "op": "not-in", "value": ["BR", "PT"]},
        "br",
        False,
        id="nin-dash-ci",
    ),
    pytest.param({"field": "priority", "op": "not_in", "value": [1, 2]}, 2.0, False, id="nin-num"),
    # contains: substrings of text, items of lists
    pytest.param(
        {"field": "body", "op": "contains", "value": "boleto"},
        "Meu BOLETO não chegou",
        True,
        id="contains-ci",
    ),
    pytest.param({"field": "body", "op": "contains", "value": "nao"}, "Não!", True, id="cont-acc"),
    pytest.param({"field": "body", "op": "contains", "value": "Não"}, "NAO", True, id="cont-acc2"),
    pytest.param(
        {"field": "body", "op": "contains", "value": "fatura"}, "boleto", False, id="c-no"
    ),
    pytest.param(
        {"field": "body", "op": "contains", "value": "boleto", "case_sensitive": True},
        "Meu BOLETO",
        False,
        id="contains-cs",
    ),
    pytest.param(
        {"field": "body", "op": "contains", "value": 123}, "pedido 123", True, id="contains-num"
    ),
    pytest.param({"field": "media_count", "op": "contains", "value": "1"}, 12, False, id="c-int"),
    pytest.param({"field": "body", "op": "contains", "value": "x"}, None, False, id="c-none"),
    pytest.param(
        {"field": "variables.tags", "op": "contains", "value": "VIP"},
        ["vip", "gold"],
        True,
        id="contains-list",
    ),
    pytest.param(
        {"field": "variables.tags", "op": "contains", "value": "vi"},
        ["vip", "gold"],
        False,
        id="contains-list-whole-items",
    ),
    pytest.param(
        {"field": "variables.tags", "op": "contains", "value": "VIP", "case_sensitive": True},
        ["vip"],
        False,
        id="contains-list-cs",
    ),
    pytest.param(
        {"field": "variables.tags", "op": "contains", "value": 5}, [4, 5], True, id="cont-list-n"
    ),
    pytest.param(
        {"field": "variables.tags", "op": "contains", "value": "x"}, [], False, id="cont-empty"
    ),
    # matches: regular expressions, case/accent-insensitive by default, search not fullmatch
    pytest.param(
        {"field": "body", "op": "matches", "value": r"^pedido\s+\d+"},
        "Pedido 123",
        True,
        id="matches-ci",
    ),
    pytest.param(
        {"field": "body", "op": "matches", "value": r"^pedido\s+\d+"},
        "meu pedido 123",
        False,
        id="matches-anchor",
    ),
    pytest.param(
        {"field": "body", "op": "matches", "value": r"^pedido\s+\d+", "case_sensitive": True},
        "Pedido 123",
        False,
        id="matches-cs",
    ),
    pytest.param(
        {"field": "body", "op": "matches", "value": "cobran[cç]a"},
        "COBRANÇA indevida",
        True,
        id="matches-accent",
    ),
    pytest.param(
        {"field": "body", "op": "matches", "value": "fatura"}, "a fatura", True, id="m-search"
    ),
    pytest.param(
        {"field": "media_count", "op": "matches", "value": r"^1\d$"}, 12, True, id="m-int"
    ),
    pytest.param({"field": "sandbox", "op": "matches", "value": "true"}, True, False, id="m-bool"),
    pytest.param({"field": "body", "op": "matches", "value": "."}, None, False, id="m-none"),
    pytest.param({"field": "body", "op": "matches", "value": "a"}, ["a"], False, id="m-list"),
    # ordering: numbers as numbers, texts (times, dates) as texts
    pytest.param({"field": "priority", "op": "gt", "value": 5}, 6, True, id="gt"),
    pytest.param({"field": "priority", "op": "gt", "value": 5}, 5, False, id="gt-eq"),
    pytest.param({"field": "priority", "op": "ge", "value": 5}, 5, True, id="ge-eq"),
    pytest.param({"field": "priority", "op": "ge", "value": 5}, 4.99, False, id="ge-below"),
    pytest.param({"field": "priority", "op": "lt", "value": 5}, 4, True, id="lt"),
    pytest.param({"field": "priority", "op": "lt", "value": 5}, 5, False, id="lt-eq"),
    pytest.param({"field": "priority", "op": "le", "value": 5}, 5, True, id="le-eq"),
    pytest.param({"field": "priority", "op": "le", "value": 5}, 6, False, id="le-above"),
    pytest.param({"field": "media_count", "op": "gt", "value": 1}, "2", True, id="gt-numstr"),
    pytest.param({"field": "media_count", "op": "gt", "value": "10"}, 9, False, id="gt-not-lexi"),
    pytest.param({"field": "variables.x", "op": "lt", "value": "10"}, "9", True, id="lt-numstrs"),
    pytest.param({"field": "variables.x", "op": "ge", "value": 2.5}, 2.5, True, id="ge-float"),
    pytest.param({"field": "variables.x", "op": "gt", "value": -1}, "-0.5", True, id="gt-neg"),
    pytest.param({"field": "time", "op": "ge", "value": "18:00"}, "18:00", True, id="time-ge-eq"),
    pytest.param({"field": "time", "op": "ge", "value": "18:00"}, "17:59", False, id="time-ge-no"),
    pytest.param({"field": "time", "op": "ge", "value": "18:00"}, "23:10", True, id="time-ge"),
    pytest.param({"field": "time", "op": "lt", "value": "09:00"}, "08:59", True, id="time-lt"),
    pytest.param({"field": "time", "op": "lt", "value": "09:00"}, "09:00", False, id="time-lt-no"),
    pytest.param(
        {"field": "date", "op": "ge", "value": "2026-12-24"}, "2026-12-25", True, id="date-ge"
    ),
    pytest.param({"field": "priority", "op": "gt", "value": 5}, "abc", False, id="gt-text"),
    pytest.param({"field": "priority", "op": "gt", "value": 0}, True, False, id="gt-bool"),
    pytest.param({"field": "priority", "op": "ge", "value": 0}, None, False, id="ge-none"),
    pytest.param({"field": "priority", "op": "le", "value": 5}, [1], False, id="le-list"),
    # exists (no value means true)
    pytest.param({"field": "body", "op": "exists"}, "x", True, id="exists"),
    pytest.param({"field": "body", "op": "exists", "value": True}, "x", True, id="exists-true"),
    pytest.param({"field": "body", "op": "exists"}, "", False, id="exists-empty"),
    pytest.param({"field": "body", "op": "exists"}, None, False, id="exists-none"),
    pytest.param({"field": "variables.tags", "op": "exists"}, [], False, id="exists-empty-list"),
    pytest.param({"field": "media_count", "op": "exists"}, 0, True, id="exists-zero"),
    pytest.param({"field": "has_media", "op": "exists"}, False, True, id="exists-false-value"),
    pytest.param({"field": "body", "op": "exists", "value": False}, None, True, id="absent"),
    pytest.param({"field": "body", "op": "exists", "value": False}, "x", False, id="absent-no"),
]


@pytest.mark.parametrize(("spec", "actual", "expected"), OPERATOR_CASES)
def test_operator(spec: dict[str, Any], actual: Any, expected: bool) -> None:
    compiled = cond(spec)
    assert compiled.test({spec["field"]: actual}) is expected


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param({"field": "body", "op": "eq", "value": "x"}, False, id="eq"),
        pytest.param({"field": "body", "op": "ne", "value": "x"}, True, id="ne"),
        pytest.param({"field": "body", "op": "in", "value": ["x"]}, False, id="in"),
        pytest.param({"field": "body", "op": "not_in", "value": ["x"]}, True, id="not_in"),
        pytest.param({"field": "body", "op": "contains", "value": "x"}, False, id="contains"),
        pytest.param({"field": "body", "op": "matches", "value": ".*"}, False, id="matches"),
        pytest.param({"field": "priority", "op": "gt", "value": 0}, False, id="gt"),
        pytest.param({"field": "priority", "op": "ge", "value": 0}, False, id="ge"),
        pytest.param({"field": "priority", "op": "lt", "value": 0}, False, id="lt"),
        pytest.param({"field": "priority", "op": "le", "value": 0}, False, id="le"),
        pytest.param({"field": "body", "op": "exists"}, False, id="exists"),
        pytest.param({"field": "body", "op": "exists", "value": False}, True, id="exists-false"),
    ],
)
def test_missing_field(spec: dict[str, Any], expected: bool) -> None:
    """A field absent from the context: only the negative operators hold."""
    assert cond(spec).test({}) is expected


@pytest.mark.parametrize(
    "value",
    [NAN, math.inf, -math.inf, "", "🙂", ["a", 1], {"k": "v"}, object()],
    ids=["nan", "inf", "-inf", "empty", "emoji", "mixed-list", "dict", "object"],
)
@pytest.mark.parametrize(
    "spec",
    [
        {"field": "variables.x", "op": "eq", "value": 1},
        {"field": "variables.x", "op": "ne", "value": "a"},
        {"field": "variables.x", "op": "in", "value": [1, "a", True]},
        {"field": "variables.x", "op": "not_in", "value": [1, "a"]},
        {"field": "variables.x", "op": "contains", "value": "a"},
        {"field": "variables.x", "op": "matches", "value": "a"},
        {"field": "variables.x", "op": "gt", "value": 1},
        {"field": "variables.x", "op": "le", "value": "a"},
        {"field": "variables.x", "op": "exists"},
    ],
    ids=["eq", "ne", "in", "not_in", "contains", "matches", "gt", "le", "exists"],
)
def test_odd_values_never_raise(spec: dict[str, Any], value: Any) -> None:
    result = cond(spec).test({"variables.x": value})
    assert isinstance(result, bool)


def test_nan_is_not_equal_to_anything() -> None:
    assert (
        cond({"field": "variables.x", "op": "eq", "value": 1}).test({"variables.x": NAN}) is False
    )
    assert cond({"field": "variables.x", "op": "ne", "value": 1}).test({"variables.x": NAN}) is True


@pytest.mark.parametrize("op", ["ge", "le"])
def test_nan_is_not_ordered(op: str) -> None:
    assert cond({"field": "variables.x", "op": op, "value": 5}).test({"variables.x": NAN}) is False


def test_long_digit_strings_are_not_equal() -> None:
    compiled = cond({"field": "variables.order", "op": "eq", "value": "12345678901234567"})
    assert compiled.test({"variables.order": "12345678901234568"}) is False


@pytest.mark.parametrize(
    ("pattern", "text"),
    [(r"^\S+$", "hello"), (r"^\D+$", "abc"), (r"^\W$", "!")],
    ids=["S", "D", "W"],
)
def test_matches_keeps_uppercase_escapes(pattern: str, text: str) -> None:
    assert cond({"field": "body", "op": "matches", "value": pattern}).test({"body": text})


def test_matches_end_anchor_compiles() -> None:
    compiled = cond({"field": "body", "op": "matches", "value": r"boleto\Z"})
    assert compiled.test({"body": "meu boleto"})


def test_uppercase_escapes_are_honoured_when_case_sensitive() -> None:
    compiled = cond({"field": "body", "op": "matches", "value": r"^\S+$", "case_sensitive": True})
    assert compiled.test({"body": "hello"})
    assert not compiled.test({"body": "hello world"})


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"field": "body", "op": "contains", "value": "boleto"}, ["body", "contains", "boleto"]),
        (
            {"field": "customer.region", "op": "not_in", "value": ["BR"]},
            ["customer.region", "not-in"],
        ),
        ({"field": "priority", "op": "ge", "value": 5}, ["priority", "ge", "5"]),
        ({"field": "body", "op": "exists"}, ["body", "exists"]),
        ({"field": "body", "op": "exists", "value": False}, ["body", "does not exist"]),
    ],
    ids=["contains", "not-in", "ge", "exists", "not-exists"],
)
def test_test_text_names_field_and_op(spec: dict[str, Any], words: list[str]) -> None:
    text = cond(spec).text
    for word in words:
        assert word in text


# --- compositions ------------------------------------------------------------------------------

BILLING = {"field": "body", "op": "contains", "value": "boleto"}
BRAZIL = {"field": "customer.region", "op": "eq", "value": "BR"}


@pytest.mark.parametrize(
    ("spec", "ctx", "expected"),
    [
        pytest.param(
            {"all": [BILLING, BRAZIL]}, {"body": "boleto", "customer.region": "BR"}, True, id="all"
        ),
        pytest.param(
            {"all": [BILLING, BRAZIL]},
            {"body": "boleto", "customer.region": "PT"},
            False,
            id="all-one",
        ),
        pytest.param(
            {"any": [BILLING, BRAZIL]}, {"body": "oi", "customer.region": "br"}, True, id="any"
        ),
        pytest.param(
            {"any": [BILLING, BRAZIL]},
            {"body": "oi", "customer.region": "PT"},
            False,
            id="any-none",
        ),
        pytest.param({"any": [BILLING, BRAZIL]}, {}, False, id="any-missing"),
        pytest.param({"not": BILLING}, {"body": "oi"}, True, id="not"),
        pytest.param({"not": BILLING}, {"body": "BOLETO"}, False, id="not-match"),
        pytest.param({"not": {"not": BILLING}}, {"body": "boleto"}, True, id="not-not"),
        pytest.param(None, {}, True, id="always"),
    ],
)
def test_composition(spec: dict[str, Any] | None, ctx: dict[str, Any], expected: bool) -> None:
    assert when(spec).test(ctx) is expected


NESTED = {
    "all": [
        {"field": "weekday", "op": "in", "value": ["sat", "sun"]},
        {
            "any": [
                {"field": "priority", "op": "ge", "value": 5},
                {"not": {"field": "customer.region", "op": "in", "value": ["BR", "PT"]}},
            ]
        },
    ]
}


@pytest.mark.parametrize(
    ("ctx", "expected"),
    [
        pytest.param({"weekday": "sat", "priority": 5, "customer.region": "BR"}, True, id="prio"),
        pytest.param({"weekday": "sun", "priority": 0, "customer.region": "US"}, True, id="abroad"),
        pytest.param({"weekday": "sun", "priority": 0}, True, id="no-region"),
        pytest.param({"weekday": "sat", "priority": 0, "customer.region": "pt"}, False, id="home"),
        pytest.param({"weekday": "mon", "priority": 9, "customer.region": "US"}, False, id="mon"),
    ],
)
def test_nested_three_deep(ctx: dict[str, Any], expected: bool) -> None:
    assert when(NESTED).test(ctx) is expected


def test_composition_text_describes_every_part() -> None:
    text = when(NESTED).text
    for word in ["weekday", "in", "priority", "ge", "not (", "customer.region", " and ", " or "]:
        assert word in text
    assert when(None).text == "always"


# --- rulesets and routing ----------------------------------------------------------------------


def _rule(name: str, needle: str, then: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "when": {"field": "body", "op": "contains", "value": needle},
        "then": then,
    }


def _policy_workstream(policy: str) -> CompiledWorkstream:
    return workstream(
        {
            "fallback_queue": "general",
            "classification": [
                {
                    "name": "topics",
                    "hit_policy": policy,
                    "rules": [
                        _rule("a", "alpha", {"priority": 1, "variables": {"tag": "one", "a": 1}}),
                        _rule("none", "zeta", {"priority": 99}),
                        _rule(
                            "b",
                            "beta",
                            {"priority": 2, "skills": {"s": 3}, "variables": {"tag": "two"}},
                        ),
                    ],
                }
            ],
        }
    )


def test_hit_policy_first_applies_only_the_first_match() -> None:
    result = classify(_policy_workstream("first"), {"body": "alpha beta"})
    assert [(m.ruleset, m.rule) for m in result.matched] == [("topics", "a")]
    assert result.priority == 1
    assert result.variables == {"tag": "one", "a": 1}
    assert result.skills == {}


def test_hit_policy_first_falls_through_to_a_later_rule() -> None:
    result = classify(_policy_workstream("first"), {"body": "only beta"})
    assert [m.rule for m in result.matched] == ["b"]
    assert result.priority == 2


def test_hit_policy_all_applies_every_match_later_overrides() -> None:
    result = classify(_policy_workstream("all"), {"body": "alpha beta"})
    assert [m.rule for m in result.matched] == ["a", "b"]
    assert result.priority == 2
    assert result.variables == {"tag": "two", "a": 1}
    assert result.skills == {"s": 3}


CHAINED = workstream(
    {
        "fallback_queue": "general",
        "language": "pt-BR",
        "classification": [
            {
                "name": "topics",
                "rules": [
                    {
                        "name": "billing",
                        "when": {"field": "body", "op": "matches", "value": "boleto|fatura"},
                        "then": {"skills": {"billing": 5}, "variables": {"vip": True}},
                    },
                    {
                        "name": "orders",
                        "when": {"field": "body", "op": "contains", "value": "pedido"},
                        "then": {"skills": {"orders": 3}, "priority": 5},
                    },
                ],
            },
            {
                "name": "derived",
                "hit_policy": "all",
                "rules": [
                    {
                        "name": "billing-expert",
                        "when": {"field": "skills.billing", "op": "ge", "value": 5},
                        "then": {"severity": "high"},
                    },
                    {
                        "name": "vip",
                        "when": {"field": "variables.vip", "op": "eq", "value": True},
                        "then": {"priority": 7, "language": "en"},
                    },
                    {
                        "name": "busy",
                        "when": {"field": "priority", "op": "ge", "value": 5},
                        "then": {"variables": {"busy": "yes"}, "skills": {"triage": 1}},
                    },
                ],
            },
        ],
        "routing": [
            {"name": "vip", "when": {"field": "variables.busy", "op": "exists"}, "queue": "vip"},
            {
                "name": "billing",
                "when": {"field": "skills.billing", "op": "exists"},
                "queue": "billing",
            },
            {"name": "never", "when": {"field": "body", "op": "eq", "value": "-"}, "queue": "x"},
            {
                "name": "orders",
                "when": {"field": "skills.orders", "op": "exists"},
                "queue": "orders",
            },
        ],
    }
)


def test_later_rulesets_see_earlier_outputs() -> None:
    result = classify(CHAINED, {"body": "Minha FATURA"})
    assert [(m.ruleset, m.rule) for m in result.matched] == [
        ("topics", "billing"),
        ("derived", "billing-expert"),
        ("derived", "vip"),
        ("derived", "busy"),  # priority 7 was set by the "vip" rule just before
    ]
    assert result.skills == {"billing": 5, "triage": 1}
    assert result.priority == 7
    assert result.severity == "high"
    assert result.language == "en"
    assert result.variables == {"vip": True, "busy": "yes"}
    # the first route (variables.busy) wins even though the billing route matches too
    assert result.queue == "vip"
    assert result.route is not None
    assert (result.route.ruleset, result.route.rule) == ("routing", "vip")
    assert "variables.busy" in result.route.why
    assert result.fallback is False


def test_priority_from_an_earlier_ruleset_is_tested() -> None:
    result = classify(CHAINED, {"body": "meu pedido 12"})
    assert [m.rule for m in result.matched] == ["orders", "busy"]
    assert result.priority == 5
    assert result.severity == "normal"
    assert result.language == "pt-BR"
    assert result.skills == {"orders": 3, "triage": 1}
    assert result.queue == "vip"


def test_no_route_matches_falls_back() -> None:
    result = classify(CHAINED, {"body": "oi, tudo bem?"})
    assert result.matched == []
    assert result.queue == "general"
    assert result.fallback is True
    assert result.route is None
    assert (result.priority, result.severity, result.language) == (0, "normal", "pt-BR")
    assert result.skills == {} and result.variables == {}


def test_match_records_carry_names_and_why() -> None:
    result = classify(CHAINED, {"body": "boleto"})
    first = result.matched[0]
    assert (first.ruleset, first.rule) == ("topics", "billing")
    assert "body" in first.why and "matches" in first.why and "boleto|fatura" in first.why
    expert = result.matched[1]
    assert "skills.billing" in expert.why and "ge" in expert.why


def test_trace_is_json_serializable() -> None:
    result = classify(CHAINED, {"body": "boleto"})
    trace = json.loads(json.dumps(result.trace()))
    assert trace["fallback"] is False
    assert trace["route"]["rule"] == "vip"
    assert [m["rule"] for m in trace["matched"]] == ["billing", "billing-expert", "vip", "busy"]
    assert trace["errors"] == []
    fallback = json.loads(json.dumps(classify(CHAINED, {}).trace()))
    assert fallback == {"matched": [], "route": None, "fallback": True, "errors": []}


def test_context_defaults_are_taken_from_the_context() -> None:
    result = classify(CHAINED, {"priority": 3, "severity": "low", "language": "es"})
    assert (result.priority, result.severity, result.language) == (3, "low", "es")


def test_classify_does_not_mutate_the_context() -> None:
    ctx = {"body": "boleto"}
    classify(CHAINED, ctx)
    assert ctx == {"body": "boleto"}


def test_rule_without_condition_always_matches() -> None:
    ws = workstream(
        {
            "fallback_queue": "general",
            "classification": [{"name": "r", "rules": [{"name": "all", "then": {"priority": 4}}]}],
            "routing": [{"name": "catch-all", "queue": "other"}],
        }
    )
    result = classify(ws, {})
    assert result.priority == 4
    assert result.matched[0].why == "always"
    assert result.queue == "other" and result.fallback is False


class _Explosive:
    def __eq__(self, other: object) -> bool:
        raise RuntimeError("boom")

    __hash__ = object.__hash__


def test_a_raising_predicate_is_recorded_not_raised() -> None:
    ws = workstream(
        {
            "fallback_queue": "general",
            "classification": [
                {
                    "name": "r",
                    "rules": [
                        {
                            "name": "eq",
                            "when": {"field": "variables.x", "op": "eq", "value": "a"},
                            "then": {"priority": 1},
                        }
                    ],
                }
            ],
            "routing": [
                {
                    "name": "q",
                    "when": {"field": "variables.x", "op": "eq", "value": "a"},
                    "queue": "q",
                }
            ],
        }
    )
    result = classify(ws, {"variables.x": _Explosive()})
    assert result.matched == [] and result.fallback is True
    assert len(result.errors) == 2
    assert result.errors[0].startswith("r/eq: RuntimeError: boom")
    assert result.errors[1].startswith("routing/q: RuntimeError")
    json.dumps(result.trace())


@pytest.mark.parametrize(
    "priority", ["1.5", "1e3", NAN, math.inf], ids=["1.5", "1e3", "nan", "inf"]
)
def test_odd_context_priority_does_not_raise(priority: Any) -> None:
    classify(CHAINED, {"priority": priority})


# --- properties --------------------------------------------------------------------------------

RICH = workstream(
    {
        "fallback_queue": "general",
        "language": "pt-BR",
        "timezone": "America/Sao_Paulo",
        "classification": [
            {
                "name": "topics",
                "hit_policy": "first",
                "rules": [
                    _rule("billing", "boleto", {"skills": {"billing": 5}}),
                    {
                        "name": "orders",
                        "when": {"field": "body", "op": "matches", "value": r"^pedido\s+\d+"},
                        "then": {"skills": {"orders": 3}, "variables": {"topic": "orders"}},
                    },
                    {
                        "name": "media",
                        "when": {"field": "media_count", "op": "gt", "value": 2},
                        "then": {"priority": 2},
                    },
                ],
            },
            {
                "name": "everything",
                "hit_policy": "all",
                "rules": [
                    {
                        "name": "abroad",
                        "when": {
                            "all": [
                                {"field": "customer.region", "op": "exists"},
                                {"field": "customer.region", "op": "not-in", "value": ["BR"]},
                            ]
                        },
                        "then": {"language": "en"},
                    },
                    {
                        "name": "night",
                        "when": {
                            "any": [
                                {"field": "time", "op": "ge", "value": "18:00"},
                                {"field": "time", "op": "lt", "value": "09:00"},
                            ]
                        },
                        "then": {"variables": {"night": True}},
                    },
                    {
                        "name": "weekend",
                        "when": {"field": "weekday", "op": "in", "value": ["sat", "sun"]},
                        "then": {"severity": "low"},
                    },
                    {
                        "name": "vip",
                        "when": {
                            "not": {"field": "variables.x", "op": "ne", "value": "vip"},
                        },
                        "then": {"priority": 9, "severity": "critical"},
                    },
                    {
                        "name": "sandbox",
                        "when": {"field": "sandbox", "op": "eq", "value": True},
                        "then": {"variables": {"test": True}},
                    },
                    {
                        "name": "small",
                        "when": {"field": "media_count", "op": "le", "value": 1},
                        "then": {"skills": {"small": 1}},
                    },
                    {
                        "name": "x-list",
                        "when": {"field": "variables.x", "op": "contains", "value": "gold"},
                        "then": {"skills": {"gold": 10}},
                    },
                    {
                        "name": "no-profile",
                        "when": {"field": "profile_name", "op": "exists", "value": False},
                        "then": {"variables": {"anonymous": True}},
                    },
                ],
            },
        ],
        "routing": [
            {"name": "vip", "when": {"field": "priority", "op": "ge", "value": 9}, "queue": "vip"},
            {
                "name": "billing",
                "when": {"field": "skills.billing", "op": "exists"},
                "queue": "billing",
            },
            {
                "name": "night",
                "when": {"field": "variables.night", "op": "eq", "value": True},
                "queue": "night",
            },
            {
                "name": "date",
                "when": {"field": "date", "op": "eq", "value": "2026-12-25"},
                "queue": "holiday",
            },
        ],
    }
)
RICH_QUEUES = {"general", "vip", "billing", "night", "holiday"}

FIELDS = sorted(set(CONTEXT_FIELDS) - {"priority"} | {"variables.x", "skills.billing"})
VALUES = st.one_of(
    st.text(),
    st.sampled_from(["boleto", "Pedido 42", "18:30", "08:00", "sat", "BR", "vip", "2026-12-25"]),
    st.integers(),
    st.floats(),  # includes nan and ±inf
    st.booleans(),
    st.none(),
    st.lists(st.text(max_size=5), max_size=3),
)
# The context's priority may be anything too (text, floats, nan): classify must not raise.
CONTEXTS = st.builds(
    lambda fields, priority: {**fields, **priority},
    st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=12),
    st.one_of(st.just({}), st.builds(lambda p: {"priority": p}, VALUES)),
)


def _outcome(result: Classification) -> tuple[Any, ...]:
    return (
        result.queue,
        result.skills,
        result.priority,
        result.severity,
        result.language,
        result.variables,
        result.matched,
        result.route,
        result.fallback,
        result.errors,
    )


@FAST
@given(ctx=CONTEXTS)
def test_classify_is_total_and_deterministic(ctx: dict[str, Any]) -> None:
    first = classify(RICH, ctx)
    second = classify(RICH, dict(ctx))
    assert first.queue in RICH_QUEUES
    assert first.fallback is (first.route is None)
    assert first.errors == []
    assert _outcome(first) == _outcome(second)
    json.dumps(first.trace())


def test_classify_with_nan_everywhere_does_not_raise() -> None:
    ctx = {name: NAN for name in FIELDS}
    result = classify(RICH, ctx)
    assert result.queue in RICH_QUEUES
    assert result.errors == []


@FAST
@given(text=st.text())
def test_fold_is_idempotent_and_strips_combining_marks(text: str) -> None:
    folded = fold(text)
    assert fold(folded) == folded
    assert not any(unicodedata.combining(c) for c in folded)
    assert folded == folded.casefold()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Ação", "acao"), ("BOLETO", "boleto"), ("straße", "strasse"), ("Ｆｕｌｌ", "full"), ("", "")],
)
def test_fold_examples(text: str, expected: str) -> None:
    assert fold(text) == expected
