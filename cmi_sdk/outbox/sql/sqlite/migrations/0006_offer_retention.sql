-- Migration 6: offers by when they stop being valid, acceptances by their offer, and
-- attempts by when they finished, so the purge of expired offers (with their
-- acceptances) and of delivered rows' old attempts goes through indexes.

CREATE INDEX IF NOT EXISTS cmi_offers_valid_until ON cmi_offers (valid_until);
CREATE INDEX IF NOT EXISTS cmi_acceptances_offer ON cmi_acceptances (offer_id);
CREATE INDEX IF NOT EXISTS cmi_attempts_finished ON cmi_attempts (finished_at);
