-- The PostgreSQL store's statements (cmi_sdk/outbox/postgres.py), by name.
-- {s} is the store's schema and {channel} its NOTIFY channel, both checked identifiers
-- the store fills in; values are always bound (%s, or %(name)s).
-- The tables are made by the numbered files in migrations/.

-- fragment: row_columns
-- The columns of an outbox row, in the order the row mapping reads them.
seq, msg_id, terms_id, customer_ref, transaction_id, standard, document_type,
destination, body, created_at, state, attempts, next_attempt_at, lease_owner,
lease_until, last_status, last_error, delivered_at

-- fragment: acceptance_columns
-- The columns of an acceptance, in the order AcceptanceRecord.of_row reads them.
id, offer_id, state, result, intermediary, acceptance, hold, lease_owner, lease_until

-- fragment: link_columns
-- The columns of a link, in the order the row mapping reads them.
id, account, intermediary, customer_ref, created_at, revoked_at

-- fragment: intermediary_columns
-- The columns of an intermediary, in the order the row mapping reads them.
name, created_at, secrets::text, revoked_at, generation

-- fragment: active
-- Terms in force at %(now)s.
t.revoked_at IS NULL AND (t.until IS NULL OR t.until > %(now)s)

-- fragment: due
-- A row is due when it is pending or retrying and its time has come. A row with an
-- ordering key also waits while an older row with the same key has not gone out:
-- pending (even if not yet due), leased or retrying.
o.state IN ('pending', 'retry') AND o.next_attempt_at <= %(now)s
AND (o.ordering_key IS NULL OR NOT EXISTS (
    SELECT 1 FROM {s}.outbox p
    WHERE p.ordering_key = o.ordering_key AND p.seq < o.seq
        AND p.state IN ('pending', 'leased', 'retry')
))

-- fragment: lease
-- Lease the rows a claim picked (picked.picked_seq) to the worker.
UPDATE {s}.outbox t SET state = 'leased', lease_owner = %(owner)s, lease_until = %(until)s
FROM picked WHERE t.seq = picked.picked_seq
RETURNING {row_columns}

-- fragment: cancel_rows
-- Rows of terms being revoked, cancelled at the revocation's time; rows being sent right
-- now too, so that their result is not recorded over the cancellation (see
-- mark_delivered and the others).
UPDATE {s}.outbox SET state = 'cancelled', last_error = 'terms revoked',
    lease_owner = NULL, lease_until = NULL, ended_at = %s
WHERE terms_id = %s AND state IN ('pending', 'retry', 'leased', 'digest')

-- ---------------------------------------------------------------------------------------
-- connections and schema

-- name: jit_off
-- The store's statements are short, indexed ones: compiling them (JIT, when the
-- planner's estimates are high on a large table) costs more than it saves.
SET jit = off;

-- name: commit_async
-- Commit this transaction without waiting for the disk (leases, heartbeats, outcomes).
SET LOCAL synchronous_commit TO off;

-- name: table_exists
-- The table of that qualified name, or NULL when there is none.
SELECT to_regclass(%s);

-- name: lock_migrations
-- Make processes that migrate the same schema at once take turns (until commit).
SELECT pg_advisory_xact_lock(hashtextextended(%s, 0));

-- name: create_schema
-- The store's schema.
CREATE SCHEMA IF NOT EXISTS {s};

-- name: create_migrations_table
-- The table of the numbered migrations applied, one row each.
CREATE TABLE IF NOT EXISTS {s}.migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at double precision NOT NULL
);

-- name: migration_version
-- The highest numbered migration applied.
SELECT max(version) FROM {s}.migrations;

-- name: legacy_version
-- The version row of a store made before migrations were numbered.
SELECT value FROM {s}.meta WHERE key = 'schema_version';

-- name: record_migration
-- Record a numbered migration as applied.
INSERT INTO {s}.migrations (version, name, applied_at) VALUES (%s, %s, %s)
ON CONFLICT (version) DO NOTHING;

-- name: drop_legacy_version
-- Drop the version table of a store made before migrations were numbered.
DROP TABLE IF EXISTS {s}.meta;

-- name: notify_work
-- Wake the workers waiting on the store's channel, when the transaction commits.
NOTIFY {channel};

-- name: listen_for_work
-- Be told of the store's wake-ups.
LISTEN {channel};

