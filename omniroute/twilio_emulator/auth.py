"""HTTP basic authentication of REST calls, as Twilio checks it."""

from __future__ import annotations

import base64
import binascii

from aiohttp import hdrs, web

from omniroute.twilio_emulator.runtime import STATE_KEY, token_matches
from omniroute.twilio_emulator.twilio_errors import authenticate_error, not_found_error


def parse_basic_auth(header: str) -> tuple[str, str] | None:
    """Return ``(login, password)`` from an ``Authorization: Basic …`` header, or None."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    login, colon, password = decoded.partition(":")
    return (login, password) if colon else None


def authenticate(request: web.Request) -> str:
    """Check basic auth against the path's account; return the Account SID.

    Wrong or missing credentials raise 401 / 20003; valid credentials for another (or an
    unknown) account than the one in the path raise 404 / 20404, as Twilio does.
    """
    accounts = request.app[STATE_KEY].accounts
    header = request.headers.get(hdrs.AUTHORIZATION, "")
    credentials = parse_basic_auth(header)
    if credentials is None:
        raise authenticate_error()
    login, password = credentials
    expected = accounts.get(login)
    if expected is None or not token_matches(expected, password):
        raise authenticate_error()
    if request.match_info["account_sid"] != login:
        raise not_found_error(request.path)
    return login
