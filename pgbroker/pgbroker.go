package pgbroker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/roomcast/pubsub"
)

// MaxRoomNameBytes bounds a room's name: it is a unique key of the rooms
// table and rides in a NOTIFY payload.
const MaxRoomNameBytes = 1000

// ErrRoomName: a room name longer than MaxRoomNameBytes.
var ErrRoomName = errors.New("pgbroker: room name longer than 1000 bytes")

// Broker is a pubsub.Broker on PostgreSQL. Create it with New.
type Broker struct {
	pool *pgxpool.Pool
	cfg  config
	log  *slog.Logger
	node string // this node's id, on its presence entries
	sql  statements

	ctx    context.Context // ends at Close; bounds the broker's own calls
	cancel context.CancelFunc
	wg     sync.WaitGroup // the listener, the notifier, the reader, the publishers, the waiters and the keeper

	queue chan *publishCall // publishes waiting for a batch

	wmu     sync.Mutex
	waiting map[string]*waitingRoom // busy rooms' publishes, for the waiters
	ready   chan string             // rooms in waiting, each at most once

	// dmu is held by the reader while it delivers one room's messages and
	// by Unsubscribe, so nothing of a room is delivered once Unsubscribe
	// returned. Lock order: dmu, then mu.
	dmu sync.Mutex

	nmu      sync.Mutex
	notifyTo map[string]bool // rooms whose publishes committed, for the notifier to announce
	notifyUp chan struct{}   // capacity 1: the notifier has work

	omu sync.Mutex
	own map[ownWake][]time.Time // this node's batches' notifications on their way back to its listener (see sentOwn)

	mu      sync.Mutex
	deliver func(pubsub.Message)
	closed  bool
	subs    map[string]*sub               // rooms this node is subscribed to
	dirty   map[string]bool               // subscribed rooms to read from the table
	readAll bool                          // read every subscribed room
	wake    chan struct{}                 // capacity 1: the reader has work
	members map[string]map[string]*member // room -> conn id -> this node's presence entries
	outages uint64                        // outages so far: a sub's strict names one
}

var _ pubsub.Broker = (*Broker)(nil)

// sub is this node's subscription to a room and how far it delivered.
type sub struct {
	ready bool // the subscription's starting position is known
	pos   pos
	// strict, when not 0, is the outage since which the node has not
	// read the room: it lost its listening connection (or, polling only,
	// a poll failed). What was published meanwhile is delivered only from
	// what the room's history keeps, as a reconnecting client would
	// recover it; anything short of that resets the room. (The rows past
	// the history bounds that the delivery window keeps are for nodes that
	// were listening: after an outage of unknown length, which of them
	// are left is down to the sweep's timing.)
	strict uint64
}

// pos is the last position of a room this node delivered: its epoch
// ("" when the room had no life), the seq and id of its last message (the
// id "" when unknown) and the number of its last presence event.
type pos struct {
	epoch string
	seq   uint64
	id    string
	ev    int64
}

// New returns a broker on the database pool reaches, after installing
// or upgrading its schema (see WithSchema, WithoutSchemaInstall). ctx
// bounds the installation. New panics with a "pgbroker: " message on a bad
// option. The broker starts its goroutines when a Handler binds it, and
// Close stops them; the host owns the pool and closes it after the
// Handler.
func New(ctx context.Context, pool *pgxpool.Pool, opts ...Option) (*Broker, error) {
	if pool == nil {
		panic("pgbroker: New(ctx, nil): want a *pgxpool.Pool")
	}
	cfg := defaultConfig()
	for _, o := range opts {
		o(&cfg)
	}
	cfg.validate()
	if err := install(ctx, pool, cfg.schema, cfg.install); err != nil {
		return nil, fmt.Errorf("pgbroker: schema %q: %w", cfg.schema, err)
	}
	b := &Broker{
		pool:     pool,
		cfg:      cfg,
		log:      cfg.logger,
		node:     uuid.NewString(),
		sql:      newStatements(cfg.schema),
		queue:    make(chan *publishCall, 4*cfg.maxBatch),
		waiting:  make(map[string]*waitingRoom),
		ready:    make(chan string, 4096),
		notifyTo: make(map[string]bool),
		own:      make(map[ownWake][]time.Time),
		notifyUp: make(chan struct{}, 1),
		subs:     make(map[string]*sub),
		dirty:    make(map[string]bool),
		wake:     make(chan struct{}, 1),
		members:  make(map[string]map[string]*member),
	}
	b.ctx, b.cancel = context.WithCancel(context.Background())
	return b, nil
}

// waiters is how many rooms that other transactions hold a node waits for
// at once (see waitLoop), each on a pooled connection.
const waiters = 4

// Bind starts the broker's goroutines: the listener and the notifier
// (unless WithPollOnly), the reader that delivers, the publishers that
// batch, the waiters (for rooms other transactions hold), and the keeper
// (presence refresh and sweep).
func (b *Broker) Bind(deliver func(pubsub.Message)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.deliver != nil {
		panic("pgbroker: this broker is already bound to a Handler; create one broker per Handler")
	}
	b.deliver = deliver
	if b.closed {
		return
	}
	if !b.cfg.pollOnly {
		b.wg.Go(b.listenLoop)
		b.wg.Go(b.notifyLoop)
	}
	b.wg.Go(b.readLoop)
	for range b.cfg.publishConns {
		b.wg.Go(b.publishLoop)
	}
	for range waiters {
		b.wg.Go(b.waitLoop)
	}
	b.wg.Go(b.keepLoop)
}

