-- Migration 6: offers by when they stop being valid, and acceptances by their offer, so
-- the purge of expired offers (with their acceptances) goes through indexes.

CREATE INDEX IF NOT EXISTS offers_valid_until ON {s}.offers (valid_until);
CREATE INDEX IF NOT EXISTS acceptances_offer ON {s}.acceptances (offer_id);
