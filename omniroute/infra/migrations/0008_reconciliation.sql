-- Reconciliation with Twilio's message log, and status callbacks parked until their message
-- is known.

-- Per account and business number: Twilio's message log has been read up to here (a date_sent
-- of Twilio's, or the start of a pass that found nothing newer). The next pass reads from
-- here minus an overlap; it only ever moves forward.
CREATE TABLE reconcile_checkpoints (
    account          text NOT NULL,
    business_number  text NOT NULL,
    checked_until    timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account, business_number)
);

-- When the reconciler last asked Twilio for an outbound message's status. Checks get sparser
-- as a message ages (a WhatsApp user with read receipts off leaves it 'delivered' for good).
ALTER TABLE messages ADD COLUMN status_checked_at timestamptz;

-- Outbound messages whose status may still change: the reconciler's status sweep is a range
-- scan over the last day of this index. Sent messages leave it once final, so a year of
-- history stays out of it (except those that stay 'delivered', which the range skips).
CREATE INDEX messages_status_open ON messages (created_at)
    WHERE direction = 'outbound' AND twilio_sid IS NOT NULL
      AND status NOT IN ('read', 'failed', 'undelivered', 'canceled');

-- Status callbacks for a sid not stored yet (the callback beat the send's API answer, or a
-- Messaging Service called back about another application's message). Kept until the message
-- is stored, then applied as a fresh callback; dropped after a grace period.
CREATE TABLE parked_status (
    event_id     uuid PRIMARY KEY,           -- a callback delivered twice is parked once
    message_sid  text NOT NULL,
    body         jsonb NOT NULL,             -- the message.status event
    first_seen   timestamptz NOT NULL,
    due_at       timestamptz NOT NULL,
    attempts     integer NOT NULL DEFAULT 0
);
-- The status stage's tick takes due rows through this index (FOR UPDATE SKIP LOCKED).
CREATE INDEX parked_status_due ON parked_status (due_at);
