"""Real HTTP bots speaking Rasa's REST channel protocol, scripted per test.

The bot stage is tested against a real aiohttp server on a loopback port rather than a mocked
client, so timeouts, refused connections, 5xx answers and malformed bodies go through the same
socket path they take in production.

The protocol, as Rasa documents its REST channel ("Your Own Website", RestInput:
https://rasa.com/docs/reference/channels/your-own-website/ and the HTTP API's
``POST /webhooks/{rest_channel}/webhook``,
https://rasa.com/docs/reference/api/pro/http-api/channel-webhooks/post-user-message-from-a-rest-channel):
the client POSTs ``{"sender": "<id>", "message": "<text>", "metadata": {...}}`` to
``http://<host>:<port>/webhooks/rest/webhook``; the answer is a JSON list of bot messages such as
``[{"recipient_id": "<id>", "text": "Hey"}, {"recipient_id": "<id>", "image": "http://…"}]``,
with ``buttons`` (``[{"title", "payload"}]``) and ``custom`` (any JSON object) alongside.
A button's ``payload`` is what the client sends back as the next ``message``.

Use::

    async with bot_server(answers({"text": "Hi"})) as bot:
        ...  # point the workstream's bot.url at bot.url
        assert bot.calls[0].body["sender"] == conversation_id

A script is a function ``(body) -> Reply`` (``Reply(status, body, delay)``: ``body`` is any JSON
value, or ``bytes`` sent as is); the helpers below build the usual ones. ``bot.script`` may be
replaced while the server runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
from aiohttp import web
from multidict import CIMultiDict

REST_PATH = "/webhooks/rest/webhook"
# How long the server waits for handlers still running (a scripted delay) when it stops:
# short, since a test has already seen what it wanted.
SHUTDOWN_TIMEOUT = 0.5


class Reply(NamedTuple):
    """What the bot answers: HTTP status, a JSON value (or raw ``bytes``), seconds to wait."""

    status: int = 200
    body: Any = ()
    delay: float = 0.0


Script = Callable[[dict[str, Any]], Reply]


@dataclass(frozen=True)
class BotCall:
    """One request the bot received: its parsed JSON body (``None`` when it was not JSON),
    its headers, and when it arrived (``time.monotonic()``)."""

    body: Any
    headers: CIMultiDict[str]
    at: float

    @property
    def message(self) -> str | None:
        """The customer's text (or a button's payload) the client sent."""
        return self.body.get("message") if isinstance(self.body, dict) else None

    @property
    def metadata(self) -> dict[str, Any]:
        meta = self.body.get("metadata") if isinstance(self.body, dict) else None
        return meta if isinstance(meta, dict) else {}


@dataclass
class BotServer:
    """A running scripted bot: ``url`` is its REST webhook, ``calls`` every request received
    (including refused ones), in arrival order."""

    script: Script
    token: str | None = None
    calls: list[BotCall] = field(default_factory=list)
    url: str = ""
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    _closing: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def messages(self) -> list[str | None]:
        """The ``message`` of each call, in order."""
        return [call.message for call in self.calls]

    async def wait_calls(self, count: int, timeout: float = 5.0) -> list[BotCall]:
        """Wait until at least ``count`` calls arrived; fail after ``timeout`` seconds."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.calls) >= count)
        return list(self.calls)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        async with self._arrived:
            self.calls.append(BotCall(body, request.headers.copy(), time.monotonic()))
            self._arrived.notify_all()
        if self.token is not None and request.headers.get("Authorization") != (
            f"Bearer {self.token}"
        ):
            return web.json_response({"error": "unauthorized"}, status=401)
        if not isinstance(body, dict):
            return web.json_response({"error": "body is not a JSON object"}, status=400)
        reply = self.script(body)
        if reply.delay:
            # Ends early when the server stops, so a test's shutdown never waits on it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), reply.delay)
        if isinstance(reply.body, bytes):
            return web.Response(
                body=reply.body, status=reply.status, content_type="application/json"
            )
        return web.Response(
            body=orjson.dumps(reply.body), status=reply.status, content_type="application/json"
        )


