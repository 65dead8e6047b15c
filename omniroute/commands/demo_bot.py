"""The bot of ``omniroute demo``: ``examples/faq_bot.py`` runs as a service of its own (a
separate process on a free loopback port, as a Rasa server would), the example's bot
workstream is pointed at it, and one customer talks to it until it hands the conversation
to the agents with what it collected; the report checks that trail."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from schemas.config import Config

FAQ_BOT = Path("examples/faq_bot.py")
START_SECONDS = 10.0
ANSWER_SECONDS = 15.0


def free_port(preferred: int = 0) -> int:
    """``preferred`` on loopback when nobody listens there, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise RuntimeError("no free port")


@contextlib.asynccontextmanager
async def faq_bot(script: Path = FAQ_BOT) -> AsyncIterator[str]:
    """Start the example bot; yield its REST channel URL; stop it."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        "--port",
        str(port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}/webhooks/rest"
    try:
        await _until_healthy(process, f"{base}/")
        yield f"{base}/webhook"
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _until_healthy(process: asyncio.subprocess.Process, health: str) -> None:
    """Rasa channels answer ``GET /webhooks/<channel>/`` with ``{"status": "ok"}``."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
        async with asyncio.timeout(START_SECONDS):
            while True:
                if process.returncode is not None:
                    err = b"" if process.stderr is None else await process.stderr.read()
                    raise RuntimeError(
                        f"{FAQ_BOT} exited ({process.returncode}): "
                        + err.decode(errors="replace").strip()[-300:]
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(health) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.1)


def with_bot_at(config: Config, url: str) -> Config:
    """The configuration with every workstream's bot answering at ``url``."""
    workstreams = [
        w.model_copy(update={"bot": w.bot.model_copy(update={"url": url})}) if w.bot else w
        for w in config.workstreams
    ]
    return config.model_copy(update={"workstreams": workstreams})


def bot_numbers(config: Config) -> list[str]:
    """The names of the numbers whose workstream has a bot."""
    bots = {w.name for w in config.workstreams if w.bot is not None}
    return [n.name for a in config.accounts for n in a.numbers if n.workstream in bots]


async def answered(pool: Any, message_sid: str) -> None:
    """Wait until the bot answered this customer message (or it was handed over)."""
    query = (
        "SELECT t.state FROM bot_turns t JOIN messages m ON m.id = t.message_id"
        " WHERE m.twilio_sid = $1"
    )
    async with asyncio.timeout(ANSWER_SECONDS):
        while True:
            if await pool.fetchval(query, message_sid) in ("answered", "skipped", "failed"):
                return
            await asyncio.sleep(0.05)


def check_bot(
    customer: str, events: list[dict[str, Any]], holders: list[str], bot_texts: list[str]
) -> tuple[bool, str]:
    """The customer talked to the bot, which handed over with what it collected; then the
    conversation was classified with it, queued and taken by an agent."""
    kinds = [e["type"] for e in events]
    escalated = next((e["data"] for e in events if e["type"] == "conversation.escalated"), None)
    classified = [e["data"] for e in events if e["type"] == "conversation.classified"]
    if escalated is None:
        return False, f"bot: {customer} was never handed to agents ({', '.join(kinds)})"
    variables = escalated.get("variables") or {}
    ok = (
        "conversation.bot-started" in kinds
        and kinds.count("bot.replied") >= 2
        and escalated["reason"] == "bot"
        and variables.get("topic") == "orders"
        and bool(variables.get("order"))
        and bool(classified)
        and bool(holders)
        and kinds.index("conversation.escalated") < kinds.index("conversation.classified")
    )
    skills = classified[-1].get("skills") if classified else None
    return ok, (
        f"bot: {customer} talked to the FAQ bot ({len(bot_texts)} bot messages, e.g."
        f" {(bot_texts[1] if len(bot_texts) > 1 else '')[:40]!r}); it handed over"
        f" ({escalated['reason']}) with topic={variables.get('topic')}"
        f" order={variables.get('order')}; classified with skills {skills};"
        f" served by {', '.join(holders) or 'nobody'}"
    )


def check_resolved(
    customer: str, events: list[dict[str, Any]], offers: list[tuple[str, str]]
) -> tuple[bool, str]:
    """The bot answered and, thanked, closed the conversation itself: no agent involved."""
    kinds = [e["type"] for e in events]
    closed = next((e["data"] for e in events if e["type"] == "conversation.closed"), None)
    reason = closed.get("reason") if closed else None
    ok = (
        reason == "resolved_by_bot"
        and "conversation.escalated" not in kinds
        and "conversation.queued" not in kinds
        and not offers
    )
    return ok, (
        f"bot resolved: {customer} asked the bot, said thanks; closed ({reason or 'not closed'})"
        f" after {kinds.count('bot.replied')} bot answers, offered to "
        f"{'nobody' if not offers else ', '.join(a for a, _ in offers)}"
    )
