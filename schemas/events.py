"""The event contract: one envelope for every event on the `omniroute.events` exchange.

`type` is the routing key. Consumers tolerate unknown fields (``extra="allow"`` on data
models), and a breaking change of a payload bumps ``version``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

EXCHANGE = "omniroute.events"
DEAD_LETTER_EXCHANGE = "omniroute.dead"

# Deterministic event ids: uuid5 over a natural key, so a retried webhook or a redelivered
# event yields the same id and downstream services can dedup on it.
EVENT_NAMESPACE = uuid.UUID("6f1f5a0e-8f0b-4f55-9a3e-3c1d7f0a9b21")


class EventType(StrEnum):
    MESSAGE_RECEIVED = "message.received"
    MESSAGE_STATUS = "message.status"
    CONVERSATION_OPENED = "conversation.opened"
    CONVERSATION_CLASSIFIED = "conversation.classified"
    CONVERSATION_QUEUED = "conversation.queued"
    CONVERSATION_OFFERED = "conversation.offered"
    CONVERSATION_ASSIGNED = "conversation.assigned"
    CONVERSATION_TRANSFERRED = "conversation.transferred"
    CONVERSATION_CLOSED = "conversation.closed"
    MESSAGE_SEND_REQUESTED = "message.send-requested"
    MESSAGE_SENT = "message.sent"
    MESSAGE_REJECTED = "message.rejected"
    MESSAGE_FAILED = "message.failed"
    MESSAGE_DELIVERED = "message.delivered"
    MESSAGE_READ = "message.read"
    AGENT_PRESENCE_CHANGED = "agent.presence-changed"
    OFFER_DECLINED = "offer.declined"
    OFFER_EXPIRED = "offer.expired"
    CONFIG_RELOAD_REQUESTED = "config.reload-requested"
    CONFIG_RELOAD_ANSWERED = "config.reload-answered"
    CONVERSATION_ENDED = "conversation.ended"
    CONVERSATION_REOPENED = "conversation.reopened"
    CONVERSATION_WAITING = "conversation.waiting"
    SURVEY_ANSWERED = "survey.answered"
    SANDBOX_JOINED = "sandbox.joined"
    CONVERSATION_OVERFLOWED = "conversation.overflowed"
    SUPERVISOR_ACTED = "supervisor.acted"
    CONVERSATION_BOT_STARTED = "conversation.bot-started"
    BOT_REPLIED = "bot.replied"
    CONVERSATION_ESCALATED = "conversation.escalated"


def event_id(*natural_key: str) -> str:
    """A deterministic event id for a natural key (same key, same id)."""
    return str(uuid.uuid5(EVENT_NAMESPACE, "\x1f".join(natural_key)))


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_event(
    type: str,
    *,
    account: str,
    key: tuple[str, ...],
    data: dict[str, Any],
    occurred_at: datetime,
    conversation_id: str | None = None,
    correlation_id: str | None = None,
    causation_id: str | None = None,
) -> Envelope:
    """An event whose id derives from its natural key (e.g. the offer it is about)."""
    eid = event_id(type, *key)
    return Envelope(
        id=eid,
        type=type,
        occurred_at=occurred_at,
        account=account,
        conversation_id=conversation_id,
        correlation_id=correlation_id or conversation_id or eid,
        causation_id=causation_id,
        data=data,
    )


class Envelope(BaseModel):
    """Every event on the bus. ``data`` is the type-specific payload."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(
        description="The event's id; deterministic (uuid5 over a natural key) where one exists, "
        "so a retried cause yields the same id: consumers dedup on it"
    )
    type: str = Field(
        description="The routing key (e.g. conversation.assigned); names the schema of `data`"
    )
    version: int = Field(
        default=1, description="The version of this type's payload; a breaking change bumps it"
    )
    occurred_at: datetime = Field(description="When it happened (ISO 8601, UTC)")
    account: str = Field(
        description="The configured Twilio account it belongs to; `*` for events about no "
        "single account (agent presence, configuration reloads)"
    )
    conversation_id: str | None = Field(
        default=None, description="The conversation it is about, once there is one"
    )
    correlation_id: str = Field(
        description="Shared by every event one cause sets off: born from the webhook's "
        "MessageSid (or the first event's id) and carried through to the assignment"
    )
    causation_id: str | None = Field(
        default=None,
        description="The id of the event whose handling produced this one; null when the "
        "cause is outside the bus (a webhook, an API call, a timer)",
    )
    data: dict[str, Any] = Field(
        default_factory=dict,
        description="The payload of this type: the component schema named after it",
    )

    def caused(
        self,
        type: str,
        data: dict[str, Any],
        *,
        conversation_id: str | None = None,
        version: int = 1,
        occurred_at: datetime | None = None,
    ) -> Envelope:
        """A follow-up event: same account and correlation, caused by this one.

        The id is derived from this event's id and the new type, so handling the same
        event twice produces the same follow-up event id.
        """
        return Envelope(
            id=event_id(self.id, type),
            type=type,
            version=version,
            occurred_at=occurred_at or utcnow(),
            account=self.account,
            conversation_id=conversation_id or self.conversation_id,
            correlation_id=self.correlation_id,
            causation_id=self.id,
            data=data,
        )


