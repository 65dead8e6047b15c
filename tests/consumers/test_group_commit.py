"""Group commit: batching, and a failure still finding its own message.

The tests order the work with events, not sleeps: the recorder says when the worker holds a
unit of work (``busy``), and ``Submitter`` says when every item it sent is waiting.
"""

from __future__ import annotations

import asyncio

import pytest

from consumers.group_commit import GroupCommit
from tests.support import within


class Fatal(Exception):
    pass


class Recorder:
    """A fake unit of work: records the batches it ran; fails on chosen items."""

    def __init__(self, failing: set[int] | None = None, fatal: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.alone: list[int] = []
        self.failing = failing or set()
        self.fatal = fatal
        self.gate = asyncio.Event()
        self.gate.set()
        self.busy = asyncio.Event()  # the worker holds a batch or a lone item

    async def _enter(self) -> None:
        self.busy.set()
        await within(self.gate.wait())

    async def batch(self, items: list[int]) -> list[int]:
        await self._enter()
        self.batches.append(items)
        if self.fatal:
            raise Fatal("shutting down")
        if self.failing & set(items):
            raise ValueError("one of them is bad")  # the whole transaction rolls back
        return [i * 10 for i in items]

    async def one(self, item: int) -> int:
        await self._enter()
        self.alone.append(item)
        if item in self.failing:
            raise ValueError(f"item {item} is bad")
        return item * 10


class Submitter:
    """Submits items, each from a task of its own (as message tasks do), and tells when
    all of them are waiting in the group commit."""

    def __init__(self, commits: GroupCommit[int, int]) -> None:
        self.commits = commits
        self.expected = 0
        self.queued = 0
        self.all_queued = asyncio.Event()

    def submit(self, *items: int) -> list[asyncio.Future[int]]:
        self.expected += len(items)
        self.all_queued.clear()
        return [asyncio.ensure_future(self._submit(item)) for item in items]

    async def _submit(self, item: int) -> int:
        # ``submit`` queues its item before its first await: counted in the same step.
        self.queued += 1
        if self.queued == self.expected:
            self.all_queued.set()
        return await self.commits.submit(item)


def group(recorder: Recorder, max_batch: int = 10, concurrent: int = 1) -> GroupCommit[int, int]:
    return GroupCommit(
        recorder.batch, recorder.one, max_batch=max_batch, max_concurrent=concurrent, fatal=(Fatal,)
    )


async def test_a_lone_item_runs_at_once_on_its_own() -> None:
    recorder = Recorder()
    assert await group(recorder).submit(7) == 70
    assert recorder.alone == [7] and recorder.batches == []


async def test_items_submitted_while_busy_share_the_next_batch() -> None:
    recorder = Recorder()
    commits = group(recorder)
    submitter = Submitter(commits)
    recorder.gate.clear()
    (first,) = submitter.submit(1)
    await within(recorder.busy.wait())  # the worker holds item 1, alone…
    rest = submitter.submit(2, 3, 4, 5)
    await within(submitter.all_queued.wait())  # … while four more arrive
    recorder.gate.set()
    assert await asyncio.gather(first, *rest) == [10, 20, 30, 40, 50]
    assert recorder.alone == [1]
    assert recorder.batches == [[2, 3, 4, 5]]


async def test_batches_are_capped() -> None:
    recorder = Recorder()
    commits = group(recorder, max_batch=3)
    submitter = Submitter(commits)
    recorder.gate.clear()
    futures = submitter.submit(*range(1, 8))
    await within(submitter.all_queued.wait())
    await within(recorder.busy.wait())
    recorder.gate.set()
    assert await asyncio.gather(*futures) == [n * 10 for n in range(1, 8)]
    assert max(len(b) for b in recorder.batches) == 3
    assert sorted([*recorder.alone, *(n for b in recorder.batches for n in b)]) == [*range(1, 8)]


async def test_a_failure_rolls_back_the_batch_and_only_its_owner_fails() -> None:
    recorder = Recorder(failing={3})
    submitter = Submitter(group(recorder))
    recorder.gate.clear()
    (first,) = submitter.submit(1)
    await within(recorder.busy.wait())
    rest = submitter.submit(2, 3, 4)
    await within(submitter.all_queued.wait())
    recorder.gate.set()
    results = await asyncio.gather(first, *rest, return_exceptions=True)
    assert results[:2] == [10, 20] and results[3] == 40
    assert isinstance(results[2], ValueError) and "item 3" in str(results[2])
    assert sorted(recorder.alone) == [1, 2, 3, 4]  # each re-ran alone after the rollback


async def test_a_fatal_error_fails_every_item_without_retrying() -> None:
    recorder = Recorder(fatal=True)
    submitter = Submitter(group(recorder))
    recorder.gate.clear()
    (first,) = submitter.submit(1)
    await within(recorder.busy.wait())
    rest = submitter.submit(2, 3)
    await within(submitter.all_queued.wait())
    recorder.gate.set()
    assert await first == 10
    for future in rest:
        with pytest.raises(Fatal):
            await future
    assert recorder.alone == [1]


async def test_concurrency_is_bounded() -> None:
    running = 0
    peak = 0

    async def slow_batch(items: list[int]) -> list[int]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        return items

    async def slow_one(item: int) -> int:
        return (await slow_batch([item]))[0]

    commits: GroupCommit[int, int] = GroupCommit(
        slow_batch, slow_one, max_batch=4, max_concurrent=2
    )
    assert await asyncio.gather(*(commits.submit(n) for n in range(40))) == list(range(40))
    assert peak == 2
