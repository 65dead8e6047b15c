"""A reload that tells the truth: ``omniroute config reload`` asks every running process to
re-read its configuration and waits, bounded, for each one's answer.

The request is ``config.reload-requested`` on the events exchange, where every process has
an exclusive queue bound to it. It names a reply queue (AMQP ``reply_to``, and in its data)
and carries a ``correlation_id``: RabbitMQ's request/reply pattern with a server-named
exclusive callback queue (rabbitmq.com/tutorials/tutorial-six-python: "reply_to: commonly
used to name a callback queue", "correlation_id: useful to correlate RPC responses with
requests"). Each process answers there with ``config.reload-answered``: applied with the
new configuration's hash, or refused with the problems. Which processes to wait for comes
from the registry (``omniroute.infra.processes``): every process with a recent heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from dataclasses import dataclass, field

import aio_pika
import asyncpg
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pydantic import ValidationError

from omniroute.errors import BrokerUnavailable
from omniroute.infra.bus import Bus, encode
from omniroute.infra.processes import LIVE_WITHIN, ProcessIdentity, ProcessRow, live_processes
from omniroute.infra.settings import Settings
from schemas.events import (
    EXCHANGE,
    ConfigReloadAnswered,
    ConfigReloadRequested,
    Envelope,
    EventType,
    event_id,
    utcnow,
)

log = structlog.get_logger("omniroute.reload")

DEFAULT_WAIT = 10.0  # seconds `config reload` waits for the answers by default
# With nobody in the registry to wait for (or the registry unreadable), how long to listen
# for answers anyway: a process started a moment ago answers before it first registers.
UNLISTED_GRACE = 1.0


# The answering side: every process (Service) -------------------------------------------

# How an answer's error starts when the process loaded the new configuration but a stage
# could not bind its queue for it (the answer is then not applied, ``hash`` the new one).
BIND_FAILED = "queue not bound: "


def bind_failed(stage: str, reason: str) -> str:
    """One line of a not-applied answer's error: ``stage`` could not bind its queue."""
    return (
        f"{BIND_FAILED}stage {stage} could not bind its queue for this configuration"
        f" ({reason}); events it now needs may not reach it until its retry succeeds"
    )


def _unbound(answer: ConfigReloadAnswered) -> bool:
    return not answer.applied and (answer.error or "").startswith(BIND_FAILED)


def answer_event(
    identity: ProcessIdentity,
    *,
    applied: bool,
    hash: str,
    previous_hash: str,
    error: str | None,
    request: Envelope | None,
) -> Envelope:
    """This process's ``config.reload-answered`` to ``request`` (None: a SIGHUP)."""
    now = utcnow()
    answer = ConfigReloadAnswered(
        process=identity.label,
        process_id=identity.id,
        role=identity.role,
        stages=list(identity.stages),
        applied=applied,
        hash=hash,
        previous_hash=previous_hash,
        error=error,
        answered_at=now,
    )
    cause = request.id if request is not None else f"signal:{now.isoformat()}"
    eid = event_id(EventType.CONFIG_RELOAD_ANSWERED, identity.id, cause)
    return Envelope(
        id=eid,
        type=EventType.CONFIG_RELOAD_ANSWERED,
        occurred_at=now,
        account="*",
        correlation_id=request.correlation_id if request is not None else eid,
        causation_id=request.id if request is not None else None,
        data=answer.model_dump(mode="json"),
    )


def reply_address(message: AbstractIncomingMessage, request: Envelope | None) -> str | None:
    """Where a request wants its answer: the AMQP reply_to, else the one in its data."""
    if message.reply_to:
        return message.reply_to
    if request is not None:
        reply_to = request.data.get("reply_to")
        return reply_to if isinstance(reply_to, str) and reply_to else None
    return None


