"""Run the router and/or stages in one process until SIGTERM/SIGINT, then drain.

``omniroute run`` (everything), ``serve`` (router) and ``consume`` (stages) all go through
``run_service``: the same code path whichever way a deployment splits the processes. This
module is the composition root, so it is where the router and the consumers meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiohttp import web
from pydantic import ValidationError

from omniroute.commands.reload import (
    DEFAULT_WAIT,
    ReloadReport,
    answer_event,
    bind_failed,
    reply_address,
    send_answer,
)
from omniroute.commands.reload import request_reload as ask_to_reload
from omniroute.commands.stage_process import StageProcess
from omniroute.domain.reconcile import running_reconciler
from omniroute.errors import ConfigError, ListenFailed
from omniroute.infra.bus import Bus
from omniroute.infra.config_hash import config_hash
from omniroute.infra.config_loader import LiveConfig
from omniroute.infra.outbox import OutboxRelay
from omniroute.infra.processes import ProcessHeartbeat, ProcessIdentity
from omniroute.infra.settings import Settings
from omniroute.infra.spool import SpoolRelay
from omniroute.infra.topology import StageQueue
from schemas.events import EXCHANGE, Envelope, EventType

if TYPE_CHECKING:
    from consumers.runtime import StageRunner

log = structlog.get_logger("omniroute.service")


def _listen(host: str, port: int) -> socket.socket:
    """Bind the HTTP port; raise ListenFailed with the address and the reason."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ListenFailed(f"cannot listen on {host}:{port}: {reason}") from None


