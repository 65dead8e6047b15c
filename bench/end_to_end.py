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
import heapq
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aio_pika
import aiohttp
import asyncpg
import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from multidict import MultiDict
from twilio.request_validator import RequestValidator

from bench.deployment import INBOUND, SID, TOKEN, Deployment, deployment, seed_agents
from bench.infra import BenchInfra
from bench.loadgen import inbound_form, percentile
from bench.processes import machine_cpu_seconds, server_cpu_seconds
from schemas.events import EXCHANGE, EventType

STAGES = ("conversations", "classify", "distribute", "lifecycle")


class Tap:
    """Assignment times per customer, from the events on the exchange.

    ``everything``: bound to ``#``, it also counts every event by id, so an event published
    twice (the same AMQP message id seen again) shows as a duplicate publish. Without it only
    the two event types the latency needs reach the tap, which keeps the tap's own cost in
    the broker small when the broker's CPU is measured. No acks: the tap's queue is
    exclusive and auto-acked.
    """

    def __init__(self, everything: bool = False) -> None:
        self.everything = everything
        self.customer_of: dict[str, str] = {}
        self.assigned_at: dict[str, float] = {}
        self.assignments = 0
        self.expected = -1
        self.complete = asyncio.Event()
        self.events = 0
        self.events_by_type: dict[str, int] = {}
        self.duplicates_by_type: dict[str, int] = {}
        self._seen: set[int] = set()  # hashes of message ids: 64 bits, far from colliding

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        now = time.perf_counter()
        kind = message.routing_key or ""
        if self.everything:
            self.events += 1
            self.events_by_type[kind] = self.events_by_type.get(kind, 0) + 1
            key = hash(message.message_id)
            if key in self._seen:
                self.duplicates_by_type[kind] = self.duplicates_by_type.get(kind, 0) + 1
            else:
                self._seen.add(key)
        if kind == EventType.CONVERSATION_OPENED:
            event = orjson.loads(message.body)
            self.customer_of[event["conversation_id"]] = event["data"]["customer"]
        elif kind == EventType.CONVERSATION_ASSIGNED:
            event = orjson.loads(message.body)
            self.assignments += 1
            self.assigned_at.setdefault(event["conversation_id"], now)
            if len(self.assigned_at) == self.expected:
                self.complete.set()

    @property
    def duplicates(self) -> int:
        return sum(self.duplicates_by_type.values())

    def expect(self, count: int) -> None:
        self.expected = count
        if len(self.assigned_at) >= count:
            self.complete.set()

    async def attach(self, connection: AbstractRobustConnection) -> None:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=0)
        exchange = await channel.get_exchange(EXCHANGE)
        queue = await channel.declare_queue(exclusive=True)
        keys = (
            ["#"]
            if self.everything
            else [EventType.CONVERSATION_OPENED, EventType.CONVERSATION_ASSIGNED]
        )
        for key in keys:
            await queue.bind(exchange, routing_key=key)
        await queue.consume(self.on_message, no_ack=True)

    def latencies(
        self, sent_at: dict[str, float], planned: dict[str, float] | None = None
    ) -> list[tuple[float, float]]:
        """(sent, webhook→assigned seconds) for every accepted new conversation assigned,
        in sending order; with ``planned``, when it was due to be sent instead of when it
        went (a sender that fell behind does not move a webhook into a later window)."""
        when = planned or sent_at
        out = [
            (when.get(customer, sent_at[customer]), at - sent_at[customer])
            for conversation, at in self.assigned_at.items()
            if (customer := self.customer_of.get(conversation)) in sent_at
        ]
        return sorted(out)

    def lost(self, sent_at: dict[str, float]) -> int:
        """Accepted webhooks whose customer never got an assignment."""
        assigned = {self.customer_of.get(c) for c in self.assigned_at}
        return len(set(sent_at) - assigned)


# A scheduled webhook: seconds after the start, the customer, whether it opens a conversation
# (a follow-up message of an open conversation otherwise).
Arrival = tuple[float, str, bool]


def customer_number(n: int) -> str:
    return f"+55119{n % 10**8:08d}"


_customers_used = 0


def next_customers(count: int) -> int:
    """The first of ``count`` customer numbers no other run in this process has used."""
    global _customers_used
    first, _customers_used = _customers_used, _customers_used + count
    return first


