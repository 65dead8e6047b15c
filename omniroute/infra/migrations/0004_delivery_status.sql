-- Every status callback received for a message, in arrival order (unknown statuses too).
ALTER TABLE messages ADD COLUMN status_history jsonb NOT NULL DEFAULT '[]';
