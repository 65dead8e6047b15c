-- The trace of a conversation: the correlation id of the event that opened it (born from
-- the first webhook's MessageSid) and the id of the last event that changed its state, so
-- work done later without that event in hand (a distribution cycle, an agent's accept)
-- still carries the same correlation and names its cause. Nullable without a default:
-- adding them rewrites nothing (rows from before read as "correlated by conversation id").
ALTER TABLE conversations
    ADD COLUMN correlation_id text,
    ADD COLUMN last_event_id text;
