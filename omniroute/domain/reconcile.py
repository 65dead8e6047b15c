"""Reconciliation: recover from Twilio's message log what its webhooks never delivered.

Twilio does not retry a webhook or a status callback answered 5xx (by default one retry, on
a failed connection only), so whatever Twilio received while omniroute could not take it is
lost to the webhook path. It is still in Twilio's Messages API. A pass, per account:

- takes the account's advisory lock; a replica that does not get it skips the account;
- per configured number, lists the inbound messages Twilio logged since the checkpoint minus
  an overlap, looks their sids up in ``messages``, and for each one missing rebuilds the form
  Twilio would have posted and publishes the very event the router builds from it
  (``omniroute.domain.webhook_events``: same id, so the conversations stage's dedup holds). The
  checkpoint moves only when every injection of the number was confirmed by the broker;
- asks Twilio for the status of outbound messages not in a final status that had no news
  for ``reconcile_status_age``, and publishes a ``message.status`` event when Twilio knows a
  status we never received; the status stage applies it by its usual forward-only rules.

A 429 from Twilio is retried with backoff a bounded number of times, then the pass gives up
on that number (checkpoint unchanged) or on the account's statuses, with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import structlog
from multidict import MultiDict
from pydantic import ValidationError
from twilio.base.exceptions import TwilioException, TwilioRestException

from omniroute.domain.webhook_events import inbound_event, status_event
from omniroute.errors import BrokerUnavailable, StoreUnavailable, UnknownAccountSid, UnknownNumber
from omniroute.infra.bus import Bus
from omniroute.infra.config_loader import LiveConfig
from omniroute.infra.metrics import RECONCILE_INJECTED
from omniroute.infra.settings import Settings
from omniroute.infra.store import UNAVAILABLE, Connection, Store
from omniroute.infra.twilio_gateway import TwilioClients
from schemas.config import Account
from schemas.events import Envelope

log = structlog.get_logger("omniroute.reconcile")

T = TypeVar("T")
Clock = Callable[[], datetime]
Sleep = Callable[[float], Awaitable[None]]

API_VERSION = "2010-04-01"
INJECT_BATCH = 500  # injections whose confirms are awaited together
RATE_LIMITED_STATUS = 429
RATE_LIMITED_CODE = 20429
WHATSAPP_PHONE = re.compile(r"^whatsapp:\+(\d+)$")
# Statuses Twilio never calls back about (the send's own answer already said so).
INITIAL_STATUSES = frozenset({"accepted", "scheduled", "queued"})
_LOCK_NAMESPACE = "omniroute.reconcile:"

# Outbound messages that may still hear from Twilio. The status list is spelled out exactly
# as in the partial index messages_status_open (migration 0008), so the planner can use it:
# a range scan of the last ``reconcile_status_max_age`` of that index, newest first.
# EXPLAIN ANALYZE, a year seeded (2 M messages, 600 k conversations, 10 % of outbound left
# 'delivered'): Limit → Nested Loop → Index Scan Backward using messages_status_open
# (Index Cond: created_at range; 273 rows) + Memoize → Index Scan using conversations_pkey;
# 3.4 ms, 1.2 k buffers. The index is 4 MB next to the table's 332 MB.
STATUS_SWEEP = """
SELECT m.id, m.twilio_sid, m.status,
       ARRAY(SELECT e->>'status' FROM jsonb_array_elements(m.status_history) AS e) AS seen
FROM messages m JOIN conversations c ON c.id = m.conversation_id
WHERE m.direction = 'outbound' AND m.twilio_sid IS NOT NULL
  AND m.status NOT IN ('read', 'failed', 'undelivered', 'canceled')
  AND m.created_at > $2 AND m.created_at <= $3 AND m.updated_at <= $3
  -- Checks get sparser as the message ages (each waits at least as long as the message was
  -- old at the previous one): a message left 'delivered' for good costs ~log2(max/age) calls.
  AND (m.status_checked_at IS NULL OR m.status_checked_at
       <= $4::timestamptz - GREATEST(make_interval(secs => $5::float8),
                                     m.status_checked_at - m.created_at))
  AND c.account = $1
