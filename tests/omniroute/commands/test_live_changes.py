"""The deployment changes while it runs (issue 17), proved on real processes: ``omniroute
serve`` and two ``omniroute consume`` processes, on a database and vhost of their own, with
the Twilio emulator as Twilio. Every change goes the way an operator makes it: edit the
configuration file (and a secret file, as Docker and Kubernetes mount them), then
``omniroute config reload``, whose output and exit status must say what each process did.

1. An account is added with its auth token in a secrets file: refused (404) before the
   reload, its signed webhooks accepted (200) and stored by the consumers after it.
2. Its token is rotated in the file: during the overlap webhooks signed with the old and
   the new token are both accepted (and the metric says which signed); after it only the new.
3. A number is removed: its webhooks answer 404, its conversation's history stays readable
   through the admin API, and the conversation in flight keeps working (the agent's reply
   goes out from that number and its delivery status comes back).
4. A broken secret file: every process refuses the reload, the CLI names each and the
   reason (the file's path, never a token) and exits non-zero; the processes keep running
   the configuration before it.

No token ever appears in a process's log or in the CLI's output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from omniroute.infra.config_hash import config_hash
from omniroute.infra.config_loader import load_config
from omniroute.infra.database import create_database, drop_database
from omniroute.infra.store import init_connection, migrate
from omniroute.twilio_emulator import EmulatorState, RunningEmulator, start_emulator
from tests.chaos.harness import ROOT, Deployment, Proc, free_port, metric, wait_until
from tests.conftest import BASE_AMQP, BASE_DB, _rabbitmqctl
from tests.support import inbound_form, new_agent, new_customer, signed_post

pytestmark = pytest.mark.timeout(120)

CONTOSO_SID = "AC00000000000000000000000000000a01"
FABRIKAM_SID = "AC00000000000000000000000000000a02"
CONTOSO_TOKEN = "contoso-token-" + uuid.uuid4().hex
FIRST_TOKEN = "fabrikam-first-" + uuid.uuid4().hex
SECOND_TOKEN = "fabrikam-second-" + uuid.uuid4().hex
TOKENS = (CONTOSO_TOKEN, FIRST_TOKEN, SECOND_TOKEN)
SUPPORT, SALES, LONDON = "+5511999990000", "+5511999990001", "+442071838750"
ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
OVERLAP = 6.0  # OMNIROUTE_TOKEN_ROTATION_OVERLAP, short so the test sees it end
SECRET = "secrets/twilio_fabrikam"  # relative to the configuration file
RELOAD_WAIT = 15.0

CONTOSO = f"""
  - name: contoso
    account_sid: {CONTOSO_SID}
    auth_token_env: LIVE_TOKEN_CONTOSO
    numbers:
{{numbers}}"""
FABRIKAM = f"""
  - name: fabrikam
    account_sid: {FABRIKAM_SID}
    auth_token_file: {SECRET}
    numbers:
      - {{name: London, number: "{LONDON}", workstream: support}}"""
GREETING = "Hello {customer_name}, you are in line"
REST = """
workstreams:
  - name: support
    language: en
    fallback_queue: general
    distribution: {{mode: push, auto_accept: true, units: 1}}
{greeting}queues: [{{name: general}}]
"""


def config_text(*, numbers: tuple[str, ...] = (SUPPORT, SALES), fabrikam: bool) -> str:
    """The deployment's file: with ``fabrikam`` the added account, whose change also gives
    the workstream a greeting (a workstream changed at runtime)."""
    listed = "\n".join(
        f'      - {{name: N{n[-4:]}, number: "{n}", workstream: support}}' for n in numbers
    )
    accounts = CONTOSO.format(numbers=listed) + (FABRIKAM if fabrikam else "")
    greeting = f'    automated_messages: {{greeting: {{text: {{en: "{GREETING}"}}}}}}\n'
    return "accounts:" + accounts + "\n" + REST.format(greeting=greeting if fabrikam else "")


@dataclass
class Live:
    """One running deployment and what the test needs to drive it."""

    deployment: Deployment
    emulator: RunningEmulator
    db: asyncpg.Pool
    http: aiohttp.ClientSession
    config: Path
    env: dict[str, str]

    @property
    def router(self) -> Proc:
        return self.deployment.router

    def write_config(self, text: str) -> None:
        _replace(self.config, text)

    def write_secret(self, token: str) -> None:
        _replace(self.config.parent / SECRET, token + "\n")

    def expected_hash(self) -> str:
        """The hash every process must report for the file as it is now."""
        return config_hash(load_config(self.config, self.env))

    async def reload(self) -> tuple[int, str]:
        """``omniroute config reload``, as the operator runs it: exit status and output."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "omniroute",
            "config",
            "reload",
            "--wait",
            str(RELOAD_WAIT),
            cwd=ROOT,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        async with asyncio.timeout(RELOAD_WAIT + 15):
            out, _ = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace")

    async def webhook(
        self, account: str, form: list[tuple[str, str]], token: str, kind: str = "inbound"
    ) -> tuple[int, str]:
        """A webhook signed with ``token`` over the router's public URL, as Twilio posts it."""
        path = f"/twilio/{account}/{kind}"
        body, headers = signed_post(path, form, token, base=self.router.url)
        async with self.http.post(self.router.url + path, data=body, headers=headers) as answer:
            return answer.status, await answer.text()

    async def customer_writes(
        self, account_sid: str, account: str, customer: str, number: str
    ) -> str:
        """A customer writes through the emulator (Twilio's side signs the webhook and opens
        the 24-hour window there); the message's sid."""
        spec = {
            "account_sid": account_sid,
            "url": f"{self.router.url}/twilio/{account}/inbound",
            "from": f"whatsapp:{customer}",
            "to": f"whatsapp:{number}",
            "body": "where is my order?",
        }
        async with self.http.post(
            f"{self.emulator.url}/_emulator/customers/send", json=spec
        ) as answer:
            sent = await answer.json()
        assert sent["statuses"] == [200], sent
        return str(sent["message_sid"])

    async def process_lines(self, output: str) -> dict[int, str]:
        """The CLI's line for each of the deployment's processes, by pid."""
        lines: dict[int, str] = {}
        for name, proc in self.deployment.procs.items():
            assert proc.proc is not None
            mine = f"{socket.gethostname()}:{proc.proc.pid}:"
            found = [line for line in output.splitlines() if line.startswith(mine)]
            assert len(found) == 1, f"{name} (pid {proc.proc.pid}) in:\n{output}"
            lines[proc.proc.pid] = found[0]
        return lines


