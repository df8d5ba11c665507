-- Migration 3: an acceptance carries its lease, the acceptance itself and its hold (for
-- recovery after a crash); an offer names the one acceptance that holds it; documents
-- that could not be made are kept for the operator.

ALTER TABLE cmi_acceptances ADD COLUMN intermediary TEXT;
ALTER TABLE cmi_acceptances ADD COLUMN acceptance TEXT;
ALTER TABLE cmi_acceptances ADD COLUMN hold TEXT;
ALTER TABLE cmi_acceptances ADD COLUMN lease_owner TEXT;
ALTER TABLE cmi_acceptances ADD COLUMN lease_until REAL;
ALTER TABLE cmi_offers ADD COLUMN accepted_by TEXT;

-- An offer accepted more than once before is held by its first live acceptance; the
-- others keep their answers (a retry of theirs still gets them).
UPDATE cmi_offers SET accepted_by = (
    SELECT a.id FROM cmi_acceptances a
    WHERE a.offer_id = cmi_offers.id AND a.state IN ('processing', 'booked')
    ORDER BY a.created_at, a.id LIMIT 1
)
WHERE accepted_by IS NULL;

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
