"""``omniroute run``'s stages in a child process, so the router's answers never wait on them.

In one process the router and the stages share an event loop: with the stages saturated,
a webhook waited behind their handlers and Twilio, which does not retry a 5xx or a read
timeout by default, lost it. asyncio has no task priorities, so the stages run as
``omniroute consume STAGE…`` in a child process (the same code path compose runs), which
the parent supervises: restarted with backoff if it dies, SIGTERM'd and drained on stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Mapping, Sequence

import structlog

log = structlog.get_logger("omniroute.service")

RESTART_BACKOFF_MAX = 30.0  # seconds between restarts of a child that keeps dying
KILL_AFTER = 5.0  # seconds past the drain grace before a child that will not stop is killed


class StageProcess:
    """One supervised ``omniroute consume`` child."""

    def __init__(
        self, stages: Sequence[str], *, env: Mapping[str, str], shutdown_grace: float
    ) -> None:
        self._argv = [sys.executable, "-m", "omniroute", "consume", *stages]
        # The child serves health and metrics on a port of its own choosing: the parent
        # holds OMNIROUTE_HTTP_PORT.
        self._env = {**env, "OMNIROUTE_HTTP_PORT": "0", "OMNIROUTE_HTTP_HOST": "127.0.0.1"}
        self._grace = shutdown_grace
        self._process: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="stage-process")

    async def _supervise(self) -> None:
        delay = 1.0
        while not self._stopping:
            self._process = await asyncio.create_subprocess_exec(*self._argv, env=self._env)
            log.info("stages.child_started", pid=self._process.pid, argv=self._argv[3:])
            code = await self._process.wait()
            if self._stopping:
                return
            log.error("stages.child_exited", code=code, restart_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_BACKOFF_MAX)

    async def stop(self) -> None:
        """SIGTERM the child (it drains in-flight work), kill it past the grace."""
        self._stopping = True
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), self._grace + KILL_AFTER)
            except TimeoutError:
                log.error("stages.child_killed", pid=process.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
