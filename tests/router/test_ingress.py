"""The router with the broker away: fast 503s, no half-written events, recovery by itself."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from omniroute.config_loader import LiveConfig
from omniroute.settings import Settings
from router.app import create_app
from router.state import BUS
from tests.conftest import Infra, make_settings
from tests.support import TcpProxy, inbound_form, signed_post, tap, wait_for

PATH = "/twilio/contoso/inbound"


async def _post(client: TestClient[Any, Any], sid: str) -> tuple[int, float, dict[str, str]]:
    body, headers = signed_post(PATH, inbound_form(sid=sid))
    started = time.perf_counter()
    response = await client.post(PATH, data=body, headers=headers)
    await response.read()
    return response.status, time.perf_counter() - started, dict(response.headers)


async def test_broker_unreachable_answers_503_fast(infra: Infra, config: LiveConfig) -> None:
    settings = make_settings(infra, amqp_url="amqp://guest:guest@127.0.0.1:1/")
    app = create_app(settings, config)
    async with TestClient(TestServer(app)) as client:
        status, elapsed, headers = await _post(client, "SM" + "0" * 31 + "9")
        assert status == 503
        assert elapsed < 1.5
        assert headers.get("Retry-After") == "1"
        ready = await client.get("/readyz")
        assert ready.status == 503
        assert (await ready.json())["broker"] is False
        assert (await client.get("/healthz")).status == 200


async def test_router_starts_without_broker_and_recovers_when_it_returns(
    infra: Infra, config: LiveConfig, settings: Settings
) -> None:
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    port = proxy.port
    await proxy.cut()  # the broker is "down" when the router starts
    vhost = settings.amqp_url.get_secret_value().rsplit("/", 1)[1]
    proxied = make_settings(
        infra, amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/{vhost}", broker_retry_max=0.3
    )
    app = create_app(proxied, config)
    async with (
        TestClient(TestServer(app)) as client,
        tap(settings.amqp_url.get_secret_value(), "message.received") as spy,
    ):
        down_sid = "SM" + "1" * 32
        status, elapsed, _ = await _post(client, down_sid)
        assert status == 503 and elapsed < 1.5

        proxy.port = port
        await proxy.start()  # the broker is back
        async with asyncio.timeout(15):
            await app[BUS].wait_ready()
        up_sid = "SM" + "2" * 32
        status, _, _ = await _post(client, up_sid)
        assert status == 200
        event = await spy.next()
        # Nothing half-written: the refused webhook never became an event.
        assert event["data"]["message_sid"] == up_sid

        await proxy.cut()  # the connection drops under a running router
        status, elapsed, _ = await _post(client, "SM" + "3" * 32)
        assert status == 503 and elapsed < 1.5
        await proxy.start()

        async def accepted() -> bool:
            status, _, _ = await _post(client, "SM" + "4" * 32)
            return status == 200

        await wait_for(accepted, timeout=20, interval=0.3)
        await proxy.cut()
