"""Overload: offered load at twice the capacity, then back to a calm rate.

The router and the stages run as separate processes (as in compose.yaml). First a probe
finds the capacity: new conversations offered well above what the pipeline can take, and
capacity is the rate of ``conversation.assigned`` from one second after the probe started
until its backlog drained. Then, on the same deployment, new conversations at twice that
for ``overload_seconds``, then at ``calm_share`` of it for ``calm_seconds``, one open-loop
schedule.

A tap bound to ``#`` on the exchange counts every event by its AMQP message id (= event id):
an id seen twice is a duplicate publish (the outbox relay publishing a batch again, or an
ingress webhook both confirmed late and spooled). Recovery is measured on the
conversations *due to be sent* after the load fell back, per 5-second window: the seconds
from the fall-back to the start of the first window from which on every window's
webhook→assigned p99 is < 100 ms.
A webhook may be answered 503 only when the router refuses it; those are counted apart and
are not losses (Twilio does not retry them, so they are the router's shedding).
"""

from __future__ import annotations

import time
from typing import Any

import aio_pika

from bench.deployment import INBOUND, deployment, seed_agents
from bench.end_to_end import (
    STAGES,
    CpuWatch,
    Tap,
    _figure,
    _until_settled,
    arrivals,
    next_customers,
    other_cpu_figure,
    send_schedule,
    windows,
)
from bench.infra import BenchInfra
from bench.loadgen import percentile

WINDOW = 5.0
GOOD_MS = 100.0


TWILIO_CONNECTIONS = 1024


def recovery(minutes: list[dict[str, Any]]) -> float | None:
    """Seconds from the fall-back to the first window from which on every window's p99 is
    below ``GOOD_MS``; None if the last window is not."""
    start: float | None = None
    for window in minutes:
        if window["p99_ms"] < GOOD_MS:
            start = float(window["from_s"]) if start is None else start
        else:
            start = None
    return start


async def run(
    infra: BenchInfra,
    probe_rate: float = 1000.0,
    probe_seconds: float = 10.0,
    overload_seconds: float = 60.0,
    calm_seconds: float = 120.0,
    calm_share: float = 0.3,
) -> list[dict[str, Any]]:
    await seed_agents(infra.database_url, agents=100, capacity=100_000)
    connection = await aio_pika.connect_robust(infra.amqp_url)
    tap = Tap(everything=True)
    async with connection, deployment(infra, STAGES) as deployed:
        await tap.attach(connection)
        url = deployed.router_url + INBOUND

        # 1. Capacity: assignments per second while saturated.
        first = next_customers(int(probe_rate * probe_seconds))
        probe = await send_schedule(url, arrivals([(probe_rate, probe_seconds)], first=first))
        tap.expect(len(probe.sent_at))
        await _until_settled(tap)
        from_ = probe.origin + 1.0
        times = sorted(at for at in tap.assigned_at.values() if at >= from_)
        capacity = len(times) / (times[-1] - from_) if len(times) > 1 else 0.0
        if capacity <= 0:
            raise RuntimeError("the probe assigned nothing: no capacity to overload")
        probed = len(probe.sent_at)

        # 2. Twice the capacity, then calm.
        high, calm = 2 * capacity, calm_share * capacity
        phases = [(high, overload_seconds), (calm, calm_seconds)]
        first = next_customers(sum(int(rate * seconds) for rate, seconds in phases))
        watch = CpuWatch(deployed)
        # As Twilio does: as many connections as it takes, each webhook given 15 s (its
        # default total timeout); a 64-connection pool would queue the overload client-side.
        sent = await send_schedule(
            url, arrivals(phases, first=first), connections=TWILIO_CONNECTIONS, answer_within=15.0
        )
        tap.expect(probed + len(sent.sent_at))
        ended = time.perf_counter()
        await _until_settled(tap)
        drained = time.perf_counter() - ended
        cpu = watch.read()
    fell_back = sent.origin + overload_seconds
    latencies = tap.latencies(sent.sent_at, sent.planned)
    calm_windows = windows(latencies, fell_back, WINDOW, round(calm_seconds / WINDOW))
    overload_p99 = percentile(sorted(latency for at, latency in latencies if at < fell_back), 0.99)
    back_after = recovery(calm_windows)
    refused = sent.statuses.get("503", 0)
    failed = sum(v for k, v in sent.statuses.items() if k not in ("200", "503"))
    offered = sum(sent.statuses.values())
    setup = f"2×cap {high:.0f}/s {overload_seconds:.0f} s→{calm:.0f}/s {calm_seconds:.0f} s"
    return [
        {
            **_figure(
                "overload: capacity, conversations assigned/s at saturation",
                round(capacity, 1),
                "probe offered, /s",
                probe_rate,
                "information (2× this is offered below)",
            ),
            "probe_seconds": probe_seconds,
            "probe_statuses": probe.statuses,
        },
        {
            **_figure(
                f"overload {setup}: duplicate publishes (event ids seen twice)",
                tap.duplicates,
                "events on the exchange",
                tap.events,
                "ratio <= 0.001",
            ),
            "duplicates_by_type": tap.duplicates_by_type,
            "events_by_type": tap.events_by_type,
        },
        {
            **_figure(
                f"overload {setup}: s after the fall-back until p99 < 100 ms",
                back_after if back_after is not None else calm_seconds,
                "calm phase, s",
                calm_seconds,
                "value <= 30"
                + ("" if back_after is not None else " (NOT recovered within the calm phase)"),
            ),
            "windows": calm_windows,
            "overload_p99_ms": round(overload_p99 * 1000, 1),
            "backlog_drained_s": round(drained, 1),
        },
        _figure(
            f"overload {setup}: conversations lost",
            tap.lost(sent.sent_at),
            "webhooks answered 200",
            len(sent.sent_at),
            "value 0",
        ),
        {
            **_figure(
                f"overload {setup}: webhooks refused 503 by the router",
                refused,
                "webhooks offered",
                offered,
                "information (only the router's own refusal)",
            ),
            "statuses": sent.statuses,
        },
        _figure(
            f"overload {setup}: webhooks failed otherwise (no answer, not 200/503)",
            failed,
            "webhooks offered",
            offered,
            "value 0",
        ),
        _figure(
            f"overload {setup}: webhook answer p99 ms",
            round(percentile(sorted(sent.answer), 0.99) * 1000, 1),
            "Twilio's timeout, ms",
            15000,
            "value < 15000",
        ),
        other_cpu_figure(f"overload {setup}", cpu),
    ]
