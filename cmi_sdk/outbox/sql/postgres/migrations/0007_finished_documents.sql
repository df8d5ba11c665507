-- Migration 7: a row records when it was cancelled or merged into a digest document
-- (ended_at), and pull-only, cancelled and merged rows are indexed by their time, as are
-- emission problems, so the purge of those past their window finds the oldest through
-- an index. The outbox's are partial, so writing a pending row costs nothing more. The
-- pull index leaves the state out: one its condition fixes would not narrow the search,
-- and the whole index would be read.
-- Rows cancelled or merged before take the best time they kept: a cancelled row its
-- terms' revocation (else when it was written), a merged row the end of its digest
-- window (it was merged as the window ended).

ALTER TABLE {s}.outbox ADD COLUMN IF NOT EXISTS ended_at double precision;
UPDATE {s}.outbox o SET ended_at = coalesce(
    (SELECT t.revoked_at FROM {s}.terms t WHERE t.id = o.terms_id), o.created_at)
WHERE o.state = 'cancelled' AND o.ended_at IS NULL;
UPDATE {s}.outbox SET ended_at = coalesce(next_attempt_at, created_at)
WHERE state = 'merged' AND ended_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_pull ON {s}.outbox (created_at) WHERE state = 'pull';
CREATE INDEX IF NOT EXISTS outbox_ended ON {s}.outbox (state, ended_at)
    WHERE ended_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS emission_problems_created ON {s}.emission_problems (created_at);
