// Package redisbroker is a pubsub.Broker on Redis: every Handler (node)
// that shares one Redis, or one Redis Cluster, serves the same rooms.
//
//	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:6379"})
//	h := pubsub.NewHandler(pubsub.WithBroker(redisbroker.New(rdb)))
//
// One broker per Handler; the host owns the client and closes it after the
// Handler. Nodes need no sticky sessions: a client that reconnects to any
// node recovers from its (epoch, seq) position.
//
// # How it works
//
// A room's sequence, history and presence live in Redis, under keys that
// share the hash tag {room}. Publishing is one Lua script per batch:
// concurrent publishes are queued and sent together (at most
// WithPublishBatches batches in flight, a lone publish being a batch of
// one), and for each room in the batch the script reads the epoch
// (starting a new one when the room's state is missing, which is how a
// Redis that lost its data changes the epoch), sequences the room's
// messages in the order they were queued, appends them to the history
// stream, and PUBLISHes each on the room's channel, so sequencing, history
// and fan-out are one atomic step. A batch that go-redis resends after
// losing its reply is recognised and answered with its first result, never
// sequenced twice. History is bounded by count and age: the stream is
// trimmed roughly on publish and expires as a whole, and reads return only
// the room's newest size messages younger than its TTL (see scripts.go and
// publish.go). A node SUBSCRIBEs to the channel of each room it has
// subscribers in, so a message goes to exactly the nodes that want it. A
// publish with an idempotency key checks and records the key in the same
// script, so a key is sequenced once whichever node its publishes reach,
// however many race.
//
// Presence entries carry an expiry: each node refreshes its own every
// third of WithPresenceTTL, so a crashed node's members disappear, with
// leave events, within about one TTL. Join and leave events are decided in
// the scripts, atomically: a member's first connection joins, its last
// leaves.
//
// NewSharded spreads rooms over several Redis servers, each room wholly on
// one of them, so everything above holds per room unchanged.
//
// The broker needs Redis 6.2 or later (XADD NOMKSTREAM, XTRIM MINID).
//
// # Failures
//
// Publish, History, Join, Leave and Presence return Redis's errors; a
// publish during an outage fails, it never vanishes. The pub/sub
// connection reconnects and resubscribes by itself (go-redis); the broker
// pings it when it has been silent for 3s, so that one that broke without
// a word is found when the ping cannot be written. Messages
// published while it was down are not lost for this node's subscribers:
// the node tracks the last (epoch, seq) it delivered per room, and on a
// jump (or after resubscribing) it fills the gap from the room's history,
// in order, before going on. When the history no longer holds them, or the
// room's epoch changed under its subscribers (Redis lost its data), the
// broker logs it at Error level and delivers a pubsub.KindReset before
// anything past the hole: the Handler closes the room's subscribers on
// this node with 4006, after the messages they had, and a subscriber that
// resubscribes from its last position is told plainly what it cannot
// recover. A subscriber never sees a gap in seq on the same subscription.
package redisbroker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"
	"github.com/roomcast/pubsub"
)

// fillBatch bounds the messages one history read fetches to fill a gap.
const fillBatch = 500

// Broker is a pubsub.Broker on Redis. Create it with New.
type Broker struct {
	client redis.UniversalClient
	cfg    config
	log    *slog.Logger

	ctx    context.Context // ends at Close; bounds the broker's own calls
	cancel context.CancelFunc
	wg     sync.WaitGroup // the reader and the refresher

	cluster bool // a Redis Cluster: one room per batch
	idle    any  // ms(cfg.roomTTL), boxed once for every batch's arguments

	pmu    sync.Mutex // the publish queue (publish.go); never held with mu
	queue  []*pubReq
	queued int           // requests in queue still reqQueued
	lanes  []string      // free lanes
	last   int           // the size of the last batch taken
	grown  chan struct{} // closed when queued reaches want; nil when no leader waits
	want   int

	mu      sync.Mutex
	deliver func(pubsub.Message)
	ps      *redis.PubSub
	closed  bool
	subs    map[string]*sub               // rooms this node is subscribed to
	members map[string]map[string]*member // room -> conn id -> this node's presence entries
}

