-- Routing a supervisor can trust (issue 12).
-- last_declined_at: when the conversation's last offer was declined or expired; a new offer
--   round (declines forgotten) starts only reoffer_after later, so a decline does not bounce
--   straight back to the only eligible agent.
-- overflowed_at: when a queue's overflow rule applied; a conversation overflows once.
-- not_preferred: agents who declined, let expire or transferred away this conversation, or
--   were moved off it: affinity ("keep the same agent") never prefers them for it again.
-- Nullable or a constant default: adding them rewrites nothing.
ALTER TABLE conversations
    ADD COLUMN last_declined_at timestamptz,
    ADD COLUMN overflowed_at timestamptz,
    ADD COLUMN not_preferred uuid[] NOT NULL DEFAULT '{}';

-- An agent's open work, found by agent when the agent is removed or goes offline (and for
-- the supervisor's list by agent): only rows an agent holds, so the index stays small
-- however long the history.
CREATE INDEX conversations_agent ON conversations (agent_id)
    WHERE state IN ('offered', 'active', 'waiting', 'wrap-up');
