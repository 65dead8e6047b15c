-- Lifecycle: durable timers (idle reminder, auto-close, end of wrap-up, survey expiry),
-- wrap-up, surveys and sandbox joins.
CREATE TABLE timers (
    id               uuid PRIMARY KEY,
    conversation_id  uuid NOT NULL REFERENCES conversations (id),
    kind             text NOT NULL,
    due_at           timestamptz NOT NULL,
    fired_at         timestamptz
);
-- One pending timer of a kind per conversation: rescheduling is an upsert.
CREATE UNIQUE INDEX timers_one_pending ON timers (conversation_id, kind) WHERE fired_at IS NULL;
CREATE INDEX timers_due ON timers (due_at) WHERE fired_at IS NULL;

ALTER TABLE conversations ADD COLUMN wrap_up_until timestamptz;

ALTER TABLE contacts ADD COLUMN sandbox_joined_at timestamptz;

CREATE TABLE surveys (
    conversation_id  uuid PRIMARY KEY REFERENCES conversations (id),
    account          text NOT NULL,
    business_number  text NOT NULL,
    customer         text NOT NULL,
    workstream       text NOT NULL,
    asked_at         timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL,
    rating           integer,
    comment          text,
    answered_at      timestamptz
);
CREATE INDEX surveys_open ON surveys (account, business_number, customer, expires_at)
    WHERE answered_at IS NULL;
