package pubsub

import (
	"container/heap"
	"context"
	"sort"
	"sync"
	"time"

	"github.com/google/uuid"
)

// The memory broker: the default Broker, one process, no goroutines.

// NewMemoryBroker returns the in-process broker, the default: one node, no
// goroutines. A room's state (epoch, sequence, history, presence) lives
// while this node is subscribed to it, then while its history holds a
// message younger than its TTL, or, when it keeps nothing, for
// a minute (idleRoomGrace); then it is reclaimed, lazily, by later calls, and the
// room's next life starts a new epoch.
//
// The grace lets a client that drops and comes back quickly, with nothing
// missed, resume (recovered) even in a room that keeps no history. A room
// also lives as long as it remembers an idempotency key: it remembers
// each for its KeyTTL, and at most the newest 10,000 of them.
func NewMemoryBroker() Broker {
	return &memoryBroker{rooms: make(map[string]*memoryRoom), now: time.Now}
}

var _ Broker = (*memoryBroker)(nil)

type memoryBroker struct {
	deliver func(Message)
	now     func() time.Time

	mu     sync.Mutex // guards rooms, idle and closed; taken before a room's mu
	rooms  map[string]*memoryRoom
	idle   idleHeap // rooms with no interest, by when their state expires
	closed bool
}

type memoryRoom struct {
	name string

	mu       sync.Mutex // orders the room: held from sequence assignment to delivery
	dead     bool       // reclaimed: look the room up again
	epoch    string
	seq      uint64
	hist     []Message // oldest first
	interest bool
	conns    map[string]Member  // presence: conn id -> member
	members  map[string]int     // presence: user id -> its connections (users only)
	anon     int                // presence: anonymous connections, each a member of its own
	ttl      time.Duration      // the history TTL the last publish applied
	expires  time.Time          // when an idle room's state may be reclaimed
	keys     map[string]Message // idempotency keys -> the message each sequenced (no Data)
	keyOrder []keyed            // the keys, oldest first: expiry and the memoryKeysPerRoom bound

	// Guarded by the broker's mu: the heap never reads the room's own
	// fields. idleAt may be early (a publish moved expires on); the sweep
	// then puts the room back.
	idleAt    time.Time
	idleIndex int // position in the idle heap, -1 when not in it
}

// idleRoomGrace is how long the memory broker keeps the state of an idle
// room that keeps no history.
const idleRoomGrace = time.Minute

// memoryKeysPerRoom bounds the idempotency keys the memory broker
// remembers per room: past it, the oldest is forgotten before its TTL.
const memoryKeysPerRoom = 10000

// keyed is one remembered idempotency key.
type keyed struct {
	key     string
	expires time.Time
}

// sweepBatch bounds the reclamation work one call does.
const sweepBatch = 8

func (b *memoryBroker) Bind(deliver func(Message)) {
	if b.deliver != nil {
		panic("pubsub: this broker is already bound to a Handler; create one broker per Handler")
	}
	b.deliver = deliver
}

// room returns the room's state, creating it when create is set. It
// returns it locked, or nil.
func (b *memoryBroker) room(name string, create bool) (*memoryRoom, error) {
	for {
		b.mu.Lock()
		if b.closed {
			b.mu.Unlock()
			return nil, ErrClosed
		}
		b.sweepLocked(b.now())
		r := b.rooms[name]
		if r == nil {
			if !create {
				b.mu.Unlock()
				return nil, nil
			}
			r = &memoryRoom{name: name, epoch: uuid.NewString(), idleIndex: -1}
			b.rooms[name] = r
		}
		b.mu.Unlock()
		r.mu.Lock()
		if !r.dead {
			return r, nil
		}
		r.mu.Unlock() // reclaimed meanwhile: try again
	}
}

// sweepLocked reclaims up to sweepBatch expired idle rooms.
func (b *memoryBroker) sweepLocked(now time.Time) {
	for i := 0; i < sweepBatch && len(b.idle) > 0 && !b.idle[0].idleAt.After(now); i++ {
		r := heap.Pop(&b.idle).(*memoryRoom)
		r.mu.Lock()
		switch {
		case r.interest || len(r.conns) > 0:
			// Busy again; it returns to the heap when it next goes idle.
		case r.expires.After(now):
			r.idleAt = r.expires // published to since: not yet
			heap.Push(&b.idle, r)
		default:
			r.dead = true
			delete(b.rooms, r.name)
		}
		r.mu.Unlock()
	}
}

// settle is called with r unlocked after a change: an idle room joins the
// heap (or is dropped at once when it keeps nothing).
func (b *memoryBroker) settle(r *memoryRoom) {
	b.mu.Lock()
	defer b.mu.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.dead || r.interest || len(r.conns) > 0 {
		return
	}
	if len(r.hist) == 0 {
		// Nothing kept: keep the epoch and sequence a little while, so a
		// client back soon with nothing missed can resume.
		if grace := b.now().Add(idleRoomGrace); r.expires.Before(grace) {
			r.expires = grace
		}
	}
	r.idleAt = r.expires
	if r.idleIndex < 0 {
		heap.Push(&b.idle, r)
	} else {
		heap.Fix(&b.idle, r.idleIndex)
	}
}

