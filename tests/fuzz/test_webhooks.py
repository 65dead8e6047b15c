"""Generated Twilio webhooks against the real router: whatever arrives, the answer is a
4xx the contract names (never a 500), an unsigned or tampered request is a 403, and a
correctly signed one is accepted or refused for what it says."""

from __future__ import annotations

import hashlib
from urllib.parse import parse_qsl, quote, urlencode

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.common import TIMEOUT, CrashWatch, fuzz_settings
from tests.fuzz.conftest import Served
from tests.fuzz.strategies import (
    LIMIT,
    content_types,
    extra_headers,
    forms,
    padded,
    paddings,
    raw_bodies,
    shaped_inbound,
    shaped_status,
    values,
)
from tests.support import (
    AUTH_TOKEN,
    OTHER_TOKEN,
    PUBLIC_URL,
    inbound_form,
    new_sid,
    sign,
    status_form,
)

pytestmark = [pytest.mark.fuzz, pytest.mark.integration, TIMEOUT]

FORM = "application/x-www-form-urlencoded"
TOKENS = {"contoso": AUTH_TOKEN, "fabrikam": OTHER_TOKEN}
KINDS = ("inbound", "status")
SIGNED_ANSWERS = {200, 400, 404, 413, 415}

accounts = st.one_of(
    st.sampled_from(["contoso", "fabrikam", "nobody", "CONTOSO", "contoso ", ".."]),
    st.text(min_size=1, max_size=12),
)


def _path(account: str, kind: str) -> str:
    return f"/twilio/{quote(account, safe='')}/{kind}"


