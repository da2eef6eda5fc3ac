-- The PostgreSQL schema of roomcast's pgbroker, version 3.
--
-- pgbroker.New installs it (under an advisory lock, idempotently) unless
-- the broker is given WithoutSchemaInstall; then apply this file yourself.
-- This is SchemaSQL("roomcast"); SchemaSQL renders it for another schema.
--
-- The tables are a stable, documented layout: read them with plain SQL.
-- Write to them only through the broker (or its functions below).
--
-- Applied to a schema of version 1 or 2 it upgrades it in place. What
-- version 2 changed: messages has no foreign key to rooms any more; the
-- trigger rooms_deleted deletes a deleted room's messages instead (see
-- messages). What version 3 changed: the function read_rooms, which the
-- nodes read with instead of read (kept for nodes of version 2).

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
--
-- room_id is rooms.id, with no foreign key (since version 2): a key's
-- check ran a query per inserted message, a sixth of a batch's cost, and
-- guarded nothing the room's row lock does not, since every insert holds
-- the lock of its room's row and a deleted row cannot be locked. Deleting a
-- room's row deletes its messages (the trigger rooms_deleted below), as
-- version 1's ON DELETE CASCADE did.
CREATE TABLE IF NOT EXISTS roomcast.messages (
    room_id bigint NOT NULL,
    seq bigint NOT NULL,
    id uuid NOT NULL,
    published_at timestamptz NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (room_id, seq)
);
ALTER TABLE roomcast.messages DROP CONSTRAINT IF EXISTS messages_room_id_fkey; -- from version 1

-- rooms_deleted deletes the messages of the rooms a statement deleted.
CREATE OR REPLACE FUNCTION roomcast.rooms_deleted() RETURNS trigger
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off AS $$
BEGIN
    DELETE FROM roomcast.messages m USING gone WHERE m.room_id = gone.id;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS rooms_deleted ON roomcast.rooms;
CREATE TRIGGER rooms_deleted AFTER DELETE ON roomcast.rooms
REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION roomcast.rooms_deleted();

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
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off AS $$
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
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off AS $$
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
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off AS $$
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
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off AS $$
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

-- publish sequences a batch of messages: item i goes to room p_rooms[i].
-- It locks the rows of the batch's rooms, then, in one statement, gives
-- every item the next seq of its room (in item order), inserts the
-- messages, records the idempotency keys and updates the rooms. An item
-- whose key is live in the table, or repeats the key of an earlier item of
-- its room, is a duplicate: it returns the first one's position and
-- publishes nothing. How it locks is p_mode's:
--   0: without waiting, the rooms that exist: one statement in all when no
--      item has a key (a key must be looked up after the lock is held);
--   1: without waiting, room by room, creating the rooms that have none;
--   2: waiting for each room's lock, creating the rooms that have none.
-- The items of a room another transaction holds (or, with 0, that has no
-- row yet) come back busy, for a call with the next mode. With p_notify
-- the rooms' nodes are woken at commit by a NOTIFY that carries only the
-- room's name (else call notify after the commit). p_keys[i] '' means no
-- key; p_sizes[i] < 0 keeps the room's bounds; durations are in
-- microseconds.
CREATE OR REPLACE FUNCTION roomcast.publish(
    p_rooms text[], p_data bytea[], p_keys text[], p_key_ttls bigint[],
    p_sizes integer[], p_ttls bigint[], p_archive boolean[], p_window bigint, p_mode integer, p_notify boolean)
RETURNS TABLE (o_item integer, o_epoch text, o_seq bigint, o_id uuid, o_at timestamptz, o_duplicate boolean, o_busy boolean)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off AS $$
DECLARE
    v_name text;
    v_locked bigint[] := '{}';
    v_room roomcast.rooms;
    v_now timestamptz := clock_timestamp();
    v_window interval := p_window * interval '1 microsecond';
