"""What the chaos tests drive: a private RabbitMQ node and PostgreSQL cluster they may kill
and restart freely, product processes started as operators run them, a webhook sender that
follows Twilio's rules (one retry, on a failed connection only), and the database checks the
invariants need.

The shared broker and database of the other suites are never touched: everything here runs
on ports and directories of its own, and is stopped at the end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from omniroute.twilio_emulator import EmulatorState
from tests.support import ACCOUNT_SID, AUTH_TOKEN, BUSINESS, inbound_form, new_agents, signed_post

ROOT = Path(__file__).resolve().parents[2]
SCALE = float(os.environ.get("OMNIROUTE_CHAOS_SCALE", "0.1"))
TOKEN_ENV = "CHAOS_TWILIO_TOKEN"
INBOUND = "/twilio/chaos/inbound"
GREETING = "Hello {customer_name}, you are in line"
JOINED = "{agent_name} is with you, {customer_name}"
CONFIG = f"""
accounts:
  - name: chaos
    account_sid: {ACCOUNT_SID}
    auth_token_env: {TOKEN_ENV}
    numbers: [{{name: Main, number: "{BUSINESS}", workstream: main}}]
workstreams:
  - name: main
    language: en
    fallback_queue: general
    distribution: {{mode: push, auto_accept: true, units: 1}}
    automated_messages:
      greeting: {{text: {{en: "{GREETING}"}}}}
      agent_joined: {{text: {{en: "{JOINED}"}}}}
queues: [{{name: general}}]
"""
# Twilio's defaults for a webhook: one retry, on a failed connection only, 15 s in all.
TWILIO_RETRIES = 1
TWILIO_CONNECT_TIMEOUT = 5.0
TWILIO_TOTAL_TIME = 15.0
CLOSE = {"Connection": "close"}
PIPELINE = ("conversations", "classify", "distribute", "lifecycle", "outbound", "status")


def scaled(full: int, minimum: int) -> int:
    """``full`` at ``OMNIROUTE_CHAOS_SCALE=1``, scaled down, never below ``minimum``."""
    return max(minimum, round(full * SCALE))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


async def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> str:
    """Run a command; its output, or RuntimeError with it."""
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"{' '.join(args)} timed out after {timeout} s") from None
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {text[-1500:]}")
    return text


# --------------------------------------------------------------------------- RabbitMQ


def _binary(name: str, *folders: str) -> str:
    """``name`` from the first of ``folders`` that has it, else from the PATH."""
    for folder in folders:
        candidate = Path(folder) / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found")
    return found


def _rabbit_bin(name: str) -> str:
    """The real script, not /usr/sbin's wrapper (which switches to the rabbitmq user)."""
    return _binary(name, "/usr/lib/rabbitmq/bin")


