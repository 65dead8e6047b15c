"""Prometheus metrics shared by the router and the stages (one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

WEBHOOKS = Counter(
    "omniroute_webhooks_total", "Twilio webhooks by kind and outcome", ["kind", "outcome"]
)
WEBHOOK_SIGNATURES = Counter(
    "omniroute_webhook_signatures_total",
    "Twilio webhook signature checks by account and the secret that signed: the current or"
    " previous (within the rotation overlap) auth token, a shared key, or none (refused 403)",
    ["account", "token"],
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
STAGE_QUEUE_WAIT = Histogram(
    "omniroute_stage_queue_wait_seconds",
    "Time from an event's occurrence to its stage taking it (queue wait plus publish)",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
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
SPOOLED = Counter(
    "omniroute_webhooks_spooled_total",
    "Webhooks kept in the PostgreSQL spool because the broker was away or slow, by reason",
    ["webhook", "reason"],
)
SPOOL_RELAYED = Counter(
    "omniroute_spool_relayed_total", "Spooled webhooks published to the broker by the relay"
)
SPOOL_CONFIRMED_LATE = Counter(
    "omniroute_spool_confirmed_late_total",
    "Spooled webhooks whose own publish was confirmed after all (removed from the spool)",
)
STATUS_CALLBACKS_FOREIGN = Counter(
    "omniroute_status_callbacks_foreign_total",
    "Parked status callbacks whose message never became known within the grace (dropped)",
)
RECONCILE_INJECTED = Counter(
    "omniroute_reconcile_injected_total",
    "Events rebuilt from Twilio's Messages API and published by reconciliation, by kind",
    ["kind"],
)
OUTBOX_RELAYED = Counter(
    "omniroute_outbox_relayed_total", "Outbox events published to the broker by the relay"
)
OUTBOX_PRUNED = Counter(
    "omniroute_outbox_pruned_total", "Published outbox rows deleted after the retention"
)
OUTBOX_LEADER = Gauge(
    "omniroute_outbox_relay_leader", "1 while this process is the deployment's outbox relay"
)
