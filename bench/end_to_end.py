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
import contextlib
import time
from typing import Any

import aio_pika
import aiohttp
import orjson
from aio_pika.abc import AbstractIncomingMessage

from bench.deployment import INBOUND, SID, TOKEN, Deployment, deployment, seed_agents
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
        self.expected = -1
        self.complete = asyncio.Event()

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
        if len(self.assigned_at) == self.expected:
            self.complete.set()

    def expect(self, count: int) -> None:
        self.expected = count
        if len(self.assigned_at) >= count:
            self.complete.set()


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


async def _until_settled(tap: Tap, quiet: float = 30.0) -> None:
    """Until every accepted webhook is assigned, or nothing more was assigned for ``quiet``
    seconds: a backlog left by a rate above capacity drains first, and only what never comes
    counts as lost."""
    while not tap.complete.is_set():
        before = len(tap.assigned_at)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tap.complete.wait(), quiet)
        if len(tap.assigned_at) == before:
            return


async def _sample_rss(deployed: Deployment, every: float, into: list[dict[str, float]]) -> None:
    while True:
        await asyncio.sleep(every)
        into.append(deployed.rss())


async def measure(
    infra: BenchInfra, rate: float, seconds: float, rss_every: float = 10.0
) -> dict[str, Any]:
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
        cpu_before = deployed.cpu()
        rss_samples: list[dict[str, float]] = []
        sampler = asyncio.create_task(_sample_rss(deployed, rss_every, rss_samples))
        sent_at, answer, statuses = await _send_at_rate(url, requests, customers, rate)
        sampler.cancel()
        tap.expect(len(sent_at))
        sending_ended = time.perf_counter()
        await _until_settled(tap)
        drained_after = time.perf_counter() - sending_ended
        cpu = {k: v - cpu_before[k] for k, v in deployed.cpu().items()}
        rss_after = deployed.rss()
    latencies = sorted(
        tap.assigned_at[c] - sent_at[tap.customer_of[c]]
        for c in tap.assigned_at
        if c in tap.customer_of and tap.customer_of[c] in sent_at
    )
    answer.sort()
    assigned_customers = {tap.customer_of.get(c) for c in tap.assigned_at}
    return {
        "sent": count,
        "accepted": len(sent_at),
        "statuses": statuses,
        "assigned": len(tap.assigned_at),
        # Accepted webhooks whose customer never got an assignment. (A webhook answered 503
        # may still have been published — its confirm came late — and get assigned; Twilio's
        # retry of it is then deduplicated. That is not a loss.)
        "lost": len(set(sent_at) - assigned_customers),
        "duplicate_assignments": tap.assignments - len(tap.assigned_at),
        "backlog_drained_s": round(drained_after, 1),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "answer_p50_ms": round(percentile(answer, 0.5) * 1000, 1),
        "answer_p99_ms": round(percentile(answer, 0.99) * 1000, 1),
        "cpu_ms_per_conversation": {
            k: round(v * 1000 / max(1, len(sent_at)), 3) for k, v in cpu.items()
        },
        "rss_rest_mib": rss_rest,
        "rss_after_mib": rss_after,
        "rss_samples_mib": rss_samples,
    }


def _figure(name: str, value: float, baseline: str, base: float, goal: str) -> dict[str, Any]:
    return {
        "figure": name,
        "value": value,
        "baseline": baseline,
        "baseline_value": base,
        "ratio": round(value / base, 3) if base else None,
        "goal": goal,
    }


async def run(
    infra: BenchInfra, rate: float = 300.0, seconds: float = 60.0, also_at: float = 100.0
) -> list[dict[str, Any]]:
    """The figures at ``rate``, and the latency at ``also_at`` (a rate this machine can
    sustain, to show the pipeline's own latency when it is not saturated)."""
    figures = await _at_rate(infra, rate, seconds)
    if also_at and also_at != rate:
        calm = await measure(infra, also_at, seconds)
        at = f"at {also_at:.0f}/s for {seconds:.0f} s"
        figures += [
            _figure(
                f"webhook→assigned p99 ms {at}",
                calm["p99_ms"],
                "webhook answer p99 ms, same run",
                calm["answer_p99_ms"],
                "value < 50 ms",
            ),
            _figure(
                f"webhook→assigned p50 ms {at}",
                calm["p50_ms"],
                "webhook answer p50 ms, same run",
                calm["answer_p50_ms"],
                "information",
            ),
            _figure(
                f"conversations lost {at}",
                calm["lost"],
                "webhooks answered 200",
                calm["accepted"],
                "value 0",
            ),
        ]
    return figures


async def _at_rate(infra: BenchInfra, rate: float, seconds: float) -> list[dict[str, Any]]:
    m = await measure(infra, rate, seconds)
    at = f"at {rate:.0f}/s for {seconds:.0f} s"
    figures = [
        _figure(
            f"webhook→assigned p99 ms {at}",
            m["p99_ms"],
            "webhook answer p99 ms, same run",
            m["answer_p99_ms"],
            "value < 50 ms",
        ),
        _figure(
            f"webhook→assigned p50 ms {at}",
            m["p50_ms"],
            "webhook answer p50 ms, same run",
            m["answer_p50_ms"],
            "information",
        ),
        _figure(
            f"conversations lost {at}", m["lost"], "webhooks answered 200", m["accepted"], "value 0"
        ),
        _figure(
            f"backlog drained s after sending {at}",
            m["backlog_drained_s"],
            "sending time, s",
            seconds,
            "information (0 = kept up)",
        ),
        _figure(
            f"duplicate assignments {at}",
            m["duplicate_assignments"],
            "conversations assigned",
            m["assigned"],
            "value 0",
        ),
    ]
    cpu = m["cpu_ms_per_conversation"]
    figures += [
        _figure(
            f"CPU ms per conversation, {proc}",
            cpu[proc],
            "all processes",
            round(sum(cpu.values()), 3),
            "information",
        )
        for proc in cpu
    ]
    figures += [
        _figure(
            f"RSS MiB after the run, {proc}",
            m["rss_after_mib"][proc],
            "at rest",
            m["rss_rest_mib"][proc],
            "information",
        )
        for proc in m["rss_after_mib"]
    ]
    return figures


async def soak(
    infra: BenchInfra, rate: float = 100.0, seconds: float = 600.0
) -> list[dict[str, Any]]:
    """Memory under a long steady load: RSS at the end vs after the first minute."""
    m = await measure(infra, rate, seconds, rss_every=30.0)
    samples = m["rss_samples_mib"]
    if len(samples) < 3:
        raise ValueError("the soak run is too short to compare memory (needs ≥ 90 s)")
    warm, last = samples[1], samples[-1]
    return [
        _figure(
            f"soak {seconds:.0f} s at {rate:.0f}/s: RSS MiB at the end, {proc}",
            last[proc],
            "RSS after the first minute",
            warm[proc],
            "ratio <= 1.05",
        )
        for proc in last
    ] + [
        _figure(
            f"soak {seconds:.0f} s at {rate:.0f}/s: conversations lost",
            m["lost"],
            "webhooks answered 200",
            m["accepted"],
            "value 0",
        ),
        _figure(
            f"soak {seconds:.0f} s at {rate:.0f}/s: backlog drained s after sending",
            m["backlog_drained_s"],
            "sending time, s",
            seconds,
            "information (0 = kept up)",
        ),
    ]


def body_customer(body: bytes) -> str:
    for pair in body.split(b"&"):
        if pair.startswith(b"WaId="):
            return "+" + pair[5:].decode()
    raise ValueError("no WaId in the webhook")
