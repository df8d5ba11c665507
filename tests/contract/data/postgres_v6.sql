-- The PostgreSQL store's tables as schema version 6 made them (cmi_sdk/outbox/postgres.py
-- before migrations were numbered), with the version row it recorded; {s} is the schema.
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.meta (
    key text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.terms (
    id text PRIMARY KEY,
    customer_ref text NOT NULL,
    intermediary text,
    terms jsonb NOT NULL,
    secret text NOT NULL,
    created_at double precision NOT NULL,
    until double precision,
    revoked_at double precision
);
CREATE INDEX IF NOT EXISTS terms_customer ON {s}.terms (customer_ref);
CREATE TABLE IF NOT EXISTS {s}.consent (
    pos bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    id text PRIMARY KEY,
    terms_id text NOT NULL REFERENCES {s}.terms (id),
    event text NOT NULL,
    issued_at double precision NOT NULL,
    record jsonb NOT NULL,
    xml bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS consent_terms ON {s}.consent (terms_id, issued_at, pos);
CREATE TABLE IF NOT EXISTS {s}.outbox (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    msg_id text NOT NULL UNIQUE,
    terms_id text NOT NULL,
    customer_ref text NOT NULL,
    transaction_id text NOT NULL,
    standard text NOT NULL,
    document_type text NOT NULL,
    destination text,
    body bytea NOT NULL,
    created_at double precision NOT NULL,
    state text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at double precision,
    lease_owner text,
    lease_until double precision,
    last_status integer,
    last_error text,
    delivered_at double precision,
    dead_at double precision,
    ordering_key text,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id()
);
-- Version 2: rows held for a digest carry their model; the states that come with it.
ALTER TABLE {s}.outbox ADD COLUMN IF NOT EXISTS model text;
ALTER TABLE {s}.outbox DROP CONSTRAINT IF EXISTS outbox_state_check;
ALTER TABLE {s}.outbox ADD CONSTRAINT outbox_state_check CHECK (state IN
    ('pending', 'leased', 'retry', 'delivered', 'dead', 'pull', 'digest', 'merged',
     'cancelled'));
CREATE INDEX IF NOT EXISTS outbox_queue ON {s}.outbox (next_attempt_at, seq)
    WHERE state IN ('pending', 'retry');
CREATE INDEX IF NOT EXISTS outbox_queue_destination
    ON {s}.outbox (destination, next_attempt_at, seq) WHERE state IN ('pending', 'retry');
CREATE INDEX IF NOT EXISTS outbox_leased ON {s}.outbox (destination, lease_until)
    WHERE state = 'leased';
CREATE INDEX IF NOT EXISTS outbox_state ON {s}.outbox (state, seq);
CREATE INDEX IF NOT EXISTS outbox_terms ON {s}.outbox (terms_id, xid, seq);
CREATE INDEX IF NOT EXISTS outbox_ordering ON {s}.outbox (ordering_key, seq)
    WHERE ordering_key IS NOT NULL AND state IN ('pending', 'leased', 'retry');
CREATE TABLE IF NOT EXISTS {s}.attempts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    msg_id text NOT NULL,
    attempt integer NOT NULL,
    owner text NOT NULL,
    started_at double precision NOT NULL,
    finished_at double precision NOT NULL,
    outcome text NOT NULL,
    status integer,
    error text,
    next_attempt_at double precision
);
CREATE INDEX IF NOT EXISTS attempts_msg ON {s}.attempts (msg_id, id);
CREATE TABLE IF NOT EXISTS {s}.destinations (
    url text PRIMARY KEY,
    disabled_at double precision NOT NULL,
    reason text NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.intermediaries (
    name text PRIMARY KEY,
    secrets jsonb NOT NULL,
    created_at double precision NOT NULL
);
-- Version 6: intermediaries can be revoked, and each change of their row counts.
ALTER TABLE {s}.intermediaries ADD COLUMN IF NOT EXISTS revoked_at double precision;
ALTER TABLE {s}.intermediaries ADD COLUMN IF NOT EXISTS generation bigint NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS {s}.offers (
    id text PRIMARY KEY,
    request_id text NOT NULL,
    customer_ref text NOT NULL,
    intermediary text,
    offer jsonb NOT NULL,
    request jsonb NOT NULL,
    xml bytea NOT NULL,
    valid_until double precision NOT NULL,
    created_at double precision NOT NULL
);
-- No reader looks offers up by request: an index would only slow every insert.
DROP INDEX IF EXISTS {s}.offers_request;
CREATE TABLE IF NOT EXISTS {s}.acceptances (
    id text PRIMARY KEY,
    offer_id text NOT NULL,
    state text NOT NULL,
    result text,
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.seen (
    party text NOT NULL,
    msg_id text NOT NULL,
    expires_at double precision NOT NULL,
    PRIMARY KEY (party, msg_id)
);
CREATE INDEX IF NOT EXISTS seen_expiry ON {s}.seen (expires_at);
-- Version 4: service links. A reference is unique per intermediary, not across them.
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
-- Version 5: an acceptance carries its lease, the acceptance itself and its hold (for
-- recovery after a crash); an offer names the one acceptance that holds it (an offer
-- accepted more than once before is held by its first live acceptance); emission problems
-- are kept for the operator.
ALTER TABLE {s}.acceptances ADD COLUMN IF NOT EXISTS intermediary text;
ALTER TABLE {s}.acceptances ADD COLUMN IF NOT EXISTS acceptance text;
ALTER TABLE {s}.acceptances ADD COLUMN IF NOT EXISTS hold text;
ALTER TABLE {s}.acceptances ADD COLUMN IF NOT EXISTS lease_owner text;
ALTER TABLE {s}.acceptances ADD COLUMN IF NOT EXISTS lease_until double precision;
ALTER TABLE {s}.offers ADD COLUMN IF NOT EXISTS accepted_by text;
UPDATE {s}.offers o SET accepted_by = (SELECT a.id FROM {s}.acceptances a
    WHERE a.offer_id = o.id AND a.state IN ('processing', 'booked')
    ORDER BY a.created_at, a.id LIMIT 1)
WHERE o.accepted_by IS NULL AND EXISTS (SELECT 1 FROM {s}.acceptances a
    WHERE a.offer_id = o.id AND a.state IN ('processing', 'booked'));
CREATE INDEX IF NOT EXISTS acceptances_stalled ON {s}.acceptances (created_at)
    WHERE state = 'processing';
CREATE TABLE IF NOT EXISTS {s}.emission_problems (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id text NOT NULL,
    terms_id text NOT NULL,
    customer_ref text NOT NULL,
    standard text NOT NULL,
    reason text NOT NULL,
    created_at double precision NOT NULL,
    transaction_json text NOT NULL
);
INSERT INTO {s}.meta (key, value) VALUES ('schema_version', '6');
