-- The browser console's sessions (issue 13): an HttpOnly cookie instead of a bearer token.
-- Kept in PostgreSQL so that any router replica accepts a session another one opened.
-- id_hash: SHA-256 (hex) of the cookie's random value; the value itself is never stored, so
--   a copy of this table signs nobody in.
-- admin_hash: for a supervisor session, SHA-256 of the admin token it was opened with: when
--   OMNIROUTE_ADMIN_TOKEN is rotated, supervisors are signed out with the old token.
-- expires_at is absolute (created_at + OMNIROUTE_SESSION_TTL): no sliding renewal.
CREATE TABLE console_sessions (
    id_hash     text PRIMARY KEY,
    role        text NOT NULL CHECK (role IN ('agent', 'supervisor')),
    agent_id    uuid REFERENCES agents (id),
    admin_hash  text,
    name        text NOT NULL,
    csrf_token  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    CHECK ((role = 'agent') = (agent_id IS NOT NULL)),
    CHECK ((role = 'supervisor') = (admin_hash IS NOT NULL))
);
-- Pruning expired sessions walks this index from its oldest end.
CREATE INDEX console_sessions_expiry ON console_sessions (expires_at);