BEGIN
    IF p_mode = 0 AND '' = ALL (p_keys) THEN
        RETURN QUERY 
    WITH locked AS (
        SELECT * FROM roomcast.rooms WHERE name = ANY (p_rooms) ORDER BY name FOR NO KEY UPDATE SKIP LOCKED
    ), it AS (
        SELECT i AS item, r.id AS room_id, r.epoch, r.seq AS base, greatest(v_now, r.last_at) AS at,
               p_data[i] AS data, nullif(p_keys[i], '') AS key, p_key_ttls[i] AS key_ttl
        FROM generate_subscripts(p_rooms, 1) AS i JOIN locked r ON r.name = p_rooms[i]
    ), live AS ( -- items whose key is live in the table
        SELECT it.item, k.seq, k.id, k.published_at FROM it
        JOIN roomcast.keys k ON k.room_id = it.room_id AND k.key = it.key AND k.expires_at > it.at
    ), pub AS ( -- the items that publish, with their seq and id
        SELECT it.*, it.base + row_number() OVER (PARTITION BY it.room_id ORDER BY it.item) AS seq, gen_random_uuid() AS id
        FROM it
        WHERE NOT EXISTS (SELECT 1 FROM live WHERE live.item = it.item)
          AND (it.key IS NULL OR NOT EXISTS (
              SELECT 1 FROM it e WHERE e.room_id = it.room_id AND e.key = it.key AND e.item < it.item))
    ), ins AS (
        INSERT INTO roomcast.messages (room_id, seq, id, published_at, data)
        SELECT room_id, seq, id, at, data FROM pub
    ), keyed AS (
        INSERT INTO roomcast.keys (room_id, key, seq, id, published_at, expires_at)
        SELECT room_id, key, seq, id, at, at + key_ttl * interval '1 microsecond' FROM pub WHERE key IS NOT NULL
        ON CONFLICT (room_id, key) DO UPDATE
        SET seq = excluded.seq, id = excluded.id, published_at = excluded.published_at, expires_at = excluded.expires_at
    ), last AS ( -- per room: the newest seq, and the bounds of its last item
        SELECT DISTINCT ON (pub.room_id) pub.room_id, pub.seq, pub.at,
               CASE WHEN p_sizes[pub.item] < 0 THEN r.keep_size ELSE p_sizes[pub.item] END AS size,
               CASE WHEN p_sizes[pub.item] < 0 THEN r.keep_ttl ELSE p_ttls[pub.item] * interval '1 microsecond' END AS ttl,
               p_archive[pub.item] AS archive
        FROM pub JOIN locked r ON r.id = pub.room_id ORDER BY pub.room_id, pub.item DESC
    ), upd AS (
        UPDATE roomcast.rooms AS u SET
            seq = last.seq, keep_size = last.size, keep_ttl = last.ttl,
            archive = last.archive, last_at = last.at, touched_at = last.at,
            due = CASE
                WHEN last.archive THEN u.due
                WHEN last.seq > last.size THEN least(u.due, last.at + v_window)
                WHEN last.ttl > interval '0' THEN least(u.due, last.at + greatest(last.ttl, v_window))
                ELSE u.due END
        FROM last WHERE u.id = last.room_id
    )
    SELECT pub.item, pub.epoch, pub.seq, pub.id, pub.at, false, false FROM pub
    UNION ALL
    SELECT it.item, it.epoch, live.seq, live.id, live.published_at, true, false FROM it JOIN live USING (item)
    UNION ALL
    SELECT it.item, it.epoch, f.seq, f.id, f.at, true, false FROM it
    JOIN pub f ON f.room_id = it.room_id AND f.key = it.key AND f.item < it.item
    UNION ALL
    SELECT i, NULL, NULL, NULL, NULL, false, true FROM generate_subscripts(p_rooms, 1) AS i
    WHERE NOT EXISTS (SELECT 1 FROM locked r WHERE r.name = p_rooms[i]);
        RETURN;
    ELSIF p_mode = 0 THEN
        SELECT coalesce(array_agg(x.id), '{}') INTO v_locked FROM (
            SELECT id FROM roomcast.rooms WHERE name = ANY (p_rooms) ORDER BY name FOR NO KEY UPDATE SKIP LOCKED) x;
    ELSE
        FOR v_name IN SELECT DISTINCT r FROM unnest(p_rooms) AS r ORDER BY r LOOP
            IF p_mode = 1 THEN
                SELECT * INTO v_room FROM roomcast.try_lock_room(v_name);
                CONTINUE WHEN NOT FOUND;
            ELSE
                v_room := roomcast.lock_room(v_name);
            END IF;
            v_locked := v_locked || v_room.id;
        END LOOP;
    END IF;
    RETURN QUERY 
    WITH locked AS (
        SELECT * FROM roomcast.rooms WHERE id = ANY (v_locked)
    ), it AS (
        SELECT i AS item, r.id AS room_id, r.epoch, r.seq AS base, greatest(v_now, r.last_at) AS at,
               p_data[i] AS data, nullif(p_keys[i], '') AS key, p_key_ttls[i] AS key_ttl
        FROM generate_subscripts(p_rooms, 1) AS i JOIN locked r ON r.name = p_rooms[i]
    ), live AS ( -- items whose key is live in the table
        SELECT it.item, k.seq, k.id, k.published_at FROM it
        JOIN roomcast.keys k ON k.room_id = it.room_id AND k.key = it.key AND k.expires_at > it.at
    ), pub AS ( -- the items that publish, with their seq and id
        SELECT it.*, it.base + row_number() OVER (PARTITION BY it.room_id ORDER BY it.item) AS seq, gen_random_uuid() AS id
        FROM it
        WHERE NOT EXISTS (SELECT 1 FROM live WHERE live.item = it.item)
          AND (it.key IS NULL OR NOT EXISTS (
              SELECT 1 FROM it e WHERE e.room_id = it.room_id AND e.key = it.key AND e.item < it.item))
    ), ins AS (
        INSERT INTO roomcast.messages (room_id, seq, id, published_at, data)
        SELECT room_id, seq, id, at, data FROM pub
    ), keyed AS (
        INSERT INTO roomcast.keys (room_id, key, seq, id, published_at, expires_at)
        SELECT room_id, key, seq, id, at, at + key_ttl * interval '1 microsecond' FROM pub WHERE key IS NOT NULL
        ON CONFLICT (room_id, key) DO UPDATE
        SET seq = excluded.seq, id = excluded.id, published_at = excluded.published_at, expires_at = excluded.expires_at
    ), last AS ( -- per room: the newest seq, and the bounds of its last item
        SELECT DISTINCT ON (pub.room_id) pub.room_id, pub.seq, pub.at,
               CASE WHEN p_sizes[pub.item] < 0 THEN r.keep_size ELSE p_sizes[pub.item] END AS size,
               CASE WHEN p_sizes[pub.item] < 0 THEN r.keep_ttl ELSE p_ttls[pub.item] * interval '1 microsecond' END AS ttl,
               p_archive[pub.item] AS archive
        FROM pub JOIN locked r ON r.id = pub.room_id ORDER BY pub.room_id, pub.item DESC
    ), upd AS (
        UPDATE roomcast.rooms AS u SET
            seq = last.seq, keep_size = last.size, keep_ttl = last.ttl,
            archive = last.archive, last_at = last.at, touched_at = last.at,
            due = CASE
                WHEN last.archive THEN u.due
                WHEN last.seq > last.size THEN least(u.due, last.at + v_window)
                WHEN last.ttl > interval '0' THEN least(u.due, last.at + greatest(last.ttl, v_window))
                ELSE u.due END
        FROM last WHERE u.id = last.room_id
    )
    SELECT pub.item, pub.epoch, pub.seq, pub.id, pub.at, false, false FROM pub
    UNION ALL
    SELECT it.item, it.epoch, live.seq, live.id, live.published_at, true, false FROM it JOIN live USING (item)
    UNION ALL
    SELECT it.item, it.epoch, f.seq, f.id, f.at, true, false FROM it
    JOIN pub f ON f.room_id = it.room_id AND f.key = it.key AND f.item < it.item
    UNION ALL
    SELECT i, NULL, NULL, NULL, NULL, false, true FROM generate_subscripts(p_rooms, 1) AS i
    WHERE NOT EXISTS (SELECT 1 FROM locked r WHERE r.name = p_rooms[i]);
    IF p_notify THEN
        PERFORM pg_notify('roomcast', 'r' || r.name) FROM roomcast.rooms r WHERE r.id = ANY (v_locked);
    END IF;