def arrivals(
    phases: Sequence[tuple[float, float]], first: int = 0, followups: Sequence[float] = ()
) -> Iterator[Arrival]:
    """New conversations at piecewise constant rates (``(per second, seconds)`` each), the
    customers numbered from ``first``; each customer writes again ``followups`` seconds after
    the first message. In time order, made lazily (a 30-minute soak has 540 000 webhooks)."""

    def new() -> Iterator[Arrival]:
        start, n = 0.0, first
        for rate, seconds in phases:
            for k in range(int(rate * seconds)):
                yield start + k / rate, customer_number(n), True
                n += 1
            start += seconds

    later = [((at + delay, who, False) for at, who, _ in new()) for delay in followups]
    return heapq.merge(new(), *later)


def sign(validator: RequestValidator, url: str, customer: str) -> tuple[bytes, dict[str, str]]:
    """One signed inbound webhook from ``customer``, a MessageSid of its own."""
    sid = "SM" + uuid.uuid4().hex
    form = inbound_form(SID, sid, customer)
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": str(validator.compute_signature(url, MultiDict(form))),
        "I-Twilio-Idempotency-Token": str(uuid.uuid4()),
    }
    return urlencode(form).encode(), headers


@dataclass
class Sent:
    """What a scheduled sender saw. ``sent_at``: for each customer whose first webhook was
    answered 200, when that webhook went (perf_counter)."""

    origin: float = 0.0
    ended: float = 0.0
    sent_at: dict[str, float] = field(default_factory=dict)
    planned: dict[str, float] = field(default_factory=dict)  # when it was due to go
    answer: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    followup_statuses: dict[str, int] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        """Webhooks answered 200, first messages and follow-ups."""
        return self.statuses.get("200", 0) + self.followup_statuses.get("200", 0)


