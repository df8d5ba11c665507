-- The SQLite store's statements (cmi_sdk/outbox/sqlite.py), by name.
-- Parameters are positional (?) unless a statement names them (:name).
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
name, created_at, secrets, revoked_at, generation

-- fragment: active
-- Terms in force at :now.
t.revoked_at IS NULL AND (t.until IS NULL OR t.until > :now)

-- fragment: cancel_rows
-- Rows of terms being revoked, cancelled at the revocation's time; rows being sent right
-- now too, so that their result is not recorded over the cancellation (see
-- mark_delivered and the others).
UPDATE cmi_outbox SET state = 'cancelled', last_error = 'terms revoked',
    lease_owner = NULL, lease_until = NULL, ended_at = ?
WHERE terms_id = ? AND state IN ('pending', 'retry', 'leased', 'digest')

-- ---------------------------------------------------------------------------------------
-- schema

-- name: create_migrations_table
-- The table of the numbered migrations applied, one row each.
CREATE TABLE IF NOT EXISTS cmi_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at REAL NOT NULL
);

-- name: migration_version
-- The highest numbered migration applied (fails while the table is missing).
SELECT max(version) FROM cmi_migrations;

-- name: legacy_version
-- The version row of a store made before migrations were numbered.
SELECT value FROM cmi_meta WHERE key = 'schema_version';

-- name: record_migration
-- Record a numbered migration as applied.
INSERT OR REPLACE INTO cmi_migrations (version, name, applied_at) VALUES (?, ?, ?);

-- name: drop_legacy_version
-- Drop the version table of a store made before migrations were numbered.
DROP TABLE IF EXISTS cmi_meta;

-- name: database_list
-- The files the connection has open (to check a caller's connection is to the store's).
PRAGMA database_list;

-- name: checkpoint_wal
-- Copy the WAL into the file and empty it, so that no old page stays in it.
PRAGMA wal_checkpoint(TRUNCATE);

-- name: secure_delete
-- Whether freed pages are zeroed.
PRAGMA secure_delete;

-- ---------------------------------------------------------------------------------------
-- terms and consent