ORDER BY m.created_at DESC
LIMIT $6
"""


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class NumberReport:
    """One number's inbound reconciliation: what Twilio's log held and what we did with it."""

    account: str
    number: str
    found: int = 0  # inbound messages in Twilio's log since the read-from time
    stored: int = 0  # of those, already in ``messages``
    injected: int = 0  # rebuilt and published (confirmed) by this pass
    unusable: int = 0  # could not be rebuilt into an event (logged as warnings)
    error: str | None = None  # the pass gave up on this number; its checkpoint did not move


@dataclass
class StatusReport:
    """One account's status sweep."""

    account: str
    checked: int = 0  # outbound messages whose status was fetched from Twilio
    applied: int = 0  # ``message.status`` events published because Twilio knew more
    error: str | None = None


@dataclass
class ReconcileReport:
    """What one pass did, per account and number."""

    numbers: list[NumberReport] = field(default_factory=list)
    statuses: list[StatusReport] = field(default_factory=list)
    skipped_locked: list[str] = field(default_factory=list)  # another replica had them

    @property
    def statuses_checked(self) -> int:
        return sum(s.checked for s in self.statuses)

    @property
    def statuses_applied(self) -> int:
        return sum(s.applied for s in self.statuses)

    @property
    def injected(self) -> int:
        return sum(n.injected for n in self.numbers)

    @property
    def errors(self) -> list[str]:
        return [
            *(f"{n.account} {n.number}: {n.error}" for n in self.numbers if n.error),
            *(f"{s.account} statuses: {s.error}" for s in self.statuses if s.error),
        ]


