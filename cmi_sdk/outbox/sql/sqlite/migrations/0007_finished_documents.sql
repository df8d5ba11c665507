-- Migration 7: a row records when it was cancelled or merged into a digest document
-- (ended_at), and pull-only, cancelled and merged rows are indexed by their time, as are
-- emission problems, so the purge of those past their window finds the oldest through
-- an index. The outbox's are partial, so writing a pending row costs nothing more; they
-- lead with the state, or the planner prefers the other indexes on the state (and sorts
-- all they find).
-- Rows cancelled or merged before take the best time they kept: a cancelled row its
-- terms' revocation (else when it was written), a merged row the end of its digest
-- window (it was merged as the window ended).

ALTER TABLE cmi_outbox ADD COLUMN ended_at REAL;
UPDATE cmi_outbox SET ended_at = coalesce(
    (SELECT t.revoked_at FROM cmi_terms t WHERE t.id = cmi_outbox.terms_id), created_at)
WHERE state = 'cancelled';
UPDATE cmi_outbox SET ended_at = coalesce(next_attempt_at, created_at)
WHERE state = 'merged';
CREATE INDEX IF NOT EXISTS cmi_outbox_pull ON cmi_outbox (state, created_at)
    WHERE state = 'pull';
CREATE INDEX IF NOT EXISTS cmi_outbox_ended ON cmi_outbox (state, ended_at)
    WHERE ended_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS cmi_emission_problems_created
    ON cmi_emission_problems (created_at);
