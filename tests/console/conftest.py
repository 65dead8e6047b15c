"""The console's browser tests: Debian's chromium, headless, driven by Playwright against the
whole stack on loopback — the router served on a real port, every stage, the Twilio emulator,
RabbitMQ and PostgreSQL — as an agent or a supervisor uses it.

Playwright's own browser download is not reachable here, so the tests launch the system
chromium with ``executable_path`` ("Path to a browser executable to run instead of the
bundled one", https://playwright.dev/python/docs/api/class-browsertype#browser-type-launch);
``make test`` installs it when it can (scripts/ensure-browser.sh), and without it every test
here skips with the reason. Playwright's async API (https://playwright.dev/python/docs/library)
runs in pytest-asyncio's one session loop (pyproject: asyncio_mode auto, default fixture and
test loop scope "session", https://pytest-asyncio.readthedocs.io/en/stable/how-to-guides/
run_session_tests_in_same_loop.html), so the browser is launched once per module and shared.

The browser reaches the router through a loopback TCP proxy a test can cut and restore (a
dropped connection, to prove the event stream resumes); the proxy's URL is the public URL, so
the emulator's signed webhooks go the same way. Screenshots of each step land in
``<output>/<test name>/NN-<step>.png``, output being ``$OMNIROUTE_TEST_OUTPUT`` or
``test-output/console`` (git-ignored).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import socket
import struct
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import pytest
from aiohttp import web
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Request,
    async_playwright,
    expect,
)

from consumers.registry import STAGES
from omniroute.infra.bus import declare_stage
from omniroute.infra.config_loader import LiveConfig, parse_config
from omniroute.infra.settings import Settings
from omniroute.infra.topology import STAGES as TOPOLOGY
from omniroute.twilio_emulator import EmulatorState, RunningEmulator, start_emulator
from router.app import create_app
from router.state import BUS
from tests.conftest import Infra, RunnerFactory, make_settings
from tests.support import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    BUSINESS,
    CONFIG_YAML,
    ENVIRON,
    INBOUND,
    TcpProxy,
    inbound_form,
    signed_post,
)

STEP_TIMEOUT_MS = 10_000  # every Playwright wait and action is bounded by this
expect.set_options(timeout=STEP_TIMEOUT_MS)  # assertions too (their default is 5 s)
WRAP_UP_SECONDS = 300  # long enough to see the wrap-up and its timer during a test
TEMPLATE = "order_update"
TEMPLATE_SIDS = {"pt-BR": "HX" + "a1" * 16, "en": "HX" + "b2" * 16}
TEMPLATE_TEXTS = {
    "pt-BR": "Olá {{1}}, seu pedido {{2}} saiu.",
    "en": "Hi {{1}}, your order {{2}} shipped.",
}


def chromium_path() -> str | None:
    """The browser to drive: ``$OMNIROUTE_CHROMIUM`` when set, else Debian's chromium (the
    same lookup as scripts/ensure-browser.sh)."""
    explicit = os.environ.get("OMNIROUTE_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


def output_root(rootpath: Path) -> Path:
    configured = os.environ.get("OMNIROUTE_TEST_OUTPUT")
    return Path(configured) if configured else rootpath / "test-output" / "console"


def tiny_png(width: int = 64, height: int = 48, rgb: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    """A real PNG (one colour), so the browser decodes it and the <img> gets a size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    row = b"\x00" + bytes(rgb) * width
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


def console_yaml(prefix: str) -> str:
    """The test accounts with both workstreams feeding this test's own queues (``<prefix>-main``
    and ``<prefix>-other``), push offers, a template in two languages and a wrap-up."""
    accounts = CONFIG_YAML.split("workstreams:\n")[0]
    template = {
        "name": TEMPLATE,
        "default_language": "pt-BR",
        "languages": {
            language: {"content_sid": sid, "text": TEMPLATE_TEXTS[language]}
            for language, sid in TEMPLATE_SIDS.items()
        },
    }
    workstreams = [
        {
            "name": name,
            "language": language,
            "fallback_queue": f"{prefix}-main",
            "distribution": {"mode": "push", "offer_timeout": "2m", "reoffer_after": "5s"},
            "lifecycle": {"wrap_up": WRAP_UP_SECONDS},
            "templates": [template],
        }
        for name, language in (("support-pt", "pt-BR"), ("support-en", "en"))
    ]
    queues = [{"name": f"{prefix}-main"}, {"name": f"{prefix}-other"}]
    return f"{accounts}workstreams: {json.dumps(workstreams)}\nqueues: {json.dumps(queues)}\n"


