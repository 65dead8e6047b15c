"""A local Twilio emulator: Messages API, media, signed status callbacks, simulated customers."""

from omniroute.twilio_emulator.app import (
    RunningEmulator,
    create_emulator_app,
    run_emulator,
    start_emulator,
)
from omniroute.twilio_emulator.runtime import STATE_KEY
from omniroute.twilio_emulator.state import EmulatorState, Fault, OutboundMessage, StoredMedia

__all__ = [
    "STATE_KEY",
    "EmulatorState",
    "Fault",
    "OutboundMessage",
    "RunningEmulator",
    "StoredMedia",
    "create_emulator_app",
    "run_emulator",
    "start_emulator",
]
