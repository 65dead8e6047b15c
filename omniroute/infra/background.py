"""A piece of work a process runs in the background for as long as it lives (the outbox and
spool relays): one task, started and stopped with the process, nudged by ``wake``."""

from __future__ import annotations

import asyncio
import contextlib


class Background:
    """Subclasses implement ``_run``; ``_wake`` is set by ``wake`` for them to wait on."""

    task_name = "background"

    def __init__(self) -> None:
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """Look now (this process just wrote something for it)."""
        self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        raise NotImplementedError
