"""`omniroute dead-letters show`: what an operator reads of a dead letter (the reason
headers and the body, pretty-printed), against the real broker."""

from __future__ import annotations

import uuid

import pytest

from omniroute.commands.dead_letters import run_dead_letters
from omniroute.infra.bus import Bus
from omniroute.infra.settings import Settings
from omniroute.infra.topology import STAGES
from tests.support import publish_to_queue, purge_queues

pytestmark = pytest.mark.integration


async def test_dead_letters_show_prints_the_reason_headers_and_body(
    bus: Bus, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = STAGES["outbound"].dead_queue
    await purge_queues(settings.amqp_url.get_secret_value(), dead)
    message_id = str(uuid.uuid4())
    await publish_to_queue(
        settings.amqp_url.get_secret_value(),
        dead,
        [b'{"type": "message.send-requested", "data": {"message_id": "nope"}}'],
        message_id=message_id,
        headers={
            "x-omniroute-reason": "invalid message.send-requested payload: message_id: bad",
            "x-omniroute-routing-key": "message.send-requested",
            "x-omniroute-dead-at": "2026-11-25T12:00:00+00:00",
        },
    )
    try:
        assert await run_dead_letters(settings, "show", "outbound", 100, message_id) == 0
        out = capsys.readouterr().out
        assert message_id in out and "message_id: bad" in out
        assert '"message_id": "nope"' in out  # the body, pretty-printed
        assert await run_dead_letters(settings, "show", "outbound", 100, "no-such-id") == 1
    finally:
        await purge_queues(settings.amqp_url.get_secret_value(), dead)
