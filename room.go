package pubsub

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// ValidRoomName is the default room-name check: 1 to 128 bytes of ASCII
// letters, digits and the characters _ - . : @ /. Hosts with other needs set
// WithRoomValidator.
func ValidRoomName(room string) error {
	if room == "" {
		return errors.New("the room name is empty")
	}
	if len(room) > defaultMaxRoomNameLength {
		return fmt.Errorf("the room name is longer than %d bytes", defaultMaxRoomNameLength)
	}
	for i := 0; i < len(room); i++ {
		c := room[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case c == '_', c == '-', c == '.', c == ':', c == '@', c == '/':
		default:
			return fmt.Errorf("the room name has a character outside letters, digits and _-.:@/ at byte %d", i)
		}
	}
	return nil
}

const registryShards = 32

// registry holds this node's rooms, sharded by name so that joins and
// publishes to different rooms rarely meet on a lock.
type registry struct {
	seed       maphash.Seed
	shards     [registryShards]shard
	broker     Broker
	options    func(room string) RoomOptions
	maxPending int // the most live messages a catching-up subscription buffers
	onErr      func(op, room string, err error)
	// inline: the broker delivers on the publisher's goroutine (the
	// built-in one), so a publish to a small room writes it (inlineWrites).
	inline bool
}

type shard struct {
	mu    sync.Mutex
	rooms map[string]*room
	// leaving holds rooms whose broker Unsubscribe is still running, so the
	// room's next life can wait for it before its own Subscribe.
	leaving map[string]*room
}

// room is one life of a room on this node: from its first subscriber's
// broker Subscribe to its last subscriber's broker Unsubscribe.
type room struct {
	name string
	opts RoomOptions // fixed for the life, from WithRoomOptions
	refs int         // subscribers joined or joining; guarded by the shard's mu
	prev *room       // the previous life, whose Unsubscribe must end first

	ready chan struct{} // closed when the broker Subscribe returned
	err   error         // that Subscribe's result; read only after ready
	gone  chan struct{} // closed when this life ended at the broker

	mu       sync.RWMutex // guards subs, watchers and each sub's buffer; held for reading during fan-out
	subs     map[*conn]*sub
	watchers int // subscribers that asked for presence events

	dropped       atomic.Uint64 // messages a drop policy discarded, all subscribers
	slowConsumers atomic.Uint64 // subscribers closed as slow consumers on this room's message

	// The last message the broker delivered, guarded by the broker's
	// promise that one room's deliveries never overlap. A repeat is dropped,
	// whatever the broker does, so delivery stays at most once; a message
	// that does not follow it (a seq jump or a new epoch) is a hole in the
	// stream and resets the room (see deliver). lastEpoch is empty until
	// the life's first message, and again after a reset.
	lastEpoch string
	lastSeq   uint64
}

// sub is one connection's subscription to a room.
type sub struct {
	presence bool // wants join and leave events
	// buffering is set while the subscription catches up from history:
	// live messages wait in pending until catchUp releases them, and
	// pending is nil once live. A full pending closes the connection as a
	// slow consumer, like a full queue. (Beside presence: two bools in one
	// word keep a sub in the allocator's 112-byte class, not 128.)
	buffering bool
	member    Member
	pending   []*frame
	// floor is the position the subscription caught up to (its history
	// read, or the last buffered message it released). A broker whose live
	// stream lags its history (Redis pub/sub beside a Lua read) may still
	// deliver messages at or below it after the catch-up: they are
	// dropped. The first newer one must be the floor's next, or the
	// subscription would skip a hole: it is closed with 4006 instead. Once
	// one passes, floorEpoch is cleared and the room's own check takes over.
	floorEpoch string
	floorSeq   uint64
}

func newRegistry(b Broker, options func(string) RoomOptions, maxPending int, onErr func(op, room string, err error)) *registry {
	r := &registry{seed: maphash.MakeSeed(), broker: b, options: options, maxPending: maxPending, onErr: onErr}
	_, r.inline = b.(*memoryBroker)
	for i := range r.shards {
		r.shards[i].rooms = make(map[string]*room)
		r.shards[i].leaving = make(map[string]*room)
	}
	return r
}

func (g *registry) shard(name string) *shard {
	return &g.shards[maphash.String(g.seed, name)%registryShards]
}