var _ pubsub.Broker = (*Broker)(nil)

// sub is this node's subscription to a room.
type sub struct {
	ready     chan struct{} // closed when Redis confirmed the SUBSCRIBE
	confirmed bool
	pos       pos // guarded by the broker's mu; written by the reader, and once by Subscribe
}

// pos is the last position of a room this node delivered, or a baseline.
type pos struct {
	epoch string // "" with a baseline: the room had no state
	seq   uint64
	state posState
}

type posState uint8

const (
	posUnknown   posState = iota // no position yet: no gap check
	posBaseline                  // the room's top when the subscription started; older messages may still arrive
	posDelivered                 // the last message delivered; anything at or below it is a repeat
)

// member is one of this node's presence entries. Its mu is held while a
// script about it runs, so a refresh never re-adds an entry that is
// leaving.
type member struct {
	mu     sync.Mutex
	m      pubsub.Member
	events bool
	left   bool
}

// New returns a broker that keeps rooms in the Redis the client points
// to: a *redis.Client (one server, or a Sentinel failover client) or a
// *redis.ClusterClient. A *redis.Ring does not work: its shards do not
// share pub/sub. New panics with a "redisbroker: " message on a bad
// option. The broker starts its goroutines when a Handler binds it, and
// Close stops them; Close does not close the client.
func New(client redis.UniversalClient, opts ...Option) *Broker {
	if client == nil {
		panic("redisbroker: New(nil): want a Redis client")
	}
	cfg := config{prefix: DefaultPrefix, presenceTTL: DefaultPresenceTTL, roomTTL: DefaultRoomTTL, batches: DefaultPublishBatches}
	for _, o := range opts {
		o(&cfg)
	}
	cfg.validate()
	b := &Broker{
		client:  client,
		cfg:     cfg,
		log:     cfg.logger,
		subs:    make(map[string]*sub),
		members: make(map[string]map[string]*member),
		cluster: isCluster(client),
		idle:    ms(cfg.roomTTL),
	}
	for range cfg.batches {
		b.lanes = append(b.lanes, uuid.NewString())
	}
	b.ctx, b.cancel = context.WithCancel(context.Background())
	return b
}

// keys are one room's Redis keys; see scripts.go.
type keys struct {
	base                                    string // P:{R}
	meta, hist, pres, conns, users, channel string
	idempotency                             string // the prefix of its idempotency keys
}

func (b *Broker) keys(room string) keys {
	base := b.cfg.prefix + ":{" + room + "}"
	return keys{base, base + ":m", base + ":h", base + ":p", base + ":c", base + ":u", base, base + ":k:"}
}

// roomOf is the room whose channel ch is, or "".
func (b *Broker) roomOf(ch string) string {
	rest, ok := strings.CutPrefix(ch, b.cfg.prefix+":{")
	if !ok {
		return ""
	}
	room, _ := strings.CutSuffix(rest, "}")
	return room
}

func ms(d time.Duration) int64 {
	if d <= 0 {
		return 0
	}
	return max(1, int64(math.Ceil(float64(d)/float64(time.Millisecond))))
}

func flag(b bool) string {
	if b {
		return "1"
	}
	return "0"
}

func (b *Broker) isClosed() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.closed
}

// Bind starts the broker's reader and presence refresher.
func (b *Broker) Bind(deliver func(pubsub.Message)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.deliver != nil {
		panic("redisbroker: this broker is already bound to a Handler; create one broker per Handler")
	}
	b.deliver = deliver
	if b.closed {
		return
	}
	b.ps = b.client.Subscribe(b.ctx)
	ps := b.ps
	b.wg.Go(func() { b.readLoop(ps) })
	b.wg.Go(b.refreshLoop)
}

// Close stops the broker's goroutines and its pub/sub connection. It
// leaves the room state in Redis as it is: this node's presence entries
// expire after WithPresenceTTL unless the Handler removed them first (its
// Shutdown and Close do).
func (b *Broker) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	ps := b.ps
	b.mu.Unlock()
	b.cancel()
	if ps != nil {
		_ = ps.Close()
	}
	b.wg.Wait()
	return nil
}

