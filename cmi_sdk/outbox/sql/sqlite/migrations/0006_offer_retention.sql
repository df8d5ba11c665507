-- Migration 6: offers by when they stop being valid, and acceptances by their offer, so
-- the purge of expired offers (with their acceptances) goes through indexes.

CREATE INDEX IF NOT EXISTS cmi_offers_valid_until ON cmi_offers (valid_until);
CREATE INDEX IF NOT EXISTS cmi_acceptances_offer ON cmi_acceptances (offer_id);