END $$;

-- read returns what a node reads of its rooms (p_rooms[i], its position
-- p_seqs[i] and p_evs[i]; p_strict[i] keeps to what the history bounds
-- keep): for each room that exists a row 'r' (its epoch, newest seq and
-- event), a row 'c' (the id of the message at the position, while it is
-- in the table), then rows 'm' (its messages after the position, at most
-- p_limit) and 'join' or 'leave' (its events after the position, at most
-- p_limit). One statement, so one snapshot. (Nodes of version 3 read with
-- read_rooms below; read stays for nodes of version 2.)
CREATE OR REPLACE FUNCTION roomcast.read(p_rooms text[], p_seqs bigint[], p_evs bigint[], p_strict boolean[], p_limit integer)
RETURNS TABLE (o_room text, o_kind text, o_epoch text, o_seq bigint, o_ev bigint, o_id uuid, o_at timestamptz,
               o_data bytea, o_conn text, o_user text)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off AS $$
BEGIN
    RETURN QUERY
    WITH q AS (
        SELECT * FROM unnest(p_rooms, p_seqs, p_evs, p_strict) AS q (name, after_seq, after_ev, strict)
    ), r AS (
        SELECT q.name, q.after_seq, q.after_ev, q.strict, rm.id, rm.epoch, rm.seq, rm.ev, rm.keep_size, rm.keep_ttl
        FROM q CROSS JOIN LATERAL (SELECT * FROM roomcast.rooms WHERE rooms.name = q.name) rm
    )
    SELECT r.name, 'r', r.epoch, r.seq, r.ev, NULL::uuid, NULL::timestamptz, NULL::bytea, NULL::text, NULL::text FROM r
    UNION ALL
    SELECT r.name, 'c', NULL, r.after_seq, NULL, c.id, NULL, NULL, NULL, NULL
    FROM r CROSS JOIN LATERAL (
        SELECT msg.id FROM roomcast.messages msg WHERE msg.room_id = r.id AND msg.seq = r.after_seq) c
    UNION ALL
    SELECT r.name, 'm', NULL, m.seq, NULL, m.id, m.published_at, m.data, NULL, NULL
    FROM r CROSS JOIN LATERAL (
        SELECT msg.seq, msg.id, msg.published_at, msg.data FROM roomcast.messages msg
        WHERE msg.room_id = r.id AND msg.seq > r.after_seq AND msg.seq <= r.seq
          AND (NOT r.strict OR (msg.seq > r.seq - r.keep_size
                                AND (r.keep_ttl = interval '0' OR msg.published_at >= clock_timestamp() - r.keep_ttl)))
        ORDER BY msg.seq LIMIT p_limit) m
    UNION ALL
    SELECT r.name, e.kind, NULL, e.after_seq, e.ev, NULL, e.at, e.info, e.conn_id, e.user_id
    FROM r CROSS JOIN LATERAL (
        SELECT * FROM roomcast.events ev WHERE ev.room_id = r.id AND ev.ev > r.after_ev AND ev.ev <= r.ev
        ORDER BY ev.ev LIMIT p_limit) e;
