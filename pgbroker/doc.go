// Package pgbroker is a pubsub.Broker on PostgreSQL: every Handler (node)
// that shares one database serves the same rooms, and a room's history is
// a table of the app's own database, durable, queryable with plain SQL,
// and writable in the app's own transactions.
//
//	pool, err := pgxpool.New(ctx, "postgres://app@db/app")
//	b, err := pgbroker.New(ctx, pool) // installs or checks the schema
//	h := pubsub.NewHandler(pubsub.WithBroker(b), pubsub.WithHistory(100, time.Hour))
//	defer pool.Close()                // after the Handler
//	defer h.Close()                   // closes the broker
//
// One broker per Handler; the host owns the pool. Nodes need no sticky
// sessions: a client that reconnects to any node recovers from its (epoch,
// seq) position. PostgreSQL 13 or newer (tested on 15), through pgx v5.
//
// # The table is the truth
//
// A room is a row of the rooms table: its epoch (a UUID naming this life
// of its sequence), the seq of its newest message, its history bounds. A
// publish locks that row, inserts the messages with the next seqs and
// updates the row, in one transaction. The row lock makes a room's
// publishes take turns, so seqs grow by one in commit order with no gap,
// whichever node publishes; a commit makes the messages visible before
// any later seq of the room can be. A global sequence or a timestamp could
// not: a transaction that took a smaller number can commit after a
// larger one, and a reader would skip it.
//
// NOTIFY only wakes. Each node holds one session of its own that LISTENs
// on the schema's channel; a notification carries the room's name, never
// the message, so payloads of any size work (NOTIFY caps its payload at
// 8,000 bytes). A woken node reads the room's new rows after the position
// it delivered last, in seq order, and delivers them. It also reads every
// room it serves when its listening connection comes back, and every poll
// interval (WithPollInterval) in case a wake-up was lost, so nothing
// committed is ever skipped. A node's own publishes wake its own reader
// at once; their notifications, when they come back to the node's
// listening connection (known by the sending session's process id and
// the payload), are not read again.
//
// # Publishing in batches
//
// Concurrent publishes on a node share a batch: one call, one
// transaction, one commit (WithPublishConns, WithMaxBatch). A batch with
// no idempotency key is one statement (the publish_batch function's: lock
// the rooms' rows in name order, insert every message, update every room);
// one with keys also looks each key up, after the rows are locked. When
// the pool prepares statements (pgx's default), a batch of rooms that
// exist sends the publish_batch function's statement itself rather than
// calling the function (a call costs the server more than its
// statement), with the function's plan settings (a generic plan; no hash
// or merge joins) made by set_config for that transaction only: the
// host's pool sessions keep their own settings. The
// other nodes are woken after the commit, in a transaction of its own
// that does not wait for the disk: a transaction that NOTIFYs holds a lock
// that serializes every notifying commit of the database until its commit
// is flushed, so notifying inside the publishes' transactions would make
// their commits (and fsyncs) take turns instead of sharing one. A batch
// without keys sends that transaction in the batch's own round trip, on
// its connection, right after the batch's Sync (when the pool prepares
// statements, pgx's default); other batches, and a notification that
// failed, hand their rooms to the notifier.
//
// A room whose row another transaction holds (a host's PublishTx that has
// not committed yet) does not hold up the batch: its publishes are left out
// and handed to a waiter, which waits for that room alone (up to four rooms
// at a time). A room with no row yet is created by a second call of the
// publisher, which never waits either.
//
// # Delivery
//
// A node delivers each room's messages in seq order, with no hole: each is
// the next seq of the same epoch, or a pubsub.KindReset comes first. The
// rows beyond a room's history bounds stay in the table for the delivery
// window (WithDeliveryWindow), so every listening node delivers them, even
// in a room that keeps no history. A node resets a room (its subscribers
// are closed with 4006, reconnect, and are told what they can recover)
// when what follows its position is gone for good:
//
//   - it lost its listening connection (or, polling only, a poll failed),
//     and the messages published meanwhile are no longer in the room's
//     history: after an outage a node fills the gap from what the history
//     keeps, as a reconnecting client would, not from rows that happen to
//     outlive the bounds;
//   - it fell further behind than the delivery window;
//   - the room's row was deleted and created again (a new epoch), or the
//     messages it delivered are not in the table any more (the database
//     was restored from an older backup, or lost commits it had
//     acknowledged): see Failures.
//
// Join and leave events are rows of the events table, numbered in the
// room's row like messages: a node delivers them in the order they
// committed among the room's messages.
//
// # History and retention
//
// Each publish carries its room's bounds (pubsub.HistoryOptions, from the
// Handler's WithHistory or WithRoomOptions); the room keeps them. History
// and recovery serve what they keep: the newest Size messages, none older
// than TTL. The sweep deletes the rest once the delivery window has
// passed: every node runs it each WithSweepInterval, one at a time (an
// advisory lock), on the rooms whose due time came (an index on
// rooms.due, which a publish moves closer only when it makes work); it
// deletes a room's oldest rows in one ranged statement per room (its
// primary key is (room_id, seq)), at most 10,000 rows per room and 200
// rooms per call. A room's rows are a prefix to delete since published_at
// never decreases with seq. WithArchive keeps every message of the rooms
// it selects, forever, for a chat archive (History still keeps to the
// bounds). The sweep also forgets expired idempotency keys, old events and
// the presence entries of nodes that stopped refreshing them, and reclaims
// a room that holds no message, no presence and no live key after
// WithRoomTTL (its next life has a new epoch).
//
// Nothing lives in a node's memory that the table does not hold, so a
// restart of every node, and of PostgreSQL, keeps rooms, epochs and
// history: a client that comes back recovers exactly what it missed.
//
// # Publishing in the host's transaction
//
// PublishTx makes a message part of the host's own transaction: its
// subscribers, on every node, get it if and only if the transaction
// commits, in commit order:
//
//	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
//		if _, err := tx.Exec(ctx, `UPDATE orders SET status = 'shipped' WHERE id = 42`); err != nil {
//			return err
//		}
//		_, err := b.PublishTx(ctx, tx, "orders:42", []byte(`{"status":"shipped"}`))
//		return err
//	})
//
// The room's row stays locked until the transaction ends: that is what
// keeps seqs in commit order with no gap, and it means every other publish
// to that room, on every node, waits for the transaction (publishes to
// other rooms do not). Keep such transactions short; publish to several
// rooms of one transaction in a consistent order, or PostgreSQL resolves a
// deadlock by failing one transaction. Under REPEATABLE READ or
// SERIALIZABLE a concurrent publish to the room makes the transaction fail
// with a serialization error, to be retried as usual. The message's Time
// is when PublishTx ran; the nodes deliver it once the commit's NOTIFY
// wakes them.
//
// # Tables
//
// The schema (WithSchema, "roomcast" by default) holds these tables, a
// stable layout for the host's own SQL (search, export, moderation):
//
//	rooms     id, name, epoch, seq, ev, keep_size, keep_ttl, archive,
//	          last_at, touched_at, created_at, due
//	messages  room_id, seq, id (uuid), published_at, data (bytea)
//	keys      room_id, key, seq, id, published_at, expires_at
//	presence  room_id, conn_id, member_key, user_id, info, events, node, expires_at
//	events    room_id, ev, after_seq, kind, conn_id, user_id, info, at
//	history   a view: room, epoch, seq, id, published_at, data
//
// For instance, a room's messages as text:
//
//	SELECT seq, published_at, convert_from(data, 'UTF8') FROM roomcast.history
//	WHERE room = 'lobby' ORDER BY seq;
//
// Write to them only through the broker. schema.sql, in this module,
// documents each column.
//
// # Schema management
//
// New installs the schema, or upgrades it, in one transaction under an
// advisory lock, so nodes starting at once install it once; a
// schema_version table records SchemaVersion, and New refuses a database
// whose schema is newer than it knows (so, in a rolling upgrade to a new
// SchemaVersion, start no node of the old version once one of the new has
// started). Version 2 upgrades version 1 in place: it drops the foreign
// key from messages to rooms, whose check cost a query per message (a
// trigger on rooms deletes a deleted room's messages, as the key's
// cascade did). Version 3 adds the function read_rooms, which nodes read
// with (the read function stays, for nodes of version 2 still running):
// the same snapshot in fewer, cheaper rows, a sixth to a quarter less of
// the server's time per read. Teams whose migrations own every DDL statement
// pass WithoutSchemaInstall and apply SchemaSQL's SQL themselves
// (schema.sql is SchemaSQL(DefaultSchema), and upgrades versions 1 and 2
// too); New then only checks the version. The SQL is idempotent.
//
// # Connection poolers
//
// PgBouncer in transaction mode breaks LISTEN: use WithPollOnly, in which
// no node holds a session of its own and each reads its rooms every
// interval. The broker keeps no other session state: its advisory locks
// are transaction-scoped. Give the pool a QueryExecMode the pooler
// supports (pgx's default prepares statements, which PgBouncer supports
// from 1.21 with max_prepared_statements).
//
// # Failures
//
// Publish, History, Join, Leave and Presence return PostgreSQL's errors: a
// publish during an outage fails, it never vanishes (an error can also
// mean the outcome is unknown, if the connection broke during the commit:
// an idempotency key makes the retry safe). The listening connection
// reconnects with backoff (100ms to 5s) and is checked every poll
// interval; the node then reads what it missed, as above. A publish is as
// durable as its commit: with synchronous_commit on (PostgreSQL's
// default), a crash of the server loses no message whose Publish returned.
// After restoring the database from a backup, give every room a new
// epoch, so clients are told to reload instead of recovering from
// positions the backup does not know:
//
//	UPDATE roomcast.rooms SET epoch = gen_random_uuid()::text;
//
// Presence entries carry an expiry: each node refreshes its own every third
// of WithPresenceTTL (and adds back those that vanished while it could not
// reach the database), so a crashed node's members leave, with leave
// events, within about one TTL.
//
// # Connections
//
// The listening connection is a session of its own, opened with the pool's
// settings (application_name says "pgbroker listener"). From the pool a
// node uses up to WithPublishConns connections for batches, 4 for rooms
// other transactions hold, one each for its reader, notifier and keeper,
// and one per concurrent Handler call (subscribes, history, presence):
// give the pool at least 10 (pgxpool's default is the number of CPUs, at
// least 4).
//
// # Goroutines
//
// A broker starts its goroutines at Bind and Close stops them all, waiting
// for each: the listener (listenLoop: the listening session), the notifier
// (notifyLoop), the reader (readLoop: the only goroutine that delivers, so
// one room's deliveries never overlap), the publishers (publishLoop, one
// per WithPublishConns), four waiters (waitLoop), and the keeper (keepLoop:
// presence refresh, rooms kept alive, the sweep). Lock order: the reader's
// delivery lock (dmu, also taken by Unsubscribe so nothing of a room is
// delivered once it returns), then the broker's mu; a presence entry's
// mutex before mu; the waiting and notifying lists' locks are leaves.
package pgbroker
