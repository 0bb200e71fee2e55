-- The reliability suite's writes: the key table makes a write idempotent, the
-- writes table has no unique constraint of its own (so a write applied twice
-- would show), and the counters must agree with the rows.
CREATE TABLE reliability_keys (
    key uuid PRIMARY KEY,
    claimed_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE reliability_writes (
    seq bigserial PRIMARY KEY,
    write_id uuid NOT NULL,
    user_id uuid NOT NULL,
    payload text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX reliability_writes_write_id ON reliability_writes (write_id);
CREATE TABLE reliability_counters (
    user_id uuid PRIMARY KEY,
    writes bigint NOT NULL
);
