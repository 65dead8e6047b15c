"""End to end: webhook → ``conversation.assigned`` at a sustained rate of new conversations.

The router and the stages run as separate processes (as in compose.yaml). An open-loop
sender posts signed inbound webhooks for new customers at a fixed rate; a tap on the
exchange sees ``conversation.opened`` (conversation → customer) and
``conversation.assigned``. Latency is from the moment the webhook was sent to the moment
the assignment event reached the tap. Nothing may be lost: every webhook answered 200 must
end in exactly one assignment. The baseline is the webhook's own answer time in the same
run (what Twilio sees), so the ratio is what the rest of the pipeline adds.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aio_pika
import aiohttp
import orjson
from aio_pika.abc import AbstractIncomingMessage

from bench.deployment import INBOUND, SID, TOKEN, deployment, seed_agents
from bench.infra import BenchInfra
from bench.loadgen import percentile, signed_requests
from schemas.events import EXCHANGE, EventType

STAGES = ("conversations", "classify", "distribute", "lifecycle")


class Tap:
    """Assignment times per customer, from the events on the exchange."""

    def __init__(self) -> None:
        self.customer_of: dict[str, str] = {}
        self.assigned_at: dict[str, float] = {}
        self.assignments = 0

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        now = time.perf_counter()
        event = orjson.loads(message.body)
        conversation = event.get("conversation_id")
        if event["type"] == EventType.CONVERSATION_OPENED:
            self.customer_of[conversation] = event["data"]["customer"]
        elif event["type"] == EventType.CONVERSATION_ASSIGNED:
            self.assignments += 1
            self.assigned_at.setdefault(conversation, now)
        await message.ack()


async def _send_at_rate(
    url: str, requests: list[tuple[bytes, dict[str, str]]], customers: list[str], rate: float
) -> tuple[dict[str, float], list[float], dict[str, int]]:
    sent_at: dict[str, float] = {}
    answer: list[float] = []
    statuses: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(body: bytes, headers: dict[str, str], customer: str) -> None:
            started = time.perf_counter()
            try:
                async with http.post(url, data=body, headers=headers) as response:
                    await response.read()
                    key = str(response.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                key = type(exc).__name__
            statuses[key] = statuses.get(key, 0) + 1
            if key == "200":
                sent_at[customer] = started
                answer.append(time.perf_counter() - started)

        tasks = []
        origin = time.perf_counter()
        for n, ((body, headers), customer) in enumerate(zip(requests, customers, strict=True)):
            delay = origin + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(body, headers, customer)))
        await asyncio.gather(*tasks)
    return sent_at, answer, statuses


async def measure(infra: BenchInfra, rate: float, seconds: float) -> dict[str, Any]:
    count = int(rate * seconds)
    await seed_agents(infra.database_url, agents=100, capacity=count // 50 + 10)
    connection = await aio_pika.connect_robust(infra.amqp_url)
    tap = Tap()
    async with connection, deployment(infra, STAGES) as deployed:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        exchange = await channel.get_exchange(EXCHANGE)
        queue = await channel.declare_queue(exclusive=True)
        for key in (EventType.CONVERSATION_OPENED, EventType.CONVERSATION_ASSIGNED):
            await queue.bind(exchange, routing_key=key)
        await queue.consume(tap.on_message)
        rss_rest = deployed.rss()
        url = deployed.router_url + INBOUND
        requests = signed_requests(url, TOKEN, SID, count)
        customers = [body_customer(body) for body, _ in requests]
        sent_at, answer, statuses = await _send_at_rate(url, requests, customers, rate)
        deadline = time.monotonic() + 60
        while len(tap.assigned_at) < len(sent_at) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        rss_after = deployed.rss()
    latencies = sorted(
        tap.assigned_at[c] - sent_at[tap.customer_of[c]]
        for c in tap.assigned_at
        if c in tap.customer_of and tap.customer_of[c] in sent_at
    )
    answer.sort()
    return {
        "sent": count,
        "accepted": len(sent_at),
        "statuses": statuses,
        "assigned": len(tap.assigned_at),
        "lost": len(sent_at) - len(tap.assigned_at),
        "duplicate_assignments": tap.assignments - len(tap.assigned_at),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "answer_p50_ms": round(percentile(answer, 0.5) * 1000, 1),
        "answer_p99_ms": round(percentile(answer, 0.99) * 1000, 1),
        "rss_rest_mib": rss_rest,
        "rss_after_mib": rss_after,
    }


def body_customer(body: bytes) -> str:
    for pair in body.split(b"&"):
        if pair.startswith(b"WaId="):
            return "+" + pair[5:].decode()
    raise ValueError("no WaId in the webhook")
