"""Process settings: one pydantic-settings class, built in ``main()`` and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AnyHttpUrl, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every environment variable omniroute reads, with its default.

    Limits, timeouts and retry bounds are settings too, so operators can tune them without
    a code change.
    """

    model_config = SettingsConfigDict(env_prefix="OMNIROUTE_", extra="ignore")

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    database_url: SecretStr = SecretStr("postgresql://127.0.0.1:5432/omniroute")
    config: Path = Path("omniroute.yaml")
    public_url: AnyHttpUrl = AnyHttpUrl("http://127.0.0.1:8080")
    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8080, ge=0, le=65535)
    log_format: Literal["json", "console"] = "json"
    log_level: str = "info"
    admin_token: SecretStr | None = None
    twilio_api_url: AnyHttpUrl = AnyHttpUrl("https://api.twilio.com")
    rabbitmq_api_url: AnyHttpUrl | None = Field(
        default=None, description="management API for `omniroute status` (default: host:15672)"
    )

    # API
    idempotency_wait: float = Field(
        default=5.0,
        gt=0,
        description="a retry waits this long, s, for the request holding its Idempotency-Key"
        " (a double click gets the first answer), then 409",
    )

    session_ttl: float = Field(
        default=12 * 3600.0,
        gt=0,
        description="a console session (cookie) ends this long after sign-in, s",
    )

    # Ingress
    max_body_bytes: int = Field(default=64 * 1024, gt=0)
    # Twilio signs webhooks with the account's primary auth token. Rotation is two steps:
    # create a secondary token, then promote it, which deletes the old primary at once
    # (https://www.twilio.com/docs/iam/api/authtoken, .../iam/api/secondary_authtoken), and
    # Twilio says a token change takes about a minute to propagate on its side. Whichever
    # order the operator swaps our secret file and promotes in Twilio's console, webhooks
    # signed with the old token keep arriving for a while (in flight, propagation, the time
    # between our reload and the click): 15 minutes covers that with room, and stays short,
    # since a rotation after a leak keeps the leaked token good for just as long (0: none).
    token_rotation_overlap: float = Field(
        default=900.0,
        ge=0,
        description="after a reload changes an account's auth token, webhooks signed with the"
        " previous one are still accepted this long, s",
    )
    publish_timeout: float = Field(
        default=1.0, gt=0, description="stages: confirm wait, s, then the outbox relay retries"
    )
    # Twilio waits 15 s for an answer and does not retry a 5xx: a webhook waits for the
    # broker's confirm at most this long, and is spooled in PostgreSQL after the short wait.
    ingress_confirm_timeout: float = Field(
        default=8.0, gt=0, lt=15, description="webhooks: longest confirm wait, s"
    )
    ingress_spool_after: float = Field(
        default=0.5, gt=0, description="webhooks: a confirm slower than this spools it, s"
    )
    spool_relay_interval: float = Field(default=0.2, gt=0, description="spool relay poll, s")
    spool_relay_batch: int = Field(default=500, ge=1, description="spooled webhooks per publish")
    broker_connect_timeout: float = Field(default=2.0, gt=0)
    broker_reconnect_interval: float = Field(default=1.0, gt=0, description="after a drop, s")
    broker_retry_max: float = Field(default=5.0, gt=0, description="max reconnect backoff, s")

    # Consumers
    prefetch: int = Field(default=32, ge=1)
    delivery_limit: int = Field(default=5, ge=1, le=20, description="≤ the broker's limit")
    retry_backoff_base: float = Field(default=0.2, gt=0)
    retry_backoff_max: float = Field(default=10.0, gt=0)
    shutdown_grace: float = Field(default=20.0, gt=0)
    tick_interval: float = Field(
        default=0.25, gt=0, description="timers and sweeps (offer expiry), s"
    )
    distribution_block: int = Field(default=100, ge=1, description="work items per cycle")
    outbox_relay_interval: float = Field(
        default=1.0, gt=0, description="outbox relay: look without a NOTIFY this often, s"
    )
    outbox_relay_batch: int = Field(default=500, ge=1, description="events per relay publish")
    outbox_confirm_timeout: float = Field(
        default=10.0, gt=0, description="the relay waits this long for a batch's confirms, s"
    )
    outbox_leader_poll: float = Field(
        default=1.0, gt=0, description="a standby relay tries to become the leader this often, s"
    )
    outbox_leader_step_down: float = Field(
        default=10.0,
        gt=0,
        description="a leader that cannot reach the broker this long lets a standby lead, s",
    )
    outbox_retention: float = Field(
        default=3600.0, ge=0, description="published outbox rows kept this long, s"
    )
    outbox_prune_interval: float = Field(default=60.0, gt=0)

    # Outbound (Twilio sends)
    twilio_timeout: float = Field(default=15.0, gt=0, description="per Twilio API call, s")
    send_attempts: int = Field(default=5, ge=1, description="then message.failed")
    send_backoff_base: float = Field(default=1.0, gt=0)
    send_backoff_max: float = Field(default=60.0, gt=0)
    send_order_wait: float = Field(
        default=60.0,
        ge=0,
        description="a message waits at most this long for an earlier one of its"
        " conversation to be handed to Twilio (0: no ordering), s",
    )
    send_interval: float = Field(
        default=0.0125, ge=0, description="per sender number: 80 messages/s"
    )

    # Reconciliation: Twilio does not retry a webhook or status callback answered 5xx, so what
    # never reached us is recovered from its Messages API (omniroute/reconcile.py).
    reconcile_interval: float = Field(
        default=60.0, ge=0, description="between passes, s; 0: no periodic passes"
    )
    reconcile_overlap: float = Field(
        default=300.0, ge=0, description="re-read the log this far before the checkpoint, s"
    )
    reconcile_lookback: float = Field(
        default=3600.0, gt=0, description="first pass (no checkpoint yet) reads this far back, s"
    )
    reconcile_status_age: float = Field(
        default=120.0, ge=0, description="outbound without status news this long is checked, s"
    )
    reconcile_status_max_age: float = Field(
        default=86400.0, gt=0, description="outbound older than this is no longer checked, s"
    )
    reconcile_status_batch: int = Field(
        default=500, ge=1, description="outbound statuses fetched per account and pass"
    )
    reconcile_reinject_after: float = Field(
        default=600,
        gt=0,
        description="s: an injected message not stored by then is injected again",
    )
    reconcile_page_size: int = Field(
        default=100, ge=1, le=1000, description="messages per page of Twilio's list"
    )
    reconcile_backoff_attempts: int = Field(
        default=5, ge=1, description="tries of one Twilio call rate-limited (429) per pass"
    )
    reconcile_backoff_base: float = Field(default=1.0, gt=0, description="first 429 wait, s")
    reconcile_backoff_max: float = Field(default=30.0, gt=0, description="longest 429 wait, s")

    # Status callbacks for a sid not stored yet: parked, retried, dropped after the grace.
    status_park_grace: float = Field(
        default=600.0, ge=0, description="retry a parked callback this long, then drop it, s"
    )
    status_park_backoff_base: float = Field(default=0.5, gt=0, description="first retry, s")
    status_park_backoff_max: float = Field(default=30.0, gt=0, description="longest wait, s")
    status_park_batch: int = Field(default=100, ge=1, description="parked callbacks per tick")

    # Database
    db_pool_min: int = Field(default=1, ge=0)
    db_pool_max: int = Field(default=10, ge=1)
    db_connect_timeout: float = Field(default=3.0, gt=0)

    def public_base(self) -> str:
        return str(self.public_url).rstrip("/")