# --- the browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    path = chromium_path()
    if path is None:
        pytest.skip(
            "no chromium to drive: install Debian's chromium (make test does when run as root)"
            " or set OMNIROUTE_CHROMIUM to a chromium executable"
        )
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=path, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Shots:
    """Numbered screenshots of one test's steps."""

    folder: Path
    taken: list[Path] = field(default_factory=list)

    async def __call__(self, page: Page, step: str) -> Path:
        slug = re.sub(r"[^a-z0-9]+", "-", step.lower()).strip("-")
        path = self.folder / f"{len(self.taken) + 1:02d}-{slug}.png"
        await page.screenshot(path=str(path), full_page=True)
        self.taken.append(path)
        return path


@pytest.fixture
def shots(request: pytest.FixtureRequest) -> Shots:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    folder = output_root(request.config.rootpath) / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return Shots(folder)


@dataclass
class Watched:
    """What a page did that a test may check: every request it made, its console errors."""

    requests: list[Request] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    created = await browser.new_context(viewport={"width": 1280, "height": 860})
    created.set_default_timeout(STEP_TIMEOUT_MS)
    try:
        yield created
    finally:
        await created.close()


@pytest.fixture
async def page(context: BrowserContext) -> Page:
    return await context.new_page()


def _console_error(seen: Watched, message: ConsoleMessage) -> None:
    """Script errors the page logged; the browser's own line for each HTTP error answer
    ("Failed to load resource", e.g. the 401 of the session check before signing in) is
    the page working as designed, not an error of its code."""
    if message.type == "error" and not message.text.startswith("Failed to load resource"):
        seen.errors.append(f"console: {message.text}")


@pytest.fixture
def watched(page: Page) -> Watched:
    seen = Watched()
    page.on("request", lambda request: seen.requests.append(request))
    page.on("pageerror", lambda exc: seen.errors.append(f"pageerror: {exc}"))
    page.on("console", lambda message: _console_error(seen, message))
    return seen


# --- the stack ----------------------------------------------------------------------------


