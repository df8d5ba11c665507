-- Migration 2: service links, and the one-time codes that make them. A reference is
-- unique per intermediary, not across them.

CREATE TABLE IF NOT EXISTS cmi_links (
    id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    intermediary TEXT NOT NULL,
    customer_ref TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL,
    UNIQUE (intermediary, customer_ref)
);
CREATE INDEX IF NOT EXISTS cmi_links_account ON cmi_links (account);

CREATE TABLE IF NOT EXISTS cmi_link_codes (
    hash TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL,
    link_id TEXT
);
CREATE INDEX IF NOT EXISTS cmi_link_codes_expiry ON cmi_link_codes (expires_at);
