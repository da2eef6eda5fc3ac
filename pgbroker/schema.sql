-- The PostgreSQL schema of roomcast's pgbroker, version 1.
--
-- pgbroker.New installs it (under an advisory lock, idempotently) unless
-- the broker is given WithoutSchemaInstall; then apply this file yourself.
-- This is SchemaSQL("roomcast"); SchemaSQL renders it for another schema.
--
-- The tables are a stable, documented layout: read them with plain SQL.
-- Write to them only through the broker (or its functions below).

CREATE SCHEMA IF NOT EXISTS roomcast;

CREATE TABLE IF NOT EXISTS roomcast.schema_version (
    version integer PRIMARY KEY,
    installed_at timestamptz NOT NULL DEFAULT now()
);

-- One row per room, for its current life. A room's row is its lock: every
-- publish, presence change and trim of the room updates it, so they
-- happen one at a time and seq grows by one in commit order with no gap.
CREATE TABLE IF NOT EXISTS roomcast.rooms (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE,
    epoch text NOT NULL,                        -- names this life of the room (a UUID)
    seq bigint NOT NULL DEFAULT 0,              -- the newest message's seq; 0 before the first
    ev bigint NOT NULL DEFAULT 0,               -- the newest presence event's number
    keep_size integer NOT NULL DEFAULT 0,       -- history bounds of the last publish:
    keep_ttl interval NOT NULL DEFAULT '0',     --   the newest keep_size messages, none older than keep_ttl (0: no age bound)
    archive boolean NOT NULL DEFAULT false,     -- keep every message in messages (pgbroker.WithArchive)
    last_at timestamptz,                        -- the newest message's published_at
    touched_at timestamptz NOT NULL DEFAULT now(), -- the last publish, join or subscribed node's refresh
    created_at timestamptz NOT NULL DEFAULT now(),
    due timestamptz NOT NULL DEFAULT now()      -- when the sweep looks at the room next
) WITH (fillfactor = 70);
CREATE INDEX IF NOT EXISTS rooms_due ON roomcast.rooms (due);

-- The messages: the room's history and the stream every node reads. A room
-- keeps its last keep_size messages younger than keep_ttl; older ones stay
-- for the delivery window (pgbroker.WithDeliveryWindow) so that listening
-- nodes can deliver them, then the sweep deletes them (never in an
-- archived room). published_at never decreases with seq.
CREATE TABLE IF NOT EXISTS roomcast.messages (
    room_id bigint NOT NULL REFERENCES roomcast.rooms (id) ON DELETE CASCADE,
    seq bigint NOT NULL,
    id uuid NOT NULL,
    published_at timestamptz NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (room_id, seq)
);

-- Idempotency keys: a publish with a key seen in the room less than its
-- TTL ago returns the first message's position and publishes nothing.
CREATE TABLE IF NOT EXISTS roomcast.keys (
    room_id bigint NOT NULL REFERENCES roomcast.rooms (id) ON DELETE CASCADE,
    key text NOT NULL,
    seq bigint NOT NULL,
    id uuid NOT NULL,
    published_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (room_id, key)
);
CREATE INDEX IF NOT EXISTS keys_expires_at ON roomcast.keys (expires_at);

-- Presence: one row per connection in a room, refreshed by its node; a
-- member (member_key: u:<user id>, or c:<conn id> when anonymous) is
-- present while one of its rows is.
CREATE TABLE IF NOT EXISTS roomcast.presence (
    room_id bigint NOT NULL REFERENCES roomcast.rooms (id) ON DELETE CASCADE,
    conn_id text NOT NULL,
    member_key text NOT NULL,
    user_id text NOT NULL,
    info bytea,
    events boolean NOT NULL,                    -- announce joins and leaves
    node uuid NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (room_id, conn_id)
);
CREATE INDEX IF NOT EXISTS presence_member ON roomcast.presence (room_id, member_key);
CREATE INDEX IF NOT EXISTS presence_expires_at ON roomcast.presence (expires_at);

