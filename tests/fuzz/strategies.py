"""Hypothesis strategies for Twilio webhook forms and bodies."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from tests.support import ACCOUNT_SID, BUSINESS, SANDBOX, inbound_form, new_sid, status_form

LIMIT = 64 * 1024  # Settings.max_body_bytes, the default the fixtures use

TWILIO_KEYS = (
    "MessageSid",
    "SmsMessageSid",
    "SmsSid",
    "AccountSid",
    "From",
    "To",
    "Body",
    "NumMedia",
    "MediaUrl0",
    "MediaContentType0",
    "MediaUrl1",
    "ProfileName",
    "WaId",
    "MessageType",
    "MessageStatus",
    "SmsStatus",
    "ErrorCode",
    "ErrorMessage",
    "Latitude",
    "Longitude",
    "ButtonText",
    "ButtonPayload",
    "OriginalRepliedMessageSid",
    "ExternalUserId",
    "ApiVersion",
)


def _repeat(piece: str, times: int) -> str:
    return piece * times


def padded(body: bytes, padding: int, separator: bytes = b"&Pad=") -> bytes:
    """``body`` grown to about ``padding`` bytes (a last field of x's); as is when 0."""
    if padding <= 0:
        return body
    return body + separator + b"x" * max(0, padding - len(body) - len(separator))


# Text of every kind: short unicode, empty, control characters, a few kilobytes (huge
# values near the body limit come from ``paddings``, so that examples stay printable).
values: st.SearchStrategy[str] = st.one_of(
    st.text(max_size=40),
    st.just(""),
    st.sampled_from(
        [
            "0",
            "-1",
            "11",
            "99999999999999999999",
            "NaN",
            "whatsapp:",
            "whatsapp:+",
            f"whatsapp:{BUSINESS}",
            f"whatsapp:{SANDBOX}",
            "sms:+14155238886",
            ACCOUNT_SID,
            "\x00",
            "\ufffd",
            "%",
            "%zz",
            "a=b&c",
            "delivered",
            "https://api.twilio.com/x",
            "http://169.254.169.254/latest/meta-data/",
        ]
    ),
    st.builds(_repeat, st.sampled_from("xé✓\x00"), st.integers(100, 2_000)),
)
# Bytes of padding a test appends: none, or enough to land just under or over the limit.
paddings: st.SearchStrategy[int] = st.one_of(
    st.just(0), st.just(0), st.integers(LIMIT - 300, LIMIT + 50)
)
keys: st.SearchStrategy[str] = st.one_of(st.sampled_from(TWILIO_KEYS), st.text(max_size=20))
forms: st.SearchStrategy[list[tuple[str, str]]] = st.lists(st.tuples(keys, values), max_size=25)

CONTENT_TYPES = (
    "application/x-www-form-urlencoded",
    "application/x-www-form-urlencoded; charset=utf-8",
    "APPLICATION/X-WWW-FORM-URLENCODED",
    "application/json",
    "text/plain",
    "multipart/form-data; boundary=x",
    "application/octet-stream",
    "",
    "x/\u00e9",
    None,  # no Content-Type header at all
)
content_types: st.SearchStrategy[str | None] = st.sampled_from(CONTENT_TYPES)

# Extra headers a forged or broken client may send (the signature ones included).
header_names = st.sampled_from(
    (
        "X-Twilio-Signature",
        "X-Twilio-Webhooks-Signature-Settings",
        "I-Twilio-Idempotency-Token",
        "X-Forwarded-Proto",
        "X-Forwarded-Host",
        "Host",
        "Content-Encoding",
        "Transfer-Encoding",
        "Authorization",
        "X-Anything",
    )
)
header_values = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60),
    st.sampled_from(
        [
            "key=webhooks_sharedkey_test,algorithm=HMAC_SHA256",
            "key=unknown",
            "algorithm=MD5",
            "algorithm=",
            "gzip",
            "https",
        ]
    ),
)
extra_headers: st.SearchStrategy[dict[str, str]] = st.dictionaries(
    header_names.filter(lambda h: h not in ("Host", "Transfer-Encoding", "Content-Encoding")),
    header_values,
    max_size=3,
)

# Bodies that are not a form at all, or barely one.
raw_bodies: st.SearchStrategy[bytes] = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    st.sampled_from(
        [
            b"",
            b"=",
            b"&",
            b"a",
            b"a=%FF",
            b"a=1;b=2",
            b'{"MessageSid": "SM00"}',
            b"\xff\xfe",
            b"a=1&&b=2",
            b"%00=%00",
        ]
    ),
    st.binary(max_size=4000),
)


@st.composite
def shaped_inbound(draw: st.DrawFn) -> list[tuple[str, str]]:
    """An inbound form with every field Twilio sends, each value possibly replaced."""
    form = inbound_form(sid=new_sid())
    out: list[tuple[str, str]] = []
    for key, value in form:
        out.append((key, draw(st.one_of(st.just(value), values))))
    media = draw(st.integers(0, 3))
    for n in range(media):
        out.append((f"MediaUrl{n}", draw(st.one_of(st.just("https://api.twilio.com/m"), values))))
        out.append((f"MediaContentType{n}", draw(st.one_of(st.just("image/jpeg"), values))))
    out += draw(st.lists(st.tuples(keys, values), max_size=4))
    return draw(st.permutations(out))


@st.composite
def shaped_status(draw: st.DrawFn) -> list[tuple[str, str]]:
    """A status callback with every field Twilio sends, each value possibly replaced."""
    form = status_form(new_sid(), error_code="63016", ErrorMessage="outside the window")
    out = [(k, draw(st.one_of(st.just(v), values))) for k, v in form]
    out += draw(st.lists(st.tuples(keys, values), max_size=4))
    return draw(st.permutations(out))


def json_values() -> st.SearchStrategy[Any]:
    """Any JSON value."""
    scalars: st.SearchStrategy[Any] = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),  # what JSON encoders take
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(),
    )
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=10), children, max_size=4)
        ),
        max_leaves=12,
    )