-- name: insert_terms
-- Keep accepted terms (their secret sealed or not, as the store's keyring says).
INSERT INTO cmi_terms (id, customer_ref, intermediary, terms, secret, created_at, until,
    revoked_at)
VALUES (?, ?, ?, ?, ?, ?, ?, NULL);

-- name: insert_consent
-- Keep a consent record and its signed document.
INSERT INTO cmi_consent (id, terms_id, event, issued_at, record, xml)
VALUES (?, ?, ?, ?, ?, ?);

-- name: get_terms
-- The terms with that id, revoked or not.
SELECT terms, secret FROM cmi_terms WHERE id = ?;

-- name: list_terms
-- Every terms' JSON and secret: the store adds the filters asked for.
SELECT terms, secret FROM cmi_terms;

-- name: recipients
-- What a document for an account goes out under: the firm's direct terms for the
-- account, and the terms of each of its active links; for an intermediary's reference,
-- what its linked account gets, or, unlinked, only that intermediary's own terms for it.
WITH account (id) AS (
    SELECT :ref WHERE :intermediary IS NULL
    UNION ALL
    SELECT account FROM cmi_links
    WHERE intermediary = :intermediary AND customer_ref = :ref AND revoked_at IS NULL
)
SELECT t.terms, t.secret, t.created_at, t.id
FROM account a JOIN cmi_terms t ON t.customer_ref = a.id AND t.intermediary IS NULL
WHERE {active}
UNION ALL
SELECT t.terms, t.secret, t.created_at, t.id
FROM account a JOIN cmi_links l ON l.account = a.id AND l.revoked_at IS NULL
JOIN cmi_terms t ON t.intermediary = l.intermediary AND t.customer_ref = l.customer_ref
WHERE {active}
UNION ALL
SELECT t.terms, t.secret, t.created_at, t.id FROM cmi_terms t
WHERE t.intermediary = :intermediary AND t.customer_ref = :ref AND {active}
    AND NOT EXISTS (SELECT 1 FROM account)
ORDER BY 3, 4;

-- name: terms_to_revoke
-- Whether the terms are revoked already, and their JSON.
SELECT revoked_at, terms FROM cmi_terms WHERE id = ?;

-- name: revoke_terms
-- Mark terms revoked, with their JSON saying when.
UPDATE cmi_terms SET revoked_at = ?, terms = ? WHERE id = ?;

-- name: cancel_terms_rows
-- Cancel the undelivered rows of revoked terms.
{cancel_rows};

-- name: consent_records
-- The consent records of the terms, oldest first.
SELECT record, xml FROM cmi_consent WHERE terms_id = ? ORDER BY issued_at, rowid;

-- ---------------------------------------------------------------------------------------
-- service links

-- name: drop_expired_link_codes
-- Drop link codes that expired unredeemed.
DELETE FROM cmi_link_codes WHERE expires_at < ? AND used_at IS NULL;

-- name: insert_link_code
-- Keep a link code's hash.
INSERT INTO cmi_link_codes (hash, account, created_at, expires_at) VALUES (?, ?, ?, ?);

-- name: use_link_code
-- Mark a live, unused code used; returns its account (no row: unknown, used or expired).
UPDATE cmi_link_codes SET used_at = ?, link_id = ?
WHERE hash = ? AND used_at IS NULL AND expires_at > ?
RETURNING account;

-- name: insert_link
-- Make a link.
INSERT INTO cmi_links ({link_columns}) VALUES (?, ?, ?, ?, ?, ?);

-- name: get_link
-- The link with that id.
SELECT {link_columns} FROM cmi_links WHERE id = ?;

-- name: list_links
-- Every link: the store adds the filters asked for.
SELECT {link_columns} FROM cmi_links;

-- name: link_to_revoke
-- Whether the link is revoked already, and whose reference it links.
SELECT revoked_at, intermediary, customer_ref FROM cmi_links WHERE id = ?;

-- name: revoke_link
-- Mark a link revoked.
UPDATE cmi_links SET revoked_at = ? WHERE id = ?;

-- name: linked_terms_to_revoke
-- The JSON of live terms of the link's intermediary and reference.
SELECT terms FROM cmi_terms
WHERE id = ? AND intermediary = ? AND customer_ref = ? AND revoked_at IS NULL;

-- name: linked_terms_left
-- The live terms of an intermediary's reference, oldest first.
SELECT id FROM cmi_terms
WHERE intermediary = ? AND customer_ref = ? AND revoked_at IS NULL
ORDER BY created_at, id;

-- ---------------------------------------------------------------------------------------
-- outbox

-- name: insert_row
-- Write an outbox row; a msg_id already there is skipped.
INSERT OR IGNORE INTO cmi_outbox (msg_id, terms_id, customer_ref, transaction_id,
    standard, document_type, destination, body, created_at, state, next_attempt_at, model)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?);

-- name: claim
-- Lease the earliest due rows, and rows whose lease expired, to a worker.
UPDATE cmi_outbox SET state = 'leased', lease_owner = ?, lease_until = ?
WHERE seq IN (
    SELECT seq FROM cmi_outbox
    WHERE (state IN ('pending', 'retry') AND next_attempt_at <= ?)
        OR (state = 'leased' AND lease_until < ?)
    ORDER BY next_attempt_at, seq LIMIT ?
)
RETURNING {row_columns};

-- name: heartbeat
-- Extend a worker's lease on a row.
UPDATE cmi_outbox SET lease_until = ?
WHERE msg_id = ? AND lease_owner = ? AND state = 'leased';

