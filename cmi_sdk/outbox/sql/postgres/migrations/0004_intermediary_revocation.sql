-- Migration 4: intermediaries can be revoked, and each change of their row counts (the
-- endpoint reads the count to know when its copy of the secrets is stale).

ALTER TABLE {s}.intermediaries ADD COLUMN IF NOT EXISTS revoked_at double precision;
ALTER TABLE {s}.intermediaries ADD COLUMN IF NOT EXISTS generation bigint NOT NULL DEFAULT 0;