-- Join and leave events, in the room's stream: event ev comes after
-- message after_seq and before the next. Kept for the delivery window.
CREATE TABLE IF NOT EXISTS roomcast.events (
    room_id bigint NOT NULL REFERENCES roomcast.rooms (id) ON DELETE CASCADE,
    ev bigint NOT NULL,
    after_seq bigint NOT NULL,
    kind text NOT NULL CHECK (kind IN ('join', 'leave')),
    conn_id text NOT NULL,
    user_id text NOT NULL,
    info bytea,
    at timestamptz NOT NULL,
    PRIMARY KEY (room_id, ev)
);
CREATE INDEX IF NOT EXISTS events_at ON roomcast.events (at);

-- Every message still in the table, by room name: read your history here.
CREATE OR REPLACE VIEW roomcast.history AS
SELECT r.name AS room, r.epoch, m.seq, m.id, m.published_at, m.data
FROM roomcast.messages m JOIN roomcast.rooms r ON r.id = m.room_id;

-- create_room starts the room's life (a new epoch) unless it has one, and
-- returns its row, or nothing when p_try finds another transaction
-- creating it. Every creation holds an advisory lock on the room's name
-- until its transaction ends, so a publish that must not wait can tell a
-- room another transaction is creating (a host's PublishTx, uncommitted)
-- from a room nobody has. The lock's first key is the schema's.
CREATE OR REPLACE FUNCTION roomcast.create_room(p_room text, p_try boolean) RETURNS SETOF roomcast.rooms
LANGUAGE plpgsql AS $$
BEGIN
    IF p_try THEN
        IF NOT pg_try_advisory_xact_lock(-1691194980, hashtext(p_room)) THEN
            RETURN;
        END IF;
    ELSE
        PERFORM pg_advisory_xact_lock(-1691194980, hashtext(p_room));
    END IF;
    RETURN QUERY INSERT INTO roomcast.rooms (name, epoch) VALUES (p_room, gen_random_uuid()::text)
    ON CONFLICT (name) DO NOTHING RETURNING *;
END $$;

-- ensure_room returns the room's row, starting its life when it has none.
CREATE OR REPLACE FUNCTION roomcast.ensure_room(p_room text) RETURNS roomcast.rooms
LANGUAGE plpgsql AS $$
DECLARE
    v_room roomcast.rooms;
BEGIN
    LOOP
        SELECT * INTO v_room FROM roomcast.rooms WHERE name = p_room;
        IF FOUND THEN
            RETURN v_room;
        END IF;
        SELECT * INTO v_room FROM roomcast.create_room(p_room, false);
        IF FOUND THEN
            RETURN v_room;
        END IF;
    END LOOP;
END $$;

-- lock_room is ensure_room, holding the row's lock until the transaction
-- ends.
CREATE OR REPLACE FUNCTION roomcast.lock_room(p_room text) RETURNS roomcast.rooms
LANGUAGE plpgsql AS $$
DECLARE
    v_room roomcast.rooms;
BEGIN
    LOOP
        SELECT * INTO v_room FROM roomcast.rooms WHERE name = p_room FOR NO KEY UPDATE;
        IF FOUND THEN
            RETURN v_room;
        END IF;
        SELECT * INTO v_room FROM roomcast.create_room(p_room, false);
        IF FOUND THEN
            RETURN v_room;
        END IF;
    END LOOP;
END $$;

-- try_lock_room is lock_room without waiting: it returns nothing when
-- another transaction holds the room's row, or is creating it.
CREATE OR REPLACE FUNCTION roomcast.try_lock_room(p_room text) RETURNS SETOF roomcast.rooms
LANGUAGE plpgsql AS $$
DECLARE
    v_room roomcast.rooms;
BEGIN
    SELECT * INTO v_room FROM roomcast.rooms WHERE name = p_room FOR NO KEY UPDATE SKIP LOCKED;
    IF FOUND THEN
        RETURN NEXT v_room;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM roomcast.rooms WHERE name = p_room) THEN
        RETURN; -- held
    END IF;
    SELECT * INTO v_room FROM roomcast.create_room(p_room, true);
    IF FOUND THEN
        RETURN NEXT v_room;
        RETURN;
    END IF;
    -- Being created, or created and committed since the first look.
    RETURN QUERY SELECT * FROM roomcast.rooms WHERE name = p_room FOR NO KEY UPDATE SKIP LOCKED;
