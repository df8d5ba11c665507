-- Migration 2: service links, and the one-time codes that make them. A reference is
-- unique per intermediary, not across them.

CREATE TABLE IF NOT EXISTS {s}.links (
    id text PRIMARY KEY,
    account text NOT NULL,
    intermediary text NOT NULL,
    customer_ref text NOT NULL,
    created_at double precision NOT NULL,
    revoked_at double precision,
    UNIQUE (intermediary, customer_ref)
);
CREATE INDEX IF NOT EXISTS links_account ON {s}.links (account);

CREATE TABLE IF NOT EXISTS {s}.link_codes (
    hash text PRIMARY KEY,
    account text NOT NULL,
    created_at double precision NOT NULL,
    expires_at double precision NOT NULL,
    used_at double precision,
    link_id text
);
CREATE INDEX IF NOT EXISTS link_codes_expiry ON {s}.link_codes (expires_at);
