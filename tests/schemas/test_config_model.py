"""The configuration model through the loader: a valid file parses, and every problem is
reported with the file, the right line and the field path, all at once."""

from __future__ import annotations

from datetime import date

import pytest

from consumers.rules import classify, compile_workstream
from omniroute.errors import ConfigError
from omniroute.infra.config_loader import parse_config
from schemas.config import Config

SOURCE = "cfg.yaml"
TOKEN = "tok-5f1c9a7e-super-secret"
WEBHOOK_KEY = "whk-0b7d-also-secret"
ENVIRON = {"TOKEN_CONTOSO": TOKEN, "WEBHOOK_KEY_CONTOSO": WEBHOOK_KEY}

VALID = """\
accounts:
  - name: contoso
    account_sid: AC00000000000000000000000000000001
    auth_token_env: TOKEN_CONTOSO
    webhook_keys_env: {key-1: WEBHOOK_KEY_CONTOSO}
    numbers:
      - {name: Support, number: "+5511999990000", workstream: support}
workstreams:
  - name: support
    language: pt-BR
    timezone: America/Sao_Paulo
    fallback_queue: general
    templates:
      - name: resume
        default_language: pt-BR
        languages:
          pt-BR: {content_sid: HX00000000000000000000000000000013, text: "Olá {{1}}"}
    automated_messages:
      out_of_hours:
        text: {pt-BR: "Fechado"}
        template: resume
    classification:
      - name: topics
        hit_policy: first
        rules:
          - name: billing
            when: {field: body, op: matches, value: "boleto|fatura"}
            then: {skills: {billing: 5}, variables: {topic: billing}}
          - name: orders
            when:
              all:
                - {field: body, op: contains, value: pedido}
                - {field: customer.region, op: in, value: [BR, PT]}
            then: {skills: {orders: 3}, priority: 2}
      - name: urgency
        hit_policy: all
        rules:
          - name: urgent
            when:
              any:
                - {field: body, op: contains, value: urgente}
                - {not: {field: time, op: lt, value: "09:00"}}
            then: {priority: 10, severity: high}
          - name: abroad
            when: {field: customer.region, op: not-in, value: [BR]}
            then: {language: en}
    routing:
      - name: billing
        when: {field: skills.billing, op: exists}
        queue: billing
      - {name: orders, when: {field: skills.orders, op: ge, value: 1}, queue: orders}
queues:
  - name: general
  - name: orders
  - name: billing
    hours:
      timezone: America/Sao_Paulo
      weekly: {mon: ["09:00-18:00"], sat: ["22:00-02:00"]}
      holidays: ["2026-12-25"]
      out_of_hours: {action: transfer, queue: general}
"""


def line_of(text: str, needle: str) -> int:
    """1-based line of the only occurrence of ``needle`` in ``text``."""
    assert text.count(needle) == 1, f"{needle!r} must occur exactly once"
    return text[: text.index(needle)].count("\n") + 1


def edit(old: str, new: str, text: str = VALID) -> str:
    assert text.count(old) == 1, f"{old!r} must occur exactly once"
    return text.replace(old, new)


def problems_of(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SOURCE, ENVIRON if environ is None else environ)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def reported(problems: list[str], line: int, path: str, message: str) -> bool:
    prefix = f"{SOURCE}:{line}: {path}: "
    return any(p.startswith(prefix) and message in p for p in problems)


def test_valid_config_parses() -> None:
    config = parse_config(VALID, SOURCE, ENVIRON)
    assert isinstance(config, Config)
    assert [w.name for w in config.workstreams] == ["support"]
    assert [q.name for q in config.queues] == ["general", "orders", "billing"]
    support = config.workstreams[0]
    assert [rs.name for rs in support.classification] == ["topics", "urgency"]
    assert support.classification[1].rules[1].when is not None
    billing = config.queues[2]
    assert billing.hours is not None
    assert billing.hours.holidays == [date(2026, 12, 25)]
    assert billing.hours.out_of_hours.queue == "general"
    account = config.accounts[0]
    assert account.auth_token is not None
    assert account.auth_token.get_secret_value() == TOKEN
    assert account.webhook_keys["key-1"].get_secret_value() == WEBHOOK_KEY


