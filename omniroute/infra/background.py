"""A piece of work a process runs in the background for as long as it lives (the outbox and
spool relays): one task, started and stopped with the process, nudged by ``wake``."""

from __future__ import annotations

import asyncio

import structlog

log = structlog.get_logger("omniroute.background")


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

    async def stop(self, within: float = 10.0) -> None:
        """Cancel the task and wait for it to finish, at most ``within`` seconds: a task
        stuck in its cleanup must not hang the process's shutdown with it."""
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=within)
            if not done:
                log.warning("background.stop_timed_out", task=self.task_name)
            elif not task.cancelled() and task.exception() is not None:
                log.warning(
                    "background.failed", task=self.task_name, error=repr(task.exception())[:200]
                )

    async def _run(self) -> None:
        raise NotImplementedError
