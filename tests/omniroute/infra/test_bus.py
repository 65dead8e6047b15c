"""The bus lets its process end: closing it while the broker does not answer stops every
connection attempt (aio-pika's robust connection otherwise keeps reconnecting in a task of
its own, mosquito/aio-pika#414, and the process never exits)."""

from __future__ import annotations

import asyncio
import socket

from omniroute.infra.bus import Bus


async def test_closing_while_the_broker_does_not_answer_leaves_no_task_behind() -> None:
    silent = socket.socket()  # accepts TCP connections, never speaks AMQP
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    port = silent.getsockname()[1]
    before = asyncio.all_tasks()
    bus = Bus(
        f"amqp://guest:guest@127.0.0.1:{port}/",
        publish_timeout=1.0,
        connect_timeout=5.0,
        retry_max=1.0,
        reconnect_interval=0.2,
    )
    try:
        await bus.start()
        await asyncio.sleep(0.3)  # the first connect attempt is waiting on the silent peer
        assert not bus.ready
        async with asyncio.timeout(2):
            await bus.close()

        async def leftovers() -> set[asyncio.Task[object]]:
            return {t for t in asyncio.all_tasks() - before if not t.done()} - {
                asyncio.current_task()
            }

        # Give a reconnect loop, if one survived, the time to show itself (reconnect 0.2 s).
        await asyncio.sleep(0.6)
        assert await leftovers() == set()
    finally:
        silent.close()
