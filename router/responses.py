"""HTTP answers in the shapes the API promises."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import ValidationError

EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


def error(status: int, code: str, message: str, **details: Any) -> web.Response:
    """``{"error": {"code", "message", "details"}}`` with the given HTTP status."""
    body: dict[str, Any] = {"error": {"code": code, "message": message, "details": details}}
    response = web.json_response(body, status=status)
    if status == 503:
        response.headers["Retry-After"] = "1"
    return response


def invalid(exc: ValidationError, *, whole: str = "(body)") -> list[dict[str, str]]:
    """A validation error as ``[{"field", "problem"}]`` for an error's details."""
    return [
        {"field": ".".join(str(p) for p in e["loc"]) or whole, "problem": e["msg"]}
        for e in exc.errors()
    ]


def empty_twiml() -> web.Response:
    return web.Response(text=EMPTY_TWIML, content_type="text/xml")
