-- Migration 8: the attempts of delivered documents are found by their delivering attempt
-- (a partial index), not by walking every old attempt: the attempts dead letters keep
-- were read again by each purge batch (half a second a batch, write lock held, with
-- 100,000 dead letters). The index by when any attempt finished has no other use.

DROP INDEX IF EXISTS cmi_attempts_finished;
CREATE INDEX IF NOT EXISTS cmi_attempts_delivered ON cmi_attempts (finished_at)
    WHERE outcome = 'delivered';
