-- The event outbox of EVENT_BROKER=postgres (ghar_core.broker): every event
-- of every stream ("u:<user id>", "j:<job id>") is a row here, and
-- ghar_event_streams holds each stream's epoch and last position (head).
--
-- Positions are allocated by the upsert on the stream's row, whose row lock
-- is held until the publishing transaction ends: two transactions publishing
-- to one stream commit in position order, so a reader that sees position n
-- sees every position before it (no outbox gap within a stream).
CREATE TABLE ghar_event_streams (
    stream     text        PRIMARY KEY,
    epoch      text        NOT NULL,
    head       bigint      NOT NULL DEFAULT 0,
    touched_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ghar_event_outbox (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream     text        NOT NULL,
    epoch      text        NOT NULL,
    position   bigint      NOT NULL,
    type       text        NOT NULL,
    payload    bytea       NOT NULL,
    batch      uuid        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream, epoch, position)
);

-- A publisher whose connection died while its statement ran looks its batch
-- up here to learn whether it committed (never published twice).
CREATE INDEX ghar_event_outbox_batch_idx ON ghar_event_outbox (batch);

-- A fresh epoch: 16 hex digits, never reused.
CREATE FUNCTION ghar_event_new_epoch() RETURNS text
LANGUAGE sql VOLATILE AS $$ SELECT left(md5(gen_random_uuid()::text), 16) $$;

-- Publish events (parallel arrays, in order) in the caller's transaction and
-- wake the listeners with one small NOTIFY carrying the range of new ids.
-- Streams are locked in sorted order, so concurrent batches cannot deadlock.
-- p_durable false: this transaction commits without waiting for the WAL flush
-- (set_config(..., true) lasts until the transaction ends, no longer).
CREATE FUNCTION ghar_event_publish(
    p_streams text[], p_types text[], p_payloads bytea[], p_batch uuid, p_channel text,
    p_durable boolean DEFAULT true
) RETURNS TABLE (id bigint, stream text, epoch text, "position" bigint)
LANGUAGE sql VOLATILE AS $$
    WITH input AS (
        SELECT u.st, u.ty, u.pl, u.ord
        FROM unnest(p_streams, p_types, p_payloads) WITH ORDINALITY AS u(st, ty, pl, ord)
    ), counts AS (
        SELECT st, count(*) AS n FROM input GROUP BY st
    ), heads AS (
        INSERT INTO ghar_event_streams AS s (stream, epoch, head)
        SELECT c.st, ghar_event_new_epoch(), c.n FROM counts c ORDER BY c.st
        ON CONFLICT ON CONSTRAINT ghar_event_streams_pkey
        DO UPDATE SET head = s.head + EXCLUDED.head, touched_at = now()
        RETURNING s.stream, s.epoch, s.head
    ), added AS (
        INSERT INTO ghar_event_outbox AS o (stream, epoch, position, type, payload, batch)
        SELECT i.st, h.epoch,
               h.head - c.n + row_number() OVER (PARTITION BY i.st ORDER BY i.ord),
               i.ty, i.pl, p_batch
        FROM input i JOIN heads h ON h.stream = i.st JOIN counts c ON c.st = i.st
        ORDER BY i.st, i.ord
        RETURNING o.id, o.stream, o.epoch, o.position
    ), woken AS (
        SELECT pg_notify(p_channel, min(a.id)::text || ' ' || max(a.id)::text) FROM added a
    ), commit_mode AS (
        SELECT CASE WHEN p_durable THEN NULL
                    ELSE set_config('synchronous_commit', 'off', true) END
    )
    SELECT a.id, a.stream, a.epoch, a.position FROM added a, woken, commit_mode ORDER BY a.id
$$;

-- The epoch and head of each stream, creating the streams never seen yet
-- (a subscriber needs an epoch before the first event).
CREATE FUNCTION ghar_event_head(p_streams text[])
RETURNS TABLE (stream text, epoch text, head bigint)
LANGUAGE sql VOLATILE AS $$
    INSERT INTO ghar_event_streams (stream, epoch)
    SELECT DISTINCT s, ghar_event_new_epoch() FROM unnest(p_streams) AS s
    ON CONFLICT DO NOTHING;
    SELECT s.stream, s.epoch, s.head FROM ghar_event_streams s WHERE s.stream = ANY(p_streams);
$$;
