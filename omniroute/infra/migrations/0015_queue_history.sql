-- The supervisor's waiting history (GET /api/admin/queues/history) is derived from the rows
-- conversations already keep (queued_at, assigned_at, closed_at) instead of a table of
-- per-minute samples: a sample table needs a writer running every minute (and is empty
-- after any gap); the rows are always there. Conversations that may have waited in the last
-- hours are the open ones (conversations_one_open, partial) and those closed since the
-- window began: found by when they closed, so a year of closed history is never read.
-- Only closed rows, keyed by the close: the UPDATE that closes a conversation changes its
-- state (already indexed, never a HOT update), so this costs one index entry more per close.
CREATE INDEX conversations_closed ON conversations (closed_at) WHERE state = 'closed';
