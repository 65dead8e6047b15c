"""Group commit: messages handled at the same time share one database transaction.

A stage's throughput is bound by round trips, not by SQL: each message used to pay for its
own BEGIN, outbox INSERT and COMMIT. Here a message task submits its work and awaits its
own result; whatever was submitted while the previous batches were busy runs together in
the next one. A lone message runs at once (no waiting to fill a batch), so latency under
light load is unchanged and batches grow only when the stage is busy.

If anything in a batch fails, the whole transaction is rolled back and each item runs again
alone, so one bad message still gets its own error (retry, dead letter) and the others their
results. ``fatal`` errors (shutting down) fail every item of the batch instead.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Submitted(Generic[Item, Result]):
    item: Item
    result: asyncio.Future[Result]


class GroupCommit(Generic[Item, Result]):
    def __init__(
        self,
        run_batch: Callable[[list[Item]], Awaitable[list[Result]]],
        run_one: Callable[[Item], Awaitable[Result]],
        *,
        max_batch: int,
        max_concurrent: int,
        fatal: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._run_batch = run_batch
        self._run_one = run_one
        self._max_batch = max_batch
        self._max_concurrent = max_concurrent
        self._fatal = fatal
        self._waiting: deque[_Submitted[Item, Result]] = deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._active = 0

    async def submit(self, item: Item) -> Result:
        """Run ``item`` (alone or with others) and return its result or raise its error."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Submitted(item, future))
        if self._active < self._max_concurrent:
            self._active += 1
            worker = asyncio.create_task(self._work())
            self._workers.add(worker)  # a reference, so the task is not collected
            worker.add_done_callback(self._workers.discard)
        return await future

    async def _work(self) -> None:
        # ``_active`` drops in the same step as the last look at ``_waiting`` (no await in
        # between), so an item submitted as this worker leaves always finds a worker; the
        # task set would not do: its done-callbacks run a loop iteration later.
        try:
            while self._waiting:
                count = min(self._max_batch, len(self._waiting))
                batch = [self._waiting.popleft() for _ in range(count)]
                batch = [s for s in batch if not s.result.done()]  # its task was cancelled
                if batch:
                    await self._run(batch)
        finally:
            self._active -= 1

    async def _run(self, batch: list[_Submitted[Item, Result]]) -> None:
        if len(batch) == 1:
            await self._alone(batch[0])
            return
        try:
            results = await self._run_batch([s.item for s in batch])
        except self._fatal as exc:
            for submitted in batch:
                _fail(submitted.result, exc)
            return
        except Exception:
            # Rolled back: each item again on its own, so the failure finds its owner.
            await asyncio.gather(*(self._alone(s) for s in batch))
            return
        for submitted, result in zip(batch, results, strict=True):
            _resolve(submitted.result, result)

    async def _alone(self, submitted: _Submitted[Item, Result]) -> None:
        try:
            result = await self._run_one(submitted.item)
        except Exception as exc:
            _fail(submitted.result, exc)
        else:
            _resolve(submitted.result, result)


def _resolve(future: asyncio.Future[Result], value: Result) -> None:
    if not future.done():  # a cancelled waiter is left alone
        future.set_result(value)


def _fail(future: asyncio.Future[Result], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