END $$;

-- read_rooms is read in fewer rows, each a cheaper part of one join (since
-- version 3): for each room that exists, with its epoch, newest seq and
-- newest event (o_top, o_evtop) on every row, its messages from the
-- position on (o_kind 'm': the one at the position itself, while it is in
-- the table, with no data, then at most p_limit after it) and its events
-- after the position (o_kind 'join' or 'leave', at most p_limit; looked
-- for only when the room has any); a room with neither is one row with
-- o_kind NULL. One statement, so one snapshot.
CREATE OR REPLACE FUNCTION roomcast.read_rooms(p_rooms text[], p_seqs bigint[], p_evs bigint[], p_strict boolean[], p_limit integer)
RETURNS TABLE (o_room text, o_epoch text, o_top bigint, o_evtop bigint, o_kind text, o_seq bigint, o_ev bigint,
               o_id uuid, o_at timestamptz, o_data bytea, o_conn text, o_user text)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off AS $$
BEGIN
    RETURN QUERY
    SELECT q.name, r.epoch, r.seq, r.ev, x.kind, x.seq, x.ev, x.id, x.at, x.data, x.conn_id, x.user_id
    FROM unnest(p_rooms, p_seqs, p_evs, p_strict) AS q (name, after_seq, after_ev, strict)
    JOIN roomcast.rooms r ON r.name = q.name
    LEFT JOIN LATERAL (
        (SELECT 'm'::text AS kind, msg.seq, NULL::bigint AS ev, msg.id, msg.published_at AS at,
                CASE WHEN msg.seq = q.after_seq THEN NULL ELSE msg.data END AS data, NULL::text AS conn_id, NULL::text AS user_id
         FROM roomcast.messages msg
         WHERE msg.room_id = r.id AND msg.seq >= q.after_seq AND msg.seq <= r.seq
           AND (msg.seq = q.after_seq OR NOT q.strict OR (msg.seq > r.seq - r.keep_size
                AND (r.keep_ttl = interval '0' OR msg.published_at >= clock_timestamp() - r.keep_ttl)))
         ORDER BY msg.seq LIMIT p_limit + 1)
        UNION ALL
        (SELECT e.kind, e.after_seq, e.ev, NULL, e.at, e.info, e.conn_id, e.user_id
         FROM roomcast.events e
         WHERE r.ev > q.after_ev AND e.room_id = r.id AND e.ev > q.after_ev AND e.ev <= r.ev
         ORDER BY e.ev LIMIT p_limit)
    ) x ON true;
