"""A downstream service subscribing to omniroute's events: its own durable queue bound to the
keys it wants, acking after its work, deduplicating on the event id (delivery is at least
once). Run: python examples/subscriber.py [routing keys…] (default: conversation.*)."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import aio_pika

QUEUE = "example.subscriber"  # yours: name it after your service


async def main(keys: list[str]) -> None:
    url = os.environ.get("OMNIROUTE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=32)
        exchange = await channel.declare_exchange(
            "omniroute.events", aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(
            QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
        )
        for key in keys:
            await queue.bind(exchange, routing_key=key)
        seen: set[str] = set()  # in a real service: a unique key in your own database
        async with queue.iterator() as messages:
            async for message in messages:
                async with message.process():  # acks when the block ends without error
                    event = json.loads(message.body)
                    if event["id"] in seen:
                        continue
                    seen.add(event["id"])
                    print(
                        event["occurred_at"],
                        event["type"],
                        event.get("conversation_id"),
                        json.dumps(event["data"], ensure_ascii=False)[:120],
                    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:] or ["conversation.*"]))
