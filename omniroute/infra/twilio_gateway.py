"""The official Twilio client, async, pointed at Twilio or at the local emulator."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from dataclasses import dataclass
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
        # twilio passes timeout=None per request, which aiohttp reads as "no timeout" and
        # which would override the session's: every request gets ours explicitly.
        self._request_timeout = timeout

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
            method,
            url,
            params,
            data,
            headers,
            None,
            timeout or self._request_timeout,
            allow_redirects,
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


class TwilioClients:
    """Official clients keyed by account and auth token, created on first use.

    A client holds the auth token it was made with: when a reload rotates an account's
    token, the next ``get`` makes a new client with it (once Twilio's console promotes the
    new token, the old one is refused). Per account the current client and the one before
    stay open (a send may be in flight on the previous one, and a reload back to the
    previous token finds it again); an older one is closed ``grace`` seconds after it is
    pushed out (by default the request timeout, after which nothing is in flight on it), so
    repeated rotations never pile up open sessions. Clients are found by a SHA-256 digest
    of the token: the token itself is only in the client.
    """

    KEEP = 2  # clients open per account: the current one and the one before

    def __init__(
        self, api_url: str, timeout: float = DEFAULT_TIMEOUT, *, grace: float | None = None
    ) -> None:
        self._api_url = api_url
        self._timeout = timeout
        self._grace = timeout + 1.0 if grace is None else grace
        # account sid → [(token digest, client)], the most recently used last
        self._clients: dict[str, list[tuple[bytes, Client]]] = {}
        self._closing: dict[asyncio.Task[None], Client] = {}

    def get(self, account_sid: str, auth_token: str) -> Client:
        """The account's client for ``auth_token``: the one made before for it, if still
        kept, else a new one (call it inside the running event loop)."""
        digest = hashlib.sha256(auth_token.encode()).digest()
        kept = self._clients.setdefault(account_sid, [])
        for index, (known, client) in enumerate(kept):
            if hmac.compare_digest(known, digest):
                if index != len(kept) - 1:  # a reload went back to this token
                    kept.append(kept.pop(index))
                return client
        if kept:
            log.info("twilio.client_token_changed", account_sid=account_sid)
        client = make_client(account_sid, auth_token, self._api_url, timeout=self._timeout)
        kept.append((digest, client))
        while len(kept) > self.KEEP:
            _, old = kept.pop(0)
            self._close_later(old)
        return client

    def open_clients(self, account_sid: str) -> list[Client]:
        """The clients kept for an account, oldest first (the last is the current one)."""
        return [client for _, client in self._clients.get(account_sid, [])]

    def _close_later(self, client: Client) -> None:
        task = asyncio.get_running_loop().create_task(
            self._close_after_grace(client), name="twilio-client-close"
        )
        self._closing[task] = client
        task.add_done_callback(lambda done: self._closing.pop(done, None))

    async def _close_after_grace(self, client: Client) -> None:
        await asyncio.sleep(self._grace)
        await close_client(client)

    async def close(self) -> None:
        """Close every client now, including those still in their grace."""
        closing, self._closing = dict(self._closing), {}
        for task in closing:
            task.cancel()
        await asyncio.gather(*closing, return_exceptions=True)
        kept, self._clients = self._clients, {}
        clients = [*closing.values(), *(client for pairs in kept.values() for _, client in pairs)]
        for client in clients:
            await close_client(client)


# Twilio's answers, sorted by what omniroute does next.
RETRYABLE_CODES = frozenset({20429, 63017, 63018})
WINDOW_CLOSED = 63016
OPTED_OUT = 21610


@dataclass(frozen=True)
class SendOutcome:
    """``kind``: sent | retry | rejected | failed | unknown."""

    kind: str
    sid: str | None = None
    status: str | None = None
    code: int | None = None
    message: str | None = None


def classify_error(exc: BaseException) -> SendOutcome:
    """What a failed ``messages.create`` means: retry, reject, fail, or unknown.

    A connection that was never made is safe to retry; a timeout or a dropped connection
    may have reached Twilio, so its outcome is unknown and it is not sent again by itself.
    """
    from twilio.base.exceptions import TwilioRestException

    if isinstance(exc, TwilioRestException):
        code = int(exc.code) if exc.code is not None else None
        text = str(exc.msg or "")[:500]
        if exc.status == 429 or exc.status >= 500 or code in RETRYABLE_CODES:
            return SendOutcome("retry", code=code, message=text)
        if code == WINDOW_CLOSED:
            return SendOutcome("rejected", code=code, message="window_closed")
        if code == OPTED_OUT:
            return SendOutcome("rejected", code=code, message="opted_out")
        return SendOutcome("failed", code=code, message=text)
    if isinstance(exc, aiohttp.ClientConnectorError | ConnectionRefusedError):
        return SendOutcome("retry", message=f"connection failed: {type(exc).__name__}")
    return SendOutcome("unknown", message=f"{type(exc).__name__}: outcome unknown")
