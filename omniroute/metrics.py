"""Prometheus metrics shared by the router and the stages (one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

WEBHOOKS = Counter(
    "omniroute_webhooks_total", "Twilio webhooks by kind and outcome", ["kind", "outcome"]
)
WEBHOOK_DURATION = Histogram(
    "omniroute_webhook_duration_seconds", "Webhook handling time", ["kind"]
)
PUBLISH_CONFIRM = Histogram(
    "omniroute_publish_confirm_seconds", "Time from publish to the broker's confirm"
)
STAGE_MESSAGES = Counter(
    "omniroute_stage_messages_total", "Messages handled per stage and outcome", ["stage", "outcome"]
)
STAGE_DURATION = Histogram(
    "omniroute_stage_duration_seconds", "Time to handle one message per stage", ["stage"]
)
TWILIO_CALLS = Histogram(
    "omniroute_twilio_request_seconds", "Twilio Messages API calls by outcome", ["outcome"]
)
TWILIO_ERRORS = Counter(
    "omniroute_twilio_errors_total", "Twilio error codes answered to sends", ["code"]
)
GATE_REJECTIONS = Counter(
    "omniroute_gate_rejections_total", "Messages the 24-hour gate refused, by reason", ["reason"]
)
ASSIGNMENTS = Counter(
    "omniroute_assignments_total", "Offers and assignments made by distribution", ["kind"]
)
