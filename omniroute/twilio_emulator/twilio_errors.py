"""Twilio's REST error bodies, and the exception handlers raise to produce them."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

MORE_INFO = "https://www.twilio.com/docs/errors/{code}"


def error_body(status: int, code: int, message: str) -> dict[str, object]:
    """Return Twilio's error JSON: ``{code, message, more_info, status}``."""
    return {
        "code": code,
        "message": message,
        "more_info": MORE_INFO.format(code=code),
        "status": status,
    }


class TwilioApiError(Exception):
    """A request the emulated API rejects; the middleware turns it into Twilio's error JSON."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def to_response(self) -> web.Response:
        """Return the JSON error response Twilio would send."""
        headers = {"WWW-Authenticate": 'Basic realm="Twilio API"'} if self.status == 401 else None
        return web.json_response(
            error_body(self.status, self.code, self.message), status=self.status, headers=headers
        )


def authenticate_error() -> TwilioApiError:
    """Return the 401 / 20003 error Twilio answers for missing or wrong credentials."""
    return TwilioApiError(401, 20003, "Authenticate")


def not_found_error(path: str) -> TwilioApiError:
    """Return the 404 / 20404 error Twilio answers for an unknown resource."""
    return TwilioApiError(404, 20404, f"The requested resource {path} was not found")


@web.middleware
async def twilio_errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render ``TwilioApiError`` (and unknown REST paths) as Twilio's error JSON."""
    try:
        return await handler(request)
    except TwilioApiError as error:
        return error.to_response()
    except web.HTTPNotFound:
        if request.path.startswith("/2010-04-01/"):
            return not_found_error(request.path).to_response()
        raise