class Media(BaseModel):
    model_config = ConfigDict(extra="allow")

    url: str
    content_type: str | None = None


class MessageReceived(BaseModel):
    """``message.received``: a customer's WhatsApp message, as the router accepted it."""

    model_config = ConfigDict(extra="allow")

    message_sid: str
    account_sid: str
    business_number: str = Field(description="E.164 of our WhatsApp sender, e.g. +5511999990000")
    number_name: str
    workstream: str
    customer: str = Field(
        description="the sender address without the channel prefix (+E164 or business-scoped id)"
    )
    customer_wa_id: str | None = None
    external_user_id: str | None = None
    profile_name: str | None = None
    body: str = ""
    media: list[Media] = Field(default_factory=list)
    message_type: str | None = None
    button_text: str | None = None
    button_payload: str | None = None
    location: dict[str, str] | None = None
    replied_to_sid: str | None = None
    sandbox: bool = False
    received_at: datetime
    form: dict[str, str | list[str]] = Field(
        default_factory=dict, description="every field Twilio posted, known or not"
    )


class MessageStatus(BaseModel):
    """``message.status``: a delivery status callback, as the router accepted it."""

    model_config = ConfigDict(extra="allow")

    message_sid: str
    account_sid: str | None = None
    status: str
    error_code: str | None = None
    error_message: str | None = None
    received_at: datetime
    form: dict[str, str | list[str]] = Field(default_factory=dict)


class ConversationOpened(BaseModel):
    """``conversation.opened``: the first message of a customer opened a conversation."""

    model_config = ConfigDict(extra="allow")

    conversation_id: str
    contact_id: str
    business_number: str
    customer: str
    workstream: str
    profile_name: str | None = None
    first_message_id: str
    first_message_sid: str
    first_message_body: str = ""
    has_media: bool = False
    media_count: int = 0
    opened_at: datetime


class RuleMatch(BaseModel):
    model_config = ConfigDict(extra="allow")

    ruleset: str
    rule: str
    why: str


class ConversationClassified(BaseModel):
    """``conversation.classified``: what the rules decided, and which rules matched why."""

    model_config = ConfigDict(extra="allow")

    workstream: str
    queue: str
    skills: dict[str, int] = Field(default_factory=dict)
    priority: int = 0
    severity: str = "normal"
    language: str
    variables: dict[str, Any] = Field(default_factory=dict)
    matched: list[RuleMatch] = Field(default_factory=list)
    route: RuleMatch | None = None
    fallback: bool = False
    out_of_hours: bool = False
    out_of_hours_action: str | None = None
    notes: list[str] = Field(default_factory=list)
    classified_at: datetime


class ConversationQueued(BaseModel):
    """``conversation.queued``: the conversation waits in a queue for an agent."""

    model_config = ConfigDict(extra="allow")

    queue: str
    workstream: str
    skills: dict[str, int] = Field(default_factory=dict)
    priority: int = 0
    language: str
    out_of_hours: bool = False
    queued_at: datetime