@dataclass
class Service:
    """A running process: its bus, store, HTTP site and stage runners."""

    settings: Settings
    config: LiveConfig
    stages: list[str]
    serve_http: bool
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    http_port: int | None = None
    # Stages run by a supervised child process (``omniroute run``) instead of this one.
    child_stages: list[str] = field(default_factory=list)
    _listening: socket.socket | None = None
    _cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    _heartbeat: ProcessHeartbeat | None = None
    _bus: Bus | None = None
    _reload_channel: AbstractChannel | None = None
    _reloads: set[asyncio.Task[Envelope]] = field(default_factory=set)
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _runners: list[StageRunner] = field(default_factory=list)

    @property
    def role(self) -> str:
        """run, serve or consume: what an operator started (``omniroute run``'s stages child
        is a consume process of its own)."""
        if self.serve_http:
            return "run" if self.child_stages else "serve"
        return "consume"

    def config_hash(self) -> str:
        """The hash of the configuration this process runs now."""
        return self.config.derive("config_hash", config_hash)

    async def start(self) -> None:
        from consumers.registry import STAGES
        from consumers.runtime import StageRunner
        from omniroute.infra.bus import Bus
        from omniroute.infra.store import Store
        from router.app import create_app, create_ops_app

        unknown = [s for s in [*self.stages, *self.child_stages] if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s): {', '.join(unknown)}; known: {', '.join(STAGES)}")
        self.listen()
        listening = self._listening
        bus = Bus.from_settings(self.settings, declare_keys=self.declare_keys)
        store = Store.from_settings(self.settings, f"omniroute {self.role}")
        await bus.start()
        self._bus = bus
        self._cleanups.append(store.close)
        self._cleanups.append(bus.close)
        # Registered in the process registry once it listens for reloads (_listen_for_reload).
        heartbeat = ProcessHeartbeat(
            store,
            ProcessIdentity.this_process(self.role, self.stages),
            self.config_hash,
        )
        self._heartbeat = heartbeat
        self._cleanups.append(heartbeat.stop)
        # Every process is a candidate for the deployment's one outbox relay.
        relay = OutboxRelay(bus=bus, store=store, settings=self.settings)
        await relay.start()
        self._cleanups.append(relay.stop)
        if listening is not None:
            # The router's whole API, or for stages alone health and metrics on the same port.
            app = (
                create_app(self.settings, self.config, bus=bus, store=store)
                if self.serve_http
                else create_ops_app(bus, store)
            )
            runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await runner.setup()
            site = web.SockSite(runner, listening)
            await site.start()
            self.http_port = int(listening.getsockname()[1])
            self._cleanups.append(runner.cleanup)
            log.info(
                "router.listening" if self.serve_http else "ops.listening",
                host=self.settings.http_host,
                port=self.http_port,
            )
        # Every process reconciles with Twilio's message log at start and periodically; a
        # per-account advisory lock keeps replicas from doing the same pass twice.
        reconciler = running_reconciler(self.settings, self.config, bus, store)
        await reconciler.__aenter__()

        async def stop_reconciler() -> None:
            await reconciler.__aexit__(None, None, None)

        self._cleanups.append(stop_reconciler)
        listener = asyncio.create_task(self._listen_for_reload(bus), name="config-reload")
        self._cleanups.append(lambda: _cancel(listener))
        if self.child_stages:
            child = StageProcess(
                self.child_stages, env=os.environ, shutdown_grace=self.settings.shutdown_grace
            )
            await child.start()
            self._cleanups.append(child.stop)
        if self.stages:
            # Consumers need the broker; wait for it, but let SIGTERM end the wait.
            ready = asyncio.ensure_future(bus.wait_ready())
            stop = asyncio.ensure_future(self.stop_event.wait())
            await asyncio.wait({ready, stop}, return_when=asyncio.FIRST_COMPLETED)
            for task in (ready, stop):
                task.cancel()
            await asyncio.gather(ready, stop, return_exceptions=True)
            if self.stop_event.is_set():
                return
            if not self.serve_http:
                # The router's app runs one; a deployment whose routers are all down still
                # drains what they spooled.
                spool_relay = SpoolRelay(bus=bus, store=store, settings=self.settings)
                await spool_relay.start()
                self._cleanups.append(spool_relay.stop)
            for name in self.stages:
                stage_runner = StageRunner(
                    STAGES[name],
                    bus=bus,
                    store=store,
                    config=self.config,
                    settings=self.settings,
                    relay=relay,
                )
                await stage_runner.start()
                self._runners.append(stage_runner)
                self._cleanups.append(stage_runner.stop)

    def listen(self) -> None:
        """Bind the HTTP port (the router's, or a stage's health and metrics), if this process
        serves one and has not bound it yet. Raises ListenFailed; ``run_service`` calls this
        before anything else starts, so a port in use ends the process at once instead of
        after (or while) connecting to the broker."""
        if self._listening is None and (self.serve_http or self.stages):
            listening = _listen(self.settings.http_host, self.settings.http_port)
            self._listening = listening
            self._cleanups.append(lambda: _close(listening))

    def declare_keys(self, queue: StageQueue) -> tuple[str, ...]:
        """What a stage's queue is bound to when this process declares it: the keys it always
        needs and the optional ones this configuration needs, so events published before
        that stage's runner first starts (a fresh deployment) still reach it."""
        from consumers.registry import STAGES

        stage = STAGES.get(queue.stage)
        if stage is None or stage.needs is None:
            return queue.bindings
        needed = stage.needs(self.config.current)
        return (*queue.required, *(k for k in queue.optional if k in needed))

    async def stop(self) -> None:
        """Drain in reverse order of start: stages finish in-flight work before the bus closes."""
        while self._cleanups:
            cleanup = self._cleanups.pop()
            try:
                await cleanup()
            except Exception as exc:
                log.warning("service.cleanup_failed", error=f"{type(exc).__name__}: {exc}")

    async def _listen_for_reload(self, bus: Bus) -> None:
        """Reload when anyone publishes ``config.reload-requested`` (``omniroute config
        reload``): every process of the deployment, wherever it runs, re-reads its file and
        answers. Once listening, the process joins the registry, so whoever asks knows to
        wait for its answer."""
        await bus.wait_ready()
        channel = await bus.channel(prefetch=1)
        self._reload_channel = channel
        exchange = await channel.get_exchange(EXCHANGE)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key=EventType.CONFIG_RELOAD_REQUESTED)

        async def on_message(message: AbstractIncomingMessage) -> None:
            await message.ack()
            try:
                request: Envelope | None = Envelope.model_validate_json(message.body)
            except ValidationError:
                request = None  # still a request to reload; the answer has no cause to cite
            await self.reload(request, reply_address(message, request))

        await queue.consume(on_message)
        if self._heartbeat is not None:
            await self._heartbeat.start()

    async def reload(
        self, request: Envelope | None = None, reply_to: str | None = None
    ) -> Envelope:
        """Re-read the configuration (and its secret files), then say what happened: to
        ``reply_to`` when the request named a queue, and on the events exchange. On a
        problem the current configuration stays. Returns the answer.

        The files are read in a worker thread, so a slow disk or a stuck mount never stops
        the event loop (webhooks, stages, heartbeats); the new configuration is made current
        back on the loop, where everything reads it. The answer says applied only when every
        stage also bound its queue for the new configuration (``_follow_bindings``)."""
        async with self._reload_lock:  # two requests at once: answers in order, hashes true
            previous = self.config_hash()
            error: str | None = None
            environ = dict(os.environ)
            try:
                loaded = await asyncio.to_thread(self.config.load, environ)
            except ConfigError as exc:
                error = "\n".join(exc.problems)
                log.error("config.reload_failed", problems=exc.problems, hash=previous)
            else:
                if loaded is not None:
                    self.config.apply(loaded)
            current = self.config_hash()
            if error is None:
                unbound = await self._follow_bindings()
                if unbound:
                    error = "\n".join(unbound)
                    log.error(
                        "config.reloaded_unbound",
                        problems=unbound,
                        hash=current,
                        previous_hash=previous,
                    )
                else:
                    log.info(
                        "config.reloaded",
                        path=str(self.config.path),
                        hash=current,
                        previous_hash=previous,
                    )
            heartbeat = self._heartbeat
            identity = (
                heartbeat.identity
                if heartbeat is not None
                else ProcessIdentity.this_process(self.role, self.stages)
            )
            answer = answer_event(
                identity,
                applied=error is None,
                hash=current,
                previous_hash=previous,
                error=error,
                request=request,
            )
            if heartbeat is not None:
                heartbeat.wake()  # the registry shows the new hash now, not at the next beat
            if self._bus is not None:
                await send_answer(self._bus, self._reload_channel, answer, reply_to)
            return answer

    async def _follow_bindings(self) -> list[str]:
        """Each stage binds what the new configuration needs before the answer says it
        applied (``StageRunner.follow_config``). Returns one problem per stage that could
        not (``BIND_FAILED``…): the answer then says not applied, and the runner keeps
        retrying on its own."""
        problems = []
        for runner in self._runners:
            try:
                async with asyncio.timeout(self.settings.broker_connect_timeout):
                    await runner.follow_config()
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                log.warning("config.bind_failed", stage=runner.stage.name, error=reason[:200])
                problems.append(bind_failed(runner.stage.name, reason[:200]))
        return problems

    def reload_config(self) -> None:
        """Reload now, from a signal handler (SIGHUP): the answer goes to the events
        exchange."""
        task = asyncio.get_running_loop().create_task(self.reload(), name="config-reload-signal")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)


async def _close(sock: socket.socket) -> None:
    sock.close()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def request_reload(settings: Settings, wait: float = DEFAULT_WAIT) -> ReloadReport:
    """Ask every running process to reload and collect their answers (``reload.py``)."""
    return await ask_to_reload(settings, wait)


async def run_service(service: Service) -> None:
    """Start, wait for SIGTERM/SIGINT (SIGHUP reloads the configuration), drain, return.
    Raises ListenFailed, before starting anything, when the HTTP port cannot be bound."""
    service.listen()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop_event.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload_config)
    try:
        await service.start()
        log.info("service.started", stages=service.stages, http=service.serve_http)
        await service.stop_event.wait()
        log.info("service.stopping")
    finally:
        await service.stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        log.info("service.stopped")
