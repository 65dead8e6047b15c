"""The router when the broker is away or slow: Twilio does not retry a 5xx, so every webhook
the router can keep (broker or PostgreSQL spool) is answered 200 and reaches the stages
exactly once, in the order it arrived; 503 only when neither can take it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from multidict import MultiDict

from omniroute.domain.webhook_events import inbound_event, inbound_event_id
from omniroute.infra.bus import Bus
from omniroute.infra.config_loader import LiveConfig, parse_config
from omniroute.infra.settings import Settings
from omniroute.infra.spool import SpoolRelay, spool
from omniroute.infra.store import Store
from router.app import create_app
from router.state import BUS
from tests.conftest import Infra, make_settings
from tests.support import (
    CONFIG_YAML,
    ENVIRON,
    TcpProxy,
    inbound_form,
    new_sid,
    signed_post,
    tap,
    wait_for,
)

PATH = "/twilio/contoso/inbound"


async def _post(client: TestClient[Any, Any], sid: str) -> tuple[int, float, dict[str, str]]:
    body, headers = signed_post(PATH, inbound_form(sid=sid))
    started = time.perf_counter()
    response = await client.post(PATH, data=body, headers=headers)
    await response.read()
    return response.status, time.perf_counter() - started, dict(response.headers)


async def _spooled(db: asyncpg.Pool, sids: list[str]) -> list[str]:
    """Event ids of these webhooks still in the spool, in arrival order."""
    ids = [inbound_event_id("contoso", sid) for sid in sids]
    rows = await db.fetch(
        "SELECT event_id FROM ingress_spool WHERE event_id = ANY($1::uuid[]) ORDER BY seq", ids
    )
    return [str(r["event_id"]) for r in rows]


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    yield proxy
    proxy.resume()
    await proxy.cut()


def _through(infra: Infra, settings: Settings, proxy: TcpProxy, **overrides: Any) -> Settings:
    vhost = settings.amqp_url.get_secret_value().rsplit("/", 1)[1]
    return make_settings(
        infra,
        amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}",
        broker_retry_max=0.3,
        **overrides,
    )


async def test_broker_unreachable_webhook_is_spooled_and_answered_200_fast(
    infra: Infra, config: LiveConfig, db: asyncpg.Pool
) -> None:
    settings = make_settings(infra, amqp_url="amqp://guest:guest@127.0.0.1:1/")
    app = create_app(settings, config)
    sid = new_sid()
    try:
        async with TestClient(TestServer(app)) as client:
            status, elapsed, _ = await _post(client, sid)
            assert status == 200
            assert elapsed < 1.5
            assert await _spooled(db, [sid]) == [inbound_event_id("contoso", sid)]
            # Still ready: the spool keeps webhooks (a load balancer must keep sending them).
            ready = await client.get("/readyz")
            assert ready.status == 200
            assert await ready.json() == {"status": "degraded", "broker": False, "database": True}
            assert (await client.get("/healthz")).status == 200
            metrics = await (await client.get("/metrics")).text()
            assert 'omniroute_webhooks_total{kind="inbound",outcome="spooled"}' in metrics
    finally:
        # This router never reaches a broker: leave nothing for another test's relay.
        await db.execute(
            "DELETE FROM ingress_spool WHERE event_id = $1", inbound_event_id("contoso", sid)
        )


async def test_broker_and_database_unreachable_answers_503(
    infra: Infra, config: LiveConfig
) -> None:
    settings = make_settings(
        infra,
        amqp_url="amqp://guest:guest@127.0.0.1:1/",
        database_url="postgresql://127.0.0.1:1/nowhere",
        db_connect_timeout=0.5,
    )
    app = create_app(settings, config)
    async with TestClient(TestServer(app)) as client:
        status, elapsed, headers = await _post(client, new_sid())
        assert status == 503
        assert elapsed < 3
        assert headers.get("Retry-After") == "1"
        ready = await client.get("/readyz")
        assert ready.status == 503
        assert (await ready.json())["status"] == "unavailable"


async def test_spooled_webhooks_reach_the_stages_once_in_arrival_order(
    infra: Infra, config: LiveConfig, settings: Settings, proxy: TcpProxy, db: asyncpg.Pool
) -> None:
    port = proxy.port
    await proxy.cut()  # the broker is "down" when the router starts
    app = create_app(_through(infra, settings, proxy), config)
    async with (
        TestClient(TestServer(app)) as client,
        tap(settings.amqp_url.get_secret_value(), "message.received") as spy,
    ):
        down = [new_sid() for _ in range(5)]
        for sid in down:
            status, elapsed, _ = await _post(client, sid)
            assert status == 200 and elapsed < 1.5
        assert len(await _spooled(db, down)) == 5

        proxy.port = port
        await proxy.start()  # the broker is back: the relay drains the spool
        mine = _about(down)
        seen = [(await spy.next(15, mine))["data"]["message_sid"] for _ in down]
        assert seen == down
        await spy.expect_none(within=1.0, where=mine)
        assert await _spooled(db, down) == []

        await proxy.cut()  # the connection drops under a running router
        dropped = new_sid()
        status, elapsed, _ = await _post(client, dropped)
        assert status == 200 and elapsed < 1.5
        await proxy.start()
        event = await spy.next(20, _about([dropped]))
        assert event["id"] == inbound_event_id("contoso", dropped)


async def test_a_slow_confirm_spools_the_webhook_and_the_late_confirm_forgets_it(
    infra: Infra, config: LiveConfig, settings: Settings, proxy: TcpProxy, db: asyncpg.Pool
) -> None:
    slow = _through(infra, settings, proxy, ingress_spool_after=0.2, ingress_confirm_timeout=5)
    app = create_app(slow, config)
    async with (
        TestClient(TestServer(app)) as client,
        tap(settings.amqp_url.get_secret_value(), "message.received") as spy,
    ):
        async with asyncio.timeout(10):
            await app[BUS].wait_ready()
        sid = new_sid()
        proxy.stall()  # the broker holds the confirm
        status, elapsed, _ = await _post(client, sid)
        assert status == 200
        assert elapsed < 1.5
        assert await _spooled(db, [sid]) == [inbound_event_id("contoso", sid)]
        proxy.resume()  # the confirm arrives, well inside the budget

        await spy.next(10, _about([sid]))
        await wait_for(lambda: _none_spooled(db, sid), timeout=5)
        # The spooled copy was forgotten, not relayed: past the budget, still one event.
        await spy.expect_none(within=6.0, where=_about([sid]))


def _about(sids: list[str]) -> Callable[[dict[str, Any]], bool]:
    """Only these webhooks' events: other tests' leftovers may pass by on the shared vhost."""
    wanted = set(sids)
    return lambda event: event["data"].get("message_sid") in wanted


async def _none_spooled(db: asyncpg.Pool, sid: str) -> bool:
    return await _spooled(db, [sid]) == []


async def test_one_relay_at_a_time_publishes_each_spooled_webhook_once(
    settings: Settings, store: Store, db: asyncpg.Pool
) -> None:
    account = parse_config(CONFIG_YAML, "test-config.yaml", ENVIRON).account("contoso")
    assert account is not None
    sids = [new_sid() for _ in range(60)]
    for sid in sids:
        form = MultiDict(inbound_form(sid=sid))
        await spool(store, inbound_event(account, form, datetime.now(UTC)))
    small_batches = Settings.model_validate({**settings.model_dump(), "spool_relay_batch": 7})
    buses = [Bus.from_settings(small_batches) for _ in range(2)]
    relays = [SpoolRelay(bus=bus, store=store, settings=small_batches) for bus in buses]
    async with tap(settings.amqp_url.get_secret_value(), "message.received") as spy:
        for bus in buses:
            await bus.start()
            async with asyncio.timeout(10):
                await bus.wait_ready()
        try:
            for relay in relays:
                await relay.start()
            seen = [(await spy.next(15, _about(sids)))["data"]["message_sid"] for _ in sids]
            await spy.expect_none(within=1.0, where=_about(sids))
        finally:
            for relay in relays:
                await relay.stop()
            for bus in buses:
                await bus.close()
    assert seen == sids
    assert await _spooled(db, sids) == []
