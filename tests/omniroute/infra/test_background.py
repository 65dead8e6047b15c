"""Background: one task per piece of work, started once, nudged by ``wake``, stopped for
good (cancelled and awaited) by ``stop``."""

from __future__ import annotations

import asyncio

from omniroute.infra.background import Background
from tests.support import within


class Looking(Background):
    """Counts the looks it takes: one at start, then one per wake."""

    task_name = "looking"

    def __init__(self) -> None:
        super().__init__()
        self.looks = 0
        self.seen: asyncio.Queue[int] = asyncio.Queue()  # the number of each look taken
        self.cancelled = False

    async def _run(self) -> None:
        try:
            while True:
                self.looks += 1
                self.seen.put_nowait(self.looks)
                await self._wake.wait()
                self._wake.clear()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


def _tasks_named(name: str) -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == name and not t.done()]


async def _look(worker: Looking) -> int:
    """The number of the next look the worker takes."""
    return await within(worker.seen.get())


async def test_starting_twice_runs_one_task() -> None:
    worker = Looking()
    await worker.start()
    await worker.start()
    try:
        assert await _look(worker) == 1
        assert len(_tasks_named("looking")) == 1
    finally:
        await worker.stop()


async def test_wake_makes_the_work_look_again() -> None:
    worker = Looking()
    await worker.start()
    try:
        assert await _look(worker) == 1
        worker.wake()
        assert await _look(worker) == 2
        worker.wake()
        assert await _look(worker) == 3
        assert worker.seen.empty()
    finally:
        await worker.stop()


async def test_a_wake_before_the_task_waits_is_not_lost() -> None:
    worker = Looking()
    worker.wake()  # the process wrote something before the task ever ran
    await worker.start()
    try:
        assert await _look(worker) == 1
        assert await _look(worker) == 2  # the early wake gave a second look
    finally:
        await worker.stop()


async def test_stop_cancels_and_awaits_the_task_and_a_start_after_it_begins_again() -> None:
    worker = Looking()
    await worker.stop()  # never started: nothing to do
    await worker.start()
    assert await _look(worker) == 1
    await worker.stop()
    assert worker.cancelled and _tasks_named("looking") == []
    worker.cancelled = False
    await worker.start()
    try:
        assert await _look(worker) == 2
        assert not worker.cancelled
    finally:
        await worker.stop()
    await worker.stop()  # stopping twice is harmless
    assert worker.cancelled