def _replace(path: Path, text: str) -> None:
    """Write ``path`` whole in one rename, as a mounted secret or a deploy tool changes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    spare = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}")
    spare.write_text(text)
    os.replace(spare, path)


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    async with contextlib.AsyncExitStack() as stack:
        suffix = uuid.uuid4().hex[:10]
        vhost = f"omniroute-live-{suffix}"
        database_url = f"{BASE_DB}/omniroute_live_{suffix}"
        await create_database(database_url)
        stack.push_async_callback(drop_database, database_url)
        await migrate(database_url)
        await _rabbitmqctl("add_vhost", vhost)
        stack.push_async_callback(_rabbitmqctl, "delete_vhost", vhost)
        await _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        emulator = await start_emulator(
            EmulatorState(accounts={CONTOSO_SID: CONTOSO_TOKEN}, callback_delay=0.05)
        )
        stack.push_async_callback(emulator.close)
        db = await asyncpg.create_pool(database_url, min_size=1, max_size=3, init=init_connection)
        stack.push_async_callback(db.close)
        http = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        )
        config = tmp_path / "deploy" / "omniroute.yaml"
        router_port = free_port()
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(ROOT),
            "OMNIROUTE_AMQP_URL": f"{BASE_AMQP}/{vhost}",
            "OMNIROUTE_DATABASE_URL": database_url,
            "OMNIROUTE_CONFIG": str(config),
            "OMNIROUTE_PUBLIC_URL": f"http://127.0.0.1:{router_port}",
            "OMNIROUTE_HTTP_HOST": "127.0.0.1",
            "OMNIROUTE_ADMIN_TOKEN": ADMIN_TOKEN,
            "OMNIROUTE_TWILIO_API_URL": emulator.url,
            "OMNIROUTE_TOKEN_ROTATION_OVERLAP": str(OVERLAP),
            "OMNIROUTE_LOG_FORMAT": "json",
            "OMNIROUTE_TICK_INTERVAL": "0.2",
            "OMNIROUTE_OUTBOX_RELAY_INTERVAL": "0.1",
            "OMNIROUTE_SEND_INTERVAL": "0",
            "OMNIROUTE_SHUTDOWN_GRACE": "3",
            "LIVE_TOKEN_CONTOSO": CONTOSO_TOKEN,
        }
        logs = tmp_path / "logs"
        logs.mkdir()
        deployment = Deployment(env, logs, http)
        deployment.add("router", ["serve"], port=router_port)
        deployment.add("intake", ["consume", "conversations", "classify", "distribute"])
        deployment.add("delivery", ["consume", "outbound", "status", "lifecycle"])
        live = Live(deployment, emulator, db, http, config, env)
        live.write_config(config_text(fabrikam=False))
        stack.push_async_callback(deployment.close)
        await deployment.start()
        yield live


async def _registered(live: Live) -> None:
    """Wait until all three processes are in the registry, so the CLI waits for each."""
    pids = {p.proc.pid for p in live.deployment.procs.values() if p.proc is not None}

    async def listed() -> bool:
        rows = await live.db.fetch("SELECT pid FROM processes")
        return pids <= {r["pid"] for r in rows}

    await wait_until(listed, 15, 0.1, "every process in the registry")


async def _applied_everywhere(live: Live) -> str:
    """Run the reload; assert each process applied the file's configuration; its hash."""
    started = time.monotonic()
    code, output = await live.reload()
    expected = live.expected_hash()
    assert code == 0, output
    for line in (await live.process_lines(output)).values():
        assert f"applied, config {expected}" in line, output
    assert f"applied by all 3 processes: config {expected}" in output, output
    print(f"reload applied by 3 processes in {time.monotonic() - started:.2f} s")
    return expected


