"""HTTP API bodies: what the admin and agent APIs accept and answer.

Request models are strict (``extra="forbid"``): a typo is a 422 naming the field, never a
silently ignored key. Response models are what the handlers serialize (``mode="json"``:
datetimes as ISO 8601 strings, uuids as strings), so the OpenAPI document can be generated
from them.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Presence = Literal["available", "busy", "dnd", "away", "offline"]
PRESENCES: tuple[Presence, ...] = ("available", "busy", "dnd", "away", "offline")
ConversationState = Literal[
    "bot", "open", "queued", "offered", "active", "waiting", "wrap-up", "closed"
]
CONVERSATION_STATES: tuple[ConversationState, ...] = (
    "bot",
    "open",
    "queued",
    "offered",
    "active",
    "waiting",
    "wrap-up",
    "closed",
)

AgentName = Annotated[str, Field(min_length=1, max_length=100)]
QueueName = Annotated[str, Field(min_length=1, max_length=100)]
SkillName = Annotated[str, Field(min_length=1, max_length=100)]
Proficiency = Annotated[int, Field(ge=1, le=10, description="1 (novice) to 10 (expert)")]
Capacity = Annotated[int, Field(ge=0, le=10_000, description="units of work in total")]
Language = Annotated[str, Field(min_length=1, max_length=35, description="BCP 47, e.g. pt-BR")]


def _unique(queues: list[str]) -> list[str]:
    return list(dict.fromkeys(queues))


class AgentCreate(BaseModel):
    """``POST /api/admin/agents``."""

    model_config = ConfigDict(extra="forbid")

    name: AgentName
    queues: list[QueueName] = Field(default_factory=list, max_length=100)
    skills: dict[SkillName, Proficiency] = Field(default_factory=dict, max_length=100)
    capacity: Capacity
    language: Language | None = None

    @field_validator("queues")
    @classmethod
    def _unique_queues(cls, queues: list[str]) -> list[str]:
        return _unique(queues)


class AgentUpdate(BaseModel):
    """``PATCH /api/admin/agents/{id}``: only the fields sent change.

    ``queues`` and ``skills`` replace the whole list or map. ``language: null`` clears the
    language; the other fields cannot be null.
    """

    model_config = ConfigDict(extra="forbid")

    name: AgentName | None = None
    queues: list[QueueName] | None = Field(default=None, max_length=100)
    skills: dict[SkillName, Proficiency] | None = Field(default=None, max_length=100)
    capacity: Capacity | None = None
    language: Language | None = None
    presence: Presence | None = None

    @field_validator("queues")
    @classmethod
    def _unique_queues(cls, queues: list[str] | None) -> list[str] | None:
        return None if queues is None else _unique(queues)

    @model_validator(mode="after")
    def _something_to_change(self) -> AgentUpdate:
        if not self.model_fields_set:
            raise ValueError("send at least one field to change")
        nulls = sorted(
            name for name in self.model_fields_set - {"language"} if getattr(self, name) is None
        )
        if nulls:
            raise ValueError(f"cannot be null: {', '.join(nulls)}")
        return self

    def changes(self) -> dict[str, Any]:
        """The fields the caller sent, by name."""
        return {name: getattr(self, name) for name in self.model_fields_set}


class PresenceUpdate(BaseModel):
    """``PUT /api/me/presence``."""

    model_config = ConfigDict(extra="forbid")

    presence: Presence


class AgentOut(BaseModel):
    """An agent as the API shows it; never its token or token hash."""

    id: uuid.UUID
    name: str
    queues: list[str]
    skills: dict[str, int]
    capacity: int
    used: int
    presence: Presence
    language: str | None
    created_at: datetime
    updated_at: datetime
    last_assigned_at: datetime | None


class AgentCreated(AgentOut):
    """The answer to creating an agent: the only time its token is shown."""

    token: str = Field(description="the agent's bearer token; shown once, stored hashed")


TWILIO_SID = (
    "the sid Twilio knows the message by (SM…/MM…), to find it in Twilio's console or"
    " Messages API; null until Twilio took an outbound message"
)
BUTTON_PAYLOAD = (
    "the customer's reply was a tap on a quick-reply button: the payload the template"
    " defined for it (Twilio's ButtonPayload); null otherwise"
)
BUTTON_TEXT = "the tapped button's label (Twilio's ButtonText); null otherwise"
STATUS_HISTORY = "every delivery status callback Twilio sent for it, in arrival order"


class StatusStep(BaseModel):
    """One delivery status callback Twilio sent for the message, in arrival order."""

    status: str
    error_code: str | None = None
    received_at: datetime


class MessageOut(BaseModel):
    """A message as support staff see it: enough to find it in Twilio's console."""

    id: uuid.UUID
    direction: Literal["inbound", "outbound"]
    body: str
    media: list[dict[str, Any]]
    status: str
    error_code: str | None = None
    error_message: str | None = Field(
        default=None, description="why it was rejected, skipped or failed"
    )
    received_at: datetime
    twilio_sid: str | None = Field(description=TWILIO_SID)
    button_payload: str | None = Field(default=None, description=BUTTON_PAYLOAD)
    button_text: str | None = Field(default=None, description=BUTTON_TEXT)
    status_history: list[StatusStep] = Field(default_factory=list, description=STATUS_HISTORY)