async def send_schedule(
    url: str, schedule: Iterable[Arrival], connections: int = 64, answer_within: float = 60.0
) -> Sent:
    """Open loop: each webhook at its time whatever the answers so far (they wait for one of
    ``connections`` keep-alive connections; the wait counts in the latency), signed just
    before it goes."""
    validator = RequestValidator(TOKEN)
    sent = Sent()
    pending: set[asyncio.Task[None]] = set()
    connector = aiohttp.TCPConnector(limit=connections)
    limit = aiohttp.ClientTimeout(total=answer_within)
    async with aiohttp.ClientSession(connector=connector, timeout=limit) as http:

        async def one(body: bytes, headers: dict[str, str], customer: str, new: bool) -> None:
            started = time.perf_counter()
            try:
                async with http.post(url, data=body, headers=headers) as response:
                    await response.read()
                    key = str(response.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                key = type(exc).__name__
            statuses = sent.statuses if new else sent.followup_statuses
            statuses[key] = statuses.get(key, 0) + 1
            if key == "200" and new:
                sent.sent_at[customer] = started
                sent.answer.append(time.perf_counter() - started)

        sent.origin = time.perf_counter()
        for offset, customer, new in schedule:
            delay = sent.origin + offset - time.perf_counter()
            # Behind schedule, still let the requests already made run.
            await asyncio.sleep(max(0.0, delay))
            body, headers = sign(validator, url, customer)
            if new:
                sent.planned[customer] = sent.origin + offset
            task = asyncio.create_task(one(body, headers, customer, new))
            pending.add(task)
            task.add_done_callback(pending.discard)
        sent.ended = time.perf_counter()
        await asyncio.gather(*pending)
    return sent


def windows(
    latencies: Sequence[tuple[float, float]], origin: float, width: float, count: int
) -> list[dict[str, Any]]:
    """p99 of webhook→assigned per window of ``width`` seconds from ``origin``, over the
    conversations *sent* (or due to be sent) in each window; windows with none are left
    out."""
    buckets: list[list[float]] = [[] for _ in range(count)]
    for sent, latency in latencies:
        k = int((sent - origin) // width)
        if k >= 0:  # a sender that fell behind sent the last few late: the last window's
            buckets[min(k, count - 1)].append(latency)
    return [
        {
            "from_s": round(k * width, 1),
            "conversations": len(b),
            "p99_ms": round(percentile(sorted(b), 0.99) * 1000, 1),
        }
        for k, b in enumerate(buckets)
        if b
    ]


async def inbound_stored(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM messages WHERE direction = 'inbound'"))
    finally:
        await conn.close()


class CpuWatch:
    """CPU seconds since ``start()``: the deployment's processes, the shared servers, this
    process (sender and tap), and the rest of the machine — other load that makes the
    figures of the run worth less."""

    def __init__(self, deployed: Deployment) -> None:
        self._deployed = deployed
        self.start()

    def start(self) -> None:
        self._own = self._deployed.cpu()
        self._servers = server_cpu_seconds()
        self._machine = machine_cpu_seconds()
        self._bench = time.process_time()

    def read(self) -> dict[str, float]:
        own = sum(v - self._own[k] for k, v in self._deployed.cpu().items())
        servers = {k: v - self._servers[k] for k, v in server_cpu_seconds().items()}
        bench = time.process_time() - self._bench
        machine = machine_cpu_seconds() - self._machine
        out = {"omniroute": own, **servers, "bench": bench}
        out["other"] = machine - sum(out.values())
        out["machine"] = machine
        return {k: round(v, 2) for k, v in out.items()}


def other_cpu_figure(name: str, cpu: dict[str, float]) -> dict[str, Any]:
    return {
        **_figure(
            f"{name}: CPU s of other processes on the machine",
            cpu["other"],
            "machine busy CPU s",
            cpu["machine"],
            "information (≈ 0: the run had the machine to itself)",
        ),
        "cpu_s": cpu,
    }


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
        await tap.attach(connection)
        rss_rest = deployed.rss()
        url = deployed.router_url + INBOUND
        # Customers no earlier measurement in this process used: one already in an open
        # conversation would not open another (and would never be assigned).
        first = next_customers(count)
        cpu_before = deployed.cpu()
        servers_before = server_cpu_seconds()
        watch = CpuWatch(deployed)
        rss_samples: list[dict[str, float]] = []
        sampler = asyncio.create_task(_sample_rss(deployed, rss_every, rss_samples))
        sent = await send_schedule(url, arrivals([(rate, seconds)], first=first))
        sent_at, answer, statuses = sent.sent_at, sent.answer, sent.statuses
        sampler.cancel()
        tap.expect(len(sent_at))
        sending_ended = time.perf_counter()
        await _until_settled(tap)
        drained_after = time.perf_counter() - sending_ended
        cpu = {k: v - cpu_before[k] for k, v in deployed.cpu().items()}
        servers = {k: v - servers_before[k] for k, v in server_cpu_seconds().items()}
        machine = watch.read()
        rss_after = deployed.rss()
    latencies = sorted(latency for _, latency in tap.latencies(sent_at))
    answer.sort()
    accepted = max(1, len(sent_at))
    return {
        "sent": count,
        "accepted": len(sent_at),
        "statuses": statuses,
        "assigned": len(tap.assigned_at),
        # Accepted webhooks whose customer never got an assignment. (A webhook answered 503
        # may still have been published — its confirm came late — and get assigned; Twilio's
        # retry of it is then deduplicated. That is not a loss.)
        "lost": tap.lost(sent_at),
        "duplicate_assignments": tap.assignments - len(tap.assigned_at),
        "backlog_drained_s": round(drained_after, 1),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "answer_p50_ms": round(percentile(answer, 0.5) * 1000, 1),
        "answer_p99_ms": round(percentile(answer, 0.99) * 1000, 1),
        "cpu_ms_per_conversation": {k: round(v * 1000 / accepted, 3) for k, v in cpu.items()},
        "server_cpu_ms_per_conversation": {
            k: round(v * 1000 / accepted, 3) for k, v in servers.items()
        },
        # With the load generator and tap (this process), and everything else on the machine.
        "cpu_s": machine,
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
            "value < 100 ms (issue: 300/s for 60 s, 0 lost, p99 < 100 ms)",
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
    own = round(sum(cpu.values()), 3)
    figures += [
        _figure(
            f"CPU ms per conversation, {proc}",
            cpu[proc],
            "all omniroute processes",
            own,
            "information",
        )
        for proc in cpu
    ]
    servers = m["server_cpu_ms_per_conversation"]
    # The servers are shared: anything else using the cluster or the broker during the run
    # counts as well, and so does the tap (2 events per conversation routed to its queue).
    note = "shared server, /proc of all its processes; autovacuum off on this machine"
    figures += [
        _figure(
            f"CPU ms per conversation, {server} {at}",
            servers[server],
            "all omniroute processes",
            own,
            f"information ({note})",
        )
        for server in servers
    ]
    figures.append(
        _figure(
            f"CPU ms per conversation, everything (omniroute + PostgreSQL + RabbitMQ) {at}",
            round(own + sum(servers.values()), 3),
            "all omniroute processes",
            own,
            "value <= 5 (issue: at saturation; CPU from /proc, servers' every process;"
            " autovacuum off)",
        )
    )
    figures.append(other_cpu_figure(f"end to end {at}", m["cpu_s"]))
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


async def _until_drained(tap: Tap, database_url: str, expected: int, quiet: float = 30.0) -> int:
    """Until every accepted first webhook is assigned and every accepted inbound message is
    stored, or neither moved for ``quiet`` seconds; the inbound messages stored then."""
    await _until_settled(tap, quiet)
    stored, last_change = -1, time.perf_counter()
    while True:
        now_stored = await inbound_stored(database_url)
        if now_stored >= expected:
            return now_stored
        if now_stored != stored:
            stored, last_change = now_stored, time.perf_counter()
        elif time.perf_counter() - last_change > quiet:
            return stored
        await asyncio.sleep(0.1)


async def soak(
    infra: BenchInfra,
    rate: float = 100.0,
    seconds: float = 1800.0,
    followups: Sequence[float] = (3.0, 6.0),
) -> list[dict[str, Any]]:
    """The issue's soak: new conversations at ``rate`` for ``seconds``, each customer writing
    again ``followups`` seconds after the first message (no agent reply: that needs the
    outbound stage and a Twilio emulator, and is left out).

    Figures: webhook→assigned p99 per minute of sending (the worst minute; every minute in
    the JSON), how long after the last webhook the backlog was drained (every first message
    assigned, every accepted message stored), RSS at the end vs after the first minute (a
    third of the run if shorter than 3 minutes), conversations and messages lost, and
    duplicate publishes (every event on the exchange counted by id).
    """
    count = int(rate * seconds)
    await seed_agents(infra.database_url, agents=100, capacity=count // 50 + 10)
    connection = await aio_pika.connect_robust(infra.amqp_url)
    tap = Tap(everything=True)
    rss_every = 30.0 if seconds >= 300 else 5.0
    warm_after = 60.0 if seconds >= 180 else seconds / 3
    async with connection, deployment(infra, STAGES) as deployed:
        await tap.attach(connection)
        url = deployed.router_url + INBOUND
        rss_samples: list[dict[str, float]] = []
        sampler = asyncio.create_task(_sample_rss(deployed, rss_every, rss_samples))
        watch = CpuWatch(deployed)
        first = next_customers(count)
        schedule = arrivals([(rate, seconds)], first=first, followups=followups)
        sent = await send_schedule(url, schedule)
        sampler.cancel()
        tap.expect(len(sent.sent_at))
        stored = await _until_drained(tap, infra.database_url, sent.accepted)
        drained_after = time.perf_counter() - sent.ended
        rss_end = deployed.rss()
        cpu = watch.read()
    if len(rss_samples) < 2:
        raise ValueError("the soak run is too short to compare memory")
    warm = rss_samples[max(0, round(warm_after / rss_every) - 1)]
    latencies = tap.latencies(sent.sent_at, sent.planned)
    minutes = windows(latencies, sent.origin, 60.0, max(1, round(seconds / 60)))
    overall = percentile(sorted(latency for _, latency in latencies), 0.99)
    worst = max((m["p99_ms"] for m in minutes), default=0.0)
    at = f"soak {seconds:.0f} s at {rate:.0f}/s"
    figures = [
        {
            **_figure(
                f"{at}: webhook→assigned p99 ms, worst minute",
                worst,
                "p99 ms over the whole run",
                round(overall * 1000, 1),
                "value < 250 ms in every minute",
            ),
            "minutes": minutes,
        },
        _figure(
            f"{at}: backlog drained s after the last webhook",
            round(drained_after, 1),
            "sending time, s",
            seconds,
            "value <= 5",
        ),
        _figure(
            f"{at}: conversations lost",
            tap.lost(sent.sent_at),
            "first webhooks answered 200",
            len(sent.sent_at),
            "value 0",
        ),
        {
            **_figure(
                f"{at}: inbound messages lost (incl. {len(followups)} follow-ups each)",
                max(0, sent.accepted - stored),
                "webhooks answered 200",
                sent.accepted,
                "value 0 (no agent reply in this run)",
            ),
            "statuses": sent.statuses,
            "followup_statuses": sent.followup_statuses,
        },
        {
            **_figure(
                f"{at}: duplicate publishes (event ids seen twice)",
                tap.duplicates,
                "events on the exchange",
                tap.events,
                "value 0",
            ),
            "duplicates_by_type": tap.duplicates_by_type,
            "events_by_type": tap.events_by_type,
        },
        other_cpu_figure(at, cpu),
    ]
    figures += [
        {
            **_figure(
                f"{at}: RSS MiB at the end, {proc}",
                rss_end[proc],
                f"RSS after {warm_after:.0f} s",
                warm[proc],
                "ratio <= 1.05",
            ),
            "samples": [sample[proc] for sample in rss_samples],
        }
        for proc in rss_end
    ]
    return figures
