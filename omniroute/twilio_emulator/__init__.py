"""A local Twilio emulator: Messages API, media, signed status callbacks, simulated customers.

Twilio's side, as documented: ``POST``/``GET …/Accounts/{AccountSid}/Messages.json`` (create;
list newest first with ``To``/``From``/``DateSent``/``DateSent<``/``DateSent>`` and paging),
``GET …/Messages/{Sid}.json``, ``GET …/Messages/{Sid}/Media.json`` and ``…/Media/{MediaSid}``.
Webhooks (inbound and status callbacks) follow Twilio's delivery rules by default: sent once,
retried once only on a connection failure, unless the URL's ``#ct=…&rt=…&tt=…&rc=…&rp=…``
fragment says otherwise (see :mod:`.webhooks`).

The emulator's own controls, under ``/_emulator``: ``POST customers/send`` (a customer
writes: the message is logged, then its webhook delivered), ``POST faults``, ``GET messages``,
``GET inbound``, ``GET rejected``, ``GET webhook-failures`` (every failed webhook attempt, as
Twilio's debugger error 11200; ``?kind=inbound|status``, ``?message_sid=…``), ``GET webhooks``
(per kind: delivered, failed attempts, given up), ``GET health`` and ``POST reset``.
"""

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
