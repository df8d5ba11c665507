-- The SQLite store's tables as schema version 7 made them (cmi_sdk/outbox/sqlite.py
-- before migrations were numbered): its _SCHEMA, then the columns its _ADDED_COLUMNS
-- added to a new file, then the version row it recorded.
CREATE TABLE IF NOT EXISTS cmi_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cmi_terms (
    id TEXT PRIMARY KEY,
    customer_ref TEXT NOT NULL,
    intermediary TEXT,
    terms TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at REAL NOT NULL,
    until REAL,
    revoked_at REAL
);
CREATE INDEX IF NOT EXISTS cmi_terms_customer ON cmi_terms (customer_ref);
CREATE TABLE IF NOT EXISTS cmi_consent (
    id TEXT PRIMARY KEY,
    terms_id TEXT NOT NULL REFERENCES cmi_terms (id),
    event TEXT NOT NULL,
    issued_at REAL NOT NULL,
    record TEXT NOT NULL,
    xml BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS cmi_consent_terms ON cmi_consent (terms_id, issued_at);
CREATE TABLE IF NOT EXISTS cmi_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id TEXT NOT NULL UNIQUE,
    terms_id TEXT NOT NULL,
    customer_ref TEXT NOT NULL,
    transaction_id TEXT NOT NULL,
    standard TEXT NOT NULL,
    document_type TEXT NOT NULL,
    destination TEXT,
    body BLOB NOT NULL,
    created_at REAL NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    lease_owner TEXT,
    lease_until REAL,
    last_status INTEGER,
    last_error TEXT,
    delivered_at REAL,
    dead_at REAL,
    model TEXT
);
CREATE INDEX IF NOT EXISTS cmi_outbox_due ON cmi_outbox (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS cmi_outbox_terms ON cmi_outbox (terms_id, seq);
CREATE TABLE IF NOT EXISTS cmi_attempts (
    msg_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    owner TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    outcome TEXT NOT NULL,
    status INTEGER,
    error TEXT,
    next_attempt_at REAL
);
CREATE INDEX IF NOT EXISTS cmi_attempts_msg ON cmi_attempts (msg_id);
CREATE TABLE IF NOT EXISTS cmi_destinations (
    url TEXT PRIMARY KEY,
    disabled_at REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cmi_intermediaries (
    name TEXT PRIMARY KEY,
    secrets TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL,
    generation INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS cmi_offers (
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    customer_ref TEXT NOT NULL,
    intermediary TEXT,
    offer TEXT NOT NULL,
    request TEXT NOT NULL,
    xml BLOB NOT NULL,
    valid_until REAL NOT NULL,
    created_at REAL NOT NULL
);
-- No reader looks offers up by request: an index would only slow every insert.
DROP INDEX IF EXISTS cmi_offers_request;
CREATE TABLE IF NOT EXISTS cmi_acceptances (
    id TEXT PRIMARY KEY,
    offer_id TEXT NOT NULL,
    state TEXT NOT NULL,
    result TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cmi_seen (
    party TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (party, msg_id)
);
CREATE INDEX IF NOT EXISTS cmi_seen_expiry ON cmi_seen (expires_at);
-- Version 5: service links. A reference is unique per intermediary, not across them.
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
-- Version 6: documents that could not be made, kept for the operator.
CREATE TABLE IF NOT EXISTS cmi_emission_problems (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    transaction_id TEXT NOT NULL,
    terms_id TEXT NOT NULL,
    customer_ref TEXT NOT NULL,
    standard TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    transaction_json TEXT NOT NULL
);
ALTER TABLE cmi_acceptances ADD COLUMN intermediary TEXT;
ALTER TABLE cmi_acceptances ADD COLUMN acceptance TEXT;
ALTER TABLE cmi_acceptances ADD COLUMN hold TEXT;
ALTER TABLE cmi_acceptances ADD COLUMN lease_owner TEXT;
ALTER TABLE cmi_acceptances ADD COLUMN lease_until REAL;
ALTER TABLE cmi_offers ADD COLUMN accepted_by TEXT;
INSERT OR REPLACE INTO cmi_meta (key, value) VALUES ('schema_version', '7');