END $$;

-- publish sequences a batch of messages: item i goes to room p_rooms[i]
-- (one room's items next to each other). Each room's row is locked once,
-- its items get the next seqs, their rows are inserted with one statement,
-- the row is updated, and the room's nodes are woken by a NOTIFY that
-- carries only the room's name. With p_wait false a room whose row
-- another transaction holds is skipped: its items come back busy, for a
-- second call. p_keys[i] '' means no idempotency key; p_sizes[i] < 0 keeps
-- the room's bounds. Durations are in microseconds.
CREATE OR REPLACE FUNCTION roomcast.publish(
    p_rooms text[], p_data bytea[], p_keys text[], p_key_ttls bigint[],
    p_sizes integer[], p_ttls bigint[], p_archive boolean[], p_window bigint, p_wait boolean)
RETURNS TABLE (o_item integer, o_epoch text, o_seq bigint, o_id uuid, o_at timestamptz, o_duplicate boolean, o_busy boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_n integer := coalesce(array_length(p_rooms, 1), 0);
    v_i integer := 1;
    v_j integer;
    v_x integer;
    v_room roomcast.rooms;
    v_at timestamptz;
    v_seq bigint;
    v_id uuid;
    v_seqs bigint[];
    v_ids uuid[];
    v_data bytea[];
    v_size integer;
    v_ttl interval;
    v_window interval := p_window * interval '1 microsecond';
BEGIN
    WHILE v_i <= v_n LOOP
        v_j := v_i;
        WHILE v_j < v_n AND p_rooms[v_j + 1] = p_rooms[v_i] LOOP
            v_j := v_j + 1;
        END LOOP;
        IF p_wait THEN
            v_room := roomcast.lock_room(p_rooms[v_i]);
        ELSE
            SELECT * INTO v_room FROM roomcast.try_lock_room(p_rooms[v_i]);
            IF NOT FOUND THEN
                FOR v_x IN v_i .. v_j LOOP
                    o_item := v_x; o_epoch := NULL; o_seq := NULL; o_id := NULL; o_at := NULL;
                    o_duplicate := false; o_busy := true;
                    RETURN NEXT;
                END LOOP;
                v_i := v_j + 1;
                CONTINUE;
            END IF;
        END IF;

        v_at := greatest(clock_timestamp(), v_room.last_at);
        v_seq := v_room.seq;
        v_seqs := '{}'; v_ids := '{}'; v_data := '{}';
        FOR v_x IN v_i .. v_j LOOP
            o_item := v_x; o_epoch := v_room.epoch; o_busy := false;
            IF p_keys[v_x] <> '' THEN
                SELECT k.seq, k.id, k.published_at INTO o_seq, o_id, o_at FROM roomcast.keys k
                WHERE k.room_id = v_room.id AND k.key = p_keys[v_x] AND k.expires_at > v_at;
                IF FOUND THEN
                    o_duplicate := true;
                    RETURN NEXT;
                    CONTINUE;
                END IF;
            END IF;
            v_seq := v_seq + 1;
            v_id := gen_random_uuid();
            v_seqs := array_append(v_seqs, v_seq);
            v_ids := array_append(v_ids, v_id);
            v_data := array_append(v_data, p_data[v_x]);
            IF p_keys[v_x] <> '' THEN
                INSERT INTO roomcast.keys (room_id, key, seq, id, published_at, expires_at)
                VALUES (v_room.id, p_keys[v_x], v_seq, v_id, v_at, v_at + p_key_ttls[v_x] * interval '1 microsecond')
                ON CONFLICT (room_id, key) DO UPDATE
                SET seq = excluded.seq, id = excluded.id, published_at = excluded.published_at, expires_at = excluded.expires_at;
            END IF;
            o_seq := v_seq; o_id := v_id; o_at := v_at; o_duplicate := false;
            RETURN NEXT;
        END LOOP;

        IF v_seq > v_room.seq THEN
            INSERT INTO roomcast.messages (room_id, seq, id, published_at, data)
            SELECT v_room.id, u.seq, u.id, v_at, u.data FROM unnest(v_seqs, v_ids, v_data) AS u (seq, id, data);
            IF p_sizes[v_j] < 0 THEN
                v_size := v_room.keep_size;
                v_ttl := v_room.keep_ttl;
            ELSE
                v_size := p_sizes[v_j];
                v_ttl := p_ttls[v_j] * interval '1 microsecond';
            END IF;
            UPDATE roomcast.rooms SET
                seq = v_seq, keep_size = v_size, keep_ttl = v_ttl, archive = p_archive[v_j],
                last_at = v_at, touched_at = v_at,
                due = CASE
                    WHEN p_archive[v_j] THEN due
                    WHEN v_seq > v_size THEN least(due, v_at + v_window)
                    WHEN v_ttl > interval '0' THEN least(due, v_at + greatest(v_ttl, v_window))
                    ELSE due END
            WHERE id = v_room.id;
            PERFORM pg_notify('roomcast', 'r' || p_rooms[v_i]);
        END IF;
        v_i := v_j + 1;
    END LOOP;
END $$;

-- read_history returns the room's position (a first row with o_seq NULL),
-- then the messages its history keeps after p_since: the oldest p_limit,
-- or with p_latest the newest. A room with no life gets one.
CREATE OR REPLACE FUNCTION roomcast.read_history(p_room text, p_since bigint, p_limit integer, p_latest boolean)
RETURNS TABLE (o_epoch text, o_top bigint, o_seq bigint, o_id uuid, o_at timestamptz, o_data bytea)
LANGUAGE plpgsql AS $$
DECLARE
    v_room roomcast.rooms := roomcast.ensure_room(p_room);
    v_floor bigint := greatest(p_since, v_room.seq - v_room.keep_size);
    v_cutoff timestamptz := CASE WHEN v_room.keep_ttl > interval '0' THEN clock_timestamp() - v_room.keep_ttl ELSE '-infinity' END;
BEGIN
    o_epoch := v_room.epoch;
    o_top := v_room.seq;
    RETURN NEXT;
    IF p_limit <= 0 THEN
        RETURN;
    END IF;
    -- Each statement of a function sees the commits made before it ran:
    -- seq <= the top read above keeps the answer one consistent position.
    IF p_latest THEN
        RETURN QUERY SELECT v_room.epoch, v_room.seq, m.seq, m.id, m.published_at, m.data FROM (
            SELECT * FROM roomcast.messages
            WHERE room_id = v_room.id AND seq > v_floor AND seq <= v_room.seq AND published_at >= v_cutoff
            ORDER BY seq DESC LIMIT p_limit) m
        ORDER BY m.seq;
    ELSE
        RETURN QUERY SELECT v_room.epoch, v_room.seq, m.seq, m.id, m.published_at, m.data
        FROM roomcast.messages m
        WHERE m.room_id = v_room.id AND m.seq > v_floor AND m.seq <= v_room.seq AND m.published_at >= v_cutoff
        ORDER BY m.seq LIMIT p_limit;
    END IF;
END $$;

-- position returns the room's epoch, newest seq (and that message's id,
-- while it is in the table) and newest event, starting its life when it
-- has none: where a node's subscription starts.
CREATE OR REPLACE FUNCTION roomcast.position(p_room text, OUT o_epoch text, OUT o_seq bigint, OUT o_id text, OUT o_ev bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_room roomcast.rooms := roomcast.ensure_room(p_room);
BEGIN
    o_epoch := v_room.epoch;
    o_seq := v_room.seq;
    o_ev := v_room.ev;
    SELECT id::text INTO o_id FROM roomcast.messages WHERE room_id = v_room.id AND seq = v_room.seq;
END $$;

-- presence_expire deletes the room's expired presence entries, announcing
-- each member whose last connection they were, and returns the room's
-- newest event. The caller holds the room's lock and stores the result in
-- rooms.ev.
CREATE OR REPLACE FUNCTION roomcast.presence_expire(p_room roomcast.rooms) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_ev bigint := p_room.ev;
    v_now timestamptz := clock_timestamp();
    v_conns text[];
    v_keys text[];
    v_users text[];
    v_infos bytea[];
BEGIN
    WITH gone AS (
        DELETE FROM roomcast.presence WHERE room_id = p_room.id AND expires_at <= v_now
        RETURNING conn_id, member_key, user_id, info, events)
    SELECT array_agg(g.conn_id ORDER BY g.member_key), array_agg(g.member_key ORDER BY g.member_key),
           array_agg(g.user_id ORDER BY g.member_key), array_agg(g.info ORDER BY g.member_key)
    INTO v_conns, v_keys, v_users, v_infos
    FROM (SELECT DISTINCT ON (member_key) * FROM gone WHERE events ORDER BY member_key, conn_id) g;
    FOR v_x IN 1 .. coalesce(array_length(v_keys, 1), 0) LOOP
        IF NOT EXISTS (SELECT 1 FROM roomcast.presence WHERE room_id = p_room.id AND member_key = v_keys[v_x]) THEN
            v_ev := v_ev + 1;
            INSERT INTO roomcast.events (room_id, ev, after_seq, kind, conn_id, user_id, info, at)
            VALUES (p_room.id, v_ev, p_room.seq, 'leave', v_conns[v_x], v_users[v_x], v_infos[v_x], v_now);
        END IF;
    END LOOP;
    RETURN v_ev;
END $$;

-- presence_join adds a connection to the room's presence (a repeated join
-- only refreshes it), announcing a member's first connection when
-- p_events is set. p_ttl is in microseconds.
CREATE OR REPLACE FUNCTION roomcast.presence_join(
    p_room text, p_conn text, p_member_key text, p_user text, p_info bytea, p_events boolean, p_node uuid, p_ttl bigint)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_room roomcast.rooms := roomcast.lock_room(p_room);
    v_ev bigint := roomcast.presence_expire(v_room);
    v_now timestamptz := clock_timestamp();
BEGIN
    UPDATE roomcast.presence SET expires_at = v_now + p_ttl * interval '1 microsecond', node = p_node
    WHERE room_id = v_room.id AND conn_id = p_conn;
    IF NOT FOUND THEN
        IF p_events AND NOT EXISTS (SELECT 1 FROM roomcast.presence WHERE room_id = v_room.id AND member_key = p_member_key) THEN
            v_ev := v_ev + 1;
            INSERT INTO roomcast.events (room_id, ev, after_seq, kind, conn_id, user_id, info, at)
            VALUES (v_room.id, v_ev, v_room.seq, 'join', p_conn, p_user, p_info, v_now);
        END IF;
        INSERT INTO roomcast.presence (room_id, conn_id, member_key, user_id, info, events, node, expires_at)
        VALUES (v_room.id, p_conn, p_member_key, p_user, p_info, p_events, p_node, v_now + p_ttl * interval '1 microsecond');
    END IF;
    UPDATE roomcast.rooms SET ev = v_ev, touched_at = v_now WHERE id = v_room.id;
    IF v_ev <> v_room.ev THEN
        PERFORM pg_notify('roomcast', 'r' || p_room);
    END IF;
END $$;

-- presence_leave removes a connection from the room's presence, announcing
-- a member's last connection when p_events is set.
CREATE OR REPLACE FUNCTION roomcast.presence_leave(p_room text, p_conn text, p_events boolean)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_room roomcast.rooms;
    v_ev bigint;
    v_gone roomcast.presence;
BEGIN
    SELECT * INTO v_room FROM roomcast.rooms WHERE name = p_room FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    v_ev := roomcast.presence_expire(v_room);
    DELETE FROM roomcast.presence WHERE room_id = v_room.id AND conn_id = p_conn RETURNING * INTO v_gone;
    IF FOUND AND p_events AND NOT EXISTS (
        SELECT 1 FROM roomcast.presence WHERE room_id = v_room.id AND member_key = v_gone.member_key) THEN
        v_ev := v_ev + 1;
        INSERT INTO roomcast.events (room_id, ev, after_seq, kind, conn_id, user_id, info, at)
        VALUES (v_room.id, v_ev, v_room.seq, 'leave', v_gone.conn_id, v_gone.user_id, v_gone.info, clock_timestamp());
    END IF;
    IF v_ev <> v_room.ev THEN
        UPDATE roomcast.rooms SET ev = v_ev WHERE id = v_room.id;
        PERFORM pg_notify('roomcast', 'r' || p_room);
    END IF;
END $$;

-- presence_list returns the room's live presence entries, expiring the
-- others first when nobody else holds the room's lock.
CREATE OR REPLACE FUNCTION roomcast.presence_list(p_room text)
RETURNS TABLE (o_conn text, o_member_key text, o_user text, o_info bytea)
LANGUAGE plpgsql AS $$
DECLARE
    v_room roomcast.rooms;
    v_ev bigint;
BEGIN
    SELECT * INTO v_room FROM roomcast.rooms WHERE name = p_room;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM roomcast.presence WHERE room_id = v_room.id AND expires_at <= clock_timestamp()) THEN
        SELECT * INTO v_room FROM roomcast.rooms WHERE id = v_room.id FOR NO KEY UPDATE SKIP LOCKED;
        IF FOUND THEN
            v_ev := roomcast.presence_expire(v_room);
            IF v_ev <> v_room.ev THEN
                UPDATE roomcast.rooms SET ev = v_ev WHERE id = v_room.id;
                PERFORM pg_notify('roomcast', 'r' || p_room);
            END IF;
        END IF;
    END IF;
    RETURN QUERY SELECT conn_id, member_key, user_id, info FROM roomcast.presence
    WHERE room_id = v_room.id AND expires_at > clock_timestamp();
