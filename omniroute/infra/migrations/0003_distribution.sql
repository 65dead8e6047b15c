-- Agents, offers and assignments: work distribution.

CREATE TABLE agents (
    id                    uuid PRIMARY KEY,
    name                  text NOT NULL,
    language              text,
    queues                text[] NOT NULL DEFAULT '{}',
    skills                jsonb NOT NULL DEFAULT '{}',      -- skill → proficiency 1-10
    capacity_units        integer NOT NULL CHECK (capacity_units >= 0),
    used_units            integer NOT NULL DEFAULT 0 CHECK (used_units >= 0),
    presence              text NOT NULL DEFAULT 'offline'
        CHECK (presence IN ('available', 'busy', 'dnd', 'away', 'offline')),
    token_hash            text NOT NULL UNIQUE,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    last_assigned_at      timestamptz,          -- round robin / tie-breaks
    capacity_released_at  timestamptz,          -- least active
    deleted_at            timestamptz
);
CREATE INDEX agents_available ON agents USING gin (queues) WHERE presence = 'available'
    AND deleted_at IS NULL;

ALTER TABLE conversations
    ADD COLUMN agent_id         uuid REFERENCES agents (id),
    ADD COLUMN units            integer NOT NULL DEFAULT 1,
    ADD COLUMN assigned_at      timestamptz,
    ADD COLUMN declined_by      uuid[] NOT NULL DEFAULT '{}';

CREATE TABLE offers (
    id               uuid PRIMARY KEY,
    conversation_id  uuid NOT NULL REFERENCES conversations (id),
    agent_id         uuid NOT NULL REFERENCES agents (id),
    units            integer NOT NULL,
    state            text NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'accepted', 'declined', 'expired', 'cancelled')),
    created_at       timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL,
    decided_at       timestamptz
);
-- One live offer per conversation.
CREATE UNIQUE INDEX offers_one_pending ON offers (conversation_id) WHERE state = 'pending';
-- The durable offer timer: the sweeper finds due offers through this index.
CREATE INDEX offers_due ON offers (expires_at) WHERE state = 'pending';
CREATE INDEX offers_agent ON offers (agent_id, state);

CREATE TABLE assignments (
    id               uuid PRIMARY KEY,
    conversation_id  uuid NOT NULL REFERENCES conversations (id),
    agent_id         uuid NOT NULL REFERENCES agents (id),
    units            integer NOT NULL,
    assigned_at      timestamptz NOT NULL,
    released_at      timestamptz
);
-- One active assignment per conversation: never assigned twice.
CREATE UNIQUE INDEX assignments_one_active ON assignments (conversation_id)
    WHERE released_at IS NULL;
CREATE INDEX assignments_agent ON assignments (agent_id) WHERE released_at IS NULL;

CREATE TABLE idempotency_keys (
    scope        text NOT NULL,         -- e.g. agent id
    key          text NOT NULL,
    status       integer NOT NULL,
    body         jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);

-- Affinity: a returning customer's last agent, found per queued conversation.
CREATE INDEX conversations_contact ON conversations (contact_id, opened_at DESC)
    WHERE agent_id IS NOT NULL;