async def _purge_stage_queues(amqp_url: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for stage in STAGES:
            await (await declare_stage(channel, TOPOLOGY[stage])).purge()


@pytest.fixture(scope="module", autouse=True)
async def quiet_queues(infra: Infra) -> AsyncIterator[None]:
    """Earlier modules leave events in the stage queues; start clean, leave nothing."""
    await _purge_stage_queues(infra.amqp_url)
    yield
    await _purge_stage_queues(infra.amqp_url)


@pytest.fixture
async def emulator() -> AsyncIterator[RunningEmulator]:
    running = await start_emulator(
        EmulatorState(accounts={ACCOUNT_SID: AUTH_TOKEN}, callback_delay=0.05)
    )
    try:
        yield running
    finally:
        await running.close()


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    """The browser's (and the emulator's) way to the router; its target is set once the
    router listens."""
    front = TcpProxy("127.0.0.1", 0)
    await front.start()
    try:
        yield front
    finally:
        await front.cut()


@pytest.fixture
def listening() -> socket.socket:
    """The router's socket, bound before the settings are made (no port race)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


@pytest.fixture
def prefix() -> str:
    return "con" + uuid.uuid4().hex[:8]


@pytest.fixture
def admin_token() -> str:
    return "admin-" + uuid.uuid4().hex


@pytest.fixture
def settings(
    infra: Infra, emulator: RunningEmulator, proxy: TcpProxy, admin_token: str
) -> Settings:
    return make_settings(
        infra,
        twilio_api_url=emulator.url,
        public_url=f"http://127.0.0.1:{proxy.port}",
        admin_token=admin_token,
        tick_interval=0.1,
        send_backoff_base=0.05,
        send_backoff_max=0.2,
    )


@pytest.fixture
def config(prefix: str) -> LiveConfig:
    return LiveConfig(parse_config(console_yaml(prefix), "console.yaml", ENVIRON))


@dataclass
class Stack:
    """The running system a browser test talks to, and the test's ways to act on it."""

    url: str  # what the browser opens (through the proxy): also the public URL
    direct_url: str  # the router itself, for calls made while the proxy is cut
    admin_token: str
    prefix: str
    emulator: RunningEmulator
    proxy: TcpProxy
    db: asyncpg.Pool
    http: aiohttp.ClientSession
    amqp_url: str

    @property
    def main_queue(self) -> str:
        return f"{self.prefix}-main"

    @property
    def other_queue(self) -> str:
        return f"{self.prefix}-other"

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    async def new_agent(
        self, name: str, *, queues: list[str] | None = None, capacity: int = 3
    ) -> tuple[str, str]:
        """An agent created through the admin API: its id and token."""
        body = {"name": name, "queues": queues or [self.main_queue], "capacity": capacity}
        async with self.http.post(
            f"{self.direct_url}/api/admin/agents", json=body, headers=self.admin
        ) as response:
            answer = await response.json()
            assert response.status == 201, answer
        return str(answer["id"]), str(answer["token"])

    async def customer_writes(
        self,
        customer: str,
        body: str,
        *,
        profile: str = "Maria",
        media: list[tuple[str, bytes]] | None = None,
    ) -> str:
        """The customer writes through the emulator, which signs and posts the webhook (media
        stored on its side, fetched later through the router's media endpoint). Returns once
        the router answered 200; the message sid."""
        payload: dict[str, Any] = {
            "account_sid": ACCOUNT_SID,
            "url": self.url + INBOUND,
            "from": f"whatsapp:{customer}",
            "to": f"whatsapp:{BUSINESS}",
            "body": body,
            "profile_name": profile,
            "media": [
                {"content_type": kind, "data_base64": base64.b64encode(data).decode()}
                for kind, data in media or []
            ],
        }
        async with self.http.post(
            f"{self.emulator.url}/_emulator/customers/send", json=payload
        ) as response:
            answer = await response.json()
            assert response.status == 200 and answer["status"] == 200, answer
        return str(answer["message_sid"])

    async def customer_writes_directly(
        self, customer: str, body: str, *, profile: str = "Maria"
    ) -> None:
        """A signed inbound webhook posted to the router itself, not through the proxy (the
        signature is over the public URL, as Twilio's would be)."""
        form = inbound_form(customer=customer, body=body, profile=profile)
        data, headers = signed_post(INBOUND, form, base=self.url)
        async with self.http.post(self.direct_url + INBOUND, data=data, headers=headers) as r:
            assert r.status == 200, await r.text()
        self.emulator.state.record_customer_message(
            ACCOUNT_SID, f"whatsapp:{BUSINESS}", f"whatsapp:{customer}"
        )

    async def conversation_of(self, customer: str) -> asyncpg.Record:
        row = await self.db.fetchrow(
            "SELECT * FROM conversations WHERE customer = $1 ORDER BY opened_at DESC LIMIT 1",
            customer,
        )
        assert row is not None, f"no conversation for {customer}"
        return row

    async def close_window(self, conversation_id: str) -> None:
        """The customer last wrote 25 hours ago: the 24-hour window is closed (for us and
        for the emulator, which refuses free text outside it as Twilio does)."""
        await self.db.execute(
            "UPDATE conversations SET last_customer_message_at = now() - interval '25 hours'"
            " WHERE id = $1",
            conversation_id,
        )
        row = await self.db.fetchrow(
            "SELECT customer FROM conversations WHERE id = $1", conversation_id
        )
        assert row is not None
        self.emulator.state.windows.pop(
            (ACCOUNT_SID, f"whatsapp:{BUSINESS}", f"whatsapp:{row['customer']}"), None
        )


@pytest.fixture
async def stack(
    settings: Settings,
    config: LiveConfig,
    start_runner: RunnerFactory,
    listening: socket.socket,
    emulator: RunningEmulator,
    proxy: TcpProxy,
    admin_token: str,
    prefix: str,
    db: asyncpg.Pool,
) -> AsyncIterator[Stack]:
    """The router as ``omniroute run`` serves it (an ``AppRunner``: a handler is not cancelled
    when its client leaves, as the test server's would be) and every stage."""
    for stage in STAGES.values():
        await start_runner(stage)
    app = create_app(settings, config)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, listening).start()
        port = int(listening.getsockname()[1])
        proxy.target = ("127.0.0.1", port)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with asyncio.timeout(10):
                await app[BUS].wait_ready()
            yield Stack(
                url=f"http://127.0.0.1:{proxy.port}",
                direct_url=f"http://127.0.0.1:{port}",
                admin_token=admin_token,
                prefix=prefix,
                emulator=emulator,
                proxy=proxy,
                db=db,
                http=http,
                amqp_url=settings.amqp_url.get_secret_value(),
            )
    finally:
        await runner.cleanup()
        await db.execute(  # nobody of this test left available for later modules' stages
            "UPDATE agents SET presence = 'offline' WHERE $1 = ANY(queues)", f"{prefix}-main"
        )


class Stopwatch:
    """Wall-clock time of a step, printed (the suite measures, it does not assert timing)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.started