def test_valid_config_compiles_and_classifies() -> None:
    compiled = compile_workstream(parse_config(VALID, SOURCE, ENVIRON).workstreams[0])
    billing = classify(compiled, {"body": "Meu BOLETO", "customer.region": "BR", "time": "10:00"})
    assert billing.queue == "billing"
    assert billing.priority == 10  # "not time lt 09:00"
    orders = classify(compiled, {"body": "pedido 1", "customer.region": "br", "time": "08:00"})
    assert (orders.queue, orders.priority, orders.language) == ("orders", 2, "pt-BR")
    abroad = classify(compiled, {"body": "hi", "customer.region": "US", "time": "08:00"})
    assert (abroad.queue, abroad.fallback, abroad.language) == ("general", True, "en")


ERRORS = [
    pytest.param(
        ("field: body, op: matches", "field: bodyy, op: matches"),
        "bodyy",
        "workstreams[0].classification[0].rules[0].when.field",
        "unknown field 'bodyy'",
        id="unknown-condition-field",
    ),
    pytest.param(
        ('value: "boleto|fatura"', 'value: "boleto(|fatura"'),
        "boleto(|fatura",
        "workstreams[0].classification[0].rules[0].when",
        "not a valid regular expression",
        id="bad-regex",
    ),
    pytest.param(
        ("op: in, value: [BR, PT]", "op: in, value: BR"),
        "op: in, value: BR",
        "workstreams[0].classification[0].rules[1].when.all[1]",
        "op in needs a non-empty list",
        id="in-without-list",
    ),
    pytest.param(
        (
            "            then: {skills: {billing: 5}, variables",
            "            thn: {skills: {billing: 5}, variables",
        ),
        "thn:",
        "workstreams[0].classification[0].rules[0].thn",
        "Extra inputs are not permitted",
        id="typo-key-in-rule",
    ),
    pytest.param(
        ("        queue: billing", "        queue: bilingg"),
        "queue: bilingg",
        "workstreams[0].routing[0].queue",
        "queue 'bilingg' is not defined",
        id="route-to-unknown-queue",
    ),
    pytest.param(
        ("    fallback_queue: general", "    fallback_queue: nowhere"),
        "fallback_queue: nowhere",
        "workstreams[0].fallback_queue",
        "queue 'nowhere' is not defined",
        id="unknown-fallback-queue",
    ),
    pytest.param(
        ("workstream: support}", "workstream: suport}"),
        "workstream: suport}",
        "accounts[0].numbers[0].workstream",
        "workstream 'suport' is not defined",
        id="number-feeds-unknown-workstream",
    ),
    pytest.param(
        ("{action: transfer, queue: general}", "{action: transfer, queue: nowhere}"),
        "queue: nowhere",
        "queues[2].hours.out_of_hours.queue",
        "queue 'nowhere' is not defined",
        id="out-of-hours-transfer-to-unknown-queue",
    ),
    pytest.param(
        ("{action: transfer, queue: general}", "{action: transfer}"),
        "out_of_hours: {action: transfer}",
        "queues[2].hours.out_of_hours",
        "action transfer needs a queue",
        id="transfer-without-queue",
    ),
    pytest.param(
        ('mon: ["09:00-18:00"]', 'mon: ["9-18"]'),
        '"9-18"',
        "queues[2].hours.weekly",
        "'9-18' is not a time range",
        id="bad-time-range",
    ),
    pytest.param(
        ("      timezone: America/Sao_Paulo", "      timezone: Mars/Olympus"),
        "Mars/Olympus",
        "queues[2].hours.timezone",
        "unknown time zone 'Mars/Olympus'",
        id="unknown-time-zone-in-hours",
    ),
    pytest.param(
        ("\n    timezone: America/Sao_Paulo", "\n    timezone: America/Atlantis"),
        "America/Atlantis",
        "workstreams[0].timezone",
        "unknown time zone 'America/Atlantis'",
        id="unknown-time-zone-in-workstream",
    ),
    pytest.param(
        (
            "queues:\n  - name: general\n",
            "queues:\n  - name: general\n  - {name: general, priority: 3}\n",
        ),
        "{name: general, priority: 3}",
        "queues[1].name",
        "queue 'general' is defined twice",
        id="duplicate-queue",
    ),
    pytest.param(
        ("{skills: {orders: 3}", "{skills: {orders: 11}"),
        "orders: 11",
        "workstreams[0].classification[0].rules[1].then.skills",
        "proficiency must be 1-10, got 11",
        id="proficiency-11",
    ),
    pytest.param(
        ("        template: resume", "        template: resumee"),
        "template: resumee",
        "workstreams[0].automated_messages.out_of_hours.template",
        "template 'resumee' is not defined",
        id="automated-message-unknown-template",
    ),
    pytest.param(
        ("{field: body, op: contains, value: urgente}", "{field: body, op: contains, valu: x}"),
        "valu: x",
        "workstreams[0].classification[1].rules[0].when.any[0].valu",
        "Extra inputs are not permitted",
        id="typo-key-in-nested-condition",
    ),
    pytest.param(
        ('{not: {field: time, op: lt, value: "09:00"}}', "{not: {field: tiem, op: lt, value: 1}}"),
        "tiem",
        "workstreams[0].classification[1].rules[0].when.any[1].not.field",
        "unknown field 'tiem'",
        id="unknown-field-under-not",
    ),
]