async def send_answer(
    bus: Bus, channel: AbstractChannel | None, answer: Envelope, reply_to: str | None
) -> None:
    """To the requester's queue (when it named one), and on the events exchange for anyone
    watching. Neither failing stops the process: the requester then reports no answer."""
    if reply_to and channel is not None and not channel.is_closed:
        try:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    encode(answer),
                    content_type="application/json",
                    correlation_id=answer.correlation_id,
                    message_id=answer.id,
                    type=answer.type,
                ),
                routing_key=reply_to,
            )
        except Exception as exc:
            log.warning("config.answer_failed", to="reply_to", error=type(exc).__name__)
    try:
        await bus.publish(answer)
    except BrokerUnavailable as exc:
        log.warning("config.answer_failed", to=EXCHANGE, error=str(exc))


# The asking side: `omniroute config reload` ------------------------------------------------


@dataclass
class ReloadReport:
    """What came back: the processes the registry listed as live when asking, and every
    answer (also from processes it did not list)."""

    expected: list[ProcessRow]
    answers: dict[str, ConfigReloadAnswered] = field(default_factory=dict)
    registry_error: str | None = None
    waited: float = 0.0

    @property
    def missing(self) -> list[ProcessRow]:
        return [row for row in self.expected if row.id not in self.answers]

    @property
    def refused(self) -> list[ConfigReloadAnswered]:
        """Every answer that did not apply: refusals and the unbound."""
        return [a for a in self.answers.values() if not a.applied]

    @property
    def unbound(self) -> list[ConfigReloadAnswered]:
        """Processes that loaded the new configuration but could not bind a stage's queue."""
        return [a for a in self.answers.values() if _unbound(a)]

    @property
    def hashes(self) -> Counter[str]:
        """How many answering processes run each configuration."""
        return Counter(a.hash for a in self.answers.values())

    @property
    def ok(self) -> bool:
        """Every live process answered, all applied, all run the same configuration."""
        return (
            bool(self.answers)
            and self.registry_error is None
            and not self.missing
            and not self.refused
            and len(self.hashes) == 1
        )

    def lines(self) -> list[str]:
        """One line per process (answers first, then the silent), for stdout."""
        listed = {row.id: row for row in self.expected}
        out = []
        for answer in sorted(self.answers.values(), key=lambda a: a.process):
            stages = f" [{', '.join(answer.stages)}]" if answer.stages else ""
            unlisted = "" if answer.process_id in listed else " (not in the registry yet)"
            changed = (
                "unchanged"
                if answer.hash == answer.previous_hash
                else f"was {answer.previous_hash}"
            )
            if answer.applied:
                out.append(
                    f"{answer.process}{stages}: applied, config {answer.hash} ({changed}){unlisted}"
                )
            elif _unbound(answer):
                problems = (answer.error or "").splitlines()
                out.append(
                    f"{answer.process}{stages}: not applied, runs config {answer.hash}"
                    f" ({changed}) but its queues are not bound:"
                    f" {problems[0].removeprefix(BIND_FAILED)}{unlisted}"
                )
                out.extend(f"    {problem.removeprefix(BIND_FAILED)}" for problem in problems[1:])
            else:
                problems = (answer.error or "no reason given").splitlines()
                out.append(
                    f"{answer.process}{stages}: refused, keeps config {answer.hash}: "
                    f"{problems[0]}{unlisted}"
                )
                out.extend(f"    {problem}" for problem in problems[1:])
        for row in self.missing:
            stages = f" [{', '.join(row.stages)}]" if row.stages else ""
            out.append(
                f"{row.label}{stages}: no answer within {self.waited:g} s"
                f" (runs config {row.config_hash}, last heartbeat {row.heartbeat_age:.0f} s ago)"
            )
        return out

    def verdict(self) -> str:
        """One line: the deployment runs one configuration, or what is wrong."""
        if self.ok:
            (hash,) = self.hashes
            count = len(self.answers)
            return f"applied by all {count} process{'es' if count != 1 else ''}: config {hash}"
        problems = []
        if self.registry_error is not None:
            problems.append(
                f"cannot tell which processes run ({self.registry_error}),"
                f" {len(self.answers)} answered"
            )
        elif not self.answers and not self.expected:
            problems.append("no running omniroute process (none in the registry) answered")
        refused = [a for a in self.refused if not _unbound(a)]
        if refused:
            names = ", ".join(a.process for a in refused)
            problems.append(f"refused by {len(refused)} ({names})")
        if self.unbound:
            names = ", ".join(a.process for a in self.unbound)
            problems.append(f"could not bind its queues: {len(self.unbound)} ({names})")
        if self.missing:
            names = ", ".join(row.label for row in self.missing)
            problems.append(f"no answer from {len(self.missing)} ({names})")
        if len(self.hashes) > 1:
            spread = ", ".join(f"{h} on {n}" for h, n in self.hashes.most_common())
            problems.append(f"processes run different configurations ({spread})")
        return "reload not applied everywhere: " + "; ".join(problems)