// join adds c to the room, subscribing this node at the broker when c is
// the room's first subscriber. With buffering, live messages are held in the
// subscription until catchUp releases them. It returns the room c joined.
func (g *registry) join(ctx context.Context, name string, c *conn, s *sub) (*room, error) {
	sh := g.shard(name)
	sh.mu.Lock()
	r := sh.rooms[name]
	creator := r == nil
	if creator {
		r = &room{
			name:  name,
			opts:  g.options(name),
			prev:  sh.leaving[name],
			ready: make(chan struct{}),
			gone:  make(chan struct{}),
			subs:  make(map[*conn]*sub),
		}
		sh.rooms[name] = r
	}
	r.refs++
	sh.mu.Unlock()

	if creator {
		if r.prev != nil {
			<-r.prev.gone // bounded: the Unsubscribe runs with a timeout
			r.prev = nil
		}
		r.err = g.broker.Subscribe(ctx, name)
		close(r.ready)
	} else {
		select {
		case <-r.ready: // the common case, checked first: ctx.Done() makes a
			// channel per connection, which an idle connection would keep
		default:
			select {
			case <-r.ready:
			case <-ctx.Done():
				g.release(r)
				return nil, ctx.Err()
			}
		}
	}
	if r.err != nil {
		g.release(r)
		return nil, r.err
	}
	r.mu.Lock()
	r.subs[c] = s
	if s.presence {
		r.watchers++
	}
	r.mu.Unlock()
	if r.opts.Presence != PresenceOff {
		if err := g.broker.Join(ctx, name, s.member, r.opts.Presence == PresenceOn); err != nil {
			g.leave(r, c)
			return nil, err
		}
	}
	return r, nil
}

// catchUp ends a subscription's buffering: it queues first (history, in
// order), then every buffered live message that first does not already
// cover, and from then on the subscription is live. Nothing published in
// between is lost or doubled: the subscription buffered before the history
// was read, and everything in the buffer at or below top was in history.
func (g *registry) catchUp(r *room, c *conn, first []*frame, epoch string, top uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.subs[c]
	if s == nil {
		return
	}
	for _, f := range first {
		c.enqueue(f)
	}
	last := top
	for _, f := range s.pending {
		if f.m.Kind != KindMessage {
			c.enqueue(f)
			continue
		}
		if f.m.Epoch != epoch || f.m.Seq > last+1 {
			// The live stream ran ahead of the history read: a hole no
			// broker keeping its contract leaves, closed rather than skipped.
			c.roomReset()
			break
		}
		if f.m.Seq <= last {
			continue // covered by the history read
		}
		c.enqueue(f)
		last = f.m.Seq
	}
	s.buffering, s.pending = false, nil
	s.floorEpoch, s.floorSeq = epoch, last
}

// leave removes c from r, unsubscribing this node at the broker when c was
// the last subscriber.
func (g *registry) leave(r *room, c *conn) {
	r.mu.Lock()
	s := r.subs[c]
	delete(r.subs, c)
	if s != nil && s.presence {
		r.watchers--
	}
	r.mu.Unlock()
	if s != nil && r.opts.Presence != PresenceOff {
		ctx, cancel := context.WithTimeout(context.Background(), brokerCallTimeout)
		if err := g.broker.Leave(ctx, r.name, s.member, r.opts.Presence == PresenceOn); err != nil {
			g.onErr("leave", r.name, err)
		}
		cancel()
	}
	g.release(r)
}

// brokerCallTimeout bounds the broker calls made on behalf of a leaving
// subscriber, which has no context of its own left.
const brokerCallTimeout = 10 * time.Second

func (g *registry) release(r *room) {
	s := g.shard(r.name)
	s.mu.Lock()
	r.refs--
	last := r.refs == 0
	subscribed := false
	if last {
		// refs reached zero, so the creator has released too: ready is closed.
		delete(s.rooms, r.name)
		subscribed = r.err == nil
		if subscribed {
			s.leaving[r.name] = r
		}
	}
	s.mu.Unlock()
	if !last {
		return
	}
	if subscribed {
		ctx, cancel := context.WithTimeout(context.Background(), brokerCallTimeout)
		if err := g.broker.Unsubscribe(ctx, r.name); err != nil {
			g.onErr("unsubscribe", r.name, err)
		}
		cancel()
		s.mu.Lock()
		if s.leaving[r.name] == r {
			delete(s.leaving, r.name)
		}
		s.mu.Unlock()
	}
	close(r.gone)
}

// deliver fans a broker message out to the room's subscribers on this node.
// It enqueues one shared frame per subscriber; in a small room, with the
// built-in broker, it then writes them (inlineWrites), never waiting.
func (g *registry) deliver(m Message) {
	s := g.shard(m.Room)
	s.mu.Lock()
	r := s.rooms[m.Room]
	s.mu.Unlock()
	if r == nil {
		return
	}
	if m.Kind != KindMessage && m.Kind != KindReset {
		r.mu.RLock()
		defer r.mu.RUnlock()
		if r.watchers > 0 { // else nobody here asked for presence events: no loop over the room
			g.fanOut(r, m, newRoomFrame(m, r), nil)
		}
		return
	}
	var w *inlineWrites
	if g.inline {
		w = new(inlineWrites) // on the stack: it does not escape
	}
	hole := g.follow(r, m, w)
	w.write() // after the room's lock: an ack waits for no write
	if hole {
		// The one place that keeps a live stream gap-free, whatever the
		// broker: every subscriber was closed with 4006 before it could see
		// a message past the hole, so its last position is the one before
		// it. m started the stream afresh for later subscribers, who catch
		// up from history.
		g.onErr("deliver", m.Room, errHole)
	}
}

