"""The official Twilio client, async, pointed at Twilio or at the local emulator."""

from __future__ import annotations

from typing import Any

import aiohttp
import structlog
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

log = structlog.get_logger("omniroute.twilio_gateway")

DEFAULT_TIMEOUT = 30.0


class GatewayHttpClient(AsyncTwilioHttpClient):  # type: ignore[misc]
    """``AsyncTwilioHttpClient`` with a total request timeout and header-based basic auth.

    twilio 9.13 builds ``aiohttp.BasicAuth`` for every request, which aiohttp ≥ 3.13
    deprecates (a DeprecationWarning each call); this subclass sends the same credentials
    as an ``Authorization`` header built with ``aiohttp.encode_basic_auth`` instead.
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(pool_connections=False)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (twilio's HttpClient interface)
        allow_redirects: bool = False,
    ) -> Any:
        """Send one API request (see ``AsyncTwilioHttpClient.request``)."""
        headers = dict(headers or {})
        if auth is not None:
            headers["Authorization"] = aiohttp.encode_basic_auth(auth[0], auth[1])
        return await super().request(
            method, url, params, data, headers, None, timeout, allow_redirects
        )


def make_client(
    account_sid: str, auth_token: str, api_url: str, *, timeout: float = DEFAULT_TIMEOUT
) -> Client:
    """Return ``twilio.rest.Client`` on an async http client, aimed at ``api_url``.

    ``api_url`` is ``https://api.twilio.com`` in production or the emulator's URL; then
    ``await client.messages.create_async(...)`` posts to
    ``{api_url}/2010-04-01/Accounts/{account_sid}/Messages.json``. Call it inside a running
    event loop (the http client opens an aiohttp session) and release it with
    :func:`close_client`.
    """
    client = Client(account_sid, auth_token, http_client=GatewayHttpClient(timeout))
    client.api.base_url = api_url.rstrip("/")
    log.debug("twilio.client_created", account_sid=account_sid, api_url=client.api.base_url)
    return client


async def close_client(client: Client) -> None:
    """Close the aiohttp session of the client's async http client, if it has one."""
    http_client: Any = getattr(client, "http_client", None)
    if isinstance(http_client, AsyncTwilioHttpClient) and http_client.session is not None:
        await http_client.close()
