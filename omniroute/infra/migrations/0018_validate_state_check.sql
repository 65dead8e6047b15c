-- The state check of 0016, validated over the rows written before it (a migration of its own,
-- so its own transaction: the scan holds only SHARE UPDATE EXCLUSIVE on conversations, and
-- the stages keep reading and writing while it runs).
ALTER TABLE conversations VALIDATE CONSTRAINT conversations_state_check;