// follow checks m against the room's stream and fans it out, under the
// room's read lock (an ack of position takes the write lock, so it never
// sees a message half delivered). A repeat is dropped. A reset, or a
// message that does not follow the last one (a seq jump, a new epoch),
// closes every subscriber with 4006, after what it has queued, and starts
// the stream afresh; follow reports a hole the broker did not announce.
// The room's last position is written under the read lock: deliveries
// never overlap (the Broker contract), and its other readers hold the
// write lock.
func (g *registry) follow(r *room, m Message, w *inlineWrites) (hole bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if m.Kind == KindReset {
		r.lastEpoch, r.lastSeq = "", 0
		g.resetLocked(r)
		return false
	}
	if m.Epoch == r.lastEpoch && m.Seq <= r.lastSeq {
		return false // delivered already
	}
	hole = r.lastEpoch != "" && (m.Epoch != r.lastEpoch || m.Seq != r.lastSeq+1)
	r.lastEpoch, r.lastSeq = m.Epoch, m.Seq
	if hole {
		g.resetLocked(r)
		return true
	}
	g.fanOut(r, m, newRoomFrame(m, r), w)
	return false
}

// fanOut queues f, the frame of m, for each subscriber that takes it;
// the caller holds r's read lock. In a room of at most inlineMax
// subscribers, w (when not nil) takes the writing of those no writer has:
// the caller writes them (w.write) once it released the lock.
func (g *registry) fanOut(r *room, m Message, f *frame, w *inlineWrites) {
	if len(r.subs) > inlineMax {
		w = nil
	}
	for c, s := range r.subs {
		if m.Kind != KindMessage && !s.presence {
			continue
		}
		if s.floorEpoch != "" && m.Kind == KindMessage {
			if m.Epoch == s.floorEpoch && m.Seq <= s.floorSeq {
				continue // replayed already, or covered by the catch-up
			}
			if m.Epoch != s.floorEpoch || m.Seq != s.floorSeq+1 {
				c.roomReset() // a hole between its catch-up and the live stream
				continue
			}
			s.floorEpoch = "" // safe under the read lock: deliveries never overlap
		}
		if s.buffering {
			// Deliveries of one room never overlap (the Broker contract),
			// so this append is safe under the read lock.
			if len(s.pending) >= g.maxPending {
				c.closeSlow(r, "slow consumer", false)
				continue
			}
			s.pending = append(s.pending, f)
			continue
		}
		c.enqueueFor(f, w)
	}
}

// ackPosition queues the ack that build makes from c's position in r: the
// last message it was queued, which is the room's last delivered one once
// the subscription is live, or the position its catch-up reached before
// any. The write lock orders the ack with the room's deliveries: every
// message at or before that position is queued ahead of it, every later
// one behind it.
func (g *registry) ackPosition(r *room, c *conn, build func(epoch string, seq uint64) *frame) {
	r.mu.Lock()
	defer r.mu.Unlock()
	epoch, seq := r.lastEpoch, r.lastSeq
	if s := r.subs[c]; s != nil && s.floorEpoch != "" {
		epoch, seq = s.floorEpoch, s.floorSeq
	}
	c.enqueue(build(epoch, seq))
}

// errHole is what the Handler logs when a broker delivered a message that
// does not follow the last one: the broker lost messages and did not say
// so with KindReset first.
var errHole = errors.New("the broker skipped messages of the room without a reset; closing its subscribers with 4006")

// resetLocked closes every subscriber of r with 4006, after what it has
// queued; the caller holds r's lock.
func (g *registry) resetLocked(r *room) {
	for c := range r.subs {
		c.roomReset()
	}
}

// clients lists the room's subscribers on this node.
func (g *registry) clients(name string) []Client {
	s := g.shard(name)
	s.mu.Lock()
	r := s.rooms[name]
	s.mu.Unlock()
	if r == nil {
		return nil
	}
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]Client, 0, len(r.subs))
	for c := range r.subs {
		out = append(out, c.client)
	}
	return out
}

// lookup returns the room's current life on this node, or nil.
func (g *registry) lookup(name string) *room {
	s := g.shard(name)
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.rooms[name]
}

// conns returns the room's subscribers on this node.
func (g *registry) conns(r *room) []*conn {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]*conn, 0, len(r.subs))
	for c := range r.subs {
		out = append(out, c)
	}
	return out
}

// names lists the rooms of this node, sorted.
func (g *registry) names() []string {
	var out []string
	for i := range g.shards {
		s := &g.shards[i]
		s.mu.Lock()
		for name := range s.rooms {
			out = append(out, name)
		}
		s.mu.Unlock()
	}
	slices.Sort(out)
	return out
}

func (g *registry) count() int {
	n := 0
	for i := range g.shards {
		s := &g.shards[i]
		s.mu.Lock()
		n += len(s.rooms)
		s.mu.Unlock()
	}
	return n
}
