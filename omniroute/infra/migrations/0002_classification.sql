-- What classify decided for a conversation, and why.
ALTER TABLE conversations
    ADD COLUMN queue           text,
    ADD COLUMN skills          jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN priority        integer NOT NULL DEFAULT 0,
    ADD COLUMN severity        text NOT NULL DEFAULT 'normal',
    ADD COLUMN language        text,
    ADD COLUMN variables       jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN classification  jsonb,
    ADD COLUMN out_of_hours    boolean NOT NULL DEFAULT false,
    ADD COLUMN classified_at   timestamptz,
    ADD COLUMN queued_at       timestamptz,
    ADD COLUMN close_reason    text;

CREATE INDEX conversations_queue ON conversations (queue, priority DESC, queued_at)
    WHERE state = 'queued';
