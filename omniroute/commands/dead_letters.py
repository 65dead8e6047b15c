"""``omniroute dead-letters list|show|replay|purge STAGE``: see and fix poison messages.

Replay sends each dead letter back to its stage's own queue (not to the exchange, which
would reach every other subscriber again) with its original headers, confirmed before the
dead letter is acked. Stages are idempotent, so replaying twice is harmless.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from omniroute.infra.bus import copy_message
from omniroute.infra.settings import Settings
from omniroute.infra.topology import STAGES

_OUR_HEADERS = ("x-omniroute-stage", "x-omniroute-reason", "x-omniroute-dead-at", "x-death")


@dataclass(frozen=True)
class DeadLetter:
    message_id: str | None
    routing_key: str
    reason: str
    dead_at: str
    body: bytes
    headers: dict[str, Any]

    def describe(self) -> str:
        """Everything an operator needs to decide: why, when, what, and the body itself."""
        try:
            body = json.dumps(json.loads(self.body), indent=2, ensure_ascii=False)
        except ValueError:
            body = repr(self.body[:4000])
        headers = json.dumps(self.headers, indent=2, default=str, ensure_ascii=False)
        return (
            f"message id:  {self.message_id}\nrouting key: {self.routing_key}\n"
            f"dead at:     {self.dead_at}\nreason:      {self.reason}\n"
            f"headers:\n{headers}\nbody:\n{body}"
        )

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> DeadLetter:
        headers = message.headers or {}
        reason = headers.get("x-omniroute-reason")
        if reason is None:  # dead-lettered by the broker itself (delivery limit)
            deaths: Any = headers.get("x-death") or [{}]
            reason = f"broker: {deaths[0].get('reason', 'unknown')}"
        routing_key = headers.get("x-omniroute-routing-key") or message.routing_key or ""
        return cls(
            message_id=message.message_id,
            routing_key=str(routing_key),
            reason=str(reason),
            dead_at=str(headers.get("x-omniroute-dead-at", "")),
            body=message.body,
            headers=dict(headers),
        )


async def _dead_queue(channel: aio_pika.abc.AbstractChannel, stage: str) -> AbstractQueue:
    return await channel.declare_queue(STAGES[stage].dead_queue, passive=True)


async def list_dead(settings: Settings, stage: str, limit: int) -> list[DeadLetter]:
    """Up to ``limit`` dead letters, oldest first, left in place."""
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        queue = await _dead_queue(channel, stage)
        letters = []
        for _ in range(limit):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            letters.append(DeadLetter.of(message))
        # Closing the channel without acking returns every message to the queue.
    return letters


async def replay_dead(settings: Settings, stage: str, limit: int) -> int:
    """Send up to ``limit`` dead letters back to the stage's queue; return how many."""
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    replayed = 0
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await _dead_queue(channel, stage)
        for _ in range(limit):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            headers = {k: v for k, v in (message.headers or {}).items() if k not in _OUR_HEADERS}
            headers["x-omniroute-replayed-at"] = datetime.now(UTC).isoformat()
            await channel.default_exchange.publish(
                copy_message(message, headers), routing_key=STAGES[stage].queue
            )
            await message.ack()
            replayed += 1
    return replayed


async def purge_dead(settings: Settings, stage: str) -> int:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        queue = await _dead_queue(channel, stage)
        result = await queue.purge()
        return int(result.message_count or 0)


async def run_dead_letters(
    settings: Settings, action: str, stage: str, limit: int, message_id: str | None = None
) -> int:
    if stage not in STAGES:
        print(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
        return 2
    if action == "show":
        letters = await list_dead(settings, stage, limit if message_id else 1)
        chosen = [d for d in letters if message_id in (None, d.message_id)]
        if not chosen:
            print(f"no dead letter {message_id or ''} in {STAGES[stage].dead_queue}".strip())
            return 1
        print(chosen[0].describe())
    elif action == "list":
        letters = await list_dead(settings, stage, limit)
        for letter in letters:
            print(f"{letter.dead_at}  {letter.routing_key}  {letter.message_id}  {letter.reason}")
        print(f"{len(letters)} dead letter(s) in {STAGES[stage].dead_queue}")
    elif action == "replay":
        print(f"replayed {await replay_dead(settings, stage, limit)} message(s) to {stage}")
    else:
        print(f"purged {await purge_dead(settings, stage)} message(s)")
    return 0