func (b *memoryBroker) Publish(ctx context.Context, room string, data []byte, o PublishOptions) (PublishResult, error) {
	h := o.History
	r, err := b.room(room, h.Size > 0 || o.Key != "")
	if r == nil {
		return PublishResult{}, err
	}
	now := b.now()
	if o.Key != "" {
		r.forgetKeys(now)
		if m, seen := r.keys[o.Key]; seen {
			r.mu.Unlock()
			return PublishResult{Message: m, Duplicate: true}, nil
		}
	}
	if !r.interest && h.Size == 0 {
		// Nobody listens and nothing is kept: the message goes nowhere.
		b.settleLater(r)
		return PublishResult{}, nil
	}
	r.seq++
	m := Message{Kind: KindMessage, Room: room, ID: uuid.NewString(), Epoch: r.epoch, Seq: r.seq, Time: now, Data: data}
	if h.Size > 0 {
		if len(r.hist) == cap(r.hist) {
			// Trimming slides the history along its array: give it room to
			// slide for a whole history's worth of publishes, so it moves
			// (copying Size messages) once per Size publishes, not every few.
			r.hist = append(make([]Message, 0, len(r.hist)+min(h.Size, len(r.hist)+8)+1), r.hist...)
		}
		r.hist = append(r.hist, m)
		r.ttl = h.TTL
		r.trim(h.Size, now)
		r.expires = now.Add(h.TTL)
	} else {
		r.hist = nil
	}
	if o.Key != "" {
		r.rememberKey(o.Key, m, now.Add(o.KeyTTL))
	}
	if r.interest {
		b.deliver(m)
	}
	idle := !r.interest
	r.mu.Unlock()
	if idle {
		b.settle(r)
	}
	return PublishResult{Message: m}, nil
}

// rememberKey keeps key until expires, within memoryKeysPerRoom, and keeps
// the room's state at least that long.
func (r *memoryRoom) rememberKey(key string, m Message, expires time.Time) {
	if r.keys == nil {
		r.keys = make(map[string]Message)
	}
	if len(r.keyOrder) >= memoryKeysPerRoom {
		delete(r.keys, r.keyOrder[0].key)
		r.keyOrder[0] = keyed{}
		r.keyOrder = r.keyOrder[1:]
	}
	m.Data = nil
	r.keys[key] = m
	r.keyOrder = append(r.keyOrder, keyed{key, expires})
	if r.expires.Before(expires) {
		r.expires = expires
	}
}

// forgetKeys drops the keys that expired by now, oldest first (keys with a
// shorter TTL behind a longer one wait for it: the bound still holds).
func (r *memoryRoom) forgetKeys(now time.Time) {
	n := 0
	for n < len(r.keyOrder) && !r.keyOrder[n].expires.After(now) {
		delete(r.keys, r.keyOrder[n].key)
		n++
	}
	if n == 0 {
		return
	}
	clear(r.keyOrder[:n])
	r.keyOrder = r.keyOrder[n:]
	if len(r.keyOrder) == 0 {
		r.keyOrder = nil // let the backing array go
	}
}

// trim drops what the room's history no longer keeps: the oldest past
// size, and any older than the TTL.
func (r *memoryRoom) trim(size int, now time.Time) {
	drop := 0
	if over := len(r.hist) - size; over > 0 {
		drop = over
	}
	cutoff := now.Add(-r.ttl)
	for drop < len(r.hist) && r.hist[drop].Time.Before(cutoff) {
		drop++
	}
	if drop == 0 {
		return
	}
	clear(r.hist[:drop])
	r.hist = r.hist[drop:]
	if cap(r.hist) > 2*size+16 { // reallocate rather than grow the dead prefix forever
		r.hist = append([]Message(nil), r.hist...)
	}
}

func (b *memoryBroker) History(ctx context.Context, room string, q HistoryQuery) (HistoryResult, error) {
	// History of an unknown room creates it: its epoch must be stable from
	// the moment a client learns it.
	r, err := b.room(room, true)
	if r == nil {
		return HistoryResult{}, err
	}
	defer b.settleLater(r)
	res := HistoryResult{Epoch: r.epoch, Top: r.seq}
	if q.Limit <= 0 {
		return res, nil
	}
	r.trim(len(r.hist), b.now()) // age out what expired since the last publish
	var kept []Message
	for i, m := range r.hist {
		if m.Seq > q.Since {
			kept = r.hist[i:]
			break
		}
	}
	if len(kept) > q.Limit {
		if q.Latest {
			kept = kept[len(kept)-q.Limit:]
		} else {
			kept = kept[:q.Limit]
		}
	}
	res.Messages = append([]Message(nil), kept...)
	return res, nil
}

