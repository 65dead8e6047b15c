-- The running processes (issue 17): each omniroute process upserts its row every few seconds
-- with the configuration hash it runs, so `omniroute config reload` knows whose answers to
-- wait for and `omniroute status` shows a half-applied change. A row whose heartbeat is old
-- belongs to a process that is gone: ignored, and pruned by the others.
CREATE TABLE processes (
    id            text PRIMARY KEY,          -- host:pid:start, unique per process start
    host          text NOT NULL,
    pid           int NOT NULL,
    role          text NOT NULL,             -- run, serve or consume
    stages        text[] NOT NULL DEFAULT '{}',
    config_hash   text NOT NULL,
    started_at    timestamptz NOT NULL,
    heartbeat_at  timestamptz NOT NULL
);
-- The live ones (heartbeat_at > now() - window) and the prune (heartbeat_at < ...).
CREATE INDEX processes_heartbeat ON processes (heartbeat_at);
