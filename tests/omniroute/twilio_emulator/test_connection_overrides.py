"""Reading Twilio's webhook connection overrides from a URL fragment (pure)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from omniroute.twilio_emulator.connection_overrides import (
    DEFAULT_OVERRIDES,
    ConnectionOverrides,
    parse_overrides,
    split_webhook_url,
)


def test_no_fragment_means_twilio_defaults() -> None:
    url, overrides = split_webhook_url("https://example.com/twilio/inbound?x=1")

    assert url == "https://example.com/twilio/inbound?x=1"
    assert overrides == DEFAULT_OVERRIDES
    assert (overrides.connect_timeout_ms, overrides.read_timeout_ms) == (5000, 15000)
    assert (overrides.total_time_ms, overrides.retry_count) == (15000, 1)
    assert overrides.retry_policy == {"ct"}
    assert overrides.retries("ct")
    assert not overrides.retries("5xx") and not overrides.retries("rt")


def test_fragment_is_split_off_and_read() -> None:
    url, overrides = split_webhook_url(
        "https://example.com/s?a=1#ct=250&rt=900&tt=4000&rc=3&rp=5xx,rt&e=sydney&sni=y"
    )

    assert url == "https://example.com/s?a=1"
    assert overrides == ConnectionOverrides(
        connect_timeout_ms=250,
        read_timeout_ms=900,
        total_time_ms=4000,
        retry_count=3,
        retry_policy=frozenset({"5xx", "rt"}),
    )


def test_client_timeout_follows_the_overrides() -> None:
    limits = parse_overrides("ct=250&rt=900").client_timeout(2.5)

    assert (limits.total, limits.sock_connect, limits.sock_read) == (2.5, 0.25, 0.9)


@pytest.mark.parametrize(
    ("fragment", "expected"),
    [
        ("ct=50", {"connect_timeout_ms": 100}),
        ("ct=20000", {"connect_timeout_ms": 10000}),
        ("rt=99999", {"read_timeout_ms": 15000}),
        ("tt=1", {"total_time_ms": 100}),
        ("rc=9", {"retry_count": 5}),
        ("rc=-1", {"retry_count": 0}),
        ("rc=two", {}),
        ("ct=&rt=fast", {}),
        ("rp=sometimes", {}),
        ("rp=", {}),
        ("rp=4XX, bogus", {"retry_policy": frozenset({"4xx"})}),
        ("rp=all", {"retry_policy": frozenset({"ct", "rt", "4xx", "5xx", "other"})}),
        ("unknown=1&e=ashburn", {}),
    ],
)
def test_bad_values_are_clamped_or_ignored(fragment: str, expected: dict[str, Any]) -> None:
    assert parse_overrides(fragment) == dataclasses.replace(DEFAULT_OVERRIDES, **expected)
