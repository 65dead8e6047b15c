"""The supervisor's view of the queues (``GET /api/admin/queues`` and its ``/history``):
what waits, for how long, who could take it, and how the waiting count moved.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, Field

from schemas.api import Presence


class AgentLoad(BaseModel):
    """An agent of a queue as a supervisor watches it."""

    id: uuid.UUID
    name: str
    presence: Presence
    used: int = Field(description="capacity units held now (offers and assignments)")
    capacity: int = Field(description="capacity units in total")
    active_conversations: int = Field(description="conversations it is on now (state active)")
    available: bool = Field(description="presence available and free capacity: can take work")


class PendingOffer(BaseModel):
    """An offer waiting for its agent's answer (a supervisor may end it)."""

    id: uuid.UUID
    conversation_id: uuid.UUID
    customer: str = Field(description="the conversation's customer (WhatsApp address)")
    agent_id: uuid.UUID
    created_at: datetime
    expires_at: datetime


class QueueLoad(BaseModel):
    """One configured queue right now."""

    queue: str
    waiting: int = Field(description="conversations queued or offered, not yet assigned")
    longest_wait_seconds: float | None = Field(
        description="how long the oldest waiting conversation has been in the queue; null"
        " when none waits"
    )
    available_agents: int = Field(
        description="agents of the queue with presence available and free capacity"
    )
    active: int = Field(description="conversations of the queue assigned to an agent (active)")
    agents: list[AgentLoad]
    offers: list[PendingOffer]


class QueuesView(BaseModel):
    """``GET /api/admin/queues``: every configured queue, in configuration order."""

    at: datetime = Field(description="when the view was read (the database's clock)")
    queues: list[QueueLoad]


class WaitingPoint(BaseModel):
    """How many conversations waited in a queue at the end of one minute."""

    at: datetime = Field(description="the end of the minute (now, for the current one)")
    waiting: int


class QueueSeries(BaseModel):
    queue: str
    points: list[WaitingPoint] = Field(description="one per minute, oldest first")


class QueuesHistory(BaseModel):
    """``GET /api/admin/queues/history``: each queue's waiting count per minute."""

    at: datetime
    minutes: int
    queues: list[QueueSeries]
