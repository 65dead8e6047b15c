-- Contacts, conversations, messages and the transactional outbox.

CREATE TABLE contacts (
    id              uuid PRIMARY KEY,
    account         text NOT NULL,
    address         text NOT NULL,          -- +E164 or a business-scoped user id
    wa_id           text,
    external_user_id text,
    profile_name    text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account, address)
);

CREATE TABLE conversations (
    id                        uuid PRIMARY KEY,
    account                   text NOT NULL,
    business_number           text NOT NULL,
    customer                  text NOT NULL,
    contact_id                uuid NOT NULL REFERENCES contacts (id),
    workstream                text NOT NULL,
    state                     text NOT NULL DEFAULT 'open'
        CHECK (state IN ('open', 'queued', 'offered', 'active', 'waiting', 'wrap-up', 'closed')),
    opened_at                 timestamptz NOT NULL,
    closed_at                 timestamptz,
    -- The anchor of WhatsApp's 24-hour customer-service window.
    last_customer_message_at  timestamptz NOT NULL,
    updated_at                timestamptz NOT NULL DEFAULT now()
);

-- At most one open conversation per account, business number and customer: "find or open"
-- is one INSERT … ON CONFLICT guarded by this index, never check-then-insert.
CREATE UNIQUE INDEX conversations_one_open
    ON conversations (account, business_number, customer)
    WHERE state <> 'closed';
CREATE INDEX conversations_state ON conversations (state, opened_at);

CREATE TABLE messages (
    id                uuid PRIMARY KEY,
    conversation_id   uuid NOT NULL REFERENCES conversations (id),
    direction         text NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    twilio_sid        text UNIQUE,
    body              text NOT NULL DEFAULT '',
    media             jsonb NOT NULL DEFAULT '[]',
    attributes        jsonb NOT NULL DEFAULT '{}',   -- every other webhook field
    status            text NOT NULL,
    error_code        text,
    -- Ordering: the time the router received the webhook, stamped in the event.
    received_at       timestamptz NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_conversation ON messages (conversation_id, received_at, id);

-- Events written in the same transaction as the effects that caused them; published after
-- commit, and re-published by a relay if the process died in between.
CREATE TABLE outbox (
    id            uuid PRIMARY KEY,
    routing_key   text NOT NULL,
    body          jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (created_at) WHERE published_at IS NULL;
