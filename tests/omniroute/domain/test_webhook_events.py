"""Twilio forms → events, as the router (webhooks) and the reconciler (Messages API) both
build them: the same message gives the same event id whichever way it arrived, so the
stages' dedup holds; a form of another account or number is refused."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from multidict import MultiDict
from pydantic import ValidationError

from omniroute.domain.webhook_events import (
    flat_form,
    inbound_event,
    inbound_event_id,
    status_event,
    status_event_id,
)
from omniroute.errors import UnknownAccountSid, UnknownNumber
from omniroute.infra.config_loader import parse_config
from schemas.config import Account
from schemas.events import EventType
from tests.support import (
    ACCOUNT_SID,
    BUSINESS,
    CONFIG_YAML,
    ENVIRON,
    OTHER_ACCOUNT_SID,
    SANDBOX,
    inbound_form,
    new_sid,
    status_form,
)

AT = datetime(2026, 3, 1, 12, tzinfo=UTC)
LATER = datetime(2026, 3, 1, 13, tzinfo=UTC)


@pytest.fixture(scope="module")
def contoso() -> Account:
    config = parse_config(CONFIG_YAML, "test-config.yaml", ENVIRON)
    return next(a for a in config.accounts if a.name == "contoso")


def test_an_inbound_form_becomes_message_received_of_its_number(contoso: Account) -> None:
    sid = new_sid()
    form = MultiDict(inbound_form(sid=sid, customer="+5511988887777", body="oi", to=SANDBOX))
    event = inbound_event(contoso, form, AT)
    assert event.type == EventType.MESSAGE_RECEIVED
    assert event.id == event.correlation_id == inbound_event_id("contoso", sid)
    data = event.data
    assert (data["message_sid"], data["customer"], data["body"]) == (sid, "+5511988887777", "oi")
    assert (data["business_number"], data["workstream"], data["sandbox"]) == (
        SANDBOX,
        "support-en",
        True,
    )
    assert data["form"]["MessageSid"] == sid  # the form is kept, unknown fields too


def test_the_same_message_makes_the_same_event_id_whenever_it_arrives(contoso: Account) -> None:
    """A webhook, its retry and the reconciler's rebuild an hour later: one event id."""
    form = MultiDict(inbound_form())
    first, again = inbound_event(contoso, form, AT), inbound_event(contoso, form, LATER)
    assert first.id == again.id
    other = inbound_event(contoso, MultiDict(inbound_form()), AT)
    assert other.id != first.id


def test_a_form_of_another_account_or_an_unconfigured_number_is_refused(
    contoso: Account,
) -> None:
    with pytest.raises(UnknownAccountSid):
        inbound_event(contoso, MultiDict(inbound_form(account_sid=OTHER_ACCOUNT_SID)), AT)
    with pytest.raises(UnknownNumber):
        inbound_event(contoso, MultiDict(inbound_form(to="+5511900000000")), AT)
    with pytest.raises(ValidationError):
        inbound_event(contoso, MultiDict([("Body", "no sid, no sender")]), AT)


def test_each_status_of_a_message_is_its_own_event_and_a_repeat_is_the_same(
    contoso: Account,
) -> None:
    sid = new_sid()
    delivered = status_event(contoso, dict(status_form(sid, "delivered")), AT)
    repeated = status_event(contoso, MultiDict(status_form(sid, "delivered")), LATER)
    failed = status_event(contoso, dict(status_form(sid, "failed", error_code="63016")), AT)
    undelivered = status_event(contoso, dict(status_form(sid, "failed", error_code="30003")), AT)
    assert delivered.id == repeated.id == status_event_id("contoso", sid, "delivered", None)
    assert len({delivered.id, failed.id, undelivered.id}) == 3
    assert delivered.correlation_id == failed.correlation_id  # one message, one thread
    assert failed.data["error_code"] == "63016"
    assert failed.data["account_sid"] == ACCOUNT_SID


def test_a_repeated_form_field_keeps_every_value() -> None:
    form = MultiDict([("MediaUrl0", "a"), ("Body", "x"), ("MediaUrl0", "b"), ("To", BUSINESS)])
    assert flat_form(form) == {"MediaUrl0": ["a", "b"], "Body": "x", "To": BUSINESS}