async def _registry(settings: Settings) -> tuple[list[ProcessRow], str | None]:
    try:
        conn = await asyncpg.connect(
            settings.database_url.get_secret_value(), timeout=settings.db_connect_timeout
        )
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        return [], f"database unreachable: {type(exc).__name__}"
    try:
        return await live_processes(conn, LIVE_WITHIN), None
    except asyncpg.PostgresError as exc:
        return [], f"database: {type(exc).__name__}"
    finally:
        await conn.close()


async def request_reload(settings: Settings, wait: float = DEFAULT_WAIT) -> ReloadReport:
    """Ask every running process to reload; wait up to ``wait`` seconds for the answers of
    every process the registry lists as live. Raises TimeoutError or ConnectionError (AMQP
    connection errors are ConnectionError) when the broker cannot be reached."""
    async with asyncio.timeout(settings.broker_connect_timeout * 5):
        connection = await aio_pika.connect(
            settings.amqp_url.get_secret_value(),
            timeout=settings.broker_connect_timeout,
            client_properties={"connection_name": "omniroute config reload"},
        )
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        replies = await channel.declare_queue(exclusive=True, auto_delete=True)
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        await replies.consume(inbox.put, no_ack=True)
        # Who to wait for, read before asking: a process that starts later loads the new
        # file anyway.
        expected, registry_error = await _registry(settings)
        report = ReloadReport(expected=expected, registry_error=registry_error)
        now = utcnow()
        correlation = str(uuid.uuid4())
        request = Envelope(
            id=event_id(EventType.CONFIG_RELOAD_REQUESTED, correlation),
            type=EventType.CONFIG_RELOAD_REQUESTED,
            occurred_at=now,
            account="*",
            correlation_id=correlation,
            data=ConfigReloadRequested(reply_to=replies.name).model_dump(mode="json"),
        )
        await exchange.publish(
            aio_pika.Message(
                encode(request),
                content_type="application/json",
                message_id=request.id,
                correlation_id=correlation,
                reply_to=replies.name,
                type=request.type,
                timestamp=now,
            ),
            routing_key=request.type,
        )
        listed = {row.id for row in expected}

        def everyone_answered() -> bool:
            return registry_error is None and bool(listed) and listed <= report.answers.keys()

        # Without a list of whom to wait for, listen the whole wait when the registry could
        # not be read, only briefly when it is empty (for a process registering just now).
        limit = wait if listed or registry_error is not None else min(wait, UNLISTED_GRACE)
        report.waited = limit
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                while not everyone_answered():
                    message = await inbox.get()
                    if message.correlation_id != correlation:
                        continue  # a late answer to an earlier request
                    try:
                        envelope = Envelope.model_validate_json(message.body)
                        answer = ConfigReloadAnswered.model_validate(envelope.data)
                    except ValidationError:
                        log.warning("config.answer_unreadable", body_bytes=len(message.body))
                        continue
                    report.answers[answer.process_id] = answer
        return report