-- name: cancel_leased
-- Cancel a row the worker leases: its terms were revoked (it ended then), or are gone
-- (it ends about now, as the lease it was just claimed under would).
UPDATE cmi_outbox SET state = 'cancelled', last_error = ?, lease_owner = NULL,
    lease_until = NULL, ended_at = coalesce(
        (SELECT t.revoked_at FROM cmi_terms t WHERE t.id = cmi_outbox.terms_id),
        lease_until)
WHERE msg_id = ? AND lease_owner = ? AND state = 'leased';

-- name: insert_attempt
-- Record a delivery attempt.
INSERT INTO cmi_attempts (msg_id, attempt, owner, started_at, finished_at, outcome, status,
    error, next_attempt_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?);

-- name: mark_delivered
-- A receiver's 2xx is a fact whoever holds the lease now; only a cancelled row keeps its
-- state (its terms were revoked meanwhile).
UPDATE cmi_outbox SET state = 'delivered', delivered_at = ?, attempts = ?, last_status = ?,
    last_error = NULL, lease_owner = NULL, lease_until = NULL
WHERE msg_id = ? AND state IN ('leased', 'pending', 'retry', 'dead');

-- name: mark_retry
-- A failure, recorded only by the worker that still holds the lease.
UPDATE cmi_outbox SET state = 'retry', next_attempt_at = ?, attempts = ?, last_status = ?,
    last_error = ?, lease_owner = NULL, lease_until = NULL
WHERE msg_id = ? AND lease_owner = ? AND state = 'leased';

-- name: mark_dead
-- A last failure, recorded only by the worker that still holds the lease.
UPDATE cmi_outbox SET state = 'dead', dead_at = ?, attempts = ?, last_status = ?,
    last_error = ?, lease_owner = NULL, lease_until = NULL, next_attempt_at = NULL
WHERE msg_id = ? AND lease_owner = ? AND state = 'leased';

-- name: due_digests
-- Rows held for a digest whose window ended, by terms and window.
SELECT terms_id, next_attempt_at, msg_id, model FROM cmi_outbox
WHERE state = 'digest' AND next_attempt_at <= ?
ORDER BY terms_id, next_attempt_at, seq;

-- name: release_digest_row
-- Let a row held for a digest go out on its own.
UPDATE cmi_outbox SET state = 'pending' WHERE msg_id = ? AND state = 'digest';

-- name: merge_digest_row
-- Mark a row held for a digest as gone out inside the digest document made at a time.
UPDATE cmi_outbox SET state = 'merged', ended_at = ? WHERE msg_id = ? AND state = 'digest';

-- name: next_due
-- When the next pending or retrying row is due, or the next lease expires.
SELECT min(t) FROM (
    SELECT min(next_attempt_at) AS t FROM cmi_outbox WHERE state IN ('pending', 'retry')
    UNION ALL
    SELECT min(lease_until) FROM cmi_outbox WHERE state = 'leased'
);

-- name: count_states
-- How many rows are in each state.
SELECT state, count(*) FROM cmi_outbox GROUP BY state;

-- name: oldest_waiting
-- When the oldest row not yet delivered was written.
SELECT min(created_at) FROM cmi_outbox WHERE state IN ('pending', 'retry', 'leased');

-- name: rows
-- Rows, newest first.
SELECT {row_columns} FROM cmi_outbox ORDER BY seq DESC LIMIT ?;

-- name: rows_in_state
-- Rows in one state, newest first.
SELECT {row_columns} FROM cmi_outbox WHERE state = ? ORDER BY seq DESC LIMIT ?;

-- name: get_row
-- The row with that msg_id.
SELECT {row_columns} FROM cmi_outbox WHERE msg_id = ?;

-- name: attempt_counts
-- Delivery attempts ever recorded, by outcome.
SELECT outcome, count(*) FROM cmi_attempts GROUP BY outcome;

-- name: attempts
-- Every recorded attempt of a row, in order.
SELECT msg_id, owner, attempt, started_at, finished_at, outcome, status, error,
    next_attempt_at