END $$;

-- publish_batch is publish for a batch with no idempotency key, as each
-- node's publishers send it: the caller numbers each room's items
-- (p_ks[i], from 1), gives them their ids, marks each room's last item
-- (p_last, whose bounds the room keeps) and sorts them by room; one
-- statement (with p_mode 0) locks the rooms, inserts the messages and
-- updates the rooms, and returns, per room it could lock, its epoch, its
-- seq before the batch (item k's seq is that plus k) and the messages'
-- time. The items of the other rooms are busy (see publish's p_mode).
-- (Nodes whose pool prepares statements send the p_mode 0 statement
-- themselves, after this function's plan settings made with set_config
-- for the transaction only: a call costs the server more.)
CREATE OR REPLACE FUNCTION roomcast.publish_batch(
    p_rooms text[], p_ids uuid[], p_ks integer[], p_data bytea[], p_last boolean[],
    p_sizes integer[], p_ttls bigint[], p_archive boolean[], p_window bigint, p_mode integer)
RETURNS TABLE (o_room text, o_epoch text, o_base bigint, o_at timestamptz)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off AS $$
DECLARE
    v_name text;
    v_locked bigint[] := '{}';
    v_room roomcast.rooms;
    v_now timestamptz := clock_timestamp();
    v_window interval := p_window * interval '1 microsecond';
BEGIN
    IF p_mode = 0 THEN
        RETURN QUERY 
    WITH locked AS (
        SELECT * FROM roomcast.rooms WHERE name = ANY (p_rooms) ORDER BY name FOR NO KEY UPDATE SKIP LOCKED
    ), ins AS (
        INSERT INTO roomcast.messages (room_id, seq, id, published_at, data)
        SELECT r.id, r.seq + u.k, u.id, greatest(v_now, r.last_at), u.data
        FROM unnest(p_rooms, p_ids, p_ks, p_data) AS u (room, id, k, data) JOIN locked r ON r.name = u.room
    ), upd AS (
        UPDATE roomcast.rooms AS t SET
            seq = r.seq + g.k, keep_size = g.size, keep_ttl = g.ttl * interval '1 microsecond', archive = g.archive,
            last_at = greatest(v_now, r.last_at), touched_at = greatest(v_now, r.last_at),
            due = CASE
                WHEN g.archive THEN t.due
                WHEN r.seq + g.k > g.size THEN least(t.due, greatest(v_now, r.last_at) + v_window)
                WHEN g.ttl > 0 THEN least(t.due, greatest(v_now, r.last_at) + greatest(g.ttl * interval '1 microsecond', v_window))
                ELSE t.due END
        FROM unnest(p_rooms, p_ks, p_last, p_sizes, p_ttls, p_archive) AS g (room, k, last, size, ttl, archive)
        JOIN locked r ON r.name = g.room
        WHERE g.last AND t.id = r.id
    )
    SELECT r.name, r.epoch, r.seq, greatest(v_now, r.last_at) FROM locked r;
        RETURN;
    END IF;
    FOR v_name IN SELECT DISTINCT r FROM unnest(p_rooms) AS r ORDER BY r LOOP
        IF p_mode = 1 THEN
            SELECT * INTO v_room FROM roomcast.try_lock_room(v_name);
            CONTINUE WHEN NOT FOUND;
        ELSE
            v_room := roomcast.lock_room(v_name);
        END IF;
        v_locked := v_locked || v_room.id;
    END LOOP;
    RETURN QUERY 
    WITH locked AS (
        SELECT * FROM roomcast.rooms WHERE id = ANY (v_locked)
    ), ins AS (
        INSERT INTO roomcast.messages (room_id, seq, id, published_at, data)
        SELECT r.id, r.seq + u.k, u.id, greatest(v_now, r.last_at), u.data
        FROM unnest(p_rooms, p_ids, p_ks, p_data) AS u (room, id, k, data) JOIN locked r ON r.name = u.room
    ), upd AS (
        UPDATE roomcast.rooms AS t SET
            seq = r.seq + g.k, keep_size = g.size, keep_ttl = g.ttl * interval '1 microsecond', archive = g.archive,
            last_at = greatest(v_now, r.last_at), touched_at = greatest(v_now, r.last_at),
            due = CASE
                WHEN g.archive THEN t.due
                WHEN r.seq + g.k > g.size THEN least(t.due, greatest(v_now, r.last_at) + v_window)
                WHEN g.ttl > 0 THEN least(t.due, greatest(v_now, r.last_at) + greatest(g.ttl * interval '1 microsecond', v_window))
                ELSE t.due END
        FROM unnest(p_rooms, p_ks, p_last, p_sizes, p_ttls, p_archive) AS g (room, k, last, size, ttl, archive)
        JOIN locked r ON r.name = g.room
        WHERE g.last AND t.id = r.id
    )
    SELECT r.name, r.epoch, r.seq, greatest(v_now, r.last_at) FROM locked r;
END $$;

-- notify wakes the nodes of the rooms, after their publishes committed.
-- A transaction that notifies holds a lock that serializes every
-- notifying commit of the database until it is flushed; this one writes
-- nothing that must survive a crash, so it does not wait for the flush,
-- and the publishes' own commits (which do) are free to share one.
-- The rooms share notifications: 'm' then, per room, its name's length in
-- bytes, ':' and the name, up to about 7,900 bytes each. (Nodes since
-- version 2 make the same notifications in Go and send them with a plain
-- statement, cheaper than this call.)
CREATE OR REPLACE FUNCTION roomcast.notify(p_rooms text[]) RETURNS void
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off AS $$
DECLARE
    v_room text;
    v_item text;
    v_payload text := 'm';
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    FOREACH v_room IN ARRAY p_rooms LOOP
        v_item := octet_length(v_room) || ':' || v_room;
        IF octet_length(v_payload) + octet_length(v_item) > 7900 THEN
            PERFORM pg_notify('roomcast', v_payload);
            v_payload := 'm';
        END IF;
        v_payload := v_payload || v_item;
    END LOOP;
    IF v_payload <> 'm' THEN
        PERFORM pg_notify('roomcast', v_payload);
    END IF;
END $$;

-- read_history returns the room's position (a first row with o_seq NULL),
-- then the messages its history keeps after p_since: the oldest p_limit,
-- or with p_latest the newest. A room with no life gets one.
CREATE OR REPLACE FUNCTION roomcast.read_history(p_room text, p_since bigint, p_limit integer, p_latest boolean)
RETURNS TABLE (o_epoch text, o_top bigint, o_seq bigint, o_id uuid, o_at timestamptz, o_data bytea)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off AS $$
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
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off AS $$
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
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off AS $$
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
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off AS $$
DECLARE
    v_room roomcast.rooms := roomcast.lock_room(p_room);
    v_ev bigint := roomcast.presence_expire(v_room);
    v_now timestamptz := clock_timestamp();
BEGIN
    -- Presence and housekeeping need not wait for the disk: what a crash
    -- loses is redone (a node's refresh adds its entries back, the next
    -- sweep sweeps again), and a notifying commit that waited would hold
    -- up every other one.
    PERFORM set_config('synchronous_commit', 'off', true);
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
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off AS $$
DECLARE
    v_room roomcast.rooms;
    v_ev bigint;
    v_gone roomcast.presence;
BEGIN
    -- Presence and housekeeping need not wait for the disk: what a crash
    -- loses is redone (a node's refresh adds its entries back, the next
    -- sweep sweeps again), and a notifying commit that waited would hold
    -- up every other one.
    PERFORM set_config('synchronous_commit', 'off', true);
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
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off AS $$
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
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off AS $$
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
    -- Presence and housekeeping need not wait for the disk: what a crash
    -- loses is redone (a node's refresh adds its entries back, the next
    -- sweep sweeps again), and a notifying commit that waited would hold
    -- up every other one.
    PERFORM set_config('synchronous_commit', 'off', true);
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

INSERT INTO roomcast.schema_version (version) VALUES (3) ON CONFLICT (version) DO NOTHING;
