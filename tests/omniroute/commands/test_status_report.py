"""What an operator reads in `omniroute status` (backlog, rates, hints), against the real
broker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from omniroute.commands.status_report import (
    StageStatus,
    collect,
    database_notes,
    management_url,
    process_notes,
    render,
    render_processes,
)
from omniroute.infra.bus import Bus
from omniroute.infra.outbox import add_to_outbox
from omniroute.infra.processes import ProcessIdentity, ProcessRow, beat, forget
from omniroute.infra.settings import Settings
from omniroute.infra.topology import STAGES
from schemas.events import EventType
from tests.support import publish_to_queue, purge_queues, received_event

pytestmark = pytest.mark.integration


async def test_status_shows_a_backlog_without_consumer_and_says_what_to_do(
    bus: Bus, settings: Settings
) -> None:
    queue = STAGES["status"].queue  # no runner of this stage in this test
    await purge_queues(settings.amqp_url.get_secret_value(), queue)
    await publish_to_queue(settings.amqp_url.get_secret_value(), queue, [b"{}"] * 3)
    try:
        rows = {r.stage: r for r in await collect(settings, interval=0.2)}
        row = rows["status"]
        assert row.ready == 3 and row.consumers == 0 and row.drain_per_s == 0
        assert any("omniroute consume status" in h for h in row.hints())
        assert "no consumer" in render(list(rows.values()))
    finally:
        await purge_queues(settings.amqp_url.get_secret_value(), queue)


async def test_status_reports_the_outbox_backlog_and_warns_when_autovacuum_is_off(
    settings: Settings, db: asyncpg.Pool
) -> None:
    event = received_event().caused(EventType.CONVERSATION_OPENED, {"n": 1})
    async with db.acquire() as conn, conn.transaction():
        await add_to_outbox(conn, [event])  # no relay runs in this test
    notes = await database_notes(settings)
    waiting = next(n for n in notes if n.startswith("outbox:"))
    assert int(waiting.split()[1]) >= 1 and "oldest" in waiting
    assert any(n.startswith("ingress spool: 0") for n in notes)
    autovacuum = await db.fetchval("SHOW autovacuum")
    warned = any("autovacuum = off" in n for n in notes)
    assert warned == (autovacuum != "on")


def test_a_growing_backlog_suggests_replicas_and_dead_letters_suggest_a_look() -> None:
    growing = StageStatus("classify", "omniroute.classify", 500, 2, 4, drain_per_s=-120.0)
    hints = growing.hints()
    assert any("--scale classify=N" in h for h in hints)
    assert any("dead-letters list classify" in h for h in hints)
    draining = StageStatus("classify", "omniroute.classify", 500, 2, 0, drain_per_s=300.0)
    assert draining.hints() == []


@pytest.fixture
async def management_api() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A stand-in for RabbitMQ's management API, answering GET /api/queues/{vhost} the way
    the real one does (only the fields status reads)."""
    queues: list[dict[str, Any]] = []
    seen_auth: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen_auth.append(request.headers.get("Authorization", ""))
        return web.json_response(queues)

    app = web.Application()
    app.router.add_get("/api/queues/{vhost}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", queues
    await runner.cleanup()
    assert all(a.startswith("Basic ") for a in seen_auth)


async def test_status_adds_rates_and_in_flight_from_the_management_api(
    bus: Bus, settings: Settings, management_api: tuple[str, list[dict[str, Any]]]
) -> None:
    url, queues = management_api
    queues.append(
        {
            "name": STAGES["conversations"].queue,
            "messages_unacknowledged": 32,
            "message_stats": {
                "publish_details": {"rate": 250.0},
                "deliver_get_details": {"rate": 240.5},
            },
        }
    )
    with_api = Settings.model_validate({**settings.model_dump(), "rabbitmq_api_url": url})
    rows = {r.stage: r for r in await collect(with_api, interval=0)}
    row = rows["conversations"]
    assert (row.in_per_s, row.out_per_s, row.in_flight) == (250.0, 240.5, 32)
    assert rows["classify"].in_per_s is None  # not in the API's answer


def test_the_management_api_defaults_to_the_brokers_host_and_credentials() -> None:
    settings = Settings.model_validate({"amqp_url": "amqp://ops:s%40cret@mq.internal:5672/prod"})
    assert management_url(settings) == ("http://mq.internal:15672", "prod", "ops", "s@cret")


def _row(pid: int, config_hash: str, role: str = "consume") -> ProcessRow:
    now = datetime.now(UTC)
    return ProcessRow(
        id=f"h:{pid}:x",
        host="h",
        pid=pid,
        role=role,
        stages=("classify",) if role == "consume" else (),
        config_hash=config_hash,
        started_at=now,
        heartbeat_at=now,
        heartbeat_age=2.0,
    )


def test_processes_on_one_configuration_raise_no_flag() -> None:
    lines = render_processes([_row(1, "aaaaaaaaaaaa", "serve"), _row(2, "aaaaaaaaaaaa")])
    assert len(lines) == 3  # the heading and one line each
    assert lines[1].startswith("h:1:serve") and "aaaaaaaaaaaa" in lines[1]
    assert lines[2].startswith("h:2:consume") and lines[2].endswith("classify")
    assert not any("half-applied" in line or "differs" in line for line in lines)


def test_a_half_applied_change_is_flagged_with_the_odd_process() -> None:
    lines = render_processes(
        [_row(1, "aaaaaaaaaaaa", "serve"), _row(2, "aaaaaaaaaaaa"), _row(3, "bbbbbbbbbbbb")]
    )
    odd = [line for line in lines if "← differs" in line]
    assert len(odd) == 1 and odd[0].startswith("h:3:consume")
    assert lines[-1].startswith("warning: half-applied configuration change")
    assert "aaaaaaaaaaaa on 2, bbbbbbbbbbbb on 1" in lines[-1]
    assert render_processes([])[0].startswith("processes: none")


async def test_status_lists_the_registered_processes_with_their_hash(
    settings: Settings, db: asyncpg.Pool
) -> None:
    one = ProcessIdentity(host="status-test", pid=11, role="serve", stages=())
    two = ProcessIdentity(host="status-test", pid=12, role="consume", stages=("classify",))
    async with db.acquire() as conn:
        await beat(conn, one, "aaaaaaaaaaaa")
        await beat(conn, two, "bbbbbbbbbbbb")
    try:
        lines = [line for line in await process_notes(settings) if "status-test" in line]
        assert len(lines) == 2
        assert lines[0].startswith("status-test:11:serve") and "aaaaaaaaaaaa" in lines[0]
        assert lines[1].startswith("status-test:12:consume") and "bbbbbbbbbbbb" in lines[1]
        assert any("half-applied" in line for line in await process_notes(settings))
    finally:
        async with db.acquire() as conn:
            await forget(conn, one)
            await forget(conn, two)