class ConversationClosed(BaseModel):
    """``conversation.closed``: the conversation ended (by an agent, a timer or a rule)."""

    model_config = ConfigDict(extra="allow")

    reason: str
    workstream: str
    automated_message: str | None = None
    closed_at: datetime


class ConversationOffered(BaseModel):
    """``conversation.offered``: one agent is offered the conversation until ``expires_at``."""

    model_config = ConfigDict(extra="allow")

    offer_id: str
    agent_id: str
    queue: str
    units: int
    affinity: bool = False
    expires_at: datetime


class ConversationAssigned(BaseModel):
    """``conversation.assigned``: an agent has the conversation (accepted, auto, picked)."""

    model_config = ConfigDict(extra="allow")

    agent_id: str
    assignment_id: str
    queue: str | None = None
    via: str = Field(description="offer | auto-accept | pick | transfer")
    assigned_at: datetime


class OfferEnded(BaseModel):
    """``offer.declined`` / ``offer.expired``: the offer is gone; the work goes back to queue."""

    model_config = ConfigDict(extra="allow")

    offer_id: str
    agent_id: str
    queue: str | None = None
    ended_by: str | None = Field(
        default=None, description="the supervisor who ended the offer (then offer.expired)"
    )


class OfferDeclined(OfferEnded):
    """``offer.declined``: the agent declined the offer; the work goes back to its queue."""


class OfferExpired(OfferEnded):
    """``offer.expired``: nobody accepted the offer in time; the work goes back to its queue."""


class ConversationTransferred(BaseModel):
    """``conversation.transferred``: moved to another queue or agent."""

    model_config = ConfigDict(extra="allow")

    from_queue: str | None = None
    to_queue: str | None = None
    from_agent: str | None = None
    to_agent: str | None = None
    transferred_at: datetime
    reason: str | None = Field(
        default=None,
        description="why, when not the agent's own choice: agent_removed, agent_offline,"
        " overflow, supervisor",
    )
    by: str | None = Field(default=None, description="the supervisor who moved it, if one did")


class ConversationOverflowed(BaseModel):
    """``conversation.overflowed``: a queue's overflow rule applied to the conversation."""

    model_config = ConfigDict(extra="allow")

    queue: str = Field(description="the queue that overflowed")
    condition: Literal["max_waiting", "max_wait", "no_agents"] = Field(
        description="max_waiting: too many waiting when it arrived; max_wait: it waited"
        " too long; no_agents: nobody of the queue was available when it arrived"
    )
    action: Literal["transfer", "message", "end"]
    to_queue: str | None = Field(default=None, description="for transfer: where it went")
    waiting: int | None = Field(default=None, description="conversations waiting, counted")
    waited_seconds: float | None = None
    overflowed_at: datetime


class SupervisorActed(BaseModel):
    """``supervisor.acted``: the audit record of a supervisor's action."""

    model_config = ConfigDict(extra="allow")

    actor: str = Field(description="who: the X-Omniroute-Actor header, or 'admin'")
    action: Literal["transfer", "close", "end_offer", "set_presence", "remove_agent"]
    conversation_id: str | None = None
    offer_id: str | None = None
    agent_id: str | None = None
    to_queue: str | None = None
    to_agent: str | None = None
    presence: str | None = None
    reason: str | None = None
    acted_at: datetime


class AgentPresenceChanged(BaseModel):
    """``agent.presence-changed``."""

    model_config = ConfigDict(extra="allow")

    agent_id: str
    presence: str
    previous: str | None = None
    queues: list[str] = Field(default_factory=list)


class MessageSendRequested(BaseModel):
    """``message.send-requested``: a stored outbound message waits for the gate and Twilio."""

    model_config = ConfigDict(extra="allow")

    message_id: str
    agent_id: str | None = None
    kind: str = Field(description="text | media | template | system")
    requested_at: datetime
    automated: str | None = Field(
        default=None,
        description="the automated message it sends (greeting, closed, idle_reminder, …), "
        "for kind system",
    )