func (b *Broker) bound() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.deliver != nil && !b.closed
}

func (b *Broker) isClosed() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.closed
}

// Close stops the broker's goroutines and closes its listening
// connection; publishes still waiting for a batch fail with
// pubsub.ErrClosed. It leaves the tables as they are: this node's presence
// entries expire after WithPresenceTTL unless the Handler removed them
// first (its Shutdown and Close do). It does not close the pool.
func (b *Broker) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	b.mu.Unlock()
	b.cancel()
	b.wg.Wait()
	b.wmu.Lock()
	var rooms []string
	for room := range b.waiting {
		rooms = append(rooms, room)
	}
	b.wmu.Unlock()
	for _, room := range rooms {
		b.failWaiting(room)
	}
	for {
		select {
		case c := <-b.queue:
			c.finish(pubsub.PublishResult{}, pubsub.ErrClosed)
		default:
			return nil
		}
	}
}

// History returns the room's position and the kept messages q selects. A
// room with no state gets one (a new epoch), so the position a client
// learns stays valid.
func (b *Broker) History(ctx context.Context, room string, q pubsub.HistoryQuery) (pubsub.HistoryResult, error) {
	if b.isClosed() {
		return pubsub.HistoryResult{}, pubsub.ErrClosed
	}
	if len(room) > MaxRoomNameBytes {
		return pubsub.HistoryResult{}, ErrRoomName
	}
	rows, err := b.pool.Query(ctx, b.sql.history, room, int64(min(q.Since, math.MaxInt64)), max(q.Limit, 0), q.Latest)
	if err != nil {
		return pubsub.HistoryResult{}, fmt.Errorf("pgbroker: history of room %q: %w", room, err)
	}
	defer rows.Close()
	var res pubsub.HistoryResult
	for rows.Next() {
		var (
			epoch string
			top   int64
			seq   *int64
			id    *string
			at    *time.Time
			data  []byte
		)
		if err := rows.Scan(&epoch, &top, &seq, &id, &at, &data); err != nil {
			return pubsub.HistoryResult{}, fmt.Errorf("pgbroker: history of room %q: %w", room, err)
		}
		res.Epoch, res.Top = epoch, uint64(top)
		if seq == nil {
			continue // the position row
		}
		res.Messages = append(res.Messages, pubsub.Message{
			Kind: pubsub.KindMessage, Room: room, ID: *id, Epoch: epoch, Seq: uint64(*seq), Time: *at, Data: data,
		})
	}
	if err := rows.Err(); err != nil {
		return pubsub.HistoryResult{}, fmt.Errorf("pgbroker: history of room %q: %w", room, err)
	}
	return res, nil
}

// Subscribe reads the room's position (starting its life when it has
// none) and delivers every message committed after it, in order, from
// then on. It does not wait for the listening connection: what commits
// while it is down is read when it comes back, or by the next poll.
func (b *Broker) Subscribe(ctx context.Context, room string) error {
	if len(room) > MaxRoomNameBytes {
		return ErrRoomName
	}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return pubsub.ErrClosed
	}
	if b.deliver == nil {
		b.mu.Unlock()
		return errors.New("pgbroker: subscribe before Bind: pass the broker to pubsub.NewHandler first")
	}
	s := &sub{}
	b.subs[room] = s
	b.mu.Unlock()

	var (
		epoch   string
		seq, ev int64
		id      *string
	)
	if err := b.pool.QueryRow(ctx, b.sql.position, room).Scan(&epoch, &seq, &id, &ev); err != nil {
		b.mu.Lock()
		if b.subs[room] == s {
			delete(b.subs, room)
		}
		b.mu.Unlock()
		return fmt.Errorf("pgbroker: subscribe to room %q: %w", room, err)
	}
	b.mu.Lock()
	if b.subs[room] == s {
		s.pos = pos{epoch: epoch, seq: uint64(seq), ev: ev}
		if id != nil {
			s.pos.id = *id
		}
		s.ready = true
		b.markLocked(room)
	}
	b.mu.Unlock()
	return nil
}

// Unsubscribe forgets the room at once: nothing more of it is delivered.
func (b *Broker) Unsubscribe(ctx context.Context, room string) error {
	b.dmu.Lock()
	defer b.dmu.Unlock()
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return pubsub.ErrClosed
	}
	delete(b.subs, room)
	delete(b.dirty, room)
	return nil
}

// us is d in whole microseconds, rounded up; 0 for no duration.
func us(d time.Duration) int64 {
	if d <= 0 {
		return 0
	}
	return int64((d + time.Microsecond - 1) / time.Microsecond)
}

