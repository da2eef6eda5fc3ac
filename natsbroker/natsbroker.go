// Package natsbroker is a pubsub.Broker on NATS JetStream: every Handler
// (node) connected to one NATS server or cluster serves the same rooms,
// with the same order, history, recovery and presence as the in-memory
// and Redis brokers.
//
//	nc, err := nats.Connect(url, nats.MaxReconnects(-1), nats.ReconnectBufSize(-1))
//	b, err := natsbroker.New(ctx, nc)
//	h := pubsub.NewHandler(pubsub.WithBroker(b))
//
// One broker per Handler; the host owns the connection and closes it after
// the Handler. Nodes need no sticky sessions: a client that reconnects to
// any node recovers from its (epoch, seq) position. It needs nats-server
// 2.11 or later (per-message TTLs and subject delete markers) with
// JetStream enabled.
//
// # One stream, a log per room
//
// New creates (or updates) one JetStream stream, named after the prefix
// (WithPrefix, default "roomcast"). A room R has a log, the subject
// prefix.r.R.m, whose records are the room's messages in order. Each
// record carries its room position in headers: Rc-Epoch, Rc-Seq (the
// room's sequence), Rc-Id, Rc-Time, and the room's history bounds. The
// stream republishes every stored record to prefix.d.R.m, and a node
// subscribes (core NATS) to the delivery subjects of the rooms it serves,
// so a message goes only to the nodes that want it, in the order the
// stream stored it.
//
// # Why each room's sequence has no gap
//
// JetStream numbers a stream's messages, not a subject's, so the stream
// sequence is not a room's sequence. Each record is appended with optimistic
// concurrency: the publish carries Nats-Expected-Last-Subject-Sequence,
// the stream sequence of the room's last record (its head) as the
// publisher read it, and Rc-Seq, the head's room sequence plus one. The
// stream leader checks the expectation and stores the record as one step
// (JetStream serialises a stream's appends), so a record is stored only
// if it directly follows the head it was computed from. Two publishers
// racing on any nodes compute the same next sequence from the same head;
// the leader stores the first and refuses the second (wrong last
// sequence), which reads the new head and tries again. By induction every
// stored record of an epoch is its predecessor's seq plus one: no gap and
// no repeat, whatever the number of publishers and nodes. A refused
// record was not stored, so a retry never stores a message twice. Each
// node also serialises its own appends to a room, so its publishers do not
// race each other; only nodes race.
//
// A record never expires before its predecessor (its Nats-TTL is at least
// the head's), and history trimming always keeps the head, so the head of
// a live room is always its newest record.
//
// # Epochs
//
// A room's epoch (a UUID) is in every record. It changes when the stream's
// state for the room is lost: the log is empty (the room expired after
// WithRoomTTL with no subscriber, or the stream was deleted, lost with a
// memory-storage server, or purged) or its last record is the server's
// delete marker (left when the last record expired). The next publish, or
// a History call, then starts a new epoch with an "open" record (seq 0)
// appended with an expected last sequence of 0 (or of the marker), so
// racing nodes agree on one new epoch. Nodes recognise a new epoch in the
// records they receive, in the marker itself, and in the head they read
// after a reconnect.
//
// # Idempotency keys
//
// A publish with a key (PublishOptions.Key) is sequenced once per room
// within its KeyTTL. JetStream's own deduplication (Nats-Msg-Id) is not
// used: its window is one per stream, not per key, and a duplicate's ack
// names only a stream sequence, whose record a short history may already
// have trimmed, so it could not return the first publish's room position.
// Instead the message record carries the key's hash (Rc-Key) and its
// expiry (Rc-Key-Until), and a key record on prefix.k.R.H (H the hash)
// says where the key's message landed, with a Nats-TTL of the key's TTL.
// A publish with a key reads the head and the key record; a valid key
// record of the current epoch, or a head that is the key's own message,
// makes it a duplicate that returns that position. Otherwise it appends
// its message on the head (as above) and returns; the key record is
// written meanwhile. A keyed publish costs two round trips: the key
// record's read and the append.
//
// Why a key is never sequenced twice: a key record is written after its
// message, so there is a moment when the message is stored and its key
// record is not. The rule that closes it: before appending anything on
// a head that carries a live key, a node makes sure that key's record is
// written (reading it, and writing it if missing, with an expected last
// sequence on the key's subject so that two helpers write it once). So
// every keyed message that is not the head has its key record, and a
// publish that read the head, then the key record, and then appended on
// that same head, saw every earlier message of its key. A duplicate
// decided on a cached head is re-checked on a fresh one. KeyTTL is
// honoured to the millisecond by the Rc-Key-Until check (on each node's
// clock, so clock skew between nodes shifts it); the key record's
// Nats-TTL (whole seconds, rounded up) only reclaims its storage.
//
// # History
//
// Publish honours the HistoryOptions it is given, per room and per
// publish: every record holds the room's bounds (Rc-Keep, Rc-Age) as of
// that record, and a room's history is the messages of its current epoch
// with seq above top-Keep, younger than Age. Reads apply both bounds
// exactly; storage follows: every few publishes (a quarter of the size,
// between 8 and 256), and in a room with an age bound at least every half
// of it, the publishing node trims the room's log in the background to the
// size (a purge of the subject keeping the newest) and drops records older
// than the age bound, always keeping the head.
// Every record also expires on its own (Nats-TTL: the longer of the
// history TTL and WithRoomTTL). Reads are by subject and position: each
// record carries an anchor (Rc-Ptr: the stream sequence of an earlier
// record every 32 messages), so a read since seq s walks back about
// (top-s)/32 anchors, then reads forward with batched direct gets.
//
// # Failures
//
// Publish, History, Join, Leave and Presence return NATS's errors; a
// publish while the connection is down fails at once (ErrDisconnected)
// rather than waiting in the client's reconnect buffer (connect with
// nats.ReconnectBufSize(-1) so that nothing published before a disconnect
// is sent later either). The client reconnects and resubscribes by itself.
// Messages republished while a node's connection was down are not lost for
// its subscribers: the node tracks the last (epoch, seq) and stream
// sequence it delivered per room, and on a jump (or after a reconnect, or
// a new stream leader) it reads what it missed from the room's log, in
// order, before going on. When the history no longer holds them, or the
// room's epoch changed under its subscribers, the broker logs it at Error
// level and delivers a pubsub.KindReset before anything past the hole. A
// subscriber never sees a gap in seq on the same subscription.
//
// # Presence
//
// A connection's presence is a record on prefix.r.R.p.C, rolled up (one
// per subject) with a Nats-TTL of WithPresenceTTL; its node rewrites it
// every third of the TTL, so a crashed node's entries expire, and the
// server's delete marker tells every node. Leaving writes a leave record.
// Each node with subscribers in a room reads the room's entries when it
// subscribes, then follows the republished entry records in stream order,
// interleaved with the room's messages, and turns a member's first
// connection into a join event and its last into a leave event, as the
// other brokers do. Presence reads the room's entries with batched direct
// gets.
//
// # What it needs from NATS
//
// A connection to the account's default JetStream (no domain or API
// prefix) that may publish to prefix.r.> and prefix.k.>, subscribe to
// prefix.d.> and its own inboxes, and use the JetStream API for the
// stream: stream create and update, info, message get, direct get and
// purge, and the stream's leader-elected advisory. A room's name becomes
// one subject token (letters, digits, '-' and '_' kept, every other byte
// escaped as '=' and two hex digits), so very long names make long
// subjects (NATS's max_control_line, 4 KiB by default, bounds a subject).
// A message is at most NATS's max_payload (1 MiB by default) with its
// headers. Connect with nats.MaxReconnects(-1) so the client never gives
// up, and nats.ReconnectBufSize(-1) (see Failures).
//
// # Goroutines
//
// Bind starts four, which Close stops and waits for: the watcher (the
// connection's state: a call waiting for NATS fails as soon as the
// connection drops), the reader (every delivery of every room, so one
// room's are in order and never concurrent; it also fills gaps and catches
// up after a reconnect), the refresher (presence entries, keeping
// subscribed rooms alive, re-creating a lost stream) and the trimmer
// (history trimming). The NATS client runs its own. Lock order: a room's
// append lock or a member's mu first, then any one of the broker's
// mutexes (mu, logsMu, the link's, the trim queue's), never two of those
// at once.
package natsbroker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/roomcast/pubsub"
)