FROM cmi_attempts WHERE msg_id = ? ORDER BY rowid;

-- name: row_state
-- The state of the row with that msg_id.
SELECT state FROM cmi_outbox WHERE msg_id = ?;

-- name: redrive_one
-- Make a dead row pending again, due at the time given, its attempts counted afresh.
UPDATE cmi_outbox SET state = 'pending', attempts = 0, next_attempt_at = ?, dead_at = NULL
WHERE msg_id = ? AND state = 'dead';

-- name: redrive_since
-- Make the rows dead since a time pending again, as redrive_one does.
UPDATE cmi_outbox SET state = 'pending', attempts = 0, next_attempt_at = ?, dead_at = NULL
WHERE state = 'dead' AND dead_at >= ?;

-- name: purgeable_delivered
-- Delivered rows finished before a time, oldest first (the retention purge).
SELECT msg_id FROM cmi_outbox WHERE state = 'delivered' AND delivered_at < ?
ORDER BY delivered_at LIMIT ?;

-- name: purgeable_dead
-- Dead rows that died before a time, oldest first (the retention purge).
SELECT msg_id FROM cmi_outbox WHERE state = 'dead' AND dead_at < ?
ORDER BY dead_at LIMIT ?;

-- name: purgeable_pull
-- Pull-only rows written before a time, oldest first (the retention purge).
SELECT msg_id FROM cmi_outbox WHERE state = 'pull' AND created_at < ?
ORDER BY created_at LIMIT ?;

-- name: purgeable_merged
-- Rows merged into a digest document before a time, oldest first (the retention purge).
SELECT msg_id FROM cmi_outbox WHERE state = 'merged' AND ended_at < ?
ORDER BY ended_at LIMIT ?;

-- name: purgeable_cancelled
-- Rows cancelled before a time, oldest first (the retention purge).
SELECT msg_id FROM cmi_outbox WHERE state = 'cancelled' AND ended_at < ?
ORDER BY ended_at LIMIT ?;

-- name: count_purgeable_delivered
-- How many delivered rows finished before a time.
SELECT count(*) FROM cmi_outbox WHERE state = 'delivered' AND delivered_at < ?;

-- name: count_purgeable_dead
-- How many dead rows died before a time.
SELECT count(*) FROM cmi_outbox WHERE state = 'dead' AND dead_at < ?;

-- name: count_purgeable_pull
-- How many pull-only rows were written before a time.
SELECT count(*) FROM cmi_outbox WHERE state = 'pull' AND created_at < ?;

-- name: count_purgeable_merged
-- How many rows were merged into a digest document before a time.
SELECT count(*) FROM cmi_outbox WHERE state = 'merged' AND ended_at < ?;

-- name: count_purgeable_cancelled
-- How many rows were cancelled before a time.
SELECT count(*) FROM cmi_outbox WHERE state = 'cancelled' AND ended_at < ?;

-- name: purge_rows
-- Delete rows still in the state they were found in (a dead row redriven meanwhile is
-- pending, and stays); the ids of those deleted. The ids come as a JSON array. Found by
-- id: "+state" keeps the planner off the state indexes, which hold every such row.
DELETE FROM cmi_outbox WHERE +state = ? AND msg_id IN (SELECT value FROM json_each(?))
RETURNING msg_id;

-- name: purge_attempts
-- Delete the attempts of purged rows (their ids as a JSON array).
DELETE FROM cmi_attempts WHERE msg_id IN (SELECT value FROM json_each(?));

-- name: purgeable_offers
-- Offers no longer valid before a time whose acceptances all finished before another,
-- oldest first (the retention purge). A processing acceptance keeps its offer forever:
-- its lease may be recovered.
SELECT o.id FROM cmi_offers o WHERE o.valid_until < ? AND NOT EXISTS (
    SELECT 1 FROM cmi_acceptances a
    WHERE a.offer_id = o.id AND (a.state = 'processing' OR a.updated_at >= ?))
