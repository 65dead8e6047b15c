"""``omniroute status``: each stage's queue depth, consumers and dead letters at a glance."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import aio_pika
from aio_pika.exceptions import ChannelClosed

from omniroute.settings import Settings
from omniroute.topology import STAGES


@dataclass(frozen=True)
class StageStatus:
    stage: str
    queue: str
    ready: int | None
    consumers: int | None
    dead_letters: int | None


async def _depth(connection: aio_pika.abc.AbstractConnection, name: str) -> tuple[int, int] | None:
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        result = queue.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)
    except ChannelClosed:
        return None  # not declared yet: no process of that stage ever started
    finally:
        if not channel.is_closed:
            await channel.close()


async def collect(settings: Settings) -> list[StageStatus]:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=5)
    async with connection:
        rows = []
        for stage in STAGES.values():
            main = await _depth(connection, stage.queue)
            dead = await _depth(connection, stage.dead_queue)
            rows.append(
                StageStatus(
                    stage.stage,
                    stage.queue,
                    main[0] if main else None,
                    main[1] if main else None,
                    dead[0] if dead else None,
                )
            )
    return rows


async def run_status(settings: Settings, as_json: bool) -> int:
    rows = await collect(settings)
    if as_json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    print(f"{'stage':<14} {'waiting':>8} {'consumers':>10} {'dead letters':>13}")
    for r in rows:

        def show(value: int | None) -> str:
            return "-" if value is None else str(value)

        flag = "  ← no consumer" if r.consumers == 0 and (r.ready or 0) > 0 else ""
        flag += "  ← inspect: omniroute dead-letters list " + r.stage if r.dead_letters else ""
        print(
            f"{r.stage:<14} {show(r.ready):>8} {show(r.consumers):>10} "
            f"{show(r.dead_letters):>13}{flag}"
        )
    return 0