class ConversationOut(BaseModel):
    """A conversation as admins see it, with the trace of how it was classified."""

    id: uuid.UUID
    account: str
    business_number: str
    customer: str
    workstream: str
    state: ConversationState
    queue: str | None
    skills: dict[str, Any]
    priority: int
    severity: str
    language: str | None
    variables: dict[str, Any]
    classification: dict[str, Any] | None = Field(description="matched rules and why")
    agent_id: uuid.UUID | None
    opened_at: datetime
    queued_at: datetime | None
    assigned_at: datetime | None
    closed_at: datetime | None
    close_reason: str | None = None
    last_customer_message_at: datetime
    wait_seconds: float | None = Field(
        description="queued or offered: how long since it was queued; otherwise null"
    )
    declined_by: list[uuid.UUID] = Field(
        description="the agents not offered it again this round: they declined it or let the"
        " offer expire, or it was moved away from them"
    )


class ConversationDetail(ConversationOut):
    messages: list[MessageOut] = Field(description="in the order the router received them")


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorBody(BaseModel):
    """Every API error: ``{"error": {"code", "message", "details"}}``."""

    error: ErrorDetail


class TransferRequest(BaseModel):
    """``POST /api/conversations/{id}/transfer``: to a queue, or offered to one agent."""

    model_config = ConfigDict(extra="forbid")

    queue: str | None = Field(default=None, description="the queue to put it in")
    agent_id: uuid.UUID | None = Field(default=None, description="the agent to offer it to")

    @model_validator(mode="after")
    def _one_target(self) -> TransferRequest:
        if (self.queue is None) == (self.agent_id is None):
            raise ValueError("name either the queue or the agent_id to transfer to")
        return self


Reason = Annotated[str, Field(min_length=1, max_length=500, description="why, for the audit")]


class SupervisorTransfer(TransferRequest):
    """``POST /api/admin/conversations/{id}/transfer``: any open conversation to a queue, or
    offered to one agent."""

    reason: Reason | None = None


class SupervisorClose(BaseModel):
    """``POST /api/admin/conversations/{id}/close``."""

    model_config = ConfigDict(extra="forbid")

    reason: Reason | None = None


class EndedOffer(BaseModel):
    """An offer a supervisor ended: the conversation is back in its queue."""

    offer_id: uuid.UUID
    conversation_id: uuid.UUID
    state: Literal["queued"]


class CloseRequest(BaseModel):
    """``POST /api/conversations/{id}/close``."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="agent", min_length=1, max_length=100)


class VariablesUpdate(BaseModel):
    """``PATCH …/variables``: context variables to set (a null value removes one)."""

    model_config = ConfigDict(extra="forbid")

    variables: dict[str, str | int | float | bool | None] = Field(min_length=1, max_length=50)


class VariablesOut(BaseModel):
    conversation_id: uuid.UUID
    variables: dict[str, Any]


class SurveyOut(BaseModel):
    conversation_id: uuid.UUID
    workstream: str
    customer: str
    asked_at: datetime
    expires_at: datetime
    rating: int | None = None
    comment: str | None = None
    answered_at: datetime | None = None


class SurveyResults(BaseModel):
    """``GET /api/admin/surveys``: the answers and their summary."""

    asked: int
    answered: int
    average_rating: float | None
    surveys: list[SurveyOut]


# What the agent API and the health checks answer: the handlers serialize through these,
# so the answer and the OpenAPI document cannot drift. Optional fields with a default are
# the ones an answer may leave out (dumped with ``exclude_unset``).


class Window(BaseModel):
    """WhatsApp's 24-hour customer-service window."""

    open: bool
    closes_at: datetime


class AgentProfile(BaseModel):
    """The calling agent."""

    id: uuid.UUID
    name: str
    language: str | None
    queues: list[str]
    skills: dict[str, int]
    capacity: int
    used: int
    presence: Presence


class Offer(BaseModel):
    """A pending offer of a conversation to the calling agent."""

    id: uuid.UUID
    conversation_id: uuid.UUID
    expires_at: datetime
    created_at: datetime
    queue: str | None
    customer: str
    customer_name: str | None = Field(
        default=None, description="the customer's WhatsApp profile name, when known"
    )
    priority: int
    skills: dict[str, int]


