-- WebSocket job registrations of EVENT_BROKER=postgres (ghar_core.websocket):
-- a job registered on one instance may be followed from any other, so the
-- ownership check before a job socket's accept reads this table. A row ends
-- when the job completes or fails, or when expires_at passes (the broker's
-- retention pass deletes expired rows, in bounded batches).
CREATE TABLE ghar_ws_jobs (
    job_id     text        PRIMARY KEY,
    owner_id   text        NOT NULL,
    instance   text        NOT NULL,  -- the broker that registered it (for operators)
    expires_at timestamptz NOT NULL
);

CREATE INDEX ghar_ws_jobs_expires_idx ON ghar_ws_jobs (expires_at);
