-- Day 100: every statement on a hot path costs the same with a year of history as on day 1.

-- Affinity ("keep the same agent"): the agent a contact was last assigned to, kept in a
-- table of its own and read by primary key. It used to be searched among every assignment
-- of every conversation the contact ever had, per queued row, through no usable index.
-- Not a column of contacts: the conversations stage updates the contact row (locking it)
-- before its conversation, and an assignment locks the conversation first; writing the
-- contact there made the two deadlock.
CREATE TABLE contact_agents (
    contact_id   uuid PRIMARY KEY REFERENCES contacts (id),
    agent_id     uuid NOT NULL REFERENCES agents (id),
    assigned_at  timestamptz NOT NULL
);
INSERT INTO contact_agents (contact_id, agent_id, assigned_at)
SELECT DISTINCT ON (p.contact_id) p.contact_id, s.agent_id, s.assigned_at
FROM assignments s JOIN conversations p ON p.id = s.conversation_id
ORDER BY p.contact_id, s.assigned_at DESC;
-- Never used: no query stated its predicate. One index less on the busiest table.
DROP INDEX IF EXISTS conversations_contact;

-- The idle-timer guard ("did a timer of this kind already fire for this moment?") looks up
-- fired timers of one conversation instead of scanning every timer that ever fired.
CREATE INDEX timers_fired ON timers (conversation_id, kind, due_at) WHERE fired_at IS NOT NULL;

-- The outbox as a log. Stages and the API only INSERT; one relay in the deployment tails
-- the log in (txid, seq) order behind a stored watermark and publishes what it finds.
-- Rows are read only once every transaction that could still add a lower txid has ended
-- (txid < pg_snapshot_xmin(pg_current_snapshot())), so a slow transaction's rows are never
-- skipped and nothing is published twice by the relay. Published rows are pruned after
-- OMNIROUTE_OUTBOX_RETENTION seconds (the id stays there that long to recognise an event
-- written again by a redelivered cause).
ALTER TABLE outbox
    ADD COLUMN seq  bigserial,
    ADD COLUMN txid xid8 NOT NULL DEFAULT pg_current_xact_id();
DELETE FROM outbox WHERE published_at IS NOT NULL;
DROP INDEX IF EXISTS outbox_unpublished;
CREATE INDEX outbox_log ON outbox (txid, seq);
-- Pruning by age: rows are appended in time order, so a block-range index is enough.
CREATE INDEX outbox_age ON outbox USING brin (created_at);
CREATE TABLE outbox_watermark (
    id    boolean PRIMARY KEY DEFAULT true CHECK (id),
    txid  xid8 NOT NULL,
    seq   bigint NOT NULL
);
INSERT INTO outbox_watermark (txid, seq) VALUES ('0', 0);

-- Vacuum hygiene where autovacuum runs (it is on by default in PostgreSQL): the tables that
-- take an UPDATE or DELETE per conversation are vacuumed after 2 % of their rows changed
-- instead of 20 %, so dead queued rows and published outbox rows do not pile up between
-- runs. Room on each page keeps more updates on the same page.
ALTER TABLE conversations SET (
    fillfactor = 85,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);
ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_insert_scale_factor = 0.05);
ALTER TABLE offers SET (fillfactor = 85, autovacuum_vacuum_scale_factor = 0.02);
ALTER TABLE timers SET (fillfactor = 85, autovacuum_vacuum_scale_factor = 0.02);
ALTER TABLE contact_agents SET (fillfactor = 70);
ALTER TABLE agents SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 1000);
ALTER TABLE messages SET (autovacuum_vacuum_scale_factor = 0.05);
ALTER TABLE outbox_watermark SET (fillfactor = 10);

-- The relay waits on this channel instead of polling: one notification per committing
-- transaction that wrote to the outbox (PostgreSQL folds identical ones of a transaction).
CREATE FUNCTION omniroute_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('omniroute_outbox', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION omniroute_outbox_notify();
