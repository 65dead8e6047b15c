"""The webhook form parser: as strict as the standard library's, whatever the input."""

from __future__ import annotations

from urllib.parse import parse_qsl, quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.twilio_webhooks import Rejected, _parse_form


def _stdlib(body: bytes) -> list[tuple[str, str]] | None:
    try:
        text = body.decode("utf-8")
        return parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), errors="strict")
    except (UnicodeDecodeError, ValueError):
        return None


def _ours(body: bytes) -> list[tuple[str, str]] | None:
    try:
        return list(_parse_form(body).items())
    except Rejected as rejected:
        assert rejected.response.status == 400
        return None


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"a=1&b=%FF",
        b"a=1&b",
        b"a=b+c%20d&e=",
        b"a=1&&b=2",
        b"a=1&",
        b"a=%E2%9C%93&a=x",
        b"=v",
        b"a=1;b=2",
        b"a=%zz",
        b"a=%EF%BF%BD",
        "a=\ufffd".encode(),
        b"a=\xff",
        b"Body=Ol%C3%A1%2C+tudo+bem%3F&To=whatsapp%3A%2B5511999990000",
    ],
)
def test_known_cases_match_the_strict_stdlib_parser(body: bytes) -> None:
    assert _ours(body) == _stdlib(body)


field = st.text(alphabet=st.sampled_from("ab=&+%;\ufffd\u00e1 ")) | st.text(max_size=12)


@given(st.lists(st.tuples(field, field), max_size=6), st.binary(max_size=8))
def test_any_form_parses_as_the_stdlib_parser_would(
    pairs: list[tuple[str, str]], noise: bytes
) -> None:
    encoded = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs).encode()
    for body in (encoded, encoded + noise, "&".join(k + "=" + v for k, v in pairs).encode()):
        assert _ours(body) == _stdlib(body)
