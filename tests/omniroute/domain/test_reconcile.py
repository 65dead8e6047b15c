"""Reconciliation against the Twilio emulator's message log, the real broker and database.

Customer messages whose webhook never reached omniroute (the emulator posts them to a
closed port, as Twilio would to a router that is down) are in Twilio's log: a pass rebuilds
and injects them, once, and the conversations stage stores them with their media. A status
callback that was lost is recovered from the message's current status on Twilio.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.response import Response

from consumers import conversations, status
from omniroute.domain.reconcile import (
    NumberReport,
    Reconciler,
    account_lock_key,
    rate_limited,
    running_reconciler,
    with_backoff,
)
from omniroute.infra.bus import Bus
from omniroute.infra.config_loader import LiveConfig
from omniroute.infra.settings import Settings
from omniroute.infra.store import Store
from omniroute.infra.twilio_gateway import TwilioClients, make_client
from omniroute.twilio_emulator import EmulatorState, RunningEmulator, start_emulator
from tests.conftest import RunnerFactory
from tests.support import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    BUSINESS,
    OTHER_ACCOUNT_SID,
    OTHER_TOKEN,
    new_customer,
    wait_for,
)

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n fake image").decode()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def emulator() -> AsyncIterator[RunningEmulator]:
    running = await start_emulator(
        EmulatorState(
            accounts={ACCOUNT_SID: AUTH_TOKEN, OTHER_ACCOUNT_SID: OTHER_TOKEN},
            callback_delay=0.01,
        )
    )
    try:
        yield running
    finally:
        await running.close()


@pytest.fixture
def twilio_settings(settings: Settings, emulator: RunningEmulator) -> Settings:
    return Settings.model_validate(
        {
            **settings.model_dump(),
            "twilio_api_url": emulator.url,
            "reconcile_backoff_base": 0.01,
            "reconcile_backoff_max": 0.05,
        }
    )


@pytest.fixture
async def reconciler(
    twilio_settings: Settings, config: LiveConfig, bus: Bus, store: Store, db: asyncpg.Pool
) -> AsyncIterator[Reconciler]:
    # Checkpoints outlive a test (one database per run): each test starts from none.
    await db.execute("DELETE FROM reconcile_checkpoints")
    await db.execute("DELETE FROM reconcile_injections")
    reconciler = Reconciler(twilio_settings, config, bus, store)
    try:
        yield reconciler
    finally:
        await reconciler.close()


async def _lost_customer_message(
    emulator: RunningEmulator, customer: str, body: str, media: list[dict[str, str]] | None = None
) -> str:
    """A customer message Twilio logged but whose webhook found nobody listening."""
    send = {
        "account_sid": ACCOUNT_SID,
        "url": f"http://127.0.0.1:{_closed_port()}/twilio/contoso/inbound",
        "from": f"whatsapp:{customer}",
        "to": f"whatsapp:{BUSINESS}",
        "body": body,
        "media": media or [],
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{emulator.url}/_emulator/customers/send", json=send) as response,
    ):
        answer = await response.json()
    assert response.status == 502, answer  # no answer at all: the webhook is lost
    sid: str = answer["message_sid"]
    return sid


def _number(report: Any, number: str = BUSINESS) -> NumberReport:
    found: NumberReport = next(n for n in report.numbers if n.number == number)
    return found


async def test_lost_messages_are_injected_once_with_media(
    emulator: RunningEmulator,
    reconciler: Reconciler,
    start_runner: RunnerFactory,
    db: asyncpg.Pool,
) -> None:
    await start_runner(conversations.STAGE)
    customer = new_customer()
    photo = await _lost_customer_message(
        emulator, customer, "veja a foto", [{"content_type": "image/png", "data_base64": PNG}]
    )
    text = await _lost_customer_message(emulator, customer, "alguém aí?")

    report = await reconciler.run_once(account="contoso")
    assert report.skipped_locked == []
    line = _number(report)
    assert (line.found, line.stored, line.injected, line.error) == (2, 0, 2, None)

    stored = "SELECT count(*) FROM messages WHERE twilio_sid = ANY($1::text[])"

    async def both_stored() -> bool:
        return bool(await db.fetchval(stored, [photo, text]) == 2)

    await wait_for(both_stored, timeout=10)
    rows = await db.fetch(
        "SELECT m.twilio_sid, m.body, m.media, m.received_at, c.customer, c.id AS conversation"
        " FROM messages m JOIN conversations c ON c.id = m.conversation_id"
        " WHERE m.twilio_sid = ANY($1::text[]) ORDER BY m.received_at, m.id",
        [photo, text],
    )
    assert {r["customer"] for r in rows} == {customer}
    assert len({r["conversation"] for r in rows}) == 1
    by_sid = {r["twilio_sid"]: r for r in rows}
    [media] = by_sid[photo]["media"]
    media_sid = next(iter(emulator.state.media))
    assert media["url"] == (
        f"{emulator.url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{photo}/Media/{media_sid}"
    )
    assert media["content_type"] == "image/png"
    assert by_sid[text]["body"] == "alguém aí?"

    again = await reconciler.run_once(account="contoso")
    assert (_number(again).found, _number(again).stored, _number(again).injected) == (2, 2, 0)
    assert await db.fetchval(stored, [photo, text]) == 2


async def test_a_message_on_its_way_through_the_stages_is_not_injected_twice(
    emulator: RunningEmulator,
    reconciler: Reconciler,
    twilio_settings: Settings,
    config: LiveConfig,
    bus: Bus,
    store: Store,
    db: asyncpg.Pool,
) -> None:
    # No conversations stage runs: what a pass injects waits on the broker, unstored.
    sid = await _lost_customer_message(emulator, new_customer(), "tem alguém?")
    first = _number(await reconciler.run_once(account="contoso"))
    assert (first.found, first.stored, first.injected) == (1, 0, 1)

    replica = Reconciler(twilio_settings, config, bus, store)
    try:
        second = _number(await replica.run_once(account="contoso"))
    finally:
        await replica.close()
    assert (second.found, second.stored, second.injected) == (1, 0, 0)

    # Not stored long after it was injected: injected again.
    impatient = Settings.model_validate(
        {**twilio_settings.model_dump(), "reconcile_reinject_after": 0.001}
    )
    older = (
        "SELECT injected_at < now() - interval '1 millisecond'"
        " FROM reconcile_injections WHERE message_sid = $1"
    )
    await wait_for(lambda: db.fetchval(older, sid))
    late = Reconciler(impatient, config, bus, store)
    try:
        third = _number(await late.run_once(account="contoso"))
    finally:
        await late.close()
    assert third.injected == 1
    assert sid in emulator.state.inbound


async def test_checkpoint_persists_and_moves_forward(
    emulator: RunningEmulator, reconciler: Reconciler, db: asyncpg.Pool
) -> None:
    started = datetime.now(UTC)
    report = await reconciler.run_once(account="contoso")
    assert _number(report).found == 0
    query = (
        "SELECT checked_until FROM reconcile_checkpoints"
        " WHERE account = 'contoso' AND business_number = $1"
    )
    empty = await db.fetchval(query, BUSINESS)
    assert empty is not None and empty >= started  # nothing found: the pass's start

    sid = await _lost_customer_message(emulator, new_customer(), "oi")
    await reconciler.run_once(account="contoso")
    logged = emulator.state.inbound[sid].created_at.replace(microsecond=0)
    assert await db.fetchval(query, BUSINESS) == max(logged, empty)

    # An explicit --since far back reads more of the log but never moves the checkpoint back.
    before = await db.fetchval(query, BUSINESS)
    await reconciler.run_once(since=started - timedelta(days=2), account="contoso")
    assert await db.fetchval(query, BUSINESS) >= before


async def test_a_replica_holding_the_lock_makes_the_other_skip(
    emulator: RunningEmulator, reconciler: Reconciler, db: asyncpg.Pool
) -> None:
    async with db.acquire() as conn:
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", account_lock_key("contoso"))
        try:
            report = await reconciler.run_once()
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", account_lock_key("contoso"))
    assert report.skipped_locked == ["contoso"]
    assert {n.account for n in report.numbers} == {"fabrikam"}
    # Released (by the test and by the reconciler): the next pass takes both.
    again = await reconciler.run_once()
    assert again.skipped_locked == []
    assert {n.account for n in again.numbers} == {"contoso", "fabrikam"}


async def test_lost_status_callback_is_recovered_from_twilio(
    emulator: RunningEmulator,
    twilio_settings: Settings,
    config: LiveConfig,
    bus: Bus,
    store: Store,
    start_runner: RunnerFactory,
    db: asyncpg.Pool,
) -> None:
    await start_runner(status.STAGE)
    customer = new_customer()
    # The customer wrote (window open); our reply's status callbacks all hit a closed port.
    await _lost_customer_message(emulator, customer, "oi")
    client = make_client(ACCOUNT_SID, AUTH_TOKEN, emulator.url)
    try:
        sent = await client.messages.create_async(
            to=f"whatsapp:{customer}",
            from_=f"whatsapp:{BUSINESS}",
            body="olá!",
            status_callback=f"http://127.0.0.1:{_closed_port()}/twilio/contoso/status",
        )
    finally:
        from omniroute.infra.twilio_gateway import close_client

        await close_client(client)
    await wait_for(lambda: _emulated_status(emulator, sent.sid, "read"), timeout=10)
    await _stored_outbound(db, customer, sent.sid, "queued")

    settings = Settings.model_validate({**twilio_settings.model_dump(), "reconcile_status_age": 0})
    reconciler = Reconciler(settings, config, bus, store)
    try:
        report = await reconciler.run_once(account="contoso")
        assert report.statuses_checked >= 1 and report.statuses_applied >= 1
        query = "SELECT status, status_checked_at FROM messages WHERE twilio_sid = $1"
        row = await wait_for(lambda: _row_if(db, query, sent.sid, "read"), timeout=10)
        assert row["status_checked_at"] is not None
        # Final now: later passes leave it alone.
        again = await reconciler.run_once(account="contoso")
        assert all(s.error is None for s in again.statuses)
    finally:
        await reconciler.close()
    history = await db.fetchval(
        "SELECT status_history FROM messages WHERE twilio_sid = $1", sent.sid
    )
    assert [h["status"] for h in history] == ["read"]


async def _emulated_status(emulator: RunningEmulator, sid: str, expected: str) -> bool:
    return emulator.state.messages[sid].status == expected


async def _row_if(db: asyncpg.Pool, query: str, sid: str, expected: str) -> Any:
    row = await db.fetchrow(query, sid)
    return row if row is not None and row["status"] == expected else None


async def _stored_outbound(db: asyncpg.Pool, customer: str, sid: str, state: str) -> None:
    contact, conversation = uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC)
    await db.execute(
        "INSERT INTO contacts (id, account, address) VALUES ($1, 'contoso', $2)", contact, customer
    )
    await db.execute(
        "INSERT INTO conversations (id, account, business_number, customer, contact_id,"
        " workstream, state, opened_at, last_customer_message_at)"
        " VALUES ($1, 'contoso', $2, $3, $4, 'support-pt', 'active', $5, $5)",
        conversation,
        BUSINESS,
        customer,
        contact,
        now,
    )
    await db.execute(
        "INSERT INTO messages (id, conversation_id, direction, twilio_sid, body, status,"
        " received_at) VALUES ($1, $2, 'outbound', $3, 'olá!', $4, $5)",
        uuid.uuid4(),
        conversation,
        sid,
        state,
        now,
    )


# --- Twilio's rate limit --------------------------------------------------------------------


def _too_many() -> TwilioRestException:
    return TwilioRestException(429, "/Messages.json", "Too Many Requests", code=20429)


def test_rate_limited_recognises_both_shapes_twilio_python_raises() -> None:
    assert rate_limited(_too_many())
    # A list page answered 429: twilio-python raises the bare exception with the response.
    assert rate_limited(TwilioException("Unable to fetch page", Response(429, "{}")))
    assert not rate_limited(TwilioRestException(404, "/x", "Not found", code=20404))
    assert not rate_limited(TwilioException("Unable to fetch page", Response(500, "")))
    assert not rate_limited(ConnectionError())


async def test_backoff_retries_a_429_with_growing_jittered_waits() -> None:
    waits: list[float] = []
    calls = 0

    async def sleep(delay: float) -> None:
        waits.append(delay)

    async def call() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise _too_many()
        return "ok"

    assert await with_backoff(call, attempts=5, base=1.0, cap=3.0, sleep=sleep) == "ok"
    assert calls == 4
    assert len(waits) == 3
    assert 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 2.0 and 1.5 <= waits[2] <= 3.0


async def test_backoff_is_bounded_and_other_errors_are_not_retried() -> None:
    calls = 0

    async def sleep(_: float) -> None:
        return None

    async def limited() -> None:
        nonlocal calls
        calls += 1
        raise _too_many()

    with pytest.raises(TwilioRestException):
        await with_backoff(limited, attempts=3, base=0.01, cap=0.01, sleep=sleep)
    assert calls == 3

    calls = 0

    async def missing() -> None:
        nonlocal calls
        calls += 1
        raise TwilioRestException(404, "/x", "Not found", code=20404)

    with pytest.raises(TwilioRestException):
        await with_backoff(missing, attempts=3, base=0.01, cap=0.01, sleep=sleep)
    assert calls == 1


class _RateLimitedClients(TwilioClients):
    """Twilio clients whose every call is answered 429."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9")
        self.calls = 0

    def get(self, account_sid: str, auth_token: str) -> Any:
        owner = self

        class Messages:
            async def page_async(self, **_: Any) -> Any:
                owner.calls += 1
                raise _too_many()

        class Client:
            messages = Messages()

        return Client()


