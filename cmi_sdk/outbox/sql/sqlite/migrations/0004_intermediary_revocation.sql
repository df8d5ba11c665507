-- Migration 4: intermediaries can be revoked, and each change of their row counts (the
-- endpoint reads the count to know when its copy of the secrets is stale).

ALTER TABLE cmi_intermediaries ADD COLUMN revoked_at REAL;
ALTER TABLE cmi_intermediaries ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
