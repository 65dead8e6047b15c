-- A bot before the agents (issue 14). A conversation of a workstream with a bot opens in
-- the state 'bot': no queue, no agent, until the bot hands it off (escalation moves it to
-- 'open', where classification takes it as any new conversation).
-- NOT VALID: the new check applies to every row written from now on without scanning a year of
-- history under this migration's ACCESS EXCLUSIVE lock; 0018 validates the old rows under a
-- SHARE UPDATE EXCLUSIVE lock, which lets reads and writes go on (PostgreSQL 15, ALTER TABLE:
-- "VALIDATE CONSTRAINT … only a SHARE UPDATE EXCLUSIVE lock on the table being altered").
ALTER TABLE conversations DROP CONSTRAINT conversations_state_check;
ALTER TABLE conversations ADD CONSTRAINT conversations_state_check
    CHECK (state IN ('bot', 'open', 'queued', 'offered', 'active', 'waiting', 'wrap-up', 'closed'))
    NOT VALID;

-- Why and with what the bot handed the conversation off (reason, detail, skills, priority,
-- queue, turns): classification reads it in the row it locks anyway.
ALTER TABLE conversations ADD COLUMN bot_handoff jsonb;

-- NULL: as before (customer, agent or the router's automated messages); 'bot': written by
-- the workstream's bot.
ALTER TABLE messages ADD COLUMN origin text;

-- One row per customer message the bot stage took: the idempotency record of the bot
-- call (a redelivered message finds its turn and asks nothing, or asks again with the same
-- message id when the process died during the call).
CREATE TABLE bot_turns (
    message_id       uuid PRIMARY KEY REFERENCES messages (id),
    conversation_id  uuid NOT NULL REFERENCES conversations (id),
    turn             int NOT NULL,
    state            text NOT NULL CHECK (state IN ('calling', 'answered', 'failed', 'skipped')),
    request          jsonb,
    answer           jsonb,
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    answered_at      timestamptz
);
CREATE INDEX bot_turns_conversation ON bot_turns (conversation_id, turn);
