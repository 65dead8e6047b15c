"""The ``omniroute`` command line: every user error is one line on stderr and a non-zero
exit status, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from aiormq.exceptions import AMQPConnectionError
from pydantic import ValidationError

from omniroute.commands.agents_cli import add_agents_parser, cmd_agents
from omniroute.commands.supervise_cli import add_supervise_parser, cmd_supervise
from omniroute.errors import ConfigError
from omniroute.infra.config_loader import LiveConfig, load_config
from omniroute.infra.logging import configure_logging
from omniroute.infra.settings import Settings
from omniroute.infra.topology import STAGES
from omniroute.infra.webhook_urls import inbound_url, status_url


def _tune_gc() -> None:
    """Start-up objects out of the collector's way, and fewer young collections: a webhook
    allocates many small short-lived objects (forms, models), and the default threshold of
    700 ran a collection every few requests."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def _run(coro: Coroutine[Any, Any, int | None]) -> int:
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is not on every platform
        pass
    _tune_gc()
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro) or 0


def _quiet_drivers(settings: Settings) -> None:
    """For a one-shot command whose output says what happened: the drivers' own connection
    errors (aiormq logs each refused attempt) would bury it. OMNIROUTE_LOG_LEVEL brings them
    back."""
    if "log_level" not in settings.model_fields_set:
        configure_logging(settings.log_format, "critical")


def _config(settings: Settings, path: str | None = None) -> LiveConfig:
    config_path = Path(path) if path else settings.config
    return LiveConfig(
        load_config(config_path, os.environ),
        config_path,
        token_overlap=settings.token_rotation_overlap,
    )