-- ---------------------------------------------------------------------------------------
-- terms and consent

-- name: insert_terms
-- Keep accepted terms (their secret sealed or not, as the store's keyring says).
INSERT INTO {s}.terms (id, customer_ref, intermediary, terms, secret, created_at, until,
    revoked_at)
VALUES (%s, %s, %s, %s::jsonb, %s, %s, %s, NULL);

-- name: insert_consent
-- Keep a consent record and its signed document.
INSERT INTO {s}.consent (id, terms_id, event, issued_at, record, xml)
VALUES (%s, %s, %s, %s, %s::jsonb, %s);

-- name: get_terms
-- The terms with that id, revoked or not.
SELECT terms::text, secret FROM {s}.terms WHERE id = %s;

-- name: list_terms
-- Every terms' JSON and secret: the store adds the filters asked for.
SELECT terms::text, secret FROM {s}.terms;

-- name: recipients
-- What a document for an account goes out under: the firm's direct terms for the
-- account, and the terms of each of its active links; for an intermediary's reference,
-- what its linked account gets, or, unlinked, only that intermediary's own terms for it.
WITH account (id) AS (
    SELECT %(ref)s::text WHERE %(intermediary)s::text IS NULL
    UNION ALL
    SELECT account FROM {s}.links
    WHERE intermediary = %(intermediary)s AND customer_ref = %(ref)s AND revoked_at IS NULL
)
SELECT t.terms::text, t.secret, t.created_at, t.id
FROM account a JOIN {s}.terms t ON t.customer_ref = a.id AND t.intermediary IS NULL
WHERE {active}
UNION ALL
SELECT t.terms::text, t.secret, t.created_at, t.id
FROM account a JOIN {s}.links l ON l.account = a.id AND l.revoked_at IS NULL
JOIN {s}.terms t ON t.intermediary = l.intermediary AND t.customer_ref = l.customer_ref
WHERE {active}
UNION ALL
SELECT t.terms::text, t.secret, t.created_at, t.id FROM {s}.terms t
WHERE t.intermediary = %(intermediary)s AND t.customer_ref = %(ref)s AND {active}
    AND NOT EXISTS (SELECT 1 FROM account)
ORDER BY 3, 4;

-- name: terms_to_revoke
-- Whether the terms are revoked already, and their JSON; locked until commit.
SELECT revoked_at, terms::text FROM {s}.terms WHERE id = %s FOR UPDATE;

-- name: revoke_terms
-- Mark terms revoked, with their JSON saying when.
UPDATE {s}.terms SET revoked_at = %s, terms = %s::jsonb WHERE id = %s;

-- name: cancel_terms_rows
-- Cancel the undelivered rows of revoked terms.
{cancel_rows};

-- name: consent_records
-- The consent records of the terms, oldest first.
SELECT record::text, xml FROM {s}.consent WHERE terms_id = %s ORDER BY issued_at, pos;

-- ---------------------------------------------------------------------------------------
-- service links

-- name: drop_expired_link_codes
-- Drop link codes that expired unredeemed.
DELETE FROM {s}.link_codes WHERE expires_at < %s AND used_at IS NULL;

-- name: insert_link_code
-- Keep a link code's hash.
INSERT INTO {s}.link_codes (hash, account, created_at, expires_at) VALUES (%s, %s, %s, %s);

-- name: use_link_code
-- Mark a live, unused code used; returns its account (no row: unknown, used or expired).
-- The row lock makes a concurrent redemption wait, then find the code used.
UPDATE {s}.link_codes SET used_at = %s, link_id = %s
WHERE hash = %s AND used_at IS NULL AND expires_at > %s
RETURNING account;

-- name: insert_link
-- Make a link.
INSERT INTO {s}.links ({link_columns}) VALUES (%s, %s, %s, %s, %s, %s);

-- name: get_link
-- The link with that id.
SELECT {link_columns} FROM {s}.links WHERE id = %s;

-- name: list_links
-- Every link: the store adds the filters asked for.
SELECT {link_columns} FROM {s}.links;

-- name: link_to_revoke
-- Whether the link is revoked already, and whose reference it links; locked until commit.
SELECT revoked_at, intermediary, customer_ref FROM {s}.links WHERE id = %s FOR UPDATE;

-- name: revoke_link
-- Mark a link revoked.
UPDATE {s}.links SET revoked_at = %s WHERE id = %s;

-- name: linked_terms_to_revoke
-- The JSON of live terms of the link's intermediary and reference; locked until commit.
SELECT terms::text FROM {s}.terms
WHERE id = %s AND intermediary = %s AND customer_ref = %s AND revoked_at IS NULL
FOR UPDATE;

-- name: linked_terms_left
-- The live terms of an intermediary's reference, oldest first.
SELECT id FROM {s}.terms
WHERE intermediary = %s AND customer_ref = %s AND revoked_at IS NULL
ORDER BY created_at, id;

-- ---------------------------------------------------------------------------------------
-- outbox

-- name: insert_row
-- Write an outbox row; a msg_id already there is skipped.
INSERT INTO {s}.outbox (msg_id, terms_id, customer_ref, transaction_id, standard,
    document_type, destination, body, created_at, state, next_attempt_at, model,
    ordering_key)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (msg_id) DO NOTHING;

-- name: release_expired
-- First step of a claim: rows whose lease expired (their worker died) go back to retry,
-- due when they were first due; then every claim reads one ordered index of due rows.
UPDATE {s}.outbox SET state = 'retry', lease_owner = NULL, lease_until = NULL
WHERE seq IN (
    SELECT o.seq FROM {s}.outbox o
    WHERE o.state = 'leased' AND o.lease_until < %(now)s
    FOR UPDATE SKIP LOCKED
);

-- name: claim
-- Lease the earliest due rows to a worker, skipping rows other workers are locking.
WITH picked AS MATERIALIZED (
    SELECT o.seq AS picked_seq FROM {s}.outbox o WHERE {due}
    ORDER BY o.next_attempt_at, o.seq LIMIT %(limit)s
    FOR UPDATE OF o SKIP LOCKED
)
{lease};

-- name: lock_destinations
-- Second step of a claim with a per-destination limit: the destinations with due rows
-- and room, earliest first, each locked for this transaction (or skipped when another
-- worker is claiming for it right now). The lock makes the count and the claim one step
-- across workers; claim_per_destination reads the count again, under the lock. The
-- destinations are found by a skip scan of the index of waiting rows (one probe per
-- destination), not by reading every due row.
WITH RECURSIVE walk (destination) AS (
    (SELECT o.destination FROM {s}.outbox o
     WHERE o.state IN ('pending', 'retry') AND o.destination IS NOT NULL
     ORDER BY o.destination LIMIT 1)
    UNION ALL
    SELECT (SELECT o.destination FROM {s}.outbox o
            WHERE o.state IN ('pending', 'retry') AND o.destination > w.destination
            ORDER BY o.destination LIMIT 1)
    FROM walk w WHERE w.destination IS NOT NULL
),
waiting AS (
    SELECT w.destination, (
        SELECT min(o.next_attempt_at) FROM {s}.outbox o
        WHERE o.destination = w.destination AND o.state IN ('pending', 'retry')
    ) AS first
    FROM walk w WHERE w.destination IS NOT NULL
)
SELECT d.destination FROM (
    SELECT destination FROM waiting
    WHERE first <= %(now)s AND (
        SELECT count(*) FROM {s}.outbox l
        WHERE l.destination = waiting.destination AND l.state = 'leased'
            AND l.lease_until >= %(now)s
    ) < %(per)s
    ORDER BY first, destination LIMIT %(limit)s
) d
WHERE pg_try_advisory_xact_lock(%(lock_space)s::int4, hashtext(d.destination));

-- name: claim_per_destination
-- Third step: lease due rows to the locked destinations, up to each one's room, and rows
-- without a destination, the earliest first.
WITH room AS (
    SELECT d.destination, %(per)s - (
        SELECT count(*) FROM {s}.outbox l
        WHERE l.destination = d.destination AND l.state = 'leased'
            AND l.lease_until >= %(now)s
    ) AS room
    FROM unnest(%(destinations)s::text[]) AS d (destination)
),
to_destinations AS MATERIALIZED (
    SELECT c.seq, c.next_attempt_at FROM room r
    CROSS JOIN LATERAL (
        SELECT o.seq, o.next_attempt_at FROM {s}.outbox o
        WHERE o.destination = r.destination AND {due}
        ORDER BY o.next_attempt_at, o.seq LIMIT greatest(r.room, 0)
        FOR UPDATE OF o SKIP LOCKED
    ) c
),
to_nowhere AS MATERIALIZED (
    SELECT o.seq, o.next_attempt_at FROM {s}.outbox o
    WHERE o.destination IS NULL AND {due}
    ORDER BY o.next_attempt_at, o.seq LIMIT %(limit)s
    FOR UPDATE OF o SKIP LOCKED
),
picked AS (
    SELECT seq AS picked_seq FROM (
        SELECT * FROM to_destinations UNION ALL SELECT * FROM to_nowhere
    ) x
    ORDER BY next_attempt_at, seq LIMIT %(limit)s
)
{lease};

-- name: heartbeat
-- Extend a worker's leases on rows.
UPDATE {s}.outbox SET lease_until = %s
WHERE msg_id = ANY(%s) AND lease_owner = %s AND state = 'leased';

-- name: cancel_leased
-- Cancel rows the worker leases: their terms were revoked (they ended then), or are gone
-- (they end about now, as the lease they were just claimed under would).
UPDATE {s}.outbox o SET state = 'cancelled', last_error = %s, lease_owner = NULL,
    lease_until = NULL, ended_at = coalesce(
        (SELECT t.revoked_at FROM {s}.terms t WHERE t.id = o.terms_id), o.lease_until)
WHERE o.msg_id = ANY(%s) AND o.lease_owner = %s AND o.state = 'leased';

-- name: insert_attempt
-- Record a delivery attempt.
INSERT INTO {s}.attempts (msg_id, attempt, owner, started_at, finished_at, outcome, status,
    error, next_attempt_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s);

-- name: mark_delivered
-- A receiver's 2xx is a fact whoever holds the lease now; only a cancelled row keeps its
-- state (its terms were revoked meanwhile).
UPDATE {s}.outbox SET state = 'delivered', delivered_at = %s, attempts = %s,
    last_status = %s, last_error = NULL, lease_owner = NULL, lease_until = NULL
WHERE msg_id = %s AND state IN ('leased', 'pending', 'retry', 'dead');

-- name: mark_retry
-- A failure, recorded only by the worker that still holds the lease.
UPDATE {s}.outbox SET state = 'retry', next_attempt_at = %s, attempts = %s,
    last_status = %s, last_error = %s, lease_owner = NULL, lease_until = NULL
WHERE msg_id = %s AND lease_owner = %s AND state = 'leased';

-- name: mark_dead
-- A last failure, recorded only by the worker that still holds the lease.
UPDATE {s}.outbox SET state = 'dead', dead_at = %s, attempts = %s, last_status = %s,
    last_error = %s, lease_owner = NULL, lease_until = NULL, next_attempt_at = NULL
WHERE msg_id = %s AND lease_owner = %s AND state = 'leased';

-- name: due_digests
-- Rows held for a digest whose window ended, by terms and window.
SELECT terms_id, next_attempt_at, msg_id, model FROM {s}.outbox
WHERE state = 'digest' AND next_attempt_at <= %s
ORDER BY terms_id, next_attempt_at, seq;

-- name: lock_digest_rows
-- Lock the rows of a digest window still held, so that racing workers merge it once.
SELECT msg_id FROM {s}.outbox WHERE msg_id = ANY(%s) AND state = 'digest' FOR UPDATE;

-- name: release_digest_rows
-- Let rows held for a digest go out on their own.
UPDATE {s}.outbox SET state = 'pending' WHERE msg_id = ANY(%s) AND state = 'digest';

-- name: merge_digest_rows
-- Mark rows held for a digest as gone out inside the digest document made at a time.
UPDATE {s}.outbox SET state = 'merged', ended_at = %s
WHERE msg_id = ANY(%s) AND state = 'digest';

-- name: next_due
-- When the next pending or retrying row is due, or the next lease expires.
SELECT least(
    (SELECT min(next_attempt_at) FROM {s}.outbox WHERE state IN ('pending', 'retry')),
    (SELECT min(lease_until) FROM {s}.outbox WHERE state = 'leased')
);

-- name: count_states
-- How many rows are in each state.
SELECT state, count(*) FROM {s}.outbox GROUP BY state;

-- name: oldest_waiting
-- When the oldest row not yet delivered was written.
SELECT min(created_at) FROM {s}.outbox WHERE state IN ('pending', 'retry', 'leased');

-- name: rows
-- Rows, newest first.
SELECT {row_columns} FROM {s}.outbox ORDER BY seq DESC LIMIT %s;

-- name: rows_in_state
-- Rows in one state, newest first.
SELECT {row_columns} FROM {s}.outbox WHERE state = %s ORDER BY seq DESC LIMIT %s;

-- name: get_row
-- The row with that msg_id.
SELECT {row_columns} FROM {s}.outbox WHERE msg_id = %s;

-- name: attempt_counts
-- Delivery attempts ever recorded, by outcome.
SELECT outcome, count(*) FROM {s}.attempts GROUP BY outcome;

-- name: attempts
-- Every recorded attempt of a row, in order.
SELECT msg_id, owner, attempt, started_at, finished_at, outcome, status, error,
    next_attempt_at
FROM {s}.attempts WHERE msg_id = %s ORDER BY id;

-- name: row_state
-- The state of the row with that msg_id.
SELECT state FROM {s}.outbox WHERE msg_id = %s;

-- name: redrive_one
-- Make a dead row pending again, due at the time given, its attempts counted afresh.
UPDATE {s}.outbox SET state = 'pending', attempts = 0, next_attempt_at = %s,
    dead_at = NULL
WHERE state = 'dead' AND msg_id = %s;

-- name: redrive_since
-- Make the rows dead since a time pending again, as redrive_one does.
UPDATE {s}.outbox SET state = 'pending', attempts = 0, next_attempt_at = %s,
    dead_at = NULL
WHERE state = 'dead' AND dead_at >= %s;

-- name: purgeable_delivered
-- Delivered rows finished before a time, oldest first (the retention purge). Each
-- purgeable_* query locks what it finds until the purge commits, skipping rows another
-- session holds: a row is deleted as it was found, never after a redrive, a send and a
-- new death in between (purge_rows checks only the state); two purges take turns.
SELECT msg_id FROM {s}.outbox WHERE state = 'delivered' AND delivered_at < %s
ORDER BY delivered_at LIMIT %s
FOR UPDATE SKIP LOCKED;

-- name: purgeable_dead
-- Dead rows that died before a time, oldest first (the retention purge).
SELECT msg_id FROM {s}.outbox WHERE state = 'dead' AND dead_at < %s
ORDER BY dead_at LIMIT %s
FOR UPDATE SKIP LOCKED;

-- name: purgeable_pull
-- Pull-only rows written before a time, oldest first (the retention purge).
SELECT msg_id FROM {s}.outbox WHERE state = 'pull' AND created_at < %s
ORDER BY created_at LIMIT %s
FOR UPDATE SKIP LOCKED;

-- name: purgeable_merged
-- Rows merged into a digest document before a time, oldest first (the retention purge).
SELECT msg_id FROM {s}.outbox WHERE state = 'merged' AND ended_at < %s
ORDER BY ended_at LIMIT %s
FOR UPDATE SKIP LOCKED;

-- name: purgeable_cancelled
-- Rows cancelled before a time, oldest first (the retention purge).
SELECT msg_id FROM {s}.outbox WHERE state = 'cancelled' AND ended_at < %s
ORDER BY ended_at LIMIT %s
FOR UPDATE SKIP LOCKED;

-- name: count_purgeable_delivered
-- How many delivered rows finished before a time.
SELECT count(*) FROM {s}.outbox WHERE state = 'delivered' AND delivered_at < %s;

-- name: count_purgeable_dead
-- How many dead rows died before a time.
SELECT count(*) FROM {s}.outbox WHERE state = 'dead' AND dead_at < %s;

-- name: count_purgeable_pull
-- How many pull-only rows were written before a time.
SELECT count(*) FROM {s}.outbox WHERE state = 'pull' AND created_at < %s;

-- name: count_purgeable_merged
-- How many rows were merged into a digest document before a time.
SELECT count(*) FROM {s}.outbox WHERE state = 'merged' AND ended_at < %s;

-- name: count_purgeable_cancelled
-- How many rows were cancelled before a time.
SELECT count(*) FROM {s}.outbox WHERE state = 'cancelled' AND ended_at < %s;

-- name: purge_rows
-- Delete rows still in the state they were found in (a dead row redriven meanwhile is
-- pending, and stays); the ids of those deleted.
DELETE FROM {s}.outbox WHERE state = %s AND msg_id = ANY(%s) RETURNING msg_id;

-- name: purge_attempts
-- Delete the attempts of purged rows.
DELETE FROM {s}.attempts WHERE msg_id = ANY(%s);

-- name: purgeable_offers
-- Offers no longer valid before a time whose acceptances all finished before another,
-- oldest first (the retention purge). A processing acceptance keeps its offer forever:
-- its lease may be recovered.
SELECT o.id FROM {s}.offers o WHERE o.valid_until < %s AND NOT EXISTS (
    SELECT 1 FROM {s}.acceptances a
    WHERE a.offer_id = o.id AND (a.state = 'processing' OR a.updated_at >= %s))
ORDER BY o.valid_until, o.id LIMIT %s;

-- name: count_purgeable_offers
-- How many offers the purge would delete, and how many acceptances with them.
SELECT count(*), coalesce(sum(
    (SELECT count(*) FROM {s}.acceptances a WHERE a.offer_id = o.id)), 0)
FROM {s}.offers o WHERE o.valid_until < %s AND NOT EXISTS (
    SELECT 1 FROM {s}.acceptances a
    WHERE a.offer_id = o.id AND (a.state = 'processing' OR a.updated_at >= %s));

-- name: lock_offer_acceptances
-- Hold an offer's acceptances while it is purged, before the offer: the order in which
-- claiming and finishing an acceptance take them.
SELECT id FROM {s}.acceptances WHERE offer_id = %s FOR UPDATE;

-- name: lock_offer
-- Hold an offer while it is purged: no acceptance takes it meanwhile.
SELECT id FROM {s}.offers WHERE id = %s FOR UPDATE;

-- name: purge_offer
-- Delete an offer, checked again under its lock (an acceptance may have begun).
DELETE FROM {s}.offers AS o WHERE o.id = %s AND o.valid_until < %s AND NOT EXISTS (
    SELECT 1 FROM {s}.acceptances a
    WHERE a.offer_id = o.id AND (a.state = 'processing' OR a.updated_at >= %s));

-- name: purge_offer_acceptances
-- Delete a purged offer's acceptances, in the same transaction.
DELETE FROM {s}.acceptances WHERE offer_id = %s;

-- name: purge_delivered_attempts
-- Forget the attempts of delivered rows (kept for pulling) delivered before a time, the
-- oldest deliveries first, a batch of documents at a time. Found by their delivering
-- attempt (a partial index): the attempts of dead letters and of rows still retrying,
-- however many and old, are never read. Not those of rows the purge deletes (delivered
-- before the second time): they go with their row, and count as it. Only a delivered row's:
-- a row cancelled while its 200 came back keeps that record for its own window.
DELETE FROM {s}.attempts WHERE msg_id IN (
    SELECT a.msg_id FROM {s}.attempts a WHERE a.outcome = 'delivered' AND a.finished_at < %s
        AND a.finished_at >= %s AND EXISTS (
        SELECT 1 FROM {s}.outbox o WHERE o.msg_id = a.msg_id AND o.state = 'delivered')
    ORDER BY a.finished_at LIMIT %s);

-- name: count_purgeable_attempts
-- How many attempts of delivered rows delivered before a time, but not before the second
-- (those go with their row).
SELECT count(*) FROM {s}.attempts WHERE msg_id IN (
    SELECT d.msg_id FROM {s}.attempts d WHERE d.outcome = 'delivered' AND d.finished_at < %s
        AND d.finished_at >= %s AND EXISTS (
        SELECT 1 FROM {s}.outbox o WHERE o.msg_id = d.msg_id AND o.state = 'delivered'));

-- name: purge_seen_batch
-- Forget message ids whose time is up, oldest first, a batch at a time.
DELETE FROM {s}.seen WHERE (party, msg_id) IN (
    SELECT party, msg_id FROM {s}.seen WHERE expires_at < %s ORDER BY expires_at LIMIT %s);

-- name: count_purgeable_seen
-- How many message ids are past their time.
SELECT count(*) FROM {s}.seen WHERE expires_at < %s;

-- name: purge_problems
-- Forget emission problems kept since before a time, oldest first, a batch at a time.
DELETE FROM {s}.emission_problems WHERE seq IN (
    SELECT seq FROM {s}.emission_problems WHERE created_at < %s
    ORDER BY created_at LIMIT %s);

-- name: count_purgeable_problems
-- How many emission problems were kept since before a time.
SELECT count(*) FROM {s}.emission_problems WHERE created_at < %s;

-- name: documents_since
-- Documents of the terms after a cursor (a transaction id and a seq). Rows of
-- transactions older than every transaction still running are all there is below that
-- line: a row committing later belongs to a younger transaction, so it sorts after any
-- cursor handed out. (Aborted transactions' rows are never visible.)
SELECT {row_columns}, o.xid::text FROM {s}.outbox o
WHERE o.terms_id = %(terms)s AND o.state NOT IN ('cancelled', 'digest', 'merged')
    AND (o.xid, o.seq) > (%(xid)s::xid8, %(seq)s)
    AND o.xid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY o.xid, o.seq LIMIT %(limit)s;

-- ---------------------------------------------------------------------------------------
-- destinations

-- name: disable_destination
-- Stop delivering to a destination (kept as first disabled).
INSERT INTO {s}.destinations (url, disabled_at, reason) VALUES (%s, %s, %s)
ON CONFLICT (url) DO NOTHING;

-- name: enable_destination
-- Deliver to a destination again.
DELETE FROM {s}.destinations WHERE url = %s;

-- name: disabled_destinations
-- Disabled destinations and why.
SELECT url, reason FROM {s}.destinations;

-- ---------------------------------------------------------------------------------------
-- intermediaries and the stored secrets

-- name: add_intermediary
-- Register an intermediary with no secrets yet, unless it is there.
INSERT INTO {s}.intermediaries (name, secrets, created_at, generation)
VALUES (%s, '[]'::jsonb, %s, 0)
ON CONFLICT (name) DO NOTHING;

-- name: intermediary_secrets
-- An intermediary's secrets (as stored) and whether it is revoked; locked until commit.
SELECT secrets::text, revoked_at FROM {s}.intermediaries WHERE name = %s FOR UPDATE;

-- name: put_intermediary
-- Replace an intermediary's secrets; counts as a change.
UPDATE {s}.intermediaries SET secrets = %s::jsonb, revoked_at = NULL,
    generation = generation + 1
WHERE name = %s;

-- name: revoke_intermediary
-- Revoke an intermediary and forget its secrets.
UPDATE {s}.intermediaries SET secrets = '[]'::jsonb, revoked_at = %s,
    generation = generation + 1
WHERE name = %s;

-- name: get_intermediary
-- The intermediary with that name.
SELECT {intermediary_columns} FROM {s}.intermediaries WHERE name = %s;

-- name: list_intermediaries
-- Every intermediary, by name.
SELECT {intermediary_columns} FROM {s}.intermediaries ORDER BY name;

-- name: intermediary_generation
-- How many times the intermediary's row has changed.
SELECT generation FROM {s}.intermediaries WHERE name = %s;

-- name: all_terms_secrets
-- Every terms' secret, as stored; locked until commit.
SELECT id, secret FROM {s}.terms FOR UPDATE;

-- name: update_terms_secret
-- Store a terms' secret sealed anew.
UPDATE {s}.terms SET secret = %s WHERE id = %s;

-- name: all_intermediary_secrets
-- Every intermediary's secrets, as stored; locked until commit.
SELECT name, secrets::text FROM {s}.intermediaries FOR UPDATE;

-- name: update_intermediary_secrets
-- Store an intermediary's secrets sealed anew.
UPDATE {s}.intermediaries SET secrets = %s::jsonb WHERE name = %s;

-- ---------------------------------------------------------------------------------------
-- replay cache

-- name: purge_seen
-- Forget message ids whose time is up.
DELETE FROM {s}.seen WHERE expires_at < %s;

-- name: remember_message
-- Remember a message id; an id whose time is up counts as new, purged or not.
INSERT INTO {s}.seen AS s (party, msg_id, expires_at) VALUES (%s, %s, %s)
ON CONFLICT (party, msg_id) DO UPDATE SET expires_at = EXCLUDED.expires_at
WHERE s.expires_at < %s;

-- name: message_seen
-- Whether a message id is remembered and not expired.
SELECT 1 FROM {s}.seen WHERE party = %s AND msg_id = %s AND expires_at >= %s;

-- name: forget_message
-- Forget a message id.
DELETE FROM {s}.seen WHERE party = %s AND msg_id = %s;

-- ---------------------------------------------------------------------------------------
-- offers and acceptances

-- name: insert_offer
-- Keep an offer with the request it answers and its signed document.
INSERT INTO {s}.offers (id, request_id, customer_ref, intermediary, offer, request, xml,
    valid_until, created_at)
VALUES (%s, %s, %s, %s, %s::jsonb, %s::jsonb, %s, %s, %s);

-- name: get_offer
-- The offer with that id.
SELECT offer::text, request::text, xml, intermediary FROM {s}.offers WHERE id = %s;

-- name: offer_exists
-- Whether there is an offer with that id.
SELECT 1 FROM {s}.offers WHERE id = %s;

-- name: get_acceptance
-- The acceptance with that id.
SELECT {acceptance_columns} FROM {s}.acceptances WHERE id = %s;

-- name: lock_acceptance
-- The acceptance with that id, locked until commit.
SELECT {acceptance_columns} FROM {s}.acceptances WHERE id = %s FOR UPDATE;

-- name: take_offer
-- Make an acceptance the offer's holder, while it has none.
UPDATE {s}.offers SET accepted_by = %s WHERE id = %s AND accepted_by IS NULL;

-- name: offer_holder
-- The acceptance that holds an offer.
SELECT {acceptance_columns} FROM {s}.acceptances
WHERE id = (SELECT o.accepted_by FROM {s}.offers o WHERE o.id = %s);

-- name: claim_acceptance
-- Start an acceptance, processing under a lease (nothing when the id is taken).
INSERT INTO {s}.acceptances (id, offer_id, state, result, created_at, updated_at,
    intermediary, acceptance, hold, lease_owner, lease_until)
VALUES (%s, %s, 'processing', NULL, %s, %s, %s, %s, NULL, %s, %s)
ON CONFLICT (id) DO NOTHING;

-- name: reclaim_acceptance
-- Start a released acceptance again, processing under a lease.
UPDATE {s}.acceptances SET state = 'processing', result = NULL, updated_at = %s,
    intermediary = %s, acceptance = %s, hold = NULL, lease_owner = %s, lease_until = %s
WHERE id = %s AND state = 'released';

-- name: renew_acceptance
-- Extend the owner's lease on an acceptance and record its hold.
UPDATE {s}.acceptances SET lease_until = %s, hold = COALESCE(%s, hold)
WHERE id = %s AND state = 'processing' AND lease_owner = %s;

-- name: take_over_acceptance
-- Take over a processing acceptance whose lease expired.
UPDATE {s}.acceptances SET lease_owner = %s, lease_until = %s
WHERE id = %s AND state = 'processing' AND (lease_until IS NULL OR lease_until < %s);

-- name: hold_offer
-- Make a booked acceptance the offer's holder, unless another holds it.
UPDATE {s}.offers SET accepted_by = %s
WHERE id = %s AND (accepted_by IS NULL OR accepted_by = %s);

-- name: release_offer
-- Let go of an offer the acceptance holds.
UPDATE {s}.offers SET accepted_by = NULL WHERE id = %s AND accepted_by = %s;

-- name: finish_acceptance
-- Record an acceptance's outcome and end its lease.
UPDATE {s}.acceptances SET state = %s, result = %s, updated_at = %s, lease_owner = NULL,
    lease_until = NULL
WHERE id = %s;

-- name: stalled_acceptances
-- Processing acceptances whose lease expired, oldest first.
SELECT {acceptance_columns} FROM {s}.acceptances
WHERE state = 'processing' AND (lease_until IS NULL OR lease_until < %s)
ORDER BY created_at, id LIMIT %s;

-- ---------------------------------------------------------------------------------------
-- emission problems

-- name: insert_problem
-- Keep a document that could not be made, for the operator.
INSERT INTO {s}.emission_problems (transaction_id, terms_id, customer_ref, standard,
    reason, created_at, transaction_json)
VALUES (%s, %s, %s, %s, %s, %s, %s);

-- name: emission_problems
-- Emission problems, newest first.
SELECT transaction_id, terms_id, customer_ref, standard, reason, created_at,
    transaction_json
FROM {s}.emission_problems ORDER BY seq DESC LIMIT %s;

-- name: count_emission_problems
-- How many emission problems are kept.
SELECT count(*) FROM {s}.emission_problems;
