"""Processes a benchmark starts: free ports, waiting for a port, RSS, clean termination."""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


# The shared servers, by /proc/PID/comm and owner: every PostgreSQL process (postmaster,
# backends, walwriter, ...) and RabbitMQ's Erlang VM with the helpers it starts, run by their
# system users — a private server a test starts as another user does not count.
SERVERS = {
    "postgresql": (frozenset({"postgres"}), "postgres"),
    "rabbitmq": (frozenset({"beam.smp", "erl_child_setup", "inet_gethost", "epmd"}), "rabbitmq"),
}


def _uid(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def server_cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by each of ``SERVERS``, summed over its processes (Linux /proc).

    Each process counts its own user + system time *and* that of its children it has reaped
    (cutime + cstime): a PostgreSQL backend that exits between two readings leaves its time
    in the postmaster's, so the difference of two readings stays the CPU used in between.
    Whatever else uses the cluster or the broker at the same time counts too.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    owners = {server: _uid(user) for server, (_, user) in SERVERS.items()}
    totals = dict.fromkeys(SERVERS, 0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            server = next((s for s, (names, _) in SERVERS.items() if comm in names), None)
            if server is None or owners[server] not in (None, entry.stat().st_uid):
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone in between
            continue
        totals[server] += sum(int(f) for f in fields[11:15])
    return {server: ticks_used / ticks for server, ticks_used in totals.items()}


def machine_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy so far, all cores (Linux /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


async def wait_port(port: int, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on port {port} after {within} s") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return


@asynccontextmanager
async def python_process(
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    grace: float = 10.0,
    log: Path | None = None,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python ARGS`` from the project root, its standard error to ``log``; SIGTERM (then
    SIGKILL) on the way out."""
    with Path(log or os.devnull).open("ab") as stderr:  # noqa: ASYNC230 - opening is instant
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


async def run_python(args: Sequence[str]) -> bytes:
    """``python ARGS``; its standard output, or an error with its standard error."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {err.decode()[-2000:]}")
    return out
