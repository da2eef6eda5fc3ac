package pubsub

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"sync"
	"time"
)

// ValidRoomName is the default room-name check: 1 to 128 bytes of ASCII
// letters, digits and the characters _ - . : @ /. Hosts with other needs set
// WithRoomValidator.
func ValidRoomName(room string) error {
	if room == "" {
		return errors.New("the room name is empty")
	}
	if len(room) > DefaultMaxRoomNameLength {
		return fmt.Errorf("the room name is longer than %d bytes", DefaultMaxRoomNameLength)
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
	seed   maphash.Seed
	shards [registryShards]shard
	broker Broker
	onErr  func(op, room string, err error)
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
	refs int   // subscribers joined or joining; guarded by the shard's mu
	prev *room // the previous life, whose Unsubscribe must end first

	ready chan struct{} // closed when the broker Subscribe returned
	err   error         // that Subscribe's result; read only after ready
	gone  chan struct{} // closed when this life ended at the broker

	mu   sync.RWMutex // guards subs; held for reading during fan-out
	subs map[*conn]struct{}
}

func newRegistry(b Broker, onErr func(op, room string, err error)) *registry {
	r := &registry{seed: maphash.MakeSeed(), broker: b, onErr: onErr}
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
// the room's first subscriber. It returns the room c joined.
func (g *registry) join(ctx context.Context, name string, c *conn) (*room, error) {
	s := g.shard(name)
	s.mu.Lock()
	r := s.rooms[name]
	creator := r == nil
	if creator {
		r = &room{
			name:  name,
			prev:  s.leaving[name],
			ready: make(chan struct{}),
			gone:  make(chan struct{}),
			subs:  make(map[*conn]struct{}),
		}
		s.rooms[name] = r
	}
	r.refs++
	s.mu.Unlock()

	if creator {
		if r.prev != nil {
			<-r.prev.gone // bounded: the Unsubscribe runs with a timeout
			r.prev = nil
		}
		r.err = g.broker.Subscribe(ctx, name)
		close(r.ready)
	} else {
		select {
		case <-r.ready:
		case <-ctx.Done():
			g.release(r)
			return nil, ctx.Err()
		}
	}
	if r.err != nil {
		g.release(r)
		return nil, r.err
	}
	r.mu.Lock()
	r.subs[c] = struct{}{}
	r.mu.Unlock()
	return r, nil
}

// leave removes c from r, unsubscribing this node at the broker when c was
// the last subscriber.
func (g *registry) leave(r *room, c *conn) {
	r.mu.Lock()
	delete(r.subs, c)
	r.mu.Unlock()
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
// It only enqueues: one shared frame, one enqueue per subscriber.
func (g *registry) deliver(m Message) {
	s := g.shard(m.Room)
	s.mu.Lock()
	r := s.rooms[m.Room]
	s.mu.Unlock()
	if r == nil {
		return
	}
	f := newRoomFrame(m)
	r.mu.RLock()
	for c := range r.subs {
		c.enqueue(f)
	}
	r.mu.RUnlock()
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