@contextlib.asynccontextmanager
async def bot_server(
    script: Script | None = None, *, token: str | None = None, path: str = REST_PATH
) -> AsyncIterator[BotServer]:
    """Serve ``script`` (default: :func:`echo`) on a free 127.0.0.1 port until the block ends.
    With ``token``, requests without ``Authorization: Bearer <token>`` get a 401."""
    bot = BotServer(script or echo(), token=token)
    app = web.Application()
    app.router.add_post(path, bot.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        bot.url = f"http://{host}:{port}{path}"
        yield bot
    finally:
        bot._closing.set()
        await runner.cleanup()


# --- scripts -----------------------------------------------------------------------------


def _to(body: Mapping[str, Any], messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Bot messages addressed to the request's sender, as Rasa sets ``recipient_id``."""
    return [{"recipient_id": body.get("sender"), **message} for message in messages]


def answers(*messages: Mapping[str, Any], status: int = 200, delay: float = 0.0) -> Script:
    """The same bot messages (each ``{"text"?, "image"?, "buttons"?, "custom"?}``) every call."""
    return lambda body: Reply(status, _to(body, messages), delay)


def texts(*lines: str) -> Script:
    """One text message per line, every call."""
    return answers(*({"text": line} for line in lines))


def echo(prefix: str = "echo: ") -> Script:
    """Answers the message back, prefixed: shows which message (or payload) the bot got."""
    return lambda body: Reply(200, _to(body, [{"text": f"{prefix}{body.get('message')}"}]))


def silent() -> Script:
    """Answers an empty list: the bot heard the message and has nothing to say."""
    return lambda body: Reply(200, [])


def delayed(seconds: float, then: Script | None = None) -> Script:
    """Answers as ``then`` (default :func:`echo`) after ``seconds``: past a client's timeout,
    the call fails there."""
    inner = then or echo()

    def script(body: dict[str, Any]) -> Reply:
        status, answer, delay = inner(body)
        return Reply(status, answer, delay + seconds)

    return script


def failing(times: int, status: int = 503, then: Script | None = None) -> Script:
    """HTTP ``status`` for the first ``times`` calls, then ``then`` (default :func:`echo`)."""
    inner = then or echo()
    counter = itertools.count()

    def script(body: dict[str, Any]) -> Reply:
        if next(counter) < times:
            return Reply(status, {"error": f"scripted failure {status}"})
        return inner(body)

    return script


def malformed() -> Script:
    """A 200 whose body is not JSON at all."""
    return lambda body: Reply(200, b'[{"recipient_id": "x", "text": "unterminated')


def not_a_list() -> Script:
    """A 200 with valid JSON that is not a list of messages."""
    return lambda body: Reply(200, {"recipient_id": body.get("sender"), "text": "not a list"})


def handoff(
    text: str | None = "Transferring you to an agent.",
    *,
    variables: Mapping[str, Any] | None = None,
    skills: Mapping[str, int] | None = None,
    priority: int | None = None,
    queue: str | None = None,
) -> Script:
    """Optionally a text, then a ``custom`` hand-off to agents with what the bot collected."""
    custom: dict[str, Any] = {"handoff": True, "variables": dict(variables or {})}
    if skills is not None:
        custom["skills"] = dict(skills)
    if priority is not None:
        custom["priority"] = priority
    if queue is not None:
        custom["queue"] = queue
    messages: list[dict[str, Any]] = [{"text": text}] if text is not None else []
    return answers(*messages, {"custom": custom})


def buttons(text: str, choices: Sequence[tuple[str, str]]) -> Script:
    """A text with buttons, each ``(title, payload)``."""
    return answers({"text": text, "buttons": [{"title": t, "payload": p} for t, p in choices]})


def image(url: str, text: str | None = None) -> Script:
    """An image (its public URL), after an optional text."""
    messages: list[dict[str, Any]] = [{"text": text}] if text is not None else []
    return answers(*messages, {"image": url})


def sequence(*scripts: Script) -> Script:
    """The n-th call answered by the n-th script; the last one answers every call after."""
    if not scripts:
        raise ValueError("sequence needs at least one script")
    counter = itertools.count()

    def script(body: dict[str, Any]) -> Reply:
        return scripts[min(next(counter), len(scripts) - 1)](body)

    return script


def by_message(routes: Mapping[str, Script], default: Script | None = None) -> Script:
    """Chooses the script by the exact message (e.g. a button payload); else ``default``
    (:func:`echo`)."""
    fallback = default or echo()
    return lambda body: routes.get(str(body.get("message")), fallback)(body)


__all__ = [
    "REST_PATH",
    "BotCall",
    "BotServer",
    "Reply",
    "Script",
    "answers",
    "bot_server",
    "buttons",
    "by_message",
    "delayed",
    "echo",
    "failing",
    "handoff",
    "image",
    "malformed",
    "not_a_list",
    "sequence",
    "silent",
    "texts",
]
