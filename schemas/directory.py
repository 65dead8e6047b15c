"""What the agent directory (``GET /api/queues``, ``GET /api/agents``) answers: enough of
the contact centre for an agent's UI to show pick-mode queues and where work can be
transferred, and nothing an agent has no business seeing (tokens, skills, workload)."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, Field

from schemas.api import Presence

AssignmentMode = Literal["push", "pick"]


class DirectoryQueue(BaseModel):
    """A queue of the configuration, as an agent sees it."""

    name: str
    mode: AssignmentMode = Field(
        description="pick when conversations of a pick-mode workstream can wait in it (they"
        " wait there for an agent to pick them); push when work is only ever offered"
    )
    priority: int
    member: bool = Field(description="whether the calling agent serves this queue")


class DirectoryAgent(BaseModel):
    """Another agent an agent may transfer a conversation to (never itself, never a
    removed agent). Whether the transfer can happen now also depends on the agent's
    presence, queues and free capacity, which the transfer itself checks."""

    id: uuid.UUID
    name: str
    presence: Presence
    queues: list[str]
