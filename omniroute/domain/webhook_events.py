"""Twilio's webhook forms → the events they cause. Pure: no I/O.

The router builds ``message.received`` and ``message.status`` from the forms Twilio posts;
the reconciler builds the very same events from what Twilio's Messages API lists when a
webhook never reached us. Both go through these functions, so an event has the same id
(derived from the MessageSid) whichever way it arrived, and the stages' dedup holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from multidict import MultiDict
from pydantic import ValidationError

from omniroute.errors import UnknownAccountSid, UnknownNumber
from schemas.config import Account
from schemas.events import Envelope, EventType, Media, MessageReceived, MessageStatus, event_id
from schemas.twilio import InboundMessageForm, StatusCallbackForm


def flat_form(form: MultiDict[str]) -> dict[str, str | list[str]]:
    """The form as a dict; a repeated field keeps all its values as a list."""
    out: dict[str, str | list[str]] = {}
    for key in form:
        if key in out:
            continue
        values = form.getall(key)
        out[key] = values[0] if len(values) == 1 else values
    return out


def inbound_event_id(account: str, message_sid: str) -> str:
    """The id of the ``message.received`` event for a customer message."""
    return event_id(EventType.MESSAGE_RECEIVED, account, message_sid)


def inbound_event(account: Account, form: MultiDict[str], received_at: datetime) -> Envelope:
    """The ``message.received`` event for an inbound webhook form.

    Raises ValidationError (not a Twilio webhook), UnknownAccountSid (AccountSid is not this
    account's) or UnknownNumber (the business number is not configured).
    """
    inbound = InboundMessageForm.model_validate(dict(form))
    if inbound.account_sid != account.account_sid:
        raise UnknownAccountSid("AccountSid does not match this account")
    number = account.find_number(inbound.business_number)
    if number is None:
        raise UnknownNumber(f"{inbound.business_number} is not configured")
    payload = MessageReceived(
        message_sid=inbound.message_sid,
        account_sid=inbound.account_sid,
        business_number=number.number,
        number_name=number.name,
        workstream=number.workstream,
        customer=inbound.customer,
        customer_wa_id=inbound.wa_id,
        external_user_id=inbound.external_user_id,
        profile_name=inbound.profile_name,
        body=inbound.body,
        media=[Media.model_validate(m) for m in inbound.media()],
        message_type=inbound.message_type,
        button_text=inbound.button_text,
        button_payload=inbound.button_payload,
        location=inbound.location(),
        replied_to_sid=inbound.original_replied_message_sid,
        sandbox=number.sandbox,
        received_at=received_at,
        form=flat_form(form),
    )
    eid = inbound_event_id(account.name, inbound.message_sid)
    return Envelope(
        id=eid,
        type=EventType.MESSAGE_RECEIVED,
        occurred_at=received_at,
        account=account.name,
        correlation_id=eid,
        data=payload.model_dump(mode="json"),
    )


def status_event_id(account: str, message_sid: str, status: str, error_code: str | None) -> str:
    """The id of the ``message.status`` event for one status of one message."""
    return event_id(EventType.MESSAGE_STATUS, account, message_sid, status, error_code or "")


def status_event(account: Account, form: Mapping[str, str], received_at: datetime) -> Envelope:
    """The ``message.status`` event for a status callback form (or a fetched status).

    Raises ValidationError when the form is not a status callback.
    """
    fields = form if isinstance(form, MultiDict) else MultiDict(form)
    callback = StatusCallbackForm.model_validate(dict(fields))
    payload = MessageStatus(
        message_sid=callback.message_sid,
        account_sid=callback.account_sid,
        status=callback.message_status,
        error_code=callback.error_code,
        error_message=callback.error_message,
        received_at=received_at,
        form=flat_form(fields),
    )
    return Envelope(
        id=status_event_id(
            account.name, callback.message_sid, callback.message_status, callback.error_code
        ),
        type=EventType.MESSAGE_STATUS,
        occurred_at=received_at,
        account=account.name,
        correlation_id=event_id(account.name, callback.message_sid),
        data=payload.model_dump(mode="json"),
    )


__all__ = [
    "ValidationError",
    "flat_form",
    "inbound_event",
    "inbound_event_id",
    "status_event",
    "status_event_id",
]