async def _post(
    served: Served,
    path: str,
    body: bytes,
    content_type: str | None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    sent = dict(headers or {})
    skip: tuple[str, ...] = ()
    if content_type is None:
        skip = ("Content-Type",)
    else:
        sent["Content-Type"] = content_type
    response = await served.client.post(path, data=body, headers=sent, skip_auto_headers=skip)
    async with response:
        return response.status, await response.text()


def _is_form(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == FORM


@fuzz_settings()
@given(
    account=accounts,
    kind=st.sampled_from(KINDS),
    body=st.one_of(forms.map(lambda f: urlencode(f).encode()), raw_bodies),
    content_type=content_types,
    headers=extra_headers,
    padding=paddings,
)
@example(  # a malformed form, unsigned: the signature is checked first (403, not 400)
    account="contoso", kind="inbound", body=b"a=%FF", content_type=FORM, headers={}, padding=0
)
@example(  # a forged signature over a JSON body
    account="contoso",
    kind="status",
    body=b'{"MessageSid": "x"}',
    content_type="application/json",
    headers={"X-Twilio-Signature": "forged"},
    padding=0,
)
async def test_unsigned_webhooks_are_refused(
    served: Served,
    account: str,
    kind: str,
    body: bytes,
    content_type: str | None,
    headers: dict[str, str],
    padding: int,
) -> None:
    """No valid signature (none, or whatever a forger puts in the header): 403, or 404 for
    an account that does not exist, or 413 for a body over the limit; never a 500."""
    crashes = CrashWatch()
    body = padded(body, padding)
    status, text = await _post(served, _path(account, kind), body, content_type, headers)
    assert status != 500, (status, text, crashes.new())
    assert not crashes.new()
    known = account in TOKENS
    if not known:
        assert status == 404, (status, text)
    elif len(body) > LIMIT:
        assert status == 413, (status, text)
    else:
        assert status == 403, (status, text)


@fuzz_settings()
@given(
    account=st.sampled_from(sorted(TOKENS)),
    kind=st.sampled_from(KINDS),
    form=forms,
    content_type=st.sampled_from([FORM, f"{FORM}; charset=utf-8"]),
    padding=paddings,
)
async def test_signed_arbitrary_forms_never_fail(
    served: Served,
    account: str,
    kind: str,
    form: list[tuple[str, str]],
    content_type: str,
    padding: int,
) -> None:
    """Any form, correctly signed: accepted, or refused with 400/404/413; never a 500."""
    crashes = CrashWatch()
    if padding:
        form = [*form, ("Pad", "x" * padding)]
    path = _path(account, kind)
    body = urlencode(form).encode()
    signature = sign(PUBLIC_URL + path, form, TOKENS[account])
    status, text = await _post(served, path, body, content_type, {"X-Twilio-Signature": signature})
    assert status in SIGNED_ANSWERS, (status, text, crashes.new())
    assert not crashes.new()
    assert (status == 413) == (len(body) > LIMIT), (status, len(body))
    assert status != 403, "a correctly signed form was refused"


def _strict_form(body: bytes) -> list[tuple[str, str]] | None:
    try:
        text = body.decode("utf-8")
        if not text:
            return []
        return parse_qsl(text, keep_blank_values=True, strict_parsing=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        return None


@fuzz_settings()
@given(
    account=st.sampled_from(sorted(TOKENS)),
    kind=st.sampled_from(KINDS),
    body=raw_bodies,
    content_type=content_types,
    forged=st.text(alphabet="abcdefABCDEF0123456789+/=", min_size=1, max_size=30),
    padding=paddings,
)
async def test_raw_bodies_and_content_types(
    served: Served,
    account: str,
    kind: str,
    body: bytes,
    content_type: str | None,
    forged: str,
    padding: int,
) -> None:
    """Bodies that are not forms and requests that are not form posts, each sent twice:
    signed the way Twilio signs such a request (over the form, or over the URL with
    ``bodySHA256`` for other content types) and with a forged signature."""
    crashes = CrashWatch()
    body = padded(body, padding)
    path = _path(account, kind)
    token = TOKENS[account]
    over = len(body) > LIMIT
    if _is_form(content_type):
        parsed = _strict_form(body)
        signed_path = path
        signature = sign(PUBLIC_URL + path, parsed or [], token)
        expected = {413} if over else ({400} if parsed is None else SIGNED_ANSWERS - {413})
    else:
        try:
            digest = hashlib.sha256(body.decode("utf-8").encode()).hexdigest()
        except UnicodeDecodeError:
            digest = hashlib.sha256(b"").hexdigest()
        signed_path = f"{path}?bodySHA256={digest}"
        signature = sign(PUBLIC_URL + signed_path, [], token)
        # Not a form: 415 once the signature holds. A body that is not UTF-8 cannot be
        # hashed as Twilio does: refused either way (403, or 415 if the router hashes it
        # as empty text, which the signature over the empty hash then matches).
        expected = {413} if over else ({415} if _decodes(body) else {403, 415})
    status, text = await _post(
        served, signed_path, body, content_type, {"X-Twilio-Signature": signature}
    )
    assert status != 500, ("signed", status, text, crashes.new())
    assert status in expected, ("signed", status, text, expected)

    status, text = await _post(served, path, body, content_type, {"X-Twilio-Signature": forged})
    assert status != 500, ("forged", status, text, crashes.new())
    assert not crashes.new()
    assert status == (413 if over else 403), ("forged", status, text)


def _decodes(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@fuzz_settings()
@given(
    account=st.sampled_from(sorted(TOKENS)),
    kind_form=st.one_of(
        st.tuples(st.just("inbound"), shaped_inbound()),
        st.tuples(st.just("status"), shaped_status()),
    ),
    padding=paddings,
)
async def test_signed_twilio_shaped_forms_with_random_values(
    served: Served, account: str, kind_form: tuple[str, list[tuple[str, str]]], padding: int
) -> None:
    """Every field Twilio sends, values replaced at random, correctly signed: 200, 400 (not
    a valid webhook), 404 (unknown number or account) or 413; never a 500."""
    crashes = CrashWatch()
    kind, form = kind_form
    if padding:
        form = [*form, ("Pad", "x" * padding)]
    path = _path(account, kind)
    body = urlencode(form).encode()
    signature = sign(PUBLIC_URL + path, form, TOKENS[account])
    status, text = await _post(served, path, body, FORM, {"X-Twilio-Signature": signature})
    assert status != 500, (status, text, crashes.new())
    assert not crashes.new()
    assert status in ({413} if len(body) > LIMIT else {200, 400, 404}), (status, text)


def _tampered(
    form: list[tuple[str, str]], change: str, index: int, value: str, key: str
) -> list[tuple[str, str]]:
    position = index % len(form)
    if change == "value":
        return [(k, value if i == position else v) for i, (k, v) in enumerate(form)]
    if change == "add":
        return [*form, (key, value)]
    if change == "remove":
        return [pair for i, pair in enumerate(form) if i != position]
    if change == "rename":
        return [(key if i == position else k, v) for i, (k, v) in enumerate(form)]
    raise AssertionError(change)


@fuzz_settings()
@given(
    kind=st.sampled_from(KINDS),
    body=st.text(max_size=60),
    profile=st.text(max_size=20),
    index=st.integers(0, 100),
    value=values,
    key=st.one_of(st.sampled_from(["Body", "To", "From", "AccountSid", "NumMedia"]), st.text()),
    query=st.text(min_size=1, max_size=20),
)
async def test_replayed_with_changes_is_forbidden(
    served: Served,
    kind: str,
    body: str,
    profile: str,
    index: int,
    value: str,
    key: str,
    query: str,
) -> None:
    """A webhook Twilio really signed is accepted; the same signature over anything else
    (a value changed, a field added, removed or renamed, a query added, another account
    or endpoint) is a 403."""
    crashes = CrashWatch()
    sid = new_sid()
    if kind == "inbound":
        form = inbound_form(sid=sid, body=body, profile=profile)
    else:
        form = status_form(sid, ErrorMessage=body)
    path = _path("contoso", kind)
    signature = sign(PUBLIC_URL + path, form, AUTH_TOKEN)
    headers = {"X-Twilio-Signature": signature}
    status, text = await _post(served, path, urlencode(form).encode(), FORM, headers)
    assert status == 200, ("original", status, text)

    attempts: list[tuple[str, str, list[tuple[str, str]], str]] = []
    for change in ("value", "add", "remove", "rename"):
        changed = _tampered(form, change, index, value, key)
        attempts.append((change, path, changed, AUTH_TOKEN))
    other_kind = "status" if kind == "inbound" else "inbound"
    attempts += [
        ("query", f"{path}?{urlencode({'x': query})}", form, AUTH_TOKEN),
        ("endpoint", _path("contoso", other_kind), form, AUTH_TOKEN),
        ("account", _path("fabrikam", kind), form, OTHER_TOKEN),
    ]
    for change, new_path, changed, token in attempts:
        # Twilio's scheme signs the sorted, de-duplicated concatenation of names and
        # values: a change it cannot see (a pair repeated as is) is no change.
        if sign(PUBLIC_URL + new_path, changed, token) == signature:
            continue
        status, text = await _post(served, new_path, urlencode(changed).encode(), FORM, headers)
        assert status != 500, (change, status, text, crashes.new())
        assert status == 403, (change, changed, new_path, status, text)
    assert not crashes.new()