@pytest.mark.parametrize(("change", "needle", "path", "message"), ERRORS)
def test_problem_is_reported_with_line_and_path(
    change: tuple[str, str], needle: str, path: str, message: str
) -> None:
    text = edit(*change)
    problems = problems_of(text)
    assert reported(problems, line_of(text, needle), path, message), problems


def test_missing_then_is_reported_at_the_rule() -> None:
    text = edit(
        "            then: {skills: {billing: 5}, variables",
        "            thn: {skills: {billing: 5}, variables",
    )
    problems = problems_of(text)
    assert reported(
        problems,
        line_of(text, "- name: billing\n            when"),
        "workstreams[0].classification[0].rules[0].then",
        "Field required",
    ), problems


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        pytest.param(("    language: pt-BR", "    language: pt: BR"), "pt: BR", id="mapping-value"),
        pytest.param(
            ("  - name: general\n", "  - name: general\n\t- name: tabbed\n"),
            "\t- name: tabbed",
            id="tab",
        ),
    ],
)
def test_invalid_yaml_reports_a_line(change: tuple[str, str], needle: str) -> None:
    text = edit(*change)
    problems = problems_of(text)
    assert len(problems) == 1
    assert "not valid YAML" in problems[0]
    line = int(problems[0].split(":")[1])
    # the parser may only notice a little after the offending text, never before it
    assert line_of(text, needle) <= line <= line_of(text, needle) + 1, problems


def test_mapping_value_error_is_on_its_exact_line() -> None:
    text = edit("    language: pt-BR", "    language: pt: BR")
    assert problems_of(text)[0].startswith(f"{SOURCE}:{line_of(text, 'pt: BR')}: not valid YAML")


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just text\n"], ids=["empty", "list", "scalar"])
def test_document_must_be_a_mapping(text: str) -> None:
    assert problems_of(text) == [f"{SOURCE}:1: expected a mapping with an 'accounts' list"]


def test_several_validation_problems_are_reported_at_once() -> None:
    text = VALID
    text = edit("field: body, op: matches", "field: bodyy, op: matches", text)
    text = edit("op: in, value: [BR, PT]", "op: in, value: BR", text)
    text = edit("{skills: {orders: 3}", "{skills: {orders: 11}", text)
    text = edit('mon: ["09:00-18:00"]', 'mon: ["9-18"]', text)
    text = edit("\n    timezone: America/Sao_Paulo", "\n    timezone: America/Atlantis", text)
    problems = problems_of(text)
    rules = "workstreams[0].classification[0].rules"
    expected = [
        (line_of(text, "bodyy"), f"{rules}[0].when.field", "unknown field"),
        (line_of(text, "op: in, value: BR"), f"{rules}[1].when.all[1]", "non-empty list"),
        (line_of(text, "orders: 11"), f"{rules}[1].then.skills", "proficiency"),
        (line_of(text, '"9-18"'), "queues[2].hours.weekly", "not a time range"),
        (line_of(text, "America/Atlantis"), "workstreams[0].timezone", "unknown time zone"),
    ]
    for line, path, message in expected:
        assert reported(problems, line, path, message), (path, problems)
    assert len(problems) == len(expected)