// settleLater unlocks r and lets an idle room be reclaimed or scheduled.
func (b *memoryBroker) settleLater(r *memoryRoom) {
	idle := !r.interest && len(r.conns) == 0
	r.mu.Unlock()
	if idle {
		b.settle(r)
	}
}

func (b *memoryBroker) Subscribe(ctx context.Context, room string) error {
	r, err := b.room(room, true)
	if r == nil {
		return err
	}
	r.interest = true
	r.mu.Unlock()
	return nil
}

func (b *memoryBroker) Unsubscribe(ctx context.Context, room string) error {
	r, err := b.room(room, false)
	if r == nil {
		return err
	}
	r.interest = false
	r.mu.Unlock()
	b.settle(r)
	return nil
}

func (b *memoryBroker) Join(ctx context.Context, room string, m Member, events bool) error {
	r, err := b.room(room, true)
	if r == nil {
		return err
	}
	defer b.settleLater(r)
	if r.conns == nil {
		r.conns = make(map[string]Member)
		r.members = make(map[string]int)
	}
	if _, dup := r.conns[m.ConnID]; dup {
		return nil
	}
	r.conns[m.ConnID] = m
	first := true // an anonymous connection is a member of its own
	if m.UserID == "" {
		r.anon++
	} else {
		r.members[m.UserID]++
		first = r.members[m.UserID] == 1
	}
	if first && events && r.interest {
		b.deliver(Message{Kind: KindJoin, Room: room, Epoch: r.epoch, Time: b.now(), Member: m})
	}
	return nil
}

func (b *memoryBroker) Leave(ctx context.Context, room string, m Member, events bool) error {
	r, err := b.room(room, false)
	if r == nil {
		return err
	}
	defer b.settleLater(r)
	m, ok := r.conns[m.ConnID]
	if !ok {
		return nil
	}
	delete(r.conns, m.ConnID)
	if m.UserID == "" {
		r.anon--
	} else if r.members[m.UserID]--; r.members[m.UserID] > 0 {
		return nil
	} else {
		delete(r.members, m.UserID)
	}
	if events && r.interest {
		b.deliver(Message{Kind: KindLeave, Room: room, Epoch: r.epoch, Time: b.now(), Member: m})
	}
	return nil
}

func (b *memoryBroker) Presence(ctx context.Context, room string, countsOnly bool) (Presence, error) {
	r, err := b.room(room, false)
	if r == nil {
		return Presence{}, err
	}
	defer r.mu.Unlock()
	p := Presence{Count: len(r.members) + r.anon, Connections: len(r.conns)}
	if countsOnly {
		return p, nil
	}
	byKey := make(map[string]*PresenceMember, p.Count)
	first := make(map[string]string, p.Count) // key -> smallest conn id, whose info the member shows
	for id, m := range r.conns {
		k := m.key()
		pm := byKey[k]
		if pm == nil {
			pm = &PresenceMember{UserID: m.UserID}
			byKey[k] = pm
		}
		pm.Conns = append(pm.Conns, id)
		if f, ok := first[k]; !ok || id < f {
			first[k], pm.Info = id, m.Info
		}
	}
	p.Members = make([]PresenceMember, 0, len(byKey))
	for _, pm := range byKey {
		sort.Strings(pm.Conns)
		p.Members = append(p.Members, *pm)
	}
	sort.Slice(p.Members, func(i, j int) bool {
		a, c := p.Members[i], p.Members[j]
		if a.UserID != c.UserID {
			return a.UserID < c.UserID
		}
		return a.Conns[0] < c.Conns[0]
	})
	return p, nil
}

func (b *memoryBroker) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	clear(b.rooms)
	b.idle = nil
	return nil
}

// idleHeap orders idle rooms by expiry; the broker's mu guards it.
type idleHeap []*memoryRoom

func (h idleHeap) Len() int           { return len(h) }
func (h idleHeap) Less(i, j int) bool { return h[i].idleAt.Before(h[j].idleAt) }
func (h idleHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].idleIndex, h[j].idleIndex = i, j
}
func (h *idleHeap) Push(x any) {
	r := x.(*memoryRoom)
	r.idleIndex = len(*h)
	*h = append(*h, r)
}
func (h *idleHeap) Pop() any {
	old := *h
	r := old[len(old)-1]
	old[len(old)-1] = nil
	r.idleIndex = -1
	*h = old[:len(old)-1]
	return r
}

// key is the presence key: a user is one member whatever the number of
// its connections; an anonymous connection is a member of its own.
func (m Member) key() string {
	if m.UserID != "" {
		return "u:" + m.UserID
	}
	return "c:" + m.ConnID
}
