"""The URLs Twilio calls carry the connection overrides in their fragment: Twilio strips the
fragment before it requests and signs, so the router still sees (and checks) the plain path."""

from __future__ import annotations

from urllib.parse import parse_qs

from yarl import URL

from omniroute.infra.settings import Settings
from omniroute.infra.webhook_urls import CONNECTION_OVERRIDES, inbound_url, status_url
from tests.support import PUBLIC_URL


def _overrides(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(URL(url).fragment).items()}


def test_each_url_is_the_routers_path_with_the_overrides_in_the_fragment() -> None:
    for url, path in (
        (inbound_url(PUBLIC_URL, "contoso"), "/twilio/contoso/inbound"),
        (status_url(PUBLIC_URL, "contoso"), "/twilio/contoso/status"),
    ):
        parsed = URL(url)
        assert str(parsed.with_fragment(None)) == PUBLIC_URL + path
        assert parsed.query_string == ""  # a query would be part of what Twilio signs
        assert "#" + parsed.fragment == CONNECTION_OVERRIDES


def test_the_overrides_retry_what_is_safe_to_retry_within_twilios_limits() -> None:
    overrides = _overrides(inbound_url(PUBLIC_URL, "contoso"))
    assert set(overrides) == {"ct", "rt", "tt", "rc", "rp"}
    assert set(overrides["rp"].split(",")) == {"ct", "rt", "5xx"}  # dedup makes these safe
    assert 1 <= int(overrides["rc"]) <= 5
    connect, read, total = (int(overrides[k]) for k in ("ct", "rt", "tt"))
    assert connect + read <= total <= 15_000  # Twilio's ceiling for all attempts together


def test_the_router_answers_before_twilios_read_timeout() -> None:
    """The read timeout leaves room for the router's own wait on the broker's confirm."""
    read_ms = int(_overrides(status_url(PUBLIC_URL, "contoso"))["rt"])
    default_confirm = Settings.model_fields["ingress_confirm_timeout"].default
    assert default_confirm * 1000 < read_ms
