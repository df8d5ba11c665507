-- Migration 6: offers by when they stop being valid, acceptances by their offer, and
-- attempts by when they finished, so the purge of expired offers (with their
-- acceptances) and of delivered rows' old attempts goes through indexes.

CREATE INDEX IF NOT EXISTS offers_valid_until ON {s}.offers (valid_until);
CREATE INDEX IF NOT EXISTS acceptances_offer ON {s}.acceptances (offer_id);
CREATE INDEX IF NOT EXISTS attempts_finished ON {s}.attempts (finished_at);