@dataclass
class PrivateRabbit:
    """A RabbitMQ node of its own: name, ports, data and cookie under ``base``."""

    base: Path
    node: str = field(default_factory=lambda: f"chaos-{uuid.uuid4().hex[:8]}@localhost")
    port: int = 0
    dist_port: int = 0
    proc: asyncio.subprocess.Process | None = None

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": str(self.base),  # the Erlang cookie the node and rabbitmqctl share
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.base / "rabbit.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def url(self, vhost: str) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{vhost}"

    async def ctl(self, *args: str, timeout: float = 60.0) -> str:
        return await run(
            _rabbit_bin("rabbitmqctl"), "-n", self.node, *args, env=self.env(), timeout=timeout
        )

    async def start(self) -> None:
        """Boot the node (fresh ports on a failed boot), wait until it serves AMQP."""
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "enabled_plugins").write_text("[].\n")  # no management on :15672
        (self.base / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's
        last = ""
        for _ in range(3):
            self.port, self.dist_port = free_port(), free_port()
            (self.base / "rabbitmq.conf").write_text(
                f"loopback_users = none\nlisteners.tcp.1 = 127.0.0.1:{self.port}\n"
            )
            with (self.base / "server.log").open("ab") as out:
                self.proc = await asyncio.create_subprocess_exec(
                    _rabbit_bin("rabbitmq-server"),
                    env=self.env(),
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                )
            deadline = time.monotonic() + 90
            while self.proc.returncode is None and time.monotonic() < deadline:
                try:
                    await self.ctl("await_startup", timeout=90)
                    return
                except RuntimeError as exc:  # not registered with epmd yet, or boot failed
                    last = str(exc)
                    await asyncio.sleep(0.5)
            await self.kill()
        raise RuntimeError(
            f"private RabbitMQ did not start: {last}\n{tail(self.base / 'server.log')}"
        )

    async def stop_app(self) -> None:
        await self.ctl("stop_app")

    async def start_app(self) -> None:
        await self.ctl("start_app")
        await self.ctl("await_startup")

    async def running(self) -> bool:
        """Whether the node runs with its rabbit app started."""
        try:
            return "true" in await self.ctl("eval", "rabbit:is_running().", timeout=15)
        except RuntimeError:
            return False

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        self.proc = None

    async def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(RuntimeError):
            await self.ctl("stop", timeout=30)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(15):
                await self.proc.wait()
        await self.kill()

    async def add_vhost(self, vhost: str) -> None:
        await self.ctl("add_vhost", vhost)
        await self.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")

    async def delete_vhost(self, vhost: str) -> None:
        await self.ctl("delete_vhost", vhost)


# --------------------------------------------------------------------------- PostgreSQL


def _pg_bin(name: str) -> str:
    return _binary(name, *(f"/usr/lib/postgresql/{v}/bin" for v in ("17", "16", "15", "14")))


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of its own (as the ``postgres`` user when we are root)."""

    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="omniroute-chaos-pg-")))
    port: int = 0

    def _as_owner(self, *args: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)

    @property
    def data(self) -> Path:
        return self.base / "data"

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    async def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
        await run(
            *self._as_owner(
                _pg_bin("initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            )
        )
        self.port = free_port()

    async def _ctl(self, *args: str) -> None:
        await run(*self._as_owner(_pg_bin("pg_ctl"), "-D", str(self.data), *args), timeout=60)

    async def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c max_connections=300 -c full_page_writes=off"
        )
        await self._ctl("-l", str(self.base / "server.log"), "-w", "-o", options, "start")

    async def stop(self, mode: str = "fast") -> None:
        await self._ctl("-w", "-m", mode, "stop")

    async def running(self) -> bool:
        try:
            await self._ctl("status")
        except RuntimeError:
            return False
        return True

    def log(self) -> Path:
        return self.base / "server.log"


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """One product process (``omniroute serve`` / ``consume STAGE``) with its log and port."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    port: int
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"\n===== start #{self.starts} at {time.time():.3f}\n".encode())
            out.flush()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "omniroute",
                *self.args,
                cwd=ROOT,
                env={**self.env, "OMNIROUTE_HTTP_PORT": str(self.port)},
                stdout=out,
                stderr=out,
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def wait_ready(self, http: aiohttp.ClientSession, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        while True:
            if self.proc is not None and self.proc.returncode is not None:
                raise AssertionError(
                    f"{self.name} exited {self.proc.returncode} while starting:\n{tail(self.log)}"
                )
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(self.url + "/readyz") as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready after {within} s:\n{tail(self.log)}")
            await asyncio.sleep(0.2)

    async def kill(self) -> None:
        """``kill -9``."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def terminate(self, within: float) -> tuple[int | None, float]:
        """SIGTERM; (exit code, seconds to exit) or (None, within) if it did not exit."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(within):
                code = await self.proc.wait()
        except TimeoutError:
            return None, within
        return code, time.monotonic() - started


@dataclass
class Deployment:
    """The router and stages of one test, on the private broker and database."""

    env: dict[str, str]
    logs: Path
    http: aiohttp.ClientSession
    procs: dict[str, Proc] = field(default_factory=dict)

    def add(self, name: str, args: Sequence[str], port: int | None = None) -> Proc:
        proc = Proc(
            name, list(args), dict(self.env), self.logs / f"{name}.log", port or free_port()
        )
        self.procs[name] = proc
        return proc

    @property
    def router(self) -> Proc:
        return self.procs["router"]

    async def start(self, names: Iterable[str] | None = None) -> None:
        chosen = [self.procs[n] for n in (names or self.procs)]
        for proc in chosen:
            await proc.start()
        await asyncio.gather(*(proc.wait_ready(self.http) for proc in chosen))

    async def close(self) -> None:
        """SIGTERM what still runs, SIGKILL what does not exit within 10 s."""
        running = [p for p in self.procs.values() if p.alive]
        results = await asyncio.gather(*(p.terminate(10) for p in running))
        for proc, (code, _) in zip(running, results, strict=True):
            if code is None:
                await proc.kill()

    def tails(self, chars: int = 2500) -> str:
        return "\n".join(f"----- {p.name} log\n{tail(p.log, chars)}" for p in self.procs.values())


# --------------------------------------------------------------------------- webhooks


Media = tuple[str, bytes]  # (content type, data) of one attachment


@dataclass
class Webhook:
    sid: str
    customer: str
    profile: str
    body: bytes
    headers: dict[str, str]


def webhooks(count: int, customers: int, public: str) -> list[Webhook]:
    """``count`` signed inbound webhooks from ``customers`` customers (round robin)."""
    people = [(f"+5521{n:09d}", f"Customer{uuid.uuid4().hex[:10]}") for n in range(customers)]
    out = []
    for n in range(count):
        # A customer's messages come together, so conversations open (and automated
        # messages go out) all along the stream, not only at its start.
        customer, profile = people[n * customers // count]
        sid = "SM" + uuid.uuid4().hex
        form = inbound_form(sid=sid, customer=customer, profile=profile, body=f"message {n}")
        body, headers = signed_post(INBOUND, form, AUTH_TOKEN, base=public)
        out.append(Webhook(sid, customer, profile, body, headers))
    return out


@dataclass
class Sender:
    """Posts webhooks as Twilio does by default ("Webhooks connection overrides": ``rc=1``,
    ``rp=ct``, 15 s in all): each webhook once, retried once with the same body only when
    the TCP connection could not be made; any HTTP answer, a 5xx too, is final, and so is a
    connection that broke or timed out after it was made.

    Each webhook has a connection of its own (``Connection: close``), so a webhook that
    meets a dead router sees what Twilio's would: a refused connection. ``keep_alive`` reuses
    connections instead, for throughput: on two cores a connection per webhook costs the
    sender and the router half their rate.

    ``status[sid]``: each webhook's final answer (0: none at all); ``answers``: every
    attempt's; ``log``: (time, answer) of every attempt; ``retried``: webhooks retried (their
    first connection failed); ``refused``: webhooks whose every attempt failed to connect
    (the router never saw them).
    """

    http: aiohttp.ClientSession
    url: str
    keep_alive: bool = False
    status: dict[str, int] = field(default_factory=dict)
    answers: Counter[int] = field(default_factory=Counter)  # 0: no HTTP answer at all
    log: list[tuple[float, int]] = field(default_factory=list)
    retried: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    took: list[float] = field(default_factory=list)  # seconds to each final answer

    async def _attempt(self, hook: Webhook, budget: float) -> tuple[int, bool]:
        """(answer, whether the connection failed) of one attempt within ``budget`` s."""
        limits = aiohttp.ClientTimeout(total=budget, sock_connect=TWILIO_CONNECT_TIMEOUT)
        try:
            async with self.http.post(
                self.url + INBOUND,
                data=hook.body,
                headers=hook.headers if self.keep_alive else {**hook.headers, **CLOSE},
                timeout=limits,
            ) as response:
                await response.read()
                return response.status, False
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
            return 0, True
        except (aiohttp.ClientError, OSError, TimeoutError):
            return 0, False

    async def post(self, hook: Webhook) -> int:
        """Deliver ``hook`` under Twilio's default rules; its final answer (0: none)."""
        started = time.monotonic()
        deadline = started + TWILIO_TOTAL_TIME
        for attempt in range(1 + TWILIO_RETRIES):
            code, connect_failed = await self._attempt(hook, deadline - time.monotonic())
            self.answers[code] += 1
            self.log.append((time.monotonic(), code))
            if not connect_failed or attempt == TWILIO_RETRIES or time.monotonic() >= deadline:
                break
            self.retried.add(hook.sid)
        self.status[hook.sid] = code
        self.took.append(time.monotonic() - started)
        if connect_failed:
            self.refused.add(hook.sid)
        return code

    async def send(self, hooks: Sequence[Webhook], rate: float, concurrency: int = 32) -> None:
        """Send at about ``rate`` per second with at most ``concurrency`` in flight."""
        await paced(hooks, rate, concurrency, self.post)

    async def sent_at_least(self, count: float) -> bool:
        """Whether ``count`` posts were made (a condition for ``wait_until``)."""
        return len(self.log) >= count

    def accepted(self) -> set[str]:
        return {sid for sid, code in self.status.items() if code == 200}

    def finals(self) -> Counter[int]:
        """How many webhooks ended with each answer (0: none at all)."""
        return Counter(self.status.values())

    def latency(self, share: float) -> float:
        """Seconds within which ``share`` of the webhooks had their final answer."""
        ranked = sorted(self.took)
        return ranked[min(len(ranked) - 1, int(share * len(ranked)))] if ranked else 0.0


# --------------------------------------------------------------------------- database


@dataclass
class Db:
    """Queries on the test's database; a fresh connection each time (it may restart)."""

    dsn: str

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.dsn, timeout=5)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    async def value(self, query: str, *args: Any) -> Any:
        rows = await self.fetch(query, *args)
        return rows[0][0] if rows else None

    async def maybe(self, query: str, *args: Any) -> Any:
        """The value, or None while the database is away."""
        try:
            return await self.value(query, *args)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return None

    async def seed_agents(self, agents: int, capacity: int, queue: str = "general") -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await new_agents(conn, agents, queues=[queue], capacity=capacity, name="Agent")
        finally:
            await conn.close()

    async def inbound_sids(self) -> Counter[str]:
        rows = await self.fetch(
            "SELECT twilio_sid FROM messages WHERE direction = 'inbound' AND twilio_sid IS NOT NULL"
        )
        return Counter(r["twilio_sid"] for r in rows)

    async def inbound_count(self) -> int | None:
        value = await self.maybe("SELECT count(*) FROM messages WHERE direction = 'inbound'")
        return None if value is None else int(value)


async def _nothing() -> str:
    return ""


async def paced(
    hooks: Sequence[Webhook],
    rate: float,
    concurrency: int,
    post: Callable[[Webhook], Awaitable[object]],
) -> None:
    """Open loop: hook ``n`` is posted at ``n / rate`` seconds, at most ``concurrency`` at once."""
    gate = asyncio.Semaphore(concurrency)
    started = time.monotonic()
    tasks: list[asyncio.Task[None]] = []

    async def one(hook: Webhook) -> None:
        try:
            await post(hook)
        finally:
            gate.release()

    for n, hook in enumerate(hooks):
        delay = started + n / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await gate.acquire()
        tasks.append(asyncio.create_task(one(hook)))
    await asyncio.gather(*tasks)


async def wait_until(
    condition: Callable[[], Awaitable[Any]],
    within: float,
    interval: float = 0.5,
    what: str = "",
    state: Callable[[], Awaitable[str]] = _nothing,
) -> Any:
    """Poll until truthy; AssertionError naming ``what`` (and ``state()``) after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        result = await condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}{await state()}")
        await asyncio.sleep(interval)


async def queue_depths(amqp_url: str, names: Iterable[str]) -> dict[str, int]:
    """Ready messages per queue (0 for a queue nobody declared)."""
    depths: dict[str, int] = {}
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        for name in names:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
                depths[name] = int(queue.declaration_result.message_count or 0)
            except aio_pika.exceptions.ChannelClosed:
                depths[name] = 0
            with contextlib.suppress(Exception):
                await channel.close()
    return depths


async def metric(http: aiohttp.ClientSession, proc: Proc, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples (with ``labels``) that ``proc`` serves at /metrics."""
    async with http.get(proc.url + "/metrics") as response:
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def dead_letters(amqp_url: str, stages: Iterable[str] = PIPELINE) -> dict[str, int]:
    depths = await queue_depths(amqp_url, [f"omniroute.{s}.dead" for s in stages])
    return {name: count for name, count in depths.items() if count}


@dataclass
class Customers:
    """Customer messages written through the emulator's control API: the emulator logs each
    (Twilio's Messages list) and delivers its signed webhook to the router under Twilio's
    rules (one retry, on a failed connection only); ``repeat=2`` makes it deliver the same
    webhook twice. ``status[sid]``: the final answer (0: none), ``attempts``: HTTP attempts."""

    http: aiohttp.ClientSession
    emulator_url: str
    router_url: str
    status: dict[str, int] = field(default_factory=dict)
    posts: int = 0
    attempts: int = 0
    refused: set[str] = field(default_factory=set)

    async def post(self, hook: Webhook, repeat: int = 1, media: Sequence[Media] = ()) -> int:
        spec = {
            "account_sid": ACCOUNT_SID,
            "url": self.router_url + INBOUND,
            "from": f"whatsapp:{hook.customer}",
            "to": f"whatsapp:{BUSINESS}",
            "body": f"hello from {hook.profile}",
            "profile_name": hook.profile,
            "message_sid": hook.sid,
            "repeat": repeat,
            "media": [
                {"content_type": kind, "data_base64": base64.b64encode(data).decode()}
                for kind, data in media
            ],
        }
        async with self.http.post(
            self.emulator_url + "/_emulator/customers/send", json=spec
        ) as response:
            answer = await response.json()
        # 502: a delivery got no HTTP answer at all, after Twilio's retry if it made one.
        statuses = [int(s) for s in answer.get("statuses", [])]
        if response.status == 502:
            statuses.append(0)
            if answer.get("error") == "ClientConnectorError" and len(statuses) == 1:
                self.refused.add(hook.sid)
        self.posts += len(statuses)
        self.attempts += sum(answer.get("attempts", [len(statuses)]))
        self.status[hook.sid] = 200 if 200 in statuses else statuses[-1]
        return self.status[hook.sid]

    async def send(
        self,
        hooks: Sequence[Webhook],
        rate: float,
        replay: Collection[str] = (),
        media: Mapping[str, Sequence[Media]] | None = None,
        concurrency: int = 16,
    ) -> None:
        """Customers write ``hooks`` at ``rate`` per second; those in ``replay`` are
        delivered twice, those in ``media`` carry attachments."""

        async def post(hook: Webhook) -> None:
            attached = (media or {}).get(hook.sid, ())
            await self.post(hook, 2 if hook.sid in replay else 1, attached)

        await paced(hooks, rate, concurrency, post)

    def accepted(self) -> set[str]:
        return {sid for sid, code in self.status.items() if code == 200}

    def finals(self) -> Counter[int]:
        """How many messages' webhooks ended with each answer (0: none at all)."""
        return Counter(self.status.values())


# --------------------------------------------------------------------------- invariants

FINAL = ["read", "unknown", "failed", "rejected", "undelivered"]
# Sent, but a status callback may have met a stopped router (Twilio does not retry those).
SENT = ["queued", "sent", "delivered", *FINAL]
_PROGRESS = """
SELECT (SELECT count(*) FROM messages WHERE direction = 'inbound') AS inbound,
       (SELECT count(*) FROM conversations) AS conversations,
       (SELECT count(*) FROM conversations WHERE state = 'active') AS active,
       (SELECT count(*) FROM messages WHERE direction = 'outbound') AS outbound,
       (SELECT count(*) FROM messages WHERE direction = 'outbound'
         AND status <> ALL($1::text[])) AS unsettled
"""


async def progress(db: Db, final: Sequence[str] = FINAL) -> dict[str, int] | None:
    """Pipeline counters, or None while the database is away."""
    try:
        rows = await db.fetch(_PROGRESS, list(final))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return None
    return {k: int(v) for k, v in rows[0].items()}


async def wait_settled(
    db: Db,
    inbound: int,
    customers: int,
    within: float,
    stall: float = 30.0,
    final: Sequence[str] = FINAL,
) -> None:
    """Wait until every message is stored, every conversation assigned, every automated
    message (greeting and agent joined: two per conversation) sent and read or otherwise
    final; fail early when nothing moved for ``stall`` seconds, saying where it stands."""

    async def where() -> str:
        now = await progress(db)
        statuses = await db.fetch(
            "SELECT direction, status, count(*) AS n FROM messages GROUP BY 1, 2 ORDER BY 1, 2"
        )
        states = await db.fetch("SELECT state, count(*) AS n FROM conversations GROUP BY 1")
        return (
            f": {now} (expected {inbound} inbound, {customers} conversations), messages"
            f" {[tuple(r) for r in statuses]}, conversations {[tuple(r) for r in states]}"
        )

    seen: list[tuple[float, dict[str, int] | None]] = [(time.monotonic(), None)]

    async def done() -> bool:
        now = await progress(db, final)
        if now != seen[-1][1]:
            seen.append((time.monotonic(), now))
        elif time.monotonic() - seen[-1][0] > stall:
            raise AssertionError(f"the pipeline stalled for {stall} s{await where()}")
        return now is not None and now == _settled(inbound, customers)

    await wait_until(done, within, what="the pipeline to settle", state=where)


def _settled(inbound: int, customers: int) -> dict[str, int]:
    return {
        "inbound": inbound,
        "conversations": customers,
        "active": customers,
        "outbound": 2 * customers,
        "unsettled": 0,
    }


async def settle_accepted(
    db: Db,
    twilio: EmulatorState,
    accepted: set[str],
    hooks: Sequence[Webhook],
    within: float,
    refused: set[str] | frozenset[str] = frozenset(),
    final: Sequence[str] = FINAL,
    allow_unknown: bool = False,
) -> dict[str, int]:
    """Under Twilio's rules not every webhook is answered 200: wait until every ``accepted``
    one is stored, then until the pipeline settles for what was stored, and check it
    (``verify_pipeline``). A webhook answered otherwise may be stored too (the router died
    between the publish and its answer), once at most; a ``refused`` one never reached the
    router and is not stored. Returns the figures, with ``ghosts``: stored, not answered 200.
    """

    async def all_stored() -> bool:
        return accepted <= set(await db.inbound_sids())

    await wait_until(all_stored, within, what=f"the {len(accepted)} accepted webhooks stored")
    await asyncio.sleep(1.0)  # a webhook published but never answered would show by now
    stored = await db.inbound_sids()
    assert not refused & set(stored), "a webhook whose connection was refused is stored"
    handled = [h for h in hooks if h.sid in stored]
    customers = len({h.customer for h in handled})
    await wait_settled(db, len(handled), customers, within, final=final)
    await asyncio.sleep(1.0)  # late duplicates, if any, would show now
    figures = await verify_pipeline(db, twilio.messages.values(), handled, allow_unknown, final)
    return figures | {"accepted": len(accepted), "ghosts": len(set(stored) - accepted)}


async def verify_pipeline(
    db: Db,
    sent: Iterable[Any],
    hooks: Sequence[Webhook],
    allow_unknown: bool,
    final: Sequence[str] = ("read",),
) -> dict[str, int]:
    """Check the end state of a full-pipeline run; return its figures.

    ``sent`` is the emulator's ``state.messages.values()``: what reached "Twilio".
    """
    problems: list[str] = []
    stored = await _check_inbound(db, hooks, problems)
    conversations = await _check_conversations(db, hooks, problems)
    figures = await _check_outbound(
        db, list(sent), len(conversations), allow_unknown, final, problems
    )
    assert not problems, "\n".join(problems)
    return {"webhooks": len(hooks), "stored": stored, "conversations": len(conversations)} | (
        figures
    )


async def _check_inbound(db: Db, hooks: Sequence[Webhook], problems: list[str]) -> int:
    expected = {h.sid for h in hooks}
    stored = await db.inbound_sids()
    missing = [sid for sid in expected if sid not in stored]
    doubled = [sid for sid, n in stored.items() if n > 1]
    if missing:
        problems.append(f"{len(missing)} webhooks never stored, e.g. {missing[:3]}")
    if doubled:
        problems.append(f"{len(doubled)} webhooks stored more than once, e.g. {doubled[:3]}")
    if set(stored) - expected:
        problems.append(f"{len(set(stored) - expected)} stored messages nobody sent")
    return sum(stored.values())


async def _check_conversations(
    db: Db, hooks: Sequence[Webhook], problems: list[str]
) -> list[asyncpg.Record]:
    customers = {h.customer for h in hooks}
    conversations = await db.fetch("SELECT id, customer, state, agent_id FROM conversations")
    per_customer = Counter(r["customer"] for r in conversations)
    extra = {c: n for c, n in per_customer.items() if n != 1}
    if set(per_customer) != customers or extra:
        problems.append(
            f"conversations: {len(conversations)} for {len(customers)} customers "
            f"(more than one: {list(extra.items())[:3]})"
        )
    twice = await db.value(
        "SELECT count(*) FROM (SELECT conversation_id FROM assignments WHERE released_at IS NULL"
        " GROUP BY conversation_id HAVING count(*) > 1) AS t"
    )
    if twice:
        problems.append(f"{twice} conversations assigned twice")
    unassigned = [r for r in conversations if r["state"] != "active" or r["agent_id"] is None]
    if unassigned:
        problems.append(f"{len(unassigned)} conversations not assigned, e.g. {unassigned[:2]}")
    problems.extend(await capacity_problems(db))
    return conversations


async def capacity_problems(db: Db) -> list[str]:
    """Agents over capacity, or whose used units differ from the assignments they hold."""
    rows = await db.fetch(
        "SELECT a.name, a.capacity_units, a.used_units, (SELECT count(*) FROM assignments s"
        " WHERE s.agent_id = a.id AND s.released_at IS NULL) AS held FROM agents a"
    )
    bad = [
        dict(r)
        for r in rows
        if r["used_units"] > r["capacity_units"]
        or r["held"] > r["capacity_units"]
        or r["used_units"] != r["held"]
    ]
    return [f"agents over capacity or miscounted: {bad[:3]}"] if bad else []


async def _check_outbound(
    db: Db,
    sent: list[Any],
    conversations: int,
    allow_unknown: bool,
    final: Sequence[str],
    problems: list[str],
) -> dict[str, int]:
    outbound = await db.fetch(
        "SELECT m.id, m.body, m.status, m.twilio_sid, c.customer FROM messages m"
        " JOIN conversations c ON c.id = m.conversation_id WHERE m.direction = 'outbound'"
    )
    wrong = {c: n for c, n in Counter(r["customer"] for r in outbound).items() if n != 2}
    if len(outbound) != 2 * conversations or wrong:
        problems.append(
            f"automated messages: {len(outbound)} for {conversations} conversations, expected"
            f" greeting + agent joined each (wrong: {list(wrong.items())[:3]})"
        )
    sends = Counter((m.to, m.body) for m in sent)
    duplicates = {k: n for k, n in sends.items() if n > 1}
    if duplicates:
        problems.append(
            f"{len(duplicates)} messages sent to Twilio more than once: "
            f"{list(duplicates.items())[:3]}"
        )
    unknown = [r for r in outbound if r["status"] == "unknown"]
    if unknown and not allow_unknown:
        problems.append(f"{len(unknown)} outbound messages ended 'unknown' (send not recorded)")
    not_final = Counter(r["status"] for r in outbound if r["status"] not in (*final, "unknown"))
    if not_final:
        problems.append(f"outbound messages not in {final}: {dict(not_final)}")
    issued = {m.sid for m in sent}
    unissued = [r for r in outbound if r["status"] != "unknown" and r["twilio_sid"] not in issued]
    if unissued:
        problems.append(f"{len(unissued)} outbound messages with a sid Twilio never issued")
    stored_sids = {r["twilio_sid"] for r in outbound}
    orphans = [m for m in sent if m.sid not in stored_sids]
    unknown_keys = {(f"whatsapp:{r['customer']}", r["body"]) for r in unknown}
    unexplained = [(m.to, m.body) for m in orphans if (m.to, m.body) not in unknown_keys]
    if unexplained:
        problems.append(
            f"{len(unexplained)} Twilio sends match no stored outbound message: {unexplained[:3]}"
        )
    return {
        "outbound": len(outbound),
        "twilio_sends": sum(sends.values()),
        "duplicate_sends": sum(n - 1 for n in sends.values()),
        "unknown": len(unknown),
        "unknown_but_sent": len(orphans),
    }
