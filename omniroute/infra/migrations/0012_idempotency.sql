-- One Idempotency-Key semantics for every API call (omniroute.domain.idempotency): a key row
-- names the request it answered (a hash of method, path and body), so the same key sent with
-- another request is refused instead of answered with the first one's result, and keeps the
-- answer's sealed fields (an agent's token, sealed with the key) apart from the answer.
-- The rows from before were written under each endpoint's own scopes and key hashes: no
-- request can match them any more, and they only ever served retries, so they go.
DELETE FROM idempotency_keys;
ALTER TABLE idempotency_keys
    ADD COLUMN fingerprint text NOT NULL,
    ADD COLUMN sealed jsonb NOT NULL DEFAULT '{}';