class OfferDecision(BaseModel):
    offer_id: uuid.UUID
    state: Literal["accepted", "declined"]
    conversation_id: uuid.UUID | None


class QueueItem(BaseModel):
    """A conversation waiting in a queue that the calling agent has the skills for."""

    id: uuid.UUID
    queue: str
    priority: int
    queued_at: datetime | None
    skills: dict[str, int]
    customer: str
    customer_name: str | None = Field(
        default=None, description="the customer's WhatsApp profile name, when known"
    )
    workstream: str
    units: int
    fits_capacity: bool


class ConversationMoved(BaseModel):
    """The state a pick, close, wait or transfer left the conversation in; a transfer also
    names where it went (the queue, or the agent it is offered to)."""

    conversation_id: uuid.UUID
    state: ConversationState
    queue: str | None = None
    agent_id: uuid.UUID | None = None


class ConversationSummary(BaseModel):
    id: uuid.UUID
    customer: str
    customer_name: str | None = Field(
        default=None, description="the customer's WhatsApp profile name, when known"
    )
    state: ConversationState
    queue: str | None
    priority: int
    assigned_at: datetime | None
    last_customer_message_at: datetime
    window_closed_at: datetime | None
    window: Window


class TemplateChoice(BaseModel):
    """A template of the conversation's workstream, as it would be sent in this
    conversation: approved templates may be sent whether the window is open or not."""

    name: str
    languages: list[str]
    language: str = Field(
        description="the language it is sent in here: the conversation's, else one of the"
        " same base language, else the template's default"
    )
    text: str = Field(description="its approved text in that language, placeholders as {{name}}")
    variables: list[str] = Field(
        description="the placeholders to fill, in order of first appearance"
    )


class RuleHit(BaseModel):
    """A rule that matched when the conversation was classified, and its condition."""

    ruleset: str
    rule: str
    why: str


class ClassificationTrace(BaseModel):
    """Why the conversation is in its queue: the rules that matched and the routing rule."""

    matched: list[RuleHit]
    route: RuleHit | None
    fallback: bool = Field(description="no routing rule matched: the workstream's fallback queue")


class AttachmentPolicy(BaseModel):
    """What the workstream takes: attachments from customers, and from agents."""

    customers: bool
    agents: bool


class AgentConversation(BaseModel):
    """One of the calling agent's conversations, with the templates usable in it."""

    id: uuid.UUID
    account: str
    business_number: str
    customer: str
    workstream: str
    state: ConversationState
    queue: str | None
    agent_id: uuid.UUID
    skills: dict[str, int]
    priority: int
    severity: str
    language: str | None
    variables: dict[str, Any]
    opened_at: datetime
    assigned_at: datetime | None
    last_customer_message_at: datetime
    window_closed_at: datetime | None
    profile_name: str | None
    window: Window
    templates: list[TemplateChoice]
    wrap_up_until: datetime | None = Field(
        description="in wrap-up: when it ends and the conversation closes; otherwise null"
    )
    attachments: AttachmentPolicy
    classification: ClassificationTrace | None = Field(
        description="the rules that placed it; null if it was never classified"
    )


class AgentMessage(BaseModel):
    id: uuid.UUID
    direction: Literal["inbound", "outbound"]
    sender: Literal["customer", "agent", "automated", "bot"] = Field(
        description="who wrote it: the customer, an agent, the workstream's bot, or the"
        " router (greeting, survey, overflow and the other automated messages)"
    )
    agent_id: uuid.UUID | None = Field(description="the agent who sent it (outbound)")
    kind: str = Field(description="text | media | template | system (automated)")
    template: str | None = Field(description="the template's name, when one was sent")
    body: str
    media: list[dict[str, Any]]
    status: str
    error_code: str | None
    error_message: str | None = Field(description="why it was rejected, skipped or failed")
    status_history: list[StatusStep] = Field(description=STATUS_HISTORY)
    twilio_sid: str | None = Field(description=TWILIO_SID)
    button_payload: str | None = Field(default=None, description=BUTTON_PAYLOAD)
    button_text: str | None = Field(default=None, description=BUTTON_TEXT)
    received_at: datetime
    media_hidden: int | None = Field(
        default=None,
        description="how many attachments the customer sent that this workstream does not"
        " take (then ``media`` is empty); absent otherwise",
    )


class MessageAccepted(BaseModel):
    """The message is stored and handed to the outbound stage."""

    id: uuid.UUID
    status: Literal["requested"]
    window: Window


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "degraded", "unavailable"]
    broker: bool
    database: bool