class MessageRejected(BaseModel):
    """``message.rejected``: not sent, and why (e.g. window_closed, with usable templates)."""

    model_config = ConfigDict(extra="allow")

    message_id: str
    reason: str
    message: str | None = None
    templates: list[str] = Field(default_factory=list)
    error_code: str | None = None


class MessageOutcome(BaseModel):
    """``message.sent`` / ``delivered`` / ``read`` / ``failed``: a delivery step."""

    model_config = ConfigDict(extra="allow")

    message_id: str
    message_sid: str | None = None
    status: str
    error_code: str | None = None
    error_message: str | None = None


class MessageSent(MessageOutcome):
    """``message.sent``: the message reached the sent step (Twilio handed it to WhatsApp)."""


class MessageDelivered(MessageOutcome):
    """``message.delivered``: WhatsApp delivered the message to the customer's phone."""


class MessageRead(MessageOutcome):
    """``message.read``: the customer read the message."""


class MessageFailed(MessageOutcome):
    """``message.failed``: Twilio refused the message or could not deliver it, with its error."""


class ConversationEnded(BaseModel):
    """``conversation.ended``: the agent ended it; wrap-up holds capacity until ``until``."""

    model_config = ConfigDict(extra="allow")

    agent_id: str | None = None
    workstream: str
    until: datetime


class SurveyAnswered(BaseModel):
    """``survey.answered``: the customer's reply to the post-conversation survey."""

    model_config = ConfigDict(extra="allow")

    rating: int | None = None
    comment: str | None = None
    answered_at: datetime


class ConversationReopened(BaseModel):
    """``conversation.reopened``: the customer wrote within the reopen period after a close."""

    model_config = ConfigDict(extra="allow")

    reopened_at: datetime
    workstream: str


class ConversationWaiting(BaseModel):
    """``conversation.waiting``: the agent parked it until the customer writes."""

    model_config = ConfigDict(extra="allow")

    agent_id: str
    waiting_since: datetime


class SandboxJoined(BaseModel):
    """``sandbox.joined``: a customer sent ``join <code>`` to Twilio's sandbox number."""

    model_config = ConfigDict(extra="allow")

    customer: str
    business_number: str
    code: str
    joined_at: datetime


class ConversationBotStarted(BaseModel):
    """``conversation.bot-started``: a new conversation of a workstream with a bot is the
    bot's until it escalates; no queue, no agent meanwhile."""

    model_config = ConfigDict(extra="allow")

    workstream: str
    bot_url: str = Field(description="the bot's origin (scheme, host, port): never its path")
    started_at: datetime


class BotReplied(BaseModel):
    """``bot.replied``: the bot answered a customer message (its messages are on their way
    to the customer through the outbound stage)."""

    model_config = ConfigDict(extra="allow")

    message_id: str = Field(description="the customer message the bot answered")
    turn: int = Field(description="1 for the bot's first answer in the conversation")
    texts: list[str] = Field(default_factory=list, description="the text bodies sent")
    media: int = Field(default=0, description="images sent")
    buttons: int = Field(default=0, description="buttons offered (as numbered text)")
    handoff: bool = Field(default=False, description="the bot handed the conversation off")
    latency_ms: float = Field(description="the bot call, retries included")
    replied_at: datetime


EscalationReason = Literal["bot", "customer_asked", "max_turns", "bot_error", "bot_unavailable"]


class ConversationEscalated(BaseModel):
    """``conversation.escalated``: the bot is done with the conversation; classification
    takes it as a new one, with what the bot collected."""

    model_config = ConfigDict(extra="allow")

    workstream: str
    reason: EscalationReason = Field(
        description="bot: the bot handed off; customer_asked: a hand-off keyword;"
        " max_turns: the bot answered max_turns times; bot_error: the bot failed;"
        " bot_unavailable: the conversation was at a bot its workstream no longer has"
    )
    detail: str | None = Field(
        default=None, description="e.g. 'timeout after 10 s', 'HTTP 503', 'invalid answer: …'"
    )
    variables: dict[str, Any] = Field(
        default_factory=dict, description="merged into the conversation's context"
    )
    skills: dict[str, int] = Field(default_factory=dict, description="the bot's skills hint")
    priority: int | None = Field(default=None, description="the bot's priority hint")
    queue: str | None = Field(default=None, description="the bot's queue hint")
    turns: int = Field(default=0, description="bot answers before the escalation")
    escalated_at: datetime


