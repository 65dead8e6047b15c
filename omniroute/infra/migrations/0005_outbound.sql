-- Outbound messages: what was asked, what the gate said, the Twilio send and its retries.
ALTER TABLE messages
    ADD COLUMN agent_id         uuid REFERENCES agents (id),
    ADD COLUMN kind             text NOT NULL DEFAULT 'text',      -- text | media | template
    ADD COLUMN template         jsonb,                             -- name, language, sid, variables
    ADD COLUMN attempts         integer NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at  timestamptz,                       -- durable retry timer
    ADD COLUMN error_message    text;
CREATE INDEX messages_due_retry ON messages (next_attempt_at) WHERE status = 'retrying';

-- Twilio said 63016 (window closed) after the customer's last message: the gate believes it.
ALTER TABLE conversations ADD COLUMN window_closed_at timestamptz;

-- Per-sender send pacing shared by every outbound replica (GCRA: the next free slot).
CREATE TABLE sender_pacing (
    sender        text PRIMARY KEY,
    next_free_at  timestamptz NOT NULL
);
