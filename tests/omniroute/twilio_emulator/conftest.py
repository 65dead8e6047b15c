"""Fixtures of the emulator tests: an emulator on a test clock, the official twilio client
aimed at it, and a stand-in router that records what it gets and answers as scripted."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from omniroute.infra.twilio_gateway import close_client, make_client
from omniroute.twilio_emulator import EmulatorState, create_emulator_app

SID = "AC00000000000000000000000000000001"
TOKEN = "emulator-test-token-1"
OTHER_SID = "AC00000000000000000000000000000002"
OTHER_TOKEN = "emulator-test-token-2"
BUSINESS = "whatsapp:+5511999990000"
CUSTOMER = "whatsapp:+5511988887777"
USERNAME_CUSTOMER = "whatsapp:US.13491208655302741918"
WAIT = 5.0
START = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Captured:
    """One request the receiver got."""

    url: str
    raw_path: str
    form: dict[str, str]
    headers: dict[str, str]
    signature_valid: bool
    at: float


@dataclass
class Receiver:
    """A stand-in for the router: validates Twilio signatures and queues what it got.

    It answers each request with the next of ``answers`` (then 200 with ``<Response/>``, or
    403 for a bad signature); with ``stall`` set it first waits that long (or until
    ``release``) before answering, to make a client's read time out.
    """

    server: TestServer
    token: str
    answers: list[int] = field(default_factory=list)
    stall: float = 0.0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    requests: asyncio.Queue[Captured] = field(default_factory=asyncio.Queue)
    seen: list[Captured] = field(default_factory=list)

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def next(self) -> Captured:
        return await asyncio.wait_for(self.requests.get(), timeout=WAIT)

    async def answer(self, request: web.Request) -> web.Response:
        posted = await request.post()
        signature = request.headers.get("X-Twilio-Signature", "")
        valid = RequestValidator(self.token).validate(str(request.url), posted, signature)
        captured = Captured(
            str(request.url),
            request.raw_path,
            {key: str(value) for key, value in posted.items()},
            dict(request.headers),
            valid,
            asyncio.get_running_loop().time(),
        )
        self.seen.append(captured)
        await self.requests.put(captured)
        if self.stall:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), self.stall)
        if self.answers:
            return web.Response(status=self.answers.pop(0), text="scripted")
        if not valid:
            return web.Response(status=403, text="bad signature")
        return web.Response(text="<Response/>", content_type="text/xml")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state(clock: FakeClock) -> EmulatorState:
    return EmulatorState(
        accounts={SID: TOKEN, OTHER_SID: OTHER_TOKEN}, callback_delay=0.01, clock=clock
    )


@pytest.fixture
async def emulator(state: EmulatorState) -> AsyncIterator[TestServer]:
    server = TestServer(create_emulator_app(state))
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
def api_url(emulator: TestServer) -> str:
    return str(emulator.make_url("/"))


@pytest.fixture
async def client(api_url: str) -> AsyncIterator[Client]:
    twilio = make_client(SID, TOKEN, api_url)
    try:
        yield twilio
    finally:
        await close_client(twilio)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    holder: list[Receiver] = []

    async def handle(request: web.Request) -> web.Response:
        return await holder[0].answer(request)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    server = TestServer(app)
    await server.start_server()
    holder.append(Receiver(server, TOKEN))
    try:
        yield holder[0]
    finally:
        holder[0].release.set()  # a stalled handler answers now, so the server can close
        await server.close()


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def auth(login: str, password: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(login, password)}


async def post_json(
    http: aiohttp.ClientSession, url: str, payload: dict[str, Any]
) -> tuple[int, Any]:
    async with http.post(url, json=payload) as response:
        return response.status, await response.json()


async def get_json(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with http.get(url, **kwargs) as response:
        return response.status, await response.json()


async def customer_sends(
    http: aiohttp.ClientSession, api_url: str, url: str, **fields: Any
) -> tuple[int, dict[str, Any]]:
    """``POST /_emulator/customers/send`` to ``url``; return the status and the answer."""
    payload: dict[str, Any] = {
        "account_sid": SID,
        "url": url,
        "from": CUSTOMER,
        "to": BUSINESS,
        "body": "Olá",
        **fields,
    }
    status, answer = await post_json(http, f"{api_url}_emulator/customers/send", payload)
    result: dict[str, Any] = answer
    return status, result
