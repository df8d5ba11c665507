-- Migration 5: finished rows by when they finished, so the purge of documents past their
-- window finds the oldest through an index, however many rows are kept.

CREATE INDEX IF NOT EXISTS outbox_delivered ON {s}.outbox (state, delivered_at);
CREATE INDEX IF NOT EXISTS outbox_dead ON {s}.outbox (state, dead_at);