class SystemEvent(BaseModel):
    """Events about the deployment rather than a conversation (e.g. reload requests)."""

    model_config = ConfigDict(extra="allow")


class ConfigReloadRequested(SystemEvent):
    """``config.reload-requested``: every process reloads its configuration and answers."""

    reply_to: str | None = Field(
        default=None,
        description="the queue (default exchange) each process sends its "
        "config.reload-answered to, with the request's correlation_id; also the message's "
        "AMQP reply_to property. Without it, answers go only to the events exchange",
    )


class ConfigReloadAnswered(SystemEvent):
    """``config.reload-answered``: what one process did with a reload: applied, or refused
    and why.

    Sent to the request's ``reply_to`` queue (correlation_id: the request's) and published on
    the events exchange for anyone watching, also after a reload by SIGHUP. ``error`` holds
    the configuration's problems (file, line, field); never a secret's value.
    """

    process: str = Field(description="host:pid:role, as an operator reads it")
    process_id: str = Field(description="the process's row in the registry (host:pid:start)")
    role: str = Field(description="run, serve or consume")
    stages: list[str] = Field(default_factory=list, description="the stages it runs")
    applied: bool = Field(
        description="whether it runs the new configuration now with its stages' queues bound"
        " for it (false when it refused, or runs it but a stage could not bind: see error)"
    )
    hash: str = Field(description="the configuration hash it runs after the reload")
    previous_hash: str = Field(description="the configuration hash it ran before")
    error: str | None = Field(
        default=None, description="why it refused: the problems, one a line; null if applied"
    )
    answered_at: datetime


PAYLOADS: dict[str, type[BaseModel]] = {
    EventType.MESSAGE_RECEIVED: MessageReceived,
    EventType.MESSAGE_STATUS: MessageStatus,
    EventType.CONVERSATION_OPENED: ConversationOpened,
    EventType.CONVERSATION_CLASSIFIED: ConversationClassified,
    EventType.CONVERSATION_QUEUED: ConversationQueued,
    EventType.CONVERSATION_CLOSED: ConversationClosed,
    EventType.CONVERSATION_OFFERED: ConversationOffered,
    EventType.CONVERSATION_ASSIGNED: ConversationAssigned,
    EventType.CONVERSATION_TRANSFERRED: ConversationTransferred,
    EventType.OFFER_DECLINED: OfferDeclined,
    EventType.OFFER_EXPIRED: OfferExpired,
    EventType.AGENT_PRESENCE_CHANGED: AgentPresenceChanged,
    EventType.MESSAGE_SEND_REQUESTED: MessageSendRequested,
    EventType.MESSAGE_REJECTED: MessageRejected,
    EventType.MESSAGE_SENT: MessageSent,
    EventType.MESSAGE_DELIVERED: MessageDelivered,
    EventType.MESSAGE_READ: MessageRead,
    EventType.MESSAGE_FAILED: MessageFailed,
    EventType.CONFIG_RELOAD_REQUESTED: ConfigReloadRequested,
    EventType.CONFIG_RELOAD_ANSWERED: ConfigReloadAnswered,
    EventType.CONVERSATION_ENDED: ConversationEnded,
    EventType.SURVEY_ANSWERED: SurveyAnswered,
    EventType.CONVERSATION_REOPENED: ConversationReopened,
    EventType.CONVERSATION_WAITING: ConversationWaiting,
    EventType.SANDBOX_JOINED: SandboxJoined,
    EventType.CONVERSATION_OVERFLOWED: ConversationOverflowed,
    EventType.SUPERVISOR_ACTED: SupervisorActed,
    EventType.CONVERSATION_BOT_STARTED: ConversationBotStarted,
    EventType.BOT_REPLIED: BotReplied,
    EventType.CONVERSATION_ESCALATED: ConversationEscalated,
}
