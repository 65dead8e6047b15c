"""Twilio's webhook forms: the inbound WhatsApp message and the status callback.

Twilio adds fields without notice, so both models keep what they do not know
(``extra="allow"``); the router signs over, and the event carries, every field received.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
# A channel address as Twilio writes it: "whatsapp:+14155238886", or for WhatsApp username
# senders a business-scoped user id such as "whatsapp:US.13491208655302741918".
ADDRESS = re.compile(r"^(?P<channel>[a-z]+):(?P<id>\S{1,256})$")
MESSAGE_SID = re.compile(r"^[A-Z]{2}[0-9a-fA-F]{32}$")
ACCOUNT_SID = re.compile(r"^AC[0-9a-fA-F]{32}$")
MAX_MEDIA = 10
SID_EXPECTED = "expected a Twilio message sid: two letters such as SM, then 32 hex digits"


def _message_sid(value: str) -> str:
    if not MESSAGE_SID.match(value):
        raise ValueError(SID_EXPECTED)
    return value


MessageSid = Annotated[str, AfterValidator(_message_sid)]


def split_address(address: str) -> tuple[str, str]:
    """``"whatsapp:+1415…"`` → ``("whatsapp", "+1415…")``; raises ValueError if malformed."""
    match = ADDRESS.match(address)
    if not match:
        raise ValueError(f"not a channel address: {address!r}")
    return match["channel"], match["id"]


class InboundMessageForm(BaseModel):
    """The form Twilio posts to the inbound URL for a customer's WhatsApp message."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    message_sid: MessageSid = Field(alias="MessageSid")
    account_sid: str = Field(alias="AccountSid")
    from_: str = Field(alias="From")
    to: str = Field(alias="To")
    body: str = Field(default="", alias="Body")
    num_media: int = Field(default=0, alias="NumMedia", ge=0, le=MAX_MEDIA)
    messaging_service_sid: str | None = Field(default=None, alias="MessagingServiceSid")
    profile_name: str | None = Field(default=None, alias="ProfileName")
    wa_id: str | None = Field(default=None, alias="WaId")
    external_user_id: str | None = Field(default=None, alias="ExternalUserId")
    message_type: str | None = Field(default=None, alias="MessageType")
    button_text: str | None = Field(default=None, alias="ButtonText")
    button_payload: str | None = Field(default=None, alias="ButtonPayload")
    latitude: str | None = Field(default=None, alias="Latitude")
    longitude: str | None = Field(default=None, alias="Longitude")
    address: str | None = Field(default=None, alias="Address")
    label: str | None = Field(default=None, alias="Label")
    original_replied_message_sid: str | None = Field(
        default=None, alias="OriginalRepliedMessageSid"
    )
    num_segments: str | None = Field(default=None, alias="NumSegments")
    api_version: str | None = Field(default=None, alias="ApiVersion")

    @field_validator("account_sid")
    @classmethod
    def _account_sid(cls, value: str) -> str:
        if not ACCOUNT_SID.match(value):
            raise ValueError("expected a Twilio account sid (AC followed by 32 hex digits)")
        return value

    @field_validator("from_", "to")
    @classmethod
    def _address(cls, value: str) -> str:
        channel, _ = split_address(value)
        if channel != "whatsapp":
            raise ValueError(f"expected a whatsapp: address, got channel {channel!r}")
        return value

    @model_validator(mode="after")
    def _media_present(self) -> InboundMessageForm:
        extra = self.model_extra or {}
        for n in range(self.num_media):
            if not extra.get(f"MediaUrl{n}"):
                raise ValueError(f"NumMedia is {self.num_media} but MediaUrl{n} is missing")
        return self

    @property
    def customer(self) -> str:
        return split_address(self.from_)[1]

    @property
    def business_number(self) -> str:
        return split_address(self.to)[1]

    def media(self) -> list[dict[str, Any]]:
        extra = self.model_extra or {}
        return [
            {"url": extra[f"MediaUrl{n}"], "content_type": extra.get(f"MediaContentType{n}")}
            for n in range(self.num_media)
        ]

    def location(self) -> dict[str, str] | None:
        if self.latitude is None or self.longitude is None:
            return None
        fields = {"latitude": self.latitude, "longitude": self.longitude}
        if self.address:
            fields["address"] = self.address
        if self.label:
            fields["label"] = self.label
        return fields


class StatusCallbackForm(BaseModel):
    """The form Twilio posts to a message's StatusCallback URL."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    message_sid: MessageSid = Field(alias="MessageSid")
    message_status: str = Field(alias="MessageStatus", min_length=1, max_length=64)
    account_sid: str | None = Field(default=None, alias="AccountSid")
    error_code: str | None = Field(default=None, alias="ErrorCode")
    error_message: str | None = Field(default=None, alias="ErrorMessage")
    from_: str | None = Field(default=None, alias="From")
    to: str | None = Field(default=None, alias="To")

    @field_validator("message_status")
    @classmethod
    def _status(cls, value: str) -> str:
        # Unknown statuses are kept and passed on (Twilio adds them without notice), but
        # they must at least look like a status word.
        if not re.fullmatch(r"[a-z_-]+", value):
            raise ValueError("expected a status word such as 'delivered'")
        return value