async def test_a_pass_rate_limited_to_the_end_gives_up_without_moving_the_checkpoint(
    settings: Settings, config: LiveConfig, bus: Bus, store: Store, db: asyncpg.Pool
) -> None:
    await db.execute("DELETE FROM reconcile_checkpoints")
    await db.execute("DELETE FROM reconcile_injections")
    limited = Settings.model_validate(
        {**settings.model_dump(), "reconcile_backoff_attempts": 3, "reconcile_backoff_base": 0.01}
    )
    clients = _RateLimitedClients()
    reconciler = Reconciler(limited, config, bus, store, clients=clients)
    report = await reconciler.run_once(account="fabrikam")
    [line] = report.numbers
    assert line.error is not None and "rate limited" in line.error
    assert clients.calls == 3
    assert await db.fetchval("SELECT count(*) FROM reconcile_checkpoints") == 0


async def test_running_reconciler_runs_a_pass_at_start(
    emulator: RunningEmulator,
    twilio_settings: Settings,
    config: LiveConfig,
    bus: Bus,
    store: Store,
    db: asyncpg.Pool,
) -> None:
    await db.execute("DELETE FROM reconcile_checkpoints")
    await db.execute("DELETE FROM reconcile_injections")
    settings = Settings.model_validate({**twilio_settings.model_dump(), "reconcile_interval": 30})
    async with running_reconciler(settings, config, bus, store):
        await wait_for(
            lambda: db.fetchval("SELECT count(*) FROM reconcile_checkpoints"), timeout=10
        )

    disabled = Settings.model_validate({**twilio_settings.model_dump(), "reconcile_interval": 0})
    await db.execute("DELETE FROM reconcile_checkpoints")
    await db.execute("DELETE FROM reconcile_injections")
    async with running_reconciler(disabled, config, bus, store):
        await asyncio.sleep(0.3)
    assert await db.fetchval("SELECT count(*) FROM reconcile_checkpoints") == 0