def account_lock_key(account: str) -> int:
    """The advisory lock key (a signed 64-bit integer) of one account's reconciliation."""
    digest = hashlib.blake2b((_LOCK_NAMESPACE + account).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def rate_limited(exc: BaseException) -> bool:
    """Whether Twilio refused a call for its rate limit (HTTP 429, error 20429)."""
    if isinstance(exc, TwilioRestException):
        return bool(exc.status == RATE_LIMITED_STATUS or exc.code == RATE_LIMITED_CODE)
    if isinstance(exc, TwilioException) and len(exc.args) > 1:
        # A list page: twilio-python raises the bare exception with the response attached.
        return getattr(exc.args[1], "status_code", None) == RATE_LIMITED_STATUS
    return False


async def with_backoff(
    call: Callable[[], Awaitable[T]],
    *,
    attempts: int,
    base: float,
    cap: float,
    sleep: Sleep = asyncio.sleep,
) -> T:
    """``call()``; each time Twilio answers 429, again after an exponential, jittered wait.

    At most ``attempts`` calls; the last 429, and any other error at once, is raised.
    """
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except Exception as exc:
            if not rate_limited(exc) or attempt >= attempts:
                raise
            delay = min(cap, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            log.info("reconcile.rate_limited", attempt=attempt, retry_in=round(delay, 2))
            await sleep(delay)
    raise AssertionError("unreachable: attempts >= 1")  # pragma: no cover


def _describe(exc: BaseException) -> str:
    if rate_limited(exc):
        return "rate limited by Twilio (429), gave up for this pass"
    if isinstance(exc, TwilioRestException):
        return f"Twilio answered {exc.status} (code {exc.code})"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def inbound_form(message: Any, media: Sequence[Any], api_url: str) -> MultiDict[str]:
    """The inbound webhook form Twilio would have posted for a listed ``message``.

    ``message`` is a twilio-python ``MessageInstance``, ``media`` its ``MediaInstance`` list.
    Media URLs point at ``api_url`` (Twilio's API host), where the router fetches them.
    """
    sid, account_sid, sender = message.sid, message.account_sid, message.from_ or ""
    form = MultiDict[str](
        [
            ("MessageSid", sid),
            ("SmsMessageSid", sid),
            ("SmsSid", sid),
            ("AccountSid", account_sid),
            ("From", sender),
            ("To", message.to or ""),
            ("Body", message.body or ""),
            ("NumMedia", str(len(media))),
            ("ApiVersion", message.api_version or API_VERSION),
        ]
    )
    phone = WHATSAPP_PHONE.fullmatch(sender)
    if phone:
        form["WaId"] = phone.group(1)
    elif sender.startswith("whatsapp:"):  # a username sender's business-scoped user id
        form["ExternalUserId"] = sender.removeprefix("whatsapp:")
    if message.num_segments:
        form["NumSegments"] = str(message.num_segments)
    if message.messaging_service_sid:
        form["MessagingServiceSid"] = message.messaging_service_sid
    base = f"{api_url.rstrip('/')}/{API_VERSION}/Accounts/{account_sid}/Messages/{sid}/Media"
    for index, item in enumerate(media):
        form[f"MediaUrl{index}"] = f"{base}/{item.sid}"
        form[f"MediaContentType{index}"] = item.content_type or "application/octet-stream"
    return form


class Reconciler:
    """Reconciliation passes over the configured accounts (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        config: LiveConfig,
        bus: Bus,
        store: Store,
        *,
        clients: TwilioClients | None = None,
        clock: Clock = utc_now,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._settings = settings
        self._config = config
        self._bus = bus
        self._store = store
        self._own_clients = clients is None
        self._clients = clients or TwilioClients(
            str(settings.twilio_api_url), timeout=settings.twilio_timeout
        )
        self._clock = clock
        self._sleep = sleep

    async def close(self) -> None:
        """Close the Twilio clients this reconciler created."""
        if self._own_clients:
            await self._clients.close()

    async def run_once(
        self, since: datetime | None = None, account: str | None = None
    ) -> ReconcileReport:
        """One pass over every configured account, or only ``account``.

        ``since`` reads Twilio's log from that time instead of the checkpoint (the checkpoint
        still only moves forward). Failures of Twilio or the broker are reported per number
        (``error``) and logged, not raised. Raises ValueError for an unknown account and
        StoreUnavailable when the database is unreachable. Idempotent: what is injected has
        the webhook's event id, and a second pass finds it stored.
        """
        accounts = self._config.current.accounts
        if account is not None:
            accounts = [a for a in accounts if a.name == account]
            if not accounts:
                raise ValueError(f"unknown account {account!r}")
        report = ReconcileReport()
        started = self._clock()
        for item in accounts:
            async with self._account_lock(item.name) as held:
                if not held:
                    report.skipped_locked.append(item.name)
                    log.info("reconcile.skipped_locked", account=item.name)
                    continue
                await self._reconcile_account(item, since, started, report)
        return report

    async def logged_pass(self) -> ReconcileReport | None:
        """``run_once()`` with one summary log line; errors are logged, never raised."""
        began = time.perf_counter()
        try:
            report = await self.run_once()
        except Exception as exc:
            log.warning("reconcile.pass_failed", error=_describe(exc))
            return None
        log.info(
            "reconcile.pass",
            found=sum(n.found for n in report.numbers),
            injected=report.injected,
            statuses_checked=report.statuses_checked,
            statuses_applied=report.statuses_applied,
            skipped_locked=report.skipped_locked,
            errors=report.errors,
            duration_ms=round((time.perf_counter() - began) * 1000, 1),
        )
        return report

    @asynccontextmanager
    async def _account_lock(self, account: str) -> AsyncIterator[bool]:
        """Hold the account's session-level advisory lock (True) or learn another replica
        holds it (False). Pooled connections skip asyncpg's reset query (store.py), so the
        lock is released here explicitly, and a connection that cannot release it is closed
        rather than returned to the pool still holding it."""
        key = account_lock_key(account)
        pool = await self._store.pool()
        try:
            conn = await pool.acquire()
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"database unavailable: {type(exc).__name__}") from exc
        try:
            try:
                held = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))
            except UNAVAILABLE as exc:
                raise StoreUnavailable(f"database unavailable: {type(exc).__name__}") from exc
            try:
                yield held
            finally:
                if held:
                    await _unlock(conn, key)
        finally:
            await pool.release(conn)

    async def _reconcile_account(
        self, account: Account, since: datetime | None, started: datetime, report: ReconcileReport
    ) -> None:
        if account.auth_token is None:
            error = f"no auth token ({account.auth_token_source} gave none)"
            report.numbers += [
                NumberReport(account.name, n.number, error=error) for n in account.numbers
            ]
            report.statuses.append(StatusReport(account.name, error=error))
            return
        client = self._clients.get(account.account_sid, account.auth_token.get_secret_value())
        for number in account.numbers:
            report.numbers.append(
                await self._reconcile_number(client, account, number.number, since, started)
            )
        report.statuses.append(await self._reconcile_statuses(client, account))

    async def _twilio(self, call: Callable[[], Awaitable[T]]) -> T:
        settings = self._settings
        return await with_backoff(
            call,
            attempts=settings.reconcile_backoff_attempts,
            base=settings.reconcile_backoff_base,
            cap=settings.reconcile_backoff_max,
            sleep=self._sleep,
        )

    # Inbound ---------------------------------------------------------------------------

    async def _reconcile_number(
        self,
        client: Any,
        account: Account,
        number: str,
        since: datetime | None,
        started: datetime,
    ) -> NumberReport:
        result = NumberReport(account.name, number)
        try:
            after = since or await self._read_from(account.name, number, started)
            messages = await self._inbound_messages(client, number, after)
            result.found = len(messages)
            stored, injected = await self._known_sids([m.sid for m in messages])
            result.stored = sum(1 for m in messages if m.sid in stored)
            events: list[Envelope] = []
            # Oldest first: a conversation's messages arrive in the order they were sent.
            for message in sorted(messages, key=_sent_at):
                if message.sid in stored or message.sid in injected:
                    continue
                event = await self._rebuild(client, account, message)
                if event is None:
                    result.unusable += 1
                    continue
                events.append(event)
            result.injected = await self._inject(account.name, number, events)
            newest = max((_sent_at(m) for m in messages), default=None)
            await self._save_checkpoint(account.name, number, newest or started)
        except StoreUnavailable:
            raise
        except Exception as exc:
            result.error = _describe(exc)
            log.warning(
                "reconcile.number_failed", account=account.name, number=number, error=result.error
            )
        return result

    async def _read_from(self, account: str, number: str, started: datetime) -> datetime:
        async with self._store.transaction() as conn:
            checked_until = await conn.fetchval(
                "SELECT checked_until FROM reconcile_checkpoints"
                " WHERE account = $1 AND business_number = $2",
                account,
                number,
            )
        if checked_until is None:
            return started - timedelta(seconds=self._settings.reconcile_lookback)
        when: datetime = checked_until
        return when - timedelta(seconds=self._settings.reconcile_overlap)

    async def _save_checkpoint(self, account: str, number: str, until: datetime) -> None:
        async with self._store.transaction() as conn:
            await conn.execute(
                "INSERT INTO reconcile_checkpoints (account, business_number, checked_until)"
                " VALUES ($1, $2, $3) ON CONFLICT (account, business_number) DO UPDATE SET"
                " checked_until = GREATEST(reconcile_checkpoints.checked_until,"
                " EXCLUDED.checked_until), updated_at = now()",
                account,
                number,
                until,
            )

    async def _inbound_messages(self, client: Any, number: str, after: datetime) -> list[Any]:
        """Every inbound message to ``number`` that Twilio logged at or after ``after``,
        reading the list page by page (each page fetch backs off on 429 on its own)."""
        after = after.astimezone(UTC)  # twilio-python writes the time with a literal "Z"
        page = await self._twilio(
            lambda: client.messages.page_async(
                to=f"whatsapp:{number}",
                date_sent_after=after,
                page_size=self._settings.reconcile_page_size,
            )
        )
        found: list[Any] = []
        while page is not None:
            # Twilio documents day granularity for DateSent>: filter to the second here too.
            found += [
                m
                for m in list(page)
                if m.direction == "inbound" and _sent_at(m) >= after.replace(microsecond=0)
            ]
            page = await self._twilio(page.next_page_async)
        return found

    async def _known_sids(self, sids: list[str]) -> tuple[set[str], set[str]]:
        """Of ``sids``: those stored in ``messages``, and those a pass injected recently
        (still on their way through the stages: publishing them again only adds work)."""
        if not sids:
            return set(), set()
        async with self._store.transaction() as conn:
            stored = await conn.fetch(
                "SELECT twilio_sid FROM messages WHERE twilio_sid = ANY($1::text[])", sids
            )
            injected = await conn.fetch(
                "SELECT message_sid FROM reconcile_injections WHERE message_sid = ANY($1::text[])"
                " AND injected_at > now() - make_interval(secs => $2)",
                sids,
                self._settings.reconcile_reinject_after,
            )
        return {r["twilio_sid"] for r in stored}, {r["message_sid"] for r in injected}

    async def _inject(self, account: str, number: str, events: list[Envelope]) -> int:
        """Publish ``events`` (frames in order, confirms awaited together), remember them as
        injected, and return how many; raises BrokerUnavailable when any was not confirmed
        (the checkpoint then stays, and the next pass tries those again)."""
        for start in range(0, len(events), INJECT_BATCH):
            batch = events[start : start + INJECT_BATCH]
            results = await self._bus.publish_all(batch)
            confirmed = [e for e, ok in zip(batch, results, strict=True) if ok]
            if confirmed:
                sids = [e.data["message_sid"] for e in confirmed]
                async with self._store.transaction() as conn:
                    await conn.execute(
                        "INSERT INTO reconcile_injections (message_sid)"
                        " SELECT unnest($1::text[]) ON CONFLICT (message_sid)"
                        " DO UPDATE SET injected_at = now()",
                        sids,
                    )
                RECONCILE_INJECTED.labels("inbound").inc(len(confirmed))
                log.info("reconcile.injected", account=account, number=number, count=len(confirmed))
            if len(confirmed) < len(batch):
                raise BrokerUnavailable("the broker did not confirm every injected message")
        async with self._store.transaction() as conn:
            await conn.execute(
                "DELETE FROM reconcile_injections"
                " WHERE injected_at < now() - make_interval(secs => $1)",
                self._settings.reconcile_reinject_after,
            )
        return len(events)

    async def _rebuild(self, client: Any, account: Account, message: Any) -> Envelope | None:
        """The ``message.received`` event of a listed message, or None (logged) if it cannot
        be one (not a WhatsApp message, a number no longer configured, …)."""
        media: list[Any] = []
        if int(message.num_media or 0) > 0:
            page = await self._twilio(lambda: client.messages(message.sid).media.page_async())
            media = list(page)
        form = inbound_form(message, media, str(self._settings.twilio_api_url))
        try:
            return inbound_event(account, form, received_at=_sent_at(message))
        except (ValidationError, UnknownAccountSid, UnknownNumber) as exc:
            log.warning(
                "reconcile.unusable_message",
                account=account.name,
                message_sid=message.sid,
                error=f"{type(exc).__name__}: {str(exc)[:300]}",
            )
            return None

    # Statuses --------------------------------------------------------------------------

    async def _reconcile_statuses(self, client: Any, account: Account) -> StatusReport:
        result = StatusReport(account.name)
        now = self._clock()
        age = self._settings.reconcile_status_age
        async with self._store.transaction() as conn:
            rows = await conn.fetch(
                STATUS_SWEEP,
                account.name,
                now - timedelta(seconds=self._settings.reconcile_status_max_age),
                now - timedelta(seconds=age),
                now,
                age,
                self._settings.reconcile_status_batch,
            )
        checked: list[Any] = []
        try:
            for row in rows:
                try:
                    applied = await self._check_status(client, account, row)
                except TwilioRestException as exc:
                    if rate_limited(exc):
                        raise
                    # Gone from Twilio's log (deleted, redacted): asked again later, sparser.
                    log.warning(
                        "reconcile.status_fetch_failed",
                        message_sid=row["twilio_sid"],
                        error=_describe(exc),
                    )
                    applied = False
                checked.append(row["id"])
                result.checked += 1
                result.applied += applied
        except StoreUnavailable:
            raise
        except Exception as exc:
            result.error = _describe(exc)
            log.warning("reconcile.statuses_failed", account=account.name, error=result.error)
        finally:
            if checked:
                await self._mark_checked(checked, now)
        return result

    async def _check_status(self, client: Any, account: Account, row: Any) -> bool:
        """Fetch one message from Twilio; publish its status if it is news. True if so."""
        sid: str = row["twilio_sid"]
        twilio = await self._twilio(lambda: client.messages(sid).fetch_async())
        status = str(twilio.status or "")
        if status in INITIAL_STATUSES or status == row["status"] or status in row["seen"]:
            return False  # nothing we have not heard (a duplicate would only fill the history)
        form = {"MessageSid": sid, "AccountSid": account.account_sid, "MessageStatus": status}
        if twilio.error_code:
            form["ErrorCode"] = str(twilio.error_code)
        await self._bus.publish(status_event(account, form, received_at=self._clock()))
        RECONCILE_INJECTED.labels("status").inc()
        log.info(
            "reconcile.status_recovered",
            account=account.name,
            message_sid=sid,
            stored=row["status"],
            twilio=status,
        )
        return True

    async def _mark_checked(self, ids: list[Any], at: datetime) -> None:
        async with self._store.transaction() as conn:
            await conn.execute(
                "UPDATE messages SET status_checked_at = $2 WHERE id = ANY($1::uuid[])", ids, at
            )


def _sent_at(message: Any) -> datetime:
    """When Twilio says the message was sent (received, for an inbound one)."""
    moment: datetime | None = message.date_sent or message.date_created
    return moment if moment is not None else utc_now()


async def _unlock(conn: Connection, key: int) -> None:
    try:
        await conn.execute("SELECT pg_advisory_unlock($1)", key)
    except BaseException:
        conn.terminate()  # the lock goes with the session
        raise


@asynccontextmanager
async def running_reconciler(
    settings: Settings, config: LiveConfig, bus: Bus, store: Store
) -> AsyncIterator[Reconciler]:
    """A reconciler running one pass once the broker is up, then every
    ``settings.reconcile_interval`` seconds, until the context exits.

    ``reconcile_interval`` 0 runs no passes (the reconciler is still yielded, for manual
    ``run_once``). A failed pass is logged (``reconcile.pass_failed``) and the next one runs
    as planned: nothing here stops the process it runs in.
    """
    reconciler = Reconciler(settings, config, bus, store)
    task: asyncio.Task[None] | None = None
    if settings.reconcile_interval > 0:
        task = asyncio.create_task(
            _periodic(reconciler, bus, settings.reconcile_interval), name="reconciler"
        )
    try:
        yield reconciler
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await reconciler.close()


async def _periodic(reconciler: Reconciler, bus: Bus, interval: float) -> None:
    await bus.wait_ready()  # what a pass recovers must be published
    while True:
        await reconciler.logged_pass()
        await asyncio.sleep(interval)