// History returns the room's position and the kept messages q selects. A
// room with no state gets one (a new epoch), so the position a client
// learns stays valid.
func (b *Broker) History(ctx context.Context, room string, q pubsub.HistoryQuery) (pubsub.HistoryResult, error) {
	if b.isClosed() {
		return pubsub.HistoryResult{}, pubsub.ErrClosed
	}
	k := b.keys(room)
	vals, err := historyScript.Run(ctx, b.client, []string{k.meta, k.hist},
		q.Since, max(q.Limit, 0), flag(q.Latest), uuid.NewString(), ms(b.cfg.roomTTL)).Slice()
	if err != nil {
		return pubsub.HistoryResult{}, fmt.Errorf("redisbroker: history of room %q: %w", room, err)
	}
	epoch, top, err := position(vals)
	if err != nil {
		return pubsub.HistoryResult{}, fmt.Errorf("redisbroker: history of room %q: %w", room, err)
	}
	msgs, err := entries(room, epoch, vals[2:])
	if err != nil {
		return pubsub.HistoryResult{}, fmt.Errorf("redisbroker: history of room %q: %w", room, err)
	}
	return pubsub.HistoryResult{Epoch: epoch, Top: top, Messages: msgs}, nil
}

// Subscribe SUBSCRIBEs to the room's channel and returns once Redis
// confirmed it, so every message published after it returns reaches this
// node. It then notes the room's position, to recognise a gap later.
func (b *Broker) Subscribe(ctx context.Context, room string) error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return pubsub.ErrClosed
	}
	if b.ps == nil {
		b.mu.Unlock()
		return errors.New("redisbroker: subscribe before Bind: pass the broker to pubsub.NewHandler first")
	}
	s := &sub{ready: make(chan struct{})}
	b.subs[room] = s
	ps := b.ps
	b.mu.Unlock()

	k := b.keys(room)
	fail := func(err error) error {
		b.dropSub(room, s, k.channel)
		return fmt.Errorf("redisbroker: subscribe to room %q: %w", room, err)
	}
	if err := ps.Subscribe(ctx, k.channel); err != nil {
		return fail(err)
	}
	select {
	case <-s.ready:
	case <-ctx.Done():
		return fail(ctx.Err())
	case <-b.ctx.Done():
		return fail(pubsub.ErrClosed)
	}
	vals, err := b.client.HMGet(ctx, k.meta, "e", "s").Result()
	if err != nil {
		return fail(err)
	}
	base := pos{state: posBaseline}
	if e, ok := vals[0].(string); ok {
		base.epoch = e
		if s, ok := vals[1].(string); ok {
			base.seq, _ = strconv.ParseUint(s, 10, 64)
		}
	}
	b.mu.Lock()
	if s.pos.state == posUnknown {
		s.pos = base
	}
	b.mu.Unlock()
	return nil
}

// dropSub forgets a subscription that failed.
func (b *Broker) dropSub(room string, s *sub, channel string) {
	b.mu.Lock()
	if b.subs[room] == s {
		delete(b.subs, room)
	}
	ps := b.ps
	b.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	// Best effort: go-redis forgets the channel even when the write fails,
	// and a connection that failed resubscribes without it.
	_ = ps.Unsubscribe(ctx, channel)
}

// Unsubscribe forgets the room at once (nothing more of it is delivered)
// and UNSUBSCRIBEs from its channel.
func (b *Broker) Unsubscribe(ctx context.Context, room string) error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return pubsub.ErrClosed
	}
	delete(b.subs, room)
	ps := b.ps
	b.mu.Unlock()
	if ps == nil {
		return nil
	}
	// An error means the pub/sub connection failed; go-redis has already
	// forgotten the channel, and the new connection will not subscribe it.
	_ = ps.Unsubscribe(ctx, b.keys(room).channel)
	return nil
}