def cmd_service(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.registry import STAGES as RUNNABLE
    from omniroute.commands.service import Service, run_service
    from omniroute.errors import ListenFailed

    stages: list[str] = []
    children: list[str] = []
    if args.command == "run":
        # The router here, every stage in a supervised child (omniroute/stage_process.py).
        stages, http, children = [], True, list(RUNNABLE)
    elif args.command == "serve":
        stages, http = [], True
    else:
        stages, http = args.stages, False
    service = Service(
        settings=settings,
        config=_config(settings),
        stages=stages,
        serve_http=http,
        child_stages=children,
    )
    try:
        return _run(run_service(service))
    except ListenFailed as exc:
        print(f"omniroute {args.command}: {exc}", file=sys.stderr)
        return 1


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """Apply the migrations; 1 with one line on stderr when the database is missing,
    unreachable or refuses."""
    import asyncpg

    from omniroute.infra.database import create_database
    from omniroute.infra.store import migrate

    _quiet_drivers(settings)
    dsn = settings.database_url.get_secret_value()
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/") or "(default)"
    where = f"PostgreSQL at {parts.hostname or 'localhost'}:{parts.port or 5432}"

    def fail(reason: str) -> int:
        print(f"omniroute migrate: {reason}", file=sys.stderr)
        return 1

    async def main() -> int:
        try:
            # One bounded attempt first: asyncpg's own connect timeout is a minute.
            probe = await asyncpg.connect(dsn, timeout=settings.db_connect_timeout)
            await probe.close()
        except asyncpg.InvalidCatalogNameError:
            if not args.create_database:
                return fail(
                    f"database {name!r} does not exist on {where}"
                    " (omniroute migrate --create-database creates it)"
                )
        except TimeoutError:
            return fail(f"cannot reach {where}: no answer in {settings.db_connect_timeout} s")
        except OSError as exc:
            return fail(f"cannot reach {where}: {exc.strerror or exc}")
        except asyncpg.PostgresError as exc:
            return fail(f"{where} refused: {exc}")
        try:
            if args.create_database:
                created = await create_database(dsn)
                print(f"database {'created' if created else 'exists'}")
            applied = await migrate(dsn)
        except (OSError, asyncpg.PostgresError, RuntimeError) as exc:
            return fail(str(exc))
        print(f"migrations applied: {', '.join(applied) if applied else 'none (up to date)'}")
        return 0

    return _run(main())


def cmd_accounts(args: argparse.Namespace, settings: Settings) -> int:
    config = load_config(
        Path(args.config) if args.config else settings.config, os.environ, require_secrets=False
    )
    base = settings.public_base()
    for account in config.accounts:
        print(f"account {account.name} ({account.account_sid})")
        print(f"  auth token from {account.auth_token_source}")
        inbound, status = inbound_url(base, account.name), status_url(base, account.name)
        for number in account.numbers:
            sandbox = " [sandbox]" if number.sandbox else ""
            print(f"  {number.name}: whatsapp:{number.number}{sandbox} → {number.workstream}")
            print(f"    when a message comes in (POST): {inbound}")
            print(f"    status callback URL (POST):     {status}")
            print(
                "    fallback URL: leave empty, or the same path on a second omniroute ingress"
                " (Twilio signs for the URL it calls, so that ingress needs its own"
                " OMNIROUTE_PUBLIC_URL); what neither takes, `omniroute reconcile` recovers"
            )
    return 0


def _parse_time(text: str) -> datetime:
    """``--since``, ``--at``: an ISO 8601 time; without a UTC offset it is read as UTC."""
    moment = datetime.fromisoformat(text.strip())
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    """One reconciliation pass; exit 2 on bad arguments, 1 when something was unreachable
    or a number could not be reconciled, 0 otherwise."""
    _quiet_drivers(settings)
    since = None
    if args.since is not None:
        try:
            since = _parse_time(args.since)
        except ValueError:
            print(
                f"omniroute reconcile: --since {args.since!r} is not an ISO time"
                " (e.g. 2025-01-31T09:00:00Z)",
                file=sys.stderr,
            )
            return 2
    config = _config(settings)
    names = [a.name for a in config.current.accounts]
    if args.account is not None and args.account not in names:
        print(
            f"omniroute reconcile: unknown account {args.account!r}"
            f" (configured: {', '.join(names)})",
            file=sys.stderr,
        )
        return 2
    return _run(_reconcile(settings, config, since, args.account))


async def _reconcile(
    settings: Settings, config: LiveConfig, since: datetime | None, account: str | None
) -> int:
    from omniroute.domain.reconcile import Reconciler
    from omniroute.errors import StoreUnavailable
    from omniroute.infra.bus import Bus
    from omniroute.infra.store import Store

    bus, store = Bus.from_settings(settings), Store.from_settings(settings)
    await bus.start()
    try:
        try:
            # One connection attempt, then declaring the topology (so nothing published is
            # unroutable on a fresh broker).
            async with asyncio.timeout(2 * settings.broker_connect_timeout):
                await bus.wait_ready()
        except TimeoutError:
            print("omniroute reconcile: the broker is unreachable", file=sys.stderr)
            return 1
        reconciler = Reconciler(settings, config, bus, store)
        try:
            report = await reconciler.run_once(since, account)
        except StoreUnavailable:
            print("omniroute reconcile: the database is unreachable", file=sys.stderr)
            return 1
        finally:
            await reconciler.close()
    finally:
        await bus.close()
        await store.close()
    for number in report.numbers:
        outcome = (
            f"{number.found} in Twilio's log, {number.stored} stored, {number.injected} injected"
        )
        if number.unusable:
            outcome += f", {number.unusable} unusable (see the log)"
        if number.error:
            outcome += f"; gave up: {number.error}"
        print(f"{number.account} {number.number}: {outcome}")
    for name in report.skipped_locked:
        print(f"{name}: skipped, another process is reconciling it")
    print(
        f"statuses: {report.statuses_checked} checked with Twilio,"
        f" {report.statuses_applied} recovered"
    )
    for status in report.statuses:
        if status.error:
            print(f"{status.account} statuses: gave up: {status.error}")
    return 1 if report.errors else 0


def _config_reload(args: argparse.Namespace, settings: Settings) -> int:
    """Ask every running process to reload, print what each did; 0 only when every live
    process applied the same configuration."""
    from omniroute.commands.reload import ReloadReport, request_reload

    _quiet_drivers(settings)
    if args.wait <= 0:
        print(
            "omniroute config reload: --wait must be a positive number of seconds", file=sys.stderr
        )
        return 2
    report: list[ReloadReport] = []

    async def ask() -> None:
        report.append(await request_reload(settings, args.wait))

    try:
        _run(ask())
    except (TimeoutError, OSError, AMQPConnectionError):
        print("omniroute config reload: the broker is unreachable", file=sys.stderr)
        return 1
    for line in report[0].lines():
        print(line)
    if report[0].ok:
        print(report[0].verdict())
        return 0
    print(f"omniroute config reload: {report[0].verdict()}", file=sys.stderr)
    return 1


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    if args.config_command == "reload":
        return _config_reload(args, settings)
    if args.config_command == "schema":
        import json

        from schemas.config import Config

        print(json.dumps(Config.model_json_schema(), indent=2))
        return 0
    path = Path(args.file) if args.file else settings.config
    try:
        config = load_config(path, os.environ, require_secrets=not args.no_secrets)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    numbers = sum(len(a.numbers) for a in config.accounts)
    print(
        f"{path}: ok — {len(config.accounts)} account(s), {numbers} number(s), "
        f"{len(config.workstreams)} workstream(s), {len(config.queues)} queue(s)"
    )
    return 0


def cmd_classify(args: argparse.Namespace, settings: Settings) -> int:
    from omniroute.commands.explain import explain

    if args.at is not None:
        try:
            args.at = _parse_time(args.at).isoformat()
        except ValueError:
            print(
                f"omniroute classify: --at {args.at!r} is not an ISO time"
                " (e.g. 2025-01-31T09:00:00Z)",
                file=sys.stderr,
            )
            return 2
    path = Path(args.config) if args.config else settings.config
    config = load_config(path, os.environ, require_secrets=False)
    return explain(config, args)


def cmd_emulator(args: argparse.Namespace, settings: Settings) -> int:
    from omniroute.twilio_emulator import run_emulator

    config = load_config(settings.config, os.environ)
    accounts = {
        a.account_sid: a.auth_token.get_secret_value() for a in config.accounts if a.auth_token
    }
    return _run(run_emulator(args.host, args.port, accounts, public_url=args.public_url))


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from omniroute.commands.demo import run_demo

    if "log_level" not in settings.model_fields_set:  # the demo tells its own story
        configure_logging("console", "warning")
    return _run(run_demo(settings, keep_running=args.keep_running))


def cmd_contract(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from omniroute.commands.contract import asyncapi

    print(json.dumps(asyncapi(), indent=2, sort_keys=True))
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from omniroute.commands.status_report import run_status

    _quiet_drivers(settings)
    return _run(run_status(settings, args.json, args.interval))


def cmd_dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    from omniroute.commands.dead_letters import run_dead_letters

    _quiet_drivers(settings)
    return _run(run_dead_letters(settings, args.action, args.stage, args.limit, args.id))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown where there is one to show (not "None", "" or a flag's "False")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == "" or action.help is None:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Plain help with defaults; a usage error is one line, not the usage block."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _version() -> str:
    try:
        return metadata.version("omniroute")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        return "unknown (not installed)"


_CONFIG_HELP = "configuration file (default: $OMNIROUTE_CONFIG, else ./omniroute.yaml)"


def parser() -> argparse.ArgumentParser:
    # Typed as the base class: subparsers (and agents_cli's) are built by type(p) anyway.
    p: argparse.ArgumentParser = _Parser(
        prog="omniroute",
        description="Route WhatsApp conversations from Twilio to agents: the router, the"
        " consumer stages and the tools to run them. Settings come from OMNIROUTE_*"
        " environment variables.",
    )
    p.add_argument("--version", action="version", version=f"omniroute {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="the router, and every stage in a supervised child process")
    sub.add_parser("serve", help="the router (HTTP) alone")
    consume = sub.add_parser("consume", help="run the given consumer stages")
    consume.add_argument(
        "stages", nargs="+", metavar="STAGE", choices=list(STAGES), help=", ".join(STAGES)
    )
    migrate = sub.add_parser("migrate", help="apply database migrations (idempotent)")
    migrate.add_argument(
        "--create-database",
        action="store_true",
        help="create the database first if it does not exist",
    )
    accounts = sub.add_parser("accounts", help="the URLs to paste into the Twilio console")
    accounts.add_argument("--config", help=_CONFIG_HELP)
    config = sub.add_parser("config", help="check, describe or reload the configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser("check", help="validate a configuration file")
    check.add_argument("file", nargs="?", help=_CONFIG_HELP)
    check.add_argument(
        "--no-secrets",
        action="store_true",
        help="do not require the auth-token environment variables",
    )
    config_sub.add_parser("schema", help="print the configuration's JSON Schema")
    reload = config_sub.add_parser(
        "reload",
        help="make every running process reload its config and say what each did (exit 1"
        " unless all applied the same)",
    )
    reload.add_argument(
        "--wait",
        type=float,
        default=10.0,  # reload.DEFAULT_WAIT, without importing the drivers for --help
        metavar="SECONDS",
        help="how long to wait for the answers of the running processes",
    )
    classify = sub.add_parser(
        "classify", help="show how the rules would classify a message (no broker needed)"
    )
    classify.add_argument("--config", help=_CONFIG_HELP)
    classify.add_argument("--from", dest="sender", required=True, help="whatsapp:+E164")
    classify.add_argument("--to", required=True, help="our number, whatsapp:+E164")
    classify.add_argument("--body", default="", help="message text")
    classify.add_argument("--profile-name", help="the customer's WhatsApp profile name")
    classify.add_argument("--media", type=int, default=0, help="number of attachments")
    classify.add_argument(
        "--at", help="ISO time to classify at, UTC unless it has an offset (default: now)"
    )
    classify.add_argument("--json", action="store_true", help="machine-readable output")
    emulator = sub.add_parser("emulator", help="run the local Twilio emulator")
    emulator.add_argument("--host", default="127.0.0.1", help="address to listen on")
    emulator.add_argument("--port", type=int, default=8081, help="port to listen on")
    emulator.add_argument(
        "--public-url",
        help="where the router reaches it (its OMNIROUTE_TWILIO_API_URL), used in customers'"
        " media URLs; default http://HOST:PORT",
    )
    demo = sub.add_parser("demo", help="emulator + router + stages with simulated customers")
    demo.add_argument("--keep-running", action="store_true", help="keep serving after the demo")
    sub.add_parser("contract", help="print the event contract (AsyncAPI, from schemas/)")
    status = sub.add_parser("status", help="queue depth, consumers and dead letters per stage")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--interval", type=float, default=1.0, help="seconds between the two samples (0: one)"
    )
    dead = sub.add_parser("dead-letters", help="inspect or replay a stage's dead letters")
    dead.add_argument(
        "action",
        choices=["list", "show", "replay", "purge"],
        metavar="ACTION",
        help="list, show, replay or purge",
    )
    dead.add_argument("stage", choices=list(STAGES), metavar="STAGE", help=", ".join(STAGES))
    dead.add_argument("--limit", type=int, default=100, help="at most this many messages")
    dead.add_argument("--id", help="show: the message id (default: the oldest dead letter)")
    reconcile = sub.add_parser(
        "reconcile", help="recover from Twilio's message log what its webhooks never delivered"
    )
    reconcile.add_argument(
        "--since",
        help="read Twilio's log from this ISO time, UTC unless it has an offset"
        " (default: each number's checkpoint)",
    )
    reconcile.add_argument("--account", help="only this account (default: every account)")
    add_agents_parser(sub)
    add_supervise_parser(sub)
    return p


COMMANDS = {
    "run": cmd_service,
    "serve": cmd_service,
    "consume": cmd_service,
    "migrate": cmd_migrate,
    "accounts": cmd_accounts,
    "config": cmd_config,
    "emulator": cmd_emulator,
    "classify": cmd_classify,
    "agents": cmd_agents,
    "supervise": cmd_supervise,
    "demo": cmd_demo,
    "dead-letters": cmd_dead_letters,
    "reconcile": cmd_reconcile,
    "status": cmd_status,
    "contract": cmd_contract,
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        for error in exc.errors():
            field = "_".join(str(part) for part in error["loc"]).upper()
            print(f"omniroute: OMNIROUTE_{field}: {error['msg']}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level, cache=True)
    try:
        return COMMANDS[args.command](args, settings)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `omniroute contract | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except AMQPConnectionError as exc:
        url = urlsplit(settings.amqp_url.get_secret_value())
        reason = exc.strerror or str(exc) or type(exc).__name__
        where = f"{url.hostname or 'localhost'}:{url.port or 5672}"
        print(
            f"omniroute {args.command}: cannot reach RabbitMQ at {where}: {reason}", file=sys.stderr
        )
        return 1
    except OSError as exc:  # a port in use, a file or host out of reach
        print(f"omniroute {args.command}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
