-- Migration 3: an acceptance carries its lease, the acceptance itself and its hold (for
-- recovery after a crash); an offer names the one acceptance that holds it; documents
-- that could not be made are kept for the operator.

ALTER TABLE {s}.acceptances ADD COLUMN IF NOT EXISTS intermediary text;
ALTER TABLE {s}.acceptances ADD COLUMN IF NOT EXISTS acceptance text;
ALTER TABLE {s}.acceptances ADD COLUMN IF NOT EXISTS hold text;
ALTER TABLE {s}.acceptances ADD COLUMN IF NOT EXISTS lease_owner text;
ALTER TABLE {s}.acceptances ADD COLUMN IF NOT EXISTS lease_until double precision;
ALTER TABLE {s}.offers ADD COLUMN IF NOT EXISTS accepted_by text;

-- An offer accepted more than once before is held by its first live acceptance; the
-- others keep their answers (a retry of theirs still gets them).
UPDATE {s}.offers o SET accepted_by = (
    SELECT a.id FROM {s}.acceptances a
    WHERE a.offer_id = o.id AND a.state IN ('processing', 'booked')
    ORDER BY a.created_at, a.id LIMIT 1
)
WHERE o.accepted_by IS NULL AND EXISTS (
    SELECT 1 FROM {s}.acceptances a
    WHERE a.offer_id = o.id AND a.state IN ('processing', 'booked')
);
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
