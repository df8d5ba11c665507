-- Migration 8: the attempts of delivered documents are found by their delivering attempt
-- (a partial index), not by walking every old attempt: the attempts dead letters keep
-- were read again by each purge batch. The index by when any attempt finished has no
-- other use. Expired offers are walked in one order (below).

DROP INDEX IF EXISTS cmi_attempts_finished;
CREATE INDEX IF NOT EXISTS cmi_attempts_delivered ON cmi_attempts (finished_at)
    WHERE outcome = 'delivered';

-- Offers by when they stop being valid, then by id: two purges (two workers) walk and
-- lock them in one order, never in two orders that would deadlock on offers that expire
-- together (one request's offers share their time).
DROP INDEX IF EXISTS cmi_offers_valid_until;
CREATE INDEX IF NOT EXISTS cmi_offers_expiry ON cmi_offers (valid_until, id);
