"""Assembly of the Twilio emulator app, and helpers to run it on a socket."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web

from omniroute.twilio_emulator import control, customers, messages_api
from omniroute.twilio_emulator.runtime import STATE_KEY, log, runtime_ctx
from omniroute.twilio_emulator.state import EmulatorState
from omniroute.twilio_emulator.twilio_errors import twilio_errors_middleware

ACCOUNT = "/2010-04-01/Accounts/{account_sid}"


def create_emulator_app(state: EmulatorState) -> web.Application:
    """Build the emulator: Twilio's Messages API, media, callbacks and ``/_emulator`` controls."""
    app = web.Application(middlewares=[twilio_errors_middleware])
    app[STATE_KEY] = state
    app.cleanup_ctx.append(runtime_ctx)
    app.router.add_post(f"{ACCOUNT}/Messages.json", messages_api.create_message)
    app.router.add_get(f"{ACCOUNT}/Messages.json", messages_api.list_messages)
    app.router.add_get(f"{ACCOUNT}/Messages/{{sid}}.json", messages_api.fetch_message)
    app.router.add_get(f"{ACCOUNT}/Messages/{{message_sid}}/Media.json", messages_api.list_media)
    app.router.add_get(
        f"{ACCOUNT}/Messages/{{message_sid}}/Media/{{media_sid}}", messages_api.fetch_media
    )
    app.router.add_post("/_emulator/faults", control.add_fault)
    app.router.add_get("/_emulator/messages", control.list_messages)
    app.router.add_get("/_emulator/inbound", control.list_inbound)
    app.router.add_get("/_emulator/rejected", control.list_rejected)
    app.router.add_post("/_emulator/reset", control.reset)
    app.router.add_get("/_emulator/health", control.health)
    app.router.add_get("/_emulator/webhooks", control.webhook_summary)
    app.router.add_get("/_emulator/webhook-failures", control.list_webhook_failures)
    app.router.add_post("/_emulator/customers/send", customers.send_customer_message)
    return app


@dataclass
class RunningEmulator:
    """An emulator listening on a socket; ``url`` is what ``make_client`` takes as api_url."""

    state: EmulatorState
    runner: web.AppRunner
    url: str

    async def close(self) -> None:
        """Stop listening, cancel pending callbacks and close the HTTP session."""
        await self.runner.cleanup()


async def start_emulator(
    state: EmulatorState, host: str = "127.0.0.1", port: int = 0
) -> RunningEmulator:
    """Start the emulator on ``host:port`` (0 picks a free port) and return it running.
    Without a ``public_url`` in ``state``, it is the address it listens on."""
    runner = web.AppRunner(create_emulator_app(state), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    url = f"http://{bound_host}:{bound_port}"
    state.public_url = state.public_url or url
    log.info(
        "emulator.started", url=url, public_url=state.public_url, accounts=sorted(state.accounts)
    )
    return RunningEmulator(state, runner, url)


async def run_emulator(
    host: str,
    port: int,
    accounts: dict[str, str],
    callback_delay: float = 0.05,
    public_url: str | None = None,
) -> None:
    """Run the emulator standalone until cancelled (``omniroute emulator`` calls this).
    ``public_url``: where the router reaches it (its ``OMNIROUTE_TWILIO_API_URL``), when not
    the address it listens on (e.g. ``http://emulator:8081`` in a compose network)."""
    emulator = await start_emulator(
        EmulatorState(accounts=accounts, callback_delay=callback_delay, public_url=public_url),
        host,
        port,
    )
    try:
        await asyncio.Event().wait()
    finally:
        await emulator.close()
        log.info("emulator.stopped", url=emulator.url)