ORDER BY o.valid_until, o.id LIMIT ?;

-- name: count_purgeable_offers
-- How many offers the purge would delete, and how many acceptances with them.
SELECT count(*), coalesce(sum(
    (SELECT count(*) FROM cmi_acceptances a WHERE a.offer_id = o.id)), 0)
FROM cmi_offers o WHERE o.valid_until < ? AND NOT EXISTS (
    SELECT 1 FROM cmi_acceptances a
    WHERE a.offer_id = o.id AND (a.state = 'processing' OR a.updated_at >= ?));

-- name: lock_offer_acceptances
-- Hold an offer's acceptances while it is purged, before the offer: the order in which
-- claiming and finishing an acceptance take them.
SELECT id FROM cmi_acceptances WHERE offer_id = ?;

-- name: lock_offer
-- Hold an offer while it is purged: no acceptance takes it meanwhile.
SELECT id FROM cmi_offers WHERE id = ?;

-- name: purge_offer
-- Delete an offer, checked again under its lock (an acceptance may have begun).
DELETE FROM cmi_offers AS o WHERE o.id = ? AND o.valid_until < ? AND NOT EXISTS (
    SELECT 1 FROM cmi_acceptances a
    WHERE a.offer_id = o.id AND (a.state = 'processing' OR a.updated_at >= ?));

-- name: purge_offer_acceptances
-- Delete a purged offer's acceptances, in the same transaction.
DELETE FROM cmi_acceptances WHERE offer_id = ?;

-- name: purge_delivered_attempts
-- Forget the attempts of delivered rows (kept for pulling) delivered before a time, the
-- oldest deliveries first, a batch of documents at a time. Found by their delivering
-- attempt (a partial index): the attempts of dead letters and of rows still retrying,
-- however many and old, are never read. Not those of rows the purge deletes (delivered
-- before the second time): they go with their row, and count as it. Only a delivered row's:
-- a row cancelled while its 200 came back keeps that record for its own window.
DELETE FROM cmi_attempts WHERE msg_id IN (
    SELECT a.msg_id FROM cmi_attempts a WHERE a.outcome = 'delivered' AND a.finished_at < ?
        AND a.finished_at >= ? AND EXISTS (
        SELECT 1 FROM cmi_outbox o WHERE o.msg_id = a.msg_id AND o.state = 'delivered')
    ORDER BY a.finished_at LIMIT ?);

-- name: count_purgeable_attempts
-- How many attempts of delivered rows delivered before a time, but not before the second
-- (those go with their row).
SELECT count(*) FROM cmi_attempts WHERE msg_id IN (
    SELECT d.msg_id FROM cmi_attempts d WHERE d.outcome = 'delivered' AND d.finished_at < ?
        AND d.finished_at >= ? AND EXISTS (
        SELECT 1 FROM cmi_outbox o WHERE o.msg_id = d.msg_id AND o.state = 'delivered'));

-- name: purge_seen_batch
-- Forget message ids whose time is up, oldest first, a batch at a time.
DELETE FROM cmi_seen WHERE (party, msg_id) IN (
    SELECT party, msg_id FROM cmi_seen WHERE expires_at < ? ORDER BY expires_at LIMIT ?);

-- name: count_purgeable_seen
-- How many message ids are past their time.
SELECT count(*) FROM cmi_seen WHERE expires_at < ?;

-- name: purge_problems
-- Forget emission problems kept since before a time, oldest first, a batch at a time.
DELETE FROM cmi_emission_problems WHERE seq IN (
    SELECT seq FROM cmi_emission_problems WHERE created_at < ?
    ORDER BY created_at LIMIT ?);

-- name: count_purgeable_problems
-- How many emission problems were kept since before a time.
SELECT count(*) FROM cmi_emission_problems WHERE created_at < ?;

