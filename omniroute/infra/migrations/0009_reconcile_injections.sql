-- Messages the reconciler injected: the next pass (another replica's, or this process's after
-- a restart) must not publish them again while the stages are still working through a
-- backlog. Kept for OMNIROUTE_RECONCILE_REINJECT_AFTER; pruned by the passes themselves.
CREATE TABLE reconcile_injections (
    message_sid  text PRIMARY KEY,
    injected_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reconcile_injections_age ON reconcile_injections (injected_at);