// Join adds m to the room's presence, announcing a member's first
// connection when events is set.
func (b *Broker) Join(ctx context.Context, room string, m pubsub.Member, events bool) error {
	mm := &member{m: m, events: events}
	mm.mu.Lock()
	defer mm.mu.Unlock()
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return pubsub.ErrClosed
	}
	conns := b.members[room]
	if conns == nil {
		conns = make(map[string]*member)
		b.members[room] = conns
	}
	conns[m.ConnID] = mm
	b.mu.Unlock()

	k := b.keys(room)
	err := joinScript.Run(ctx, b.client, []string{k.meta, k.hist, k.pres, k.conns, k.users},
		m.ConnID, memberKey(m), flag(events), record(m), ms(b.cfg.presenceTTL), ms(2*b.cfg.presenceTTL),
		uuid.NewString(), ms(b.cfg.roomTTL), k.channel).Err()
	if err != nil {
		b.forget(room, mm)
		return fmt.Errorf("redisbroker: join room %q: %w", room, err)
	}
	return nil
}

// forget drops one of this node's presence entries from its refresh list.
func (b *Broker) forget(room string, mm *member) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if conns := b.members[room]; conns[mm.m.ConnID] == mm {
		delete(conns, mm.m.ConnID)
		if len(conns) == 0 {
			delete(b.members, room)
		}
	}
}

// Leave removes m from the room's presence, announcing a member's last
// connection when events is set.
func (b *Broker) Leave(ctx context.Context, room string, m pubsub.Member, events bool) error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return pubsub.ErrClosed
	}
	mm := b.members[room][m.ConnID]
	b.mu.Unlock()
	if mm != nil {
		b.forget(room, mm)
		mm.mu.Lock()
		mm.left = true
		defer mm.mu.Unlock()
	}
	k := b.keys(room)
	err := leaveScript.Run(ctx, b.client, []string{k.meta, k.pres, k.conns, k.users},
		m.ConnID, flag(events), k.channel).Err()
	if err != nil {
		return fmt.Errorf("redisbroker: leave room %q: %w", room, err)
	}
	return nil
}

// Presence lists the room's members on every node, after removing the
// entries that expired.
func (b *Broker) Presence(ctx context.Context, room string, countsOnly bool) (pubsub.Presence, error) {
	if b.isClosed() {
		return pubsub.Presence{}, pubsub.ErrClosed
	}
	k := b.keys(room)
	vals, err := presenceScript.Run(ctx, b.client, []string{k.meta, k.pres, k.conns, k.users},
		flag(countsOnly), k.channel).Slice()
	if err != nil {
		return pubsub.Presence{}, fmt.Errorf("redisbroker: presence of room %q: %w", room, err)
	}
	if countsOnly {
		if len(vals) != 2 {
			return pubsub.Presence{}, fmt.Errorf("redisbroker: presence of room %q: %w", room, errMalformed)
		}
		members, _ := vals[0].(int64)
		conns, _ := vals[1].(int64)
		return pubsub.Presence{Count: int(members), Connections: int(conns)}, nil
	}
	type group struct {
		pm    pubsub.PresenceMember
		first string
		info  json.RawMessage
	}
	groups := make(map[string]*group)
	for _, v := range vals {
		s, _ := v.(string)
		if len(s) < 1 {
			continue
		}
		ukey, rec, ok := field(s[1:])
		m, mok := parseMember(rec)
		if !ok || !mok {
			return pubsub.Presence{}, fmt.Errorf("redisbroker: presence of room %q: %w", room, errMalformed)
		}
		g := groups[ukey]
		if g == nil {
			g = &group{pm: pubsub.PresenceMember{UserID: m.UserID}, first: m.ConnID, info: m.Info}
			groups[ukey] = g
		}
		g.pm.Conns = append(g.pm.Conns, m.ConnID)
		if m.ConnID < g.first {
			g.first, g.info = m.ConnID, m.Info
		}
	}
	p := pubsub.Presence{Count: len(groups), Connections: len(vals), Members: make([]pubsub.PresenceMember, 0, len(groups))}
	for _, g := range groups {
		slices.Sort(g.pm.Conns)
		g.pm.Info = g.info
		p.Members = append(p.Members, g.pm)
	}
	slices.SortFunc(p.Members, func(a, c pubsub.PresenceMember) int {
		if a.UserID != c.UserID {
			return strings.Compare(a.UserID, c.UserID)
		}
		return strings.Compare(a.Conns[0], c.Conns[0])
	})
	return p, nil
}
