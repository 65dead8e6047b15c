-- Webhooks the broker could not confirm in time, kept durably so the router can answer
-- Twilio 200 (Twilio does not retry a 5xx by default: a refused webhook is a lost message).
-- A relay, elected by an advisory lock, publishes them in arrival order and deletes them;
-- the table stays as small as the backlog it holds.
CREATE TABLE ingress_spool (
    seq          bigserial PRIMARY KEY,
    event_id     uuid NOT NULL UNIQUE,      -- a webhook Twilio sent twice is spooled once
    routing_key  text NOT NULL,
    body         jsonb NOT NULL,
    spooled_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Not before: a webhook whose confirm may still come is left to its publisher until then.
    relay_after  timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Rows are inserted and deleted, never updated: let autovacuum keep up with the churn
-- (this server may run with autovacuum off; the setting is harmless then).
ALTER TABLE ingress_spool SET (autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 1000);