def test_several_reference_problems_are_reported_at_once() -> None:
    text = VALID
    text = edit("        queue: billing", "        queue: bilingg", text)
    text = edit("    fallback_queue: general", "    fallback_queue: nowhere", text)
    text = edit("workstream: support}", "workstream: suport}", text)
    text = edit("        template: resume", "        template: resumee", text)
    problems = problems_of(text)
    expected = [
        (line_of(text, "queue: bilingg"), "workstreams[0].routing[0].queue"),
        (line_of(text, "fallback_queue: nowhere"), "workstreams[0].fallback_queue"),
        (line_of(text, "workstream: suport"), "accounts[0].numbers[0].workstream"),
        (
            line_of(text, "template: resumee"),
            "workstreams[0].automated_messages.out_of_hours.template",
        ),
    ]
    for line, path in expected:
        assert reported(problems, line, path, "is not defined"), (path, problems)
    assert len(problems) == len(expected)


# --- secrets -----------------------------------------------------------------------------------


def test_missing_auth_token_env_is_reported_with_its_line() -> None:
    problems = problems_of(VALID, {"WEBHOOK_KEY_CONTOSO": WEBHOOK_KEY})
    assert problems == [
        f"{SOURCE}:{line_of(VALID, 'auth_token_env: TOKEN_CONTOSO')}: "
        "accounts[0].auth_token_env: environment variable TOKEN_CONTOSO is not set"
    ]


def test_empty_auth_token_counts_as_missing() -> None:
    problems = problems_of(VALID, {**ENVIRON, "TOKEN_CONTOSO": ""})
    assert reported(
        problems,
        line_of(VALID, "auth_token_env"),
        "accounts[0].auth_token_env",
        "TOKEN_CONTOSO is not set",
    )


def test_all_missing_secrets_are_reported_at_once() -> None:
    problems = problems_of(VALID, {})
    assert len(problems) == 2
    assert reported(
        problems,
        line_of(VALID, "auth_token_env"),
        "accounts[0].auth_token_env",
        "TOKEN_CONTOSO is not set",
    )
    assert reported(
        problems,
        line_of(VALID, "webhook_keys_env"),
        "accounts[0].webhook_keys_env.key-1",
        "WEBHOOK_KEY_CONTOSO is not set",
    )


def test_require_secrets_false_accepts_missing_secrets() -> None:
    config = parse_config(VALID, SOURCE, {}, require_secrets=False)
    assert config.accounts[0].auth_token is None
    assert config.accounts[0].webhook_keys == {}


def test_secrets_never_leak_into_repr_or_json() -> None:
    config = parse_config(VALID, SOURCE, ENVIRON)
    account = config.accounts[0]
    assert account.auth_token is not None and account.auth_token.get_secret_value() == TOKEN
    for rendered in (
        repr(config),
        str(config),
        repr(account),
        config.model_dump_json(),
        str(config.model_dump()),
        str(config.model_dump(mode="json")),
    ):
        assert TOKEN not in rendered
        assert WEBHOOK_KEY not in rendered


def test_secrets_in_the_file_are_rejected() -> None:
    text = edit(
        "    auth_token_env: TOKEN_CONTOSO\n",
        "    auth_token_env: TOKEN_CONTOSO\n    auth_token: inline-secret\n",
    )
    problems = problems_of(text)
    assert reported(problems, line_of(text, "- name: contoso"), "accounts[0]", "do not belong")


# --- bugs --------------------------------------------------------------------------------------


def test_extra_key_beside_all_has_the_right_path() -> None:
    text = edit(
        '{field: body, op: matches, value: "boleto|fatura"}',
        "{all: [{field: body, op: exists}], field: body}",
    )
    problems = problems_of(text)
    path = "workstreams[0].classification[0].rules[0].when.field"
    assert reported(problems, line_of(text, "{all: [{field"), path, "Extra inputs"), problems


def test_unquoted_time_in_a_condition_is_not_silently_dead() -> None:
    text = edit(
        '{field: body, op: matches, value: "boleto|fatura"}', "{field: time, op: ge, value: 18:00}"
    )
    try:
        config = parse_config(text, SOURCE, ENVIRON)
    except ConfigError:
        return  # rejecting the unquoted time would be a fine fix too
    compiled = compile_workstream(config.workstreams[0])
    assert classify(compiled, {"time": "19:00"}).skills == {"billing": 5}
