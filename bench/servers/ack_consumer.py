"""Baseline for the stages: a raw aio-pika consumer that only acknowledges.

``python -m bench.servers.ack_consumer --amqp-url URL --queue Q --count N --prefetch P``
consumes N messages with prefetch P, acking each, and prints one JSON line with the rate
from the first delivery to the last ack.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import aio_pika
import orjson
import uvloop
from aio_pika.abc import AbstractIncomingMessage


async def consume(url: str, queue_name: str, count: int, prefetch: int) -> dict[str, float]:
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(queue_name, passive=True)
        done = asyncio.Event()
        seen = 0
        first = 0.0

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal seen, first
            if not seen:
                first = time.perf_counter()
            await message.ack()
            seen += 1
            if seen >= count:
                done.set()

        await queue.consume(on_message)
        await done.wait()
        elapsed = time.perf_counter() - first
    return {"messages": seen, "seconds": round(elapsed, 3), "rate": round(seen / elapsed, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.servers.ack_consumer")
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefetch", type=int, required=True)
    args = parser.parse_args()
    result = uvloop.run(consume(args.amqp_url, args.queue, args.count, args.prefetch))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