-- name: documents_since
-- Documents of the terms after a cursor (a seq): one writer at a time commits rows in
-- seq order, so the cursor never skips a row that commits late.
SELECT {row_columns} FROM cmi_outbox
WHERE terms_id = ? AND seq > ? AND state NOT IN ('cancelled', 'digest', 'merged')
ORDER BY seq LIMIT ?;

-- ---------------------------------------------------------------------------------------
-- destinations

-- name: disable_destination
-- Stop delivering to a destination (kept as first disabled).
INSERT OR IGNORE INTO cmi_destinations (url, disabled_at, reason) VALUES (?, ?, ?);

-- name: enable_destination
-- Deliver to a destination again.
DELETE FROM cmi_destinations WHERE url = ?;

-- name: disabled_destinations
-- Disabled destinations and why.
SELECT url, reason FROM cmi_destinations;

-- ---------------------------------------------------------------------------------------
-- intermediaries and the stored secrets

-- name: intermediary_secrets
-- An intermediary's secrets (as stored) and whether it is revoked.
SELECT secrets, revoked_at FROM cmi_intermediaries WHERE name = ?;

-- name: add_intermediary
-- Register an intermediary with no secrets yet, unless it is there.
INSERT OR IGNORE INTO cmi_intermediaries (name, secrets, created_at, generation)
VALUES (?, '[]', ?, 0);

-- name: put_intermediary
-- Replace an intermediary's secrets; counts as a change.
UPDATE cmi_intermediaries SET secrets = ?, revoked_at = NULL, generation = generation + 1
WHERE name = ?;

-- name: revoke_intermediary
-- Revoke an intermediary and forget its secrets.
UPDATE cmi_intermediaries SET secrets = '[]', revoked_at = ?, generation = generation + 1
WHERE name = ?;

-- name: get_intermediary
-- The intermediary with that name.
SELECT {intermediary_columns} FROM cmi_intermediaries WHERE name = ?;

-- name: list_intermediaries
-- Every intermediary, by name.
SELECT {intermediary_columns} FROM cmi_intermediaries ORDER BY name;

-- name: intermediary_generation
-- How many times the intermediary's row has changed.
SELECT generation FROM cmi_intermediaries WHERE name = ?;

-- name: all_terms_secrets
-- Every terms' secret, as stored.
SELECT id, secret FROM cmi_terms;

-- name: update_terms_secret
-- Store a terms' secret sealed anew.
UPDATE cmi_terms SET secret = ? WHERE id = ?;

-- name: all_intermediary_secrets
-- Every intermediary's secrets, as stored.
SELECT name, secrets FROM cmi_intermediaries;

-- name: update_intermediary_secrets
-- Store an intermediary's secrets sealed anew.
UPDATE cmi_intermediaries SET secrets = ? WHERE name = ?;

-- ---------------------------------------------------------------------------------------
-- replay cache

-- name: purge_seen
-- Forget message ids whose time is up.
DELETE FROM cmi_seen WHERE expires_at < ?;

-- name: remember_message
-- Remember a message id; an id whose time is up counts as new, purged or not.
INSERT INTO cmi_seen (party, msg_id, expires_at) VALUES (?, ?, ?)
ON CONFLICT (party, msg_id) DO UPDATE SET expires_at = excluded.expires_at
WHERE cmi_seen.expires_at < ?;

-- name: message_seen
-- Whether a message id is remembered and not expired.
SELECT 1 FROM cmi_seen WHERE party = ? AND msg_id = ? AND expires_at >= ?;

-- name: forget_message
-- Forget a message id.
DELETE FROM cmi_seen WHERE party = ? AND msg_id = ?;

-- ---------------------------------------------------------------------------------------
-- offers and acceptances

-- name: insert_offer
-- Keep an offer with the request it answers and its signed document.
INSERT INTO cmi_offers (id, request_id, customer_ref, intermediary, offer, request, xml,
    valid_until, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?);