async def test_accounts_tokens_and_numbers_change_while_it_runs(live: Live) -> None:
    began = time.monotonic()
    fabrikam_customer = new_customer()  # one conversation, however many webhooks

    def fabrikam_writes() -> list[tuple[str, str]]:
        return inbound_form(account_sid=FABRIKAM_SID, to=LONDON, customer=fabrikam_customer)

    await _registered(live)
    agent, agent_auth = await new_agent(
        live.db, queues=["general"], presence="available", capacity=5
    )

    # -- 1. a new account, its token in a secrets file ------------------------------------
    before = fabrikam_writes()
    assert (await live.webhook("fabrikam", before, FIRST_TOKEN))[0] == 404
    live.write_secret(FIRST_TOKEN)
    live.write_config(config_text(fabrikam=True))
    first_hash = await _applied_everywhere(live)
    live.emulator.state.accounts[FABRIKAM_SID] = FIRST_TOKEN
    form = fabrikam_writes()
    assert (await live.webhook("fabrikam", form, FIRST_TOKEN))[0] == 200

    async def stored() -> Any:
        return await live.db.fetchval(
            "SELECT c.account FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " WHERE m.twilio_sid = $1",
            dict(form)["MessageSid"],
        )

    assert await wait_until(stored, 10, 0.1, "the new account's message stored") == "fabrikam"

    async def greeted() -> Any:
        # The first conversation after the reload is greeted: the lifecycle stage's queue
        # was bound to conversation.queued before its process answered that it applied.
        return await live.db.fetchval(
            "SELECT body FROM messages WHERE kind = 'system' AND direction = 'outbound'"
            " AND conversation_id = (SELECT conversation_id FROM messages WHERE twilio_sid = $1)",
            dict(form)["MessageSid"],
        )

    greeting = await wait_until(greeted, 10, 0.1, "the greeting added by the reload")
    assert greeting.startswith("Hello Maria")

    # -- 2. its token rotated, with an overlap --------------------------------------------
    live.write_secret(SECOND_TOKEN)
    rotated_at = time.monotonic()
    second_hash = await _applied_everywhere(live)
    assert second_hash != first_hash  # a rotated secret changes the hash, without showing it
    live.emulator.state.accounts[FABRIKAM_SID] = SECOND_TOKEN
    counted = {
        label: await metric(
            live.http,
            live.router,
            "omniroute_webhook_signatures_total",
            account="fabrikam",
            token=label,
        )
        for label in ("current", "previous")
    }
    old = fabrikam_writes()
    new = fabrikam_writes()
    assert (await live.webhook("fabrikam", old, FIRST_TOKEN))[0] == 200
    assert (await live.webhook("fabrikam", new, SECOND_TOKEN))[0] == 200
    assert time.monotonic() - rotated_at < OVERLAP, "the overlap ended before the check"
    for label in ("current", "previous"):
        now = await metric(
            live.http,
            live.router,
            "omniroute_webhook_signatures_total",
            account="fabrikam",
            token=label,
        )
        assert now == counted[label] + 1, label

    async def old_refused() -> float | None:
        late = fabrikam_writes()
        status, _ = await live.webhook("fabrikam", late, FIRST_TOKEN)
        assert status in (200, 403)
        return time.monotonic() if status == 403 else None

    refused_at = await wait_until(
        old_refused, OVERLAP + 5, 0.1, "the old token refused after the overlap"
    )
    assert refused_at - rotated_at >= OVERLAP
    after = fabrikam_writes()
    assert (await live.webhook("fabrikam", after, SECOND_TOKEN))[0] == 200

    # -- 3. a number removed; its conversation in flight ----------------------------------
    customer = new_customer()
    first_sid = await live.customer_writes(CONTOSO_SID, "contoso", customer, SUPPORT)

    async def assigned() -> Any:
        return await live.db.fetchval(
            "SELECT c.id FROM conversations c JOIN messages m ON m.conversation_id = c.id"
            " WHERE m.twilio_sid = $1 AND c.state = 'active' AND c.agent_id = $2",
            first_sid,
            uuid.UUID(agent),
        )

    conversation_id = await wait_until(assigned, 15, 0.1, "the conversation assigned to the agent")
    live.write_config(config_text(numbers=(SALES,), fabrikam=True))
    running = await _applied_everywhere(live)

    gone = inbound_form(account_sid=CONTOSO_SID, to=SUPPORT, customer=customer, body="hi?")
    status, text = await live.webhook("contoso", gone, CONTOSO_TOKEN)
    assert status == 404 and "unknown_number" in text, text
    still = inbound_form(account_sid=CONTOSO_SID, to=SALES, customer=new_customer())
    assert (await live.webhook("contoso", still, CONTOSO_TOKEN))[0] == 200

    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with live.http.get(
        f"{live.router.url}/api/admin/conversations/{conversation_id}", headers=admin
    ) as answer:
        assert answer.status == 200, await answer.text()
        detail = await answer.json()
    assert detail["business_number"] == SUPPORT
    inbound = [m["twilio_sid"] for m in detail["messages"] if m["direction"] == "inbound"]
    assert inbound == [first_sid]

    async with live.http.post(
        f"{live.router.url}/api/conversations/{conversation_id}/messages",
        json={"text": "It ships today."},
        headers={**agent_auth, "Idempotency-Key": uuid.uuid4().hex},
    ) as answer:
        assert answer.status == 202, await answer.text()
        reply_id = (await answer.json())["id"]

    async def delivered() -> Any:
        return await live.db.fetchrow(
            "SELECT twilio_sid, status FROM messages WHERE id = $1"
            ' AND status_history @> \'[{"status": "delivered"}]\'',
            uuid.UUID(reply_id),
        )

    async def where() -> str:
        row = await live.db.fetchrow(
            "SELECT status, twilio_sid, error_code, error_message, status_history FROM messages"
            " WHERE id = $1",
            uuid.UUID(reply_id),
        )
        return f"; the reply: {dict(row) if row else None}\n{live.deployment.tails(4000)}"

    reply = await wait_until(
        delivered, 15, 0.1, "the reply sent and its delivery reported back", where
    )
    sent = live.emulator.state.messages[reply["twilio_sid"]]
    assert (sent.from_, sent.to) == (f"whatsapp:{SUPPORT}", f"whatsapp:{customer}")

    # -- 4. a broken secret file: refused by every process, with the reason ---------------
    live.write_secret("")
    code, output = await live.reload()
    assert code != 0, output
    reason = (
        f"{live.config}:9: accounts[1].auth_token_file:"
        f" secret file {live.config.parent / SECRET} is empty"
    )
    for line in (await live.process_lines(output)).values():
        assert f"refused, keeps config {running}: {reason}" in line, output
    assert "reload not applied everywhere: refused by 3" in output, output
    # Every process keeps what it ran: the second token still opens the door.
    kept = fabrikam_writes()
    assert (await live.webhook("fabrikam", kept, SECOND_TOKEN))[0] == 200

    # -- no secret anywhere it could leak -------------------------------------------------
    for proc in live.deployment.procs.values():
        log = proc.log.read_text(errors="replace")
        assert not any(token in log for token in TOKENS), proc.name
    assert not any(token in output for token in TOKENS)
    assert all(proc.alive for proc in live.deployment.procs.values())
    print(f"live changes proved in {time.monotonic() - began:.1f} s")
