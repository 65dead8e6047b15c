"""Every stage omniroute can run, by name."""

from __future__ import annotations

from consumers import bot, classify, conversations, distribute, lifecycle, outbound, status
from consumers.runtime import Stage

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        conversations.STAGE,
        classify.STAGE,
        distribute.STAGE,
        outbound.STAGE,
        status.STAGE,
        lifecycle.STAGE,
        bot.STAGE,
    )
}