// statements are the broker's SQL, in its schema.
type statements struct {
	publish, publishBatch, wake, history, position, read string
	planSettings, publishPlain                           string // publish_batch's statement with p_mode 0, and its settings (see queryPipelined)
	pipelinedWake                                        string // wake, as a batch's pipeline sends it (tests break it alone)
	join, leave, presence, presenceCounts                string
	refresh, touch, sweep                                string
}

func newStatements(s string) statements {
	st := statements{
		publish: `SELECT o_item, o_epoch, o_seq, o_id::text, o_at, o_duplicate, o_busy FROM ` + s +
			`.publish($1::text[], $2::bytea[], $3::text[], $4::bigint[], $5::integer[], $6::bigint[], $7::boolean[], $8, $9, $10)`,
		publishBatch: `SELECT o_room, o_epoch, o_base, o_at FROM ` + s +
			`.publish_batch($1::text[], $2::uuid[], $3::integer[], $4::bytea[], $5::boolean[], $6::integer[], $7::bigint[], $8::boolean[], $9, $10)`,
		// The function's settings, for this transaction only: the host's
		// pool keeps its own.
		planSettings: `SELECT set_config('plan_cache_mode', 'force_generic_plan', true), ` +
			`set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true)`,
		// publish_batch's statement with p_mode 0, without the function.
		publishPlain: `WITH c AS (SELECT clock_timestamp() AS now), locked AS (
    SELECT * FROM ` + s + `.rooms WHERE name = ANY ($1::text[]) ORDER BY name FOR NO KEY UPDATE SKIP LOCKED
), ins AS (
    INSERT INTO ` + s + `.messages (room_id, seq, id, published_at, data)
    SELECT r.id, r.seq + u.k, u.id, greatest(c.now, r.last_at), u.data
    FROM c, unnest($1::text[], $2::uuid[], $3::integer[], $4::bytea[]) AS u (room, id, k, data) JOIN locked r ON r.name = u.room
), upd AS (
    UPDATE ` + s + `.rooms AS t SET
        seq = r.seq + g.k, keep_size = g.size, keep_ttl = g.ttl * interval '1 microsecond', archive = g.archive,
        last_at = greatest(c.now, r.last_at), touched_at = greatest(c.now, r.last_at),
        due = CASE
            WHEN g.archive THEN t.due
            WHEN r.seq + g.k > g.size THEN least(t.due, greatest(c.now, r.last_at) + $9::bigint * interval '1 microsecond')
            WHEN g.ttl > 0 THEN least(t.due, greatest(c.now, r.last_at) + greatest(g.ttl * interval '1 microsecond', $9::bigint * interval '1 microsecond'))
            ELSE t.due END
    FROM c, unnest($1::text[], $3::integer[], $5::boolean[], $6::integer[], $7::bigint[], $8::boolean[]) AS g (room, k, last, size, ttl, archive)
    JOIN locked r ON r.name = g.room
    WHERE g.last AND t.id = r.id
)
SELECT r.name, r.epoch, r.seq, greatest(c.now, r.last_at) FROM c, locked r`,
		// The notify function's notifications, their payloads made by
		// notifyPayloads, in a plain statement (a function call costs the
		// server more than the notifications).
		wake:     `SELECT set_config('synchronous_commit', 'off', true), pg_notify('` + s + `', p) FROM unnest($1::text[]) AS p`,
		history:  `SELECT o_epoch, o_top, o_seq, o_id::text, o_at, o_data FROM ` + s + `.read_history($1, $2, $3, $4)`,
		position: `SELECT o_epoch, o_seq, o_id, o_ev FROM ` + s + `.position($1)`,
		read: `SELECT o_room, o_kind, o_epoch, o_top, o_evtop, o_seq, o_ev, o_id, o_at, o_data, o_conn, o_user FROM ` + s +
			`.read_rooms($1::text[], $2::bigint[], $3::bigint[], $4::boolean[], $5)`,
		join:           `SELECT ` + s + `.presence_join($1, $2, $3, $4, $5, $6, $7, $8)`,
		leave:          `SELECT ` + s + `.presence_leave($1, $2, $3)`,
		presence:       `SELECT o_conn, o_user, o_info FROM ` + s + `.presence_list($1)`,
		presenceCounts: `SELECT count(DISTINCT o_member_key), count(*) FROM ` + s + `.presence_list($1)`,
		refresh: `UPDATE ` + s + `.presence p SET expires_at = clock_timestamp() + $3 * interval '1 microsecond'
FROM ` + s + `.rooms r, unnest($1::text[], $2::text[]) AS u (room, conn)
WHERE r.name = u.room AND p.room_id = r.id AND p.conn_id = u.conn
RETURNING u.room, u.conn`,
		touch: `UPDATE ` + s + `.rooms SET touched_at = clock_timestamp() WHERE id IN (
    SELECT id FROM ` + s + `.rooms WHERE name = ANY($1::text[]) FOR NO KEY UPDATE SKIP LOCKED)`,
		sweep: `SELECT o_rooms, o_trimmed, o_reclaimed, o_keys, o_events, o_expired FROM ` + s + `.sweep($1, $2, $3)`,
	}
	st.pipelinedWake = st.wake
	return st
}