// ErrDisconnected: the broker's NATS connection is down, so the call was
// not sent, or it dropped while the call waited for its answer, so it may
// have taken effect (a publish that must not happen twice carries an
// idempotency key). The client reconnects by itself.
var ErrDisconnected = errors.New("natsbroker: not connected to NATS")

// asyncTimeout bounds the wait for an asynchronous publish's ack.
const asyncTimeout = 10 * time.Second

// deliveryBuffer bounds the records waiting for the reader. Past it the
// NATS client drops records (and reports a slow consumer); the reader
// notices the gap and reads them from the stream.
const deliveryBuffer = 1 << 16

// Broker is a pubsub.Broker on NATS JetStream. Create it with New.
type Broker struct {
	nc     *nats.Conn
	js     jetstream.JetStream
	stream jetstream.Stream
	cfg    config
	log    *slog.Logger

	ctx    context.Context // ends at Close; bounds the broker's own calls
	cancel context.CancelFunc
	wg     sync.WaitGroup // the watcher, the reader, the refresher and the trimmer

	replies  replies          // answers of direct gets
	msgs     chan *nats.Msg   // republished records of subscribed rooms, for the reader
	ctl      chan func()      // work the reader runs between records
	status   chan nats.Status // the connection's status changes, for the watcher
	link     link
	resyncs  chan struct{}      // the connection came back: the reader catches up
	advisory *nats.Subscription // stream leader elections
	recreate chan struct{}      // the stream seems gone
	trims    trimQueue

	logsMu sync.Mutex
	logs   map[string]*roomLog // this node's append state per room

	skipKeyRecords bool // tests: die between a keyed message and its key record

	mu      sync.Mutex
	deliver func(pubsub.Message)
	closed  bool
	subs    map[string]*sub               // rooms this node is subscribed to
	members map[string]map[string]*member // room -> conn id -> this node's presence entries
}