-- name: get_offer
-- The offer with that id.
SELECT offer, request, xml, intermediary FROM cmi_offers WHERE id = ?;

-- name: get_acceptance
-- The acceptance with that id.
SELECT {acceptance_columns} FROM cmi_acceptances WHERE id = ?;

-- name: lock_acceptance
-- The acceptance with that id (the write transaction holds the file: nothing to lock).
SELECT {acceptance_columns} FROM cmi_acceptances WHERE id = ?;

-- name: take_offer
-- Make an acceptance the offer's holder, while it has none.
UPDATE cmi_offers SET accepted_by = ? WHERE id = ? AND accepted_by IS NULL;

-- name: offer_holder
-- The acceptance that holds an offer.
SELECT {acceptance_columns} FROM cmi_acceptances
WHERE id = (SELECT accepted_by FROM cmi_offers WHERE id = ?);

-- name: offer_exists
-- Whether there is an offer with that id.
SELECT 1 FROM cmi_offers WHERE id = ?;

-- name: claim_acceptance
-- Start an acceptance, processing under a lease (nothing when the id is taken).
INSERT INTO cmi_acceptances (id, offer_id, state, result, created_at, updated_at,
    intermediary, acceptance, hold, lease_owner, lease_until)
VALUES (?, ?, 'processing', NULL, ?, ?, ?, ?, NULL, ?, ?)
ON CONFLICT (id) DO NOTHING;

-- name: reclaim_acceptance
-- Start a released acceptance again, processing under a lease.
UPDATE cmi_acceptances SET state = 'processing', result = NULL, updated_at = ?,
    intermediary = ?, acceptance = ?, hold = NULL, lease_owner = ?, lease_until = ?
WHERE id = ? AND state = 'released';

-- name: renew_acceptance
-- Extend the owner's lease on an acceptance and record its hold.
UPDATE cmi_acceptances SET lease_until = ?, hold = COALESCE(?, hold)
WHERE id = ? AND state = 'processing' AND lease_owner = ?;

-- name: take_over_acceptance
-- Take over a processing acceptance whose lease expired.
UPDATE cmi_acceptances SET lease_owner = ?, lease_until = ?
WHERE id = ? AND state = 'processing' AND (lease_until IS NULL OR lease_until < ?);

-- name: hold_offer
-- Make a booked acceptance the offer's holder, unless another holds it.
UPDATE cmi_offers SET accepted_by = ?
WHERE id = ? AND (accepted_by IS NULL OR accepted_by = ?);

-- name: release_offer
-- Let go of an offer the acceptance holds.
UPDATE cmi_offers SET accepted_by = NULL WHERE id = ? AND accepted_by = ?;

-- name: finish_acceptance
-- Record an acceptance's outcome and end its lease.
UPDATE cmi_acceptances SET state = ?, result = ?, updated_at = ?, lease_owner = NULL,
    lease_until = NULL
WHERE id = ?;

-- name: stalled_acceptances
-- Processing acceptances whose lease expired, oldest first.
SELECT {acceptance_columns} FROM cmi_acceptances
WHERE state = 'processing' AND (lease_until IS NULL OR lease_until < ?)
ORDER BY created_at, id LIMIT ?;

-- ---------------------------------------------------------------------------------------
-- emission problems

-- name: insert_problem
-- Keep a document that could not be made, for the operator.
INSERT INTO cmi_emission_problems (transaction_id, terms_id, customer_ref, standard, reason,
    created_at, transaction_json)
VALUES (?, ?, ?, ?, ?, ?, ?);

-- name: emission_problems
-- Emission problems, newest first.
SELECT transaction_id, terms_id, customer_ref, standard, reason, created_at,
    transaction_json
FROM cmi_emission_problems ORDER BY seq DESC LIMIT ?;

-- name: count_emission_problems
-- How many emission problems are kept.
SELECT count(*) FROM cmi_emission_problems;
