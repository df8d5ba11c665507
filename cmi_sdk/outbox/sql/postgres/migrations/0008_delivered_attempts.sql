-- Migration 8: the attempts of delivered documents are found by their delivering attempt
-- (a partial index), not by walking every old attempt: the attempts dead letters keep
-- were read again by each purge batch. The index by when any attempt finished has no
-- other use.

DROP INDEX IF EXISTS {s}.attempts_finished;
CREATE INDEX IF NOT EXISTS attempts_delivered ON {s}.attempts (finished_at)
    WHERE outcome = 'delivered';