var _ pubsub.Broker = (*Broker)(nil)

// New returns a broker that keeps rooms in the NATS JetStream the
// connection reaches. It creates the broker's stream, or updates it to
// the options (replicas, size), and fails when the server is older than
// 2.11 or JetStream is not enabled. It panics with a "natsbroker: "
// message on a bad option. The broker starts its goroutines when a
// Handler binds it, and Close stops them; Close does not close the
// connection.
func New(ctx context.Context, nc *nats.Conn, opts ...Option) (*Broker, error) {
	if nc == nil {
		panic("natsbroker: New(ctx, nil): want a NATS connection")
	}
	cfg := config{
		prefix:      DefaultPrefix,
		replicas:    DefaultReplicas,
		storage:     jetstream.FileStorage,
		presenceTTL: DefaultPresenceTTL,
		roomTTL:     DefaultRoomTTL,
	}
	for _, o := range opts {
		o(&cfg)
	}
	cfg.validate()
	if v := nc.ConnectedServerVersion(); v != "" && !serverAtLeast(v, minServer) {
		return nil, fmt.Errorf("natsbroker: nats-server %s is too old: rooms need per-message TTLs, %s or later", v, minServer)
	}
	// An asynchronous publish (a key's record, a presence refresh) whose
	// ack never comes fails after a while rather than wait for ever.
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncTimeout(asyncTimeout))
	if err != nil {
		return nil, fmt.Errorf("natsbroker: %w", err)
	}
	b := &Broker{
		nc:       nc,
		js:       js,
		cfg:      cfg,
		log:      cfg.logger,
		msgs:     make(chan *nats.Msg, deliveryBuffer),
		ctl:      make(chan func()),
		recreate: make(chan struct{}, 1),
		resyncs:  make(chan struct{}, 1),
		logs:     make(map[string]*roomLog),
		subs:     make(map[string]*sub),
		members:  make(map[string]map[string]*member),
	}
	b.trims.init()
	b.ctx, b.cancel = context.WithCancel(context.Background())
	if err := b.ensureStream(ctx); err != nil {
		return nil, err
	}
	if b.stream, err = js.Stream(ctx, cfg.prefix); err != nil {
		return nil, fmt.Errorf("natsbroker: stream %q: %w", cfg.prefix, err)
	}
	if err := b.replies.start(nc); err != nil {
		return nil, fmt.Errorf("natsbroker: %w", err)
	}
	return b, nil
}

func (b *Broker) isClosed() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.closed
}

// Bind starts the broker's watcher, reader, refresher and trimmer.
func (b *Broker) Bind(deliver func(pubsub.Message)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.deliver != nil {
		panic("natsbroker: this broker is already bound to a Handler; create one broker per Handler")
	}
	b.deliver = deliver
	if b.closed {
		return
	}
	b.status = b.nc.StatusChanged(nats.CONNECTED, nats.DISCONNECTED, nats.RECONNECTING, nats.CLOSED)
	b.link.set(!b.nc.IsConnected())
	// A new stream leader may have stored records that no server
	// republished (the old leader died first): look, as after a
	// reconnect. Best effort: without it a gap is found at the next record.
	b.advisory, _ = b.nc.ChanSubscribe("$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED."+b.cfg.prefix, b.msgs)
	status := b.status
	b.wg.Go(func() { b.watchLoop(status) })
	b.wg.Go(b.readLoop)
	b.wg.Go(b.refreshLoop)
	b.wg.Go(b.trimLoop)
}

// Close stops the broker's goroutines and its subscriptions. It leaves
// the rooms in the stream as they are: this node's presence entries
// expire after WithPresenceTTL unless the Handler removed them first (its
// Shutdown and Close do).
func (b *Broker) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	subs := b.subs
	b.subs = make(map[string]*sub)
	status, advisory := b.status, b.advisory
	b.mu.Unlock()
	b.cancel()
	for _, s := range subs {
		_ = s.ns.Unsubscribe()
	}
	if advisory != nil {
		_ = advisory.Unsubscribe()
	}
	if status != nil {
		b.nc.RemoveStatusListener(status)
	}
	b.replies.stop()
	b.wg.Wait()
	return nil
}

// newEpoch names a new life of a room.
func newEpoch() string { return uuid.NewString() }
