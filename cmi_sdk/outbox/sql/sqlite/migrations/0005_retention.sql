-- Migration 5: finished rows by when they finished, so the purge of documents past their
-- window finds the oldest through an index, however many rows are kept.

CREATE INDEX IF NOT EXISTS cmi_outbox_delivered ON cmi_outbox (state, delivered_at);
CREATE INDEX IF NOT EXISTS cmi_outbox_dead ON cmi_outbox (state, dead_at);
