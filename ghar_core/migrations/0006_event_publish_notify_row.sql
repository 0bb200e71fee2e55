-- ghar_event_publish (migrations 0002, 0003, 0005) again, same rows,
-- positions and locks; one argument more, p_carry (default false), which
-- only changes what its NOTIFY carries.
--
-- Without p_carry (the default, EVENT_OUTBOX_NOTIFY_ROWS=false) the NOTIFY
-- carries the range "<first> <last>" of the new ids, as before: the
-- smallest entry in Postgres's notification queue, which every listening
-- session of the cluster shares and which fills while any of them lags.
--
-- With p_carry (EVENT_OUTBOX_NOTIFY_ROWS=true) a batch of up to 16 small
-- events (the writer's usual batch at a low or moderate rate: one event when
-- idle, a few that queued during the previous commit) carries a copy of its
-- committed rows instead, as a JSON array of [id, stream, epoch, position,
-- type, base64 payload, created_at epoch] in id order, so a listener that
-- follows the stream delivers them without reading them back (one round trip
-- less between emit and delivery). The rows are written to the outbox first,
-- in the same transaction, and their epochs and positions come from the
-- outbox as before; the copy is sent only with the commit (NOTIFY is
-- transactional), so nobody hears of an event that is not stored. A listener
-- that misses the notification, or finds a gap, reads the outbox as before.
-- The copy is sent only when the payloads total under 5000 bytes (base64
-- grows them by 4/3) and the text fits Postgres's NOTIFY limit
-- (block_size - (max_identifier_length + 1) - 128 bytes, 8000 on a default
-- build); otherwise, and for larger batches, the id range. A copy's
-- created_at is extract()'s numeric (Postgres 14 and later: the exact seconds
-- with six decimals), not a float8, whose text depends on the writing
-- session's extra_float_digits (at 0 it prints 15 significant digits and
-- loses the microseconds): the listener parses it to the same float8 as the
-- read-back's. On Postgres 13 and earlier extract() is a float8 already.
--
-- A listener older than this migration ignores the copy (it expects two ids)
-- and hears of that stream's events with its next range notification (a
-- gap, read back): nothing is lost, only delayed, while such instances run.
-- A caller that passes five or six arguments (an instance older than this
-- migration) gets the defaults: the function is dropped and created in one
-- transaction, so no call finds it missing or two of it.
DROP FUNCTION IF EXISTS ghar_event_publish(text[], text[], bytea[], uuid, text, boolean);
CREATE OR REPLACE FUNCTION ghar_event_publish(
    p_streams text[], p_types text[], p_payloads bytea[], p_batch uuid, p_channel text,
    p_durable boolean DEFAULT true, p_carry boolean DEFAULT false
) RETURNS TABLE (id bigint, stream text, epoch text, "position" bigint)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    v_epoch text;
    v_head bigint;
    v_id bigint;
    v_created timestamptz;
    v_note text;
    v_limit int;
    v_carry boolean;
BEGIN
    IF NOT p_durable THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    IF cardinality(p_streams) = 1 THEN
        -- The stream's row is locked here until the transaction ends, as below.
        INSERT INTO ghar_event_streams AS s (stream, epoch, head)
        VALUES (p_streams[1], ghar_event_new_epoch(), 1)
        ON CONFLICT ON CONSTRAINT ghar_event_streams_pkey
        DO UPDATE SET head = s.head + 1, touched_at = now()
        RETURNING s.epoch, s.head INTO v_epoch, v_head;
        INSERT INTO ghar_event_outbox AS o (stream, epoch, position, type, payload, batch)
        VALUES (p_streams[1], v_epoch, v_head, p_types[1], p_payloads[1], p_batch)
        RETURNING o.id, o.created_at INTO v_id, v_created;
        -- Only simple expressions here (no subquery): this path is the hot one.
        IF p_carry AND octet_length(p_payloads[1]) < 5000 THEN
            v_note := json_build_array(json_build_array(
                v_id, p_streams[1], v_epoch, v_head, p_types[1],
                encode(p_payloads[1], 'base64'), extract(epoch FROM v_created)
            ))::text;
            IF octet_length(v_note) >= current_setting('block_size')::int
                    - current_setting('max_identifier_length')::int - 129 THEN
                v_note := NULL;
            END IF;
        END IF;
        PERFORM pg_notify(p_channel, coalesce(v_note, v_id::text || ' ' || v_id::text));
        id := v_id;
        stream := p_streams[1];
        epoch := v_epoch;
        "position" := v_head;
        RETURN NEXT;
        RETURN;
    END IF;
    v_carry := p_carry AND cardinality(p_streams) <= 16
        AND (SELECT sum(octet_length(x)) FROM unnest(p_payloads) AS x) < 5000;
    v_limit := current_setting('block_size')::int
        - current_setting('max_identifier_length')::int - 129;
    RETURN QUERY
    WITH input AS (
        SELECT u.st, u.ty, u.pl, u.ord
        FROM unnest(p_streams, p_types, p_payloads) WITH ORDINALITY AS u(st, ty, pl, ord)
    ), counts AS (
        SELECT i.st, count(*) AS n FROM input i GROUP BY i.st
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
        RETURNING o.id, o.stream, o.epoch, o.position, o.type, o.payload, o.created_at
    ), note AS (
        SELECT min(a.id) AS lo, max(a.id) AS hi,
               json_agg(json_build_array(
                   a.id, a.stream, a.epoch, a.position, a.type,
                   encode(a.payload, 'base64'), extract(epoch FROM a.created_at)
               ) ORDER BY a.id) FILTER (WHERE v_carry)::text AS rows
        FROM added a
    ), woken AS (
        SELECT pg_notify(p_channel, CASE WHEN octet_length(n.rows) < v_limit THEN n.rows
                                         ELSE n.lo::text || ' ' || n.hi::text END)
        FROM note n
    )
    SELECT a.id, a.stream, a.epoch, a.position FROM added a, woken ORDER BY a.id;
END
$$;
