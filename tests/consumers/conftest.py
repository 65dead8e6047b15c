"""Stage fixtures live in tests/conftest.py (the type is re-exported for the stage tests);
the Twilio emulator and the router's real port for the stages that talk to Twilio."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from omniroute.twilio_emulator import EmulatorState, RunningEmulator, start_emulator
from tests.conftest import RunnerFactory
from tests.support import ACCOUNT_SID, AUTH_TOKEN, free_port

__all__ = ["RunnerFactory"]


@pytest.fixture
async def emulator() -> AsyncIterator[RunningEmulator]:
    running = await start_emulator(
        EmulatorState(accounts={ACCOUNT_SID: AUTH_TOKEN}, callback_delay=0.02)
    )
    try:
        yield running
    finally:
        await running.close()


@pytest.fixture
def router_port() -> int:
    """The port the router serves on, known before it starts (public_url names it)."""
    return free_port()