END $$;

-- sweep does the cluster's housekeeping, at most p_limit rooms per step,
-- on one node at a time (the others return at once): it trims the
-- histories that are due (outside their bounds and older than the
-- delivery window p_window; never an archived room's), reclaims rooms
-- with no messages, presence or live keys, idle for p_room_ttl, forgets
-- expired idempotency keys and old events, and expires presence entries
-- whose node stopped refreshing them. Durations are in microseconds.
CREATE OR REPLACE FUNCTION roomcast.sweep(p_window bigint, p_room_ttl bigint, p_limit integer)
RETURNS TABLE (o_rooms integer, o_trimmed bigint, o_reclaimed integer, o_keys bigint, o_events bigint, o_expired integer)
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := clock_timestamp();
    v_window interval := p_window * interval '1 microsecond';
    v_idle interval := p_room_ttl * interval '1 microsecond';
    v_room roomcast.rooms;
    v_hi bigint;
    v_n bigint;
    v_first_seq bigint;
    v_first_at timestamptz;
    v_due timestamptz;
    v_ev bigint;
    v_rid bigint;
BEGIN
    o_rooms := 0; o_trimmed := 0; o_reclaimed := 0; o_keys := 0; o_events := 0; o_expired := 0;
    IF NOT pg_try_advisory_xact_lock(-9084448158320191501) THEN
        RETURN;
    END IF;

    FOR v_room IN SELECT * FROM roomcast.rooms WHERE due <= v_now ORDER BY due LIMIT p_limit
                  FOR NO KEY UPDATE SKIP LOCKED LOOP
        o_rooms := o_rooms + 1;
        IF NOT v_room.archive THEN
            -- published_at grows with seq, so what is deletable is a prefix;
            -- look at no more than 10,000 rows of it per room and sweep.
            SELECT max(m.seq) INTO v_hi FROM (
                SELECT seq, published_at FROM roomcast.messages WHERE room_id = v_room.id ORDER BY seq LIMIT 10000) m
            WHERE m.published_at < v_now - v_window
              AND (m.seq <= v_room.seq - v_room.keep_size
                   OR (v_room.keep_ttl > interval '0' AND m.published_at < v_now - v_room.keep_ttl));
            IF v_hi IS NOT NULL THEN
                DELETE FROM roomcast.messages WHERE room_id = v_room.id AND seq <= v_hi;
                GET DIAGNOSTICS v_n = ROW_COUNT;
                o_trimmed := o_trimmed + v_n;
            END IF;
        END IF;
        SELECT seq, published_at INTO v_first_seq, v_first_at FROM roomcast.messages
        WHERE room_id = v_room.id ORDER BY seq LIMIT 1;
        IF FOUND THEN
            v_due := 'infinity';
            IF NOT v_room.archive THEN
                IF v_first_seq <= v_room.seq - v_room.keep_size THEN
                    v_due := v_first_at + v_window;
                END IF;
                IF v_room.keep_ttl > interval '0' THEN
                    v_due := least(v_due, v_first_at + greatest(v_room.keep_ttl, v_window));
                END IF;
            END IF;
            -- Nothing to trim until a publish says so (it moves due closer).
            v_due := least(v_due, v_now + v_idle);
        ELSIF v_room.touched_at <= v_now - v_idle
              AND NOT EXISTS (SELECT 1 FROM roomcast.presence WHERE room_id = v_room.id)
              AND NOT EXISTS (SELECT 1 FROM roomcast.keys WHERE room_id = v_room.id AND expires_at > v_now) THEN
            DELETE FROM roomcast.rooms WHERE id = v_room.id;
            o_reclaimed := o_reclaimed + 1;
            CONTINUE;
        ELSE
            v_due := greatest(v_room.touched_at + v_idle,
                              (SELECT max(expires_at) FROM roomcast.keys WHERE room_id = v_room.id),
                              v_now + least(v_idle, interval '1 minute'));
        END IF;
        UPDATE roomcast.rooms SET due = v_due WHERE id = v_room.id;
    END LOOP;

    WITH d AS (
        DELETE FROM roomcast.keys k USING (
            SELECT room_id, key FROM roomcast.keys WHERE expires_at <= v_now LIMIT p_limit * 10 FOR UPDATE SKIP LOCKED) x
        WHERE k.room_id = x.room_id AND k.key = x.key RETURNING 1)
    SELECT count(*) INTO o_keys FROM d;

    WITH d AS (
        DELETE FROM roomcast.events e USING (
            SELECT room_id, ev FROM roomcast.events WHERE at < v_now - v_window LIMIT p_limit * 10) x
        WHERE e.room_id = x.room_id AND e.ev = x.ev RETURNING 1)
    SELECT count(*) INTO o_events FROM d;

    FOR v_rid IN SELECT DISTINCT room_id FROM roomcast.presence WHERE expires_at <= v_now LIMIT p_limit LOOP
        SELECT * INTO v_room FROM roomcast.rooms WHERE id = v_rid FOR NO KEY UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        v_ev := roomcast.presence_expire(v_room);
        IF v_ev <> v_room.ev THEN
            UPDATE roomcast.rooms SET ev = v_ev WHERE id = v_room.id;
            PERFORM pg_notify('roomcast', 'r' || v_room.name);
        END IF;
        o_expired := o_expired + 1;
    END LOOP;
    RETURN NEXT;
END $$;

INSERT INTO roomcast.schema_version (version) VALUES (1) ON CONFLICT (version) DO NOTHING;
