package pubsub

import (
	"cmp"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/roomcast/pubsub/protocol"
)

// Stats is a snapshot of a Handler's counters.
type Stats struct {
	Connections   int    // open connections
	Rooms         int    // rooms with at least one subscriber on this node
	MessagesIn    uint64 // data messages received from clients (heartbeats aside)
	MessagesOut   uint64 // room and direct messages written to clients
	Published     uint64 // messages published into rooms, by the server and clients
	Duplicates    uint64 // publishes whose idempotency key was sequenced already: nothing published again
	SlowConsumers uint64 // connections closed because their queue overflowed or a write timed out
	Dropped       uint64 // messages discarded by a SlowConsumerDropOldest or SlowConsumerKeepLatest room
	RateLimited   uint64 // client messages refused by the rate limit
	Refused       uint64 // upgrades refused (origin, authentication, room, shutdown)
	HookPanics    uint64 // panics recovered from hooks
	Accepted      uint64 // connections accepted (upgraded and registered)
}

type counters struct {
	messagesIn, messagesOut, published, duplicates, slowConsumers, dropped,
	rateLimited, refused, hookPanics, accepted atomic.Uint64

	closedMu sync.Mutex
	closed   map[protocol.CloseCode]uint64
}

// countClosed counts a connection that ended with code.
func (s *counters) countClosed(code protocol.CloseCode) {
	s.closedMu.Lock()
	defer s.closedMu.Unlock()
	if s.closed == nil {
		s.closed = make(map[protocol.CloseCode]uint64)
	}
	s.closed[code]++
}

// ConnStats is how one connection is keeping up.
type ConnStats struct {
	Client        Client
	QueueMessages int           // messages waiting to be written
	QueueBytes    int           // their payload bytes
	Lag           time.Duration // age of the oldest waiting message; 0 when none waits
	Dropped       uint64        // messages a SlowConsumerDropOldest or SlowConsumerKeepLatest room discarded for it
}

// RoomStats is how a room's subscribers on this node are keeping up.
type RoomStats struct {
	Room          string
	Options       RoomOptions
	Subscribers   int
	Dropped       uint64      // messages its drop policy discarded, all subscribers together
	SlowConsumers uint64      // subscribers closed because its messages did not fit their queue
	Connections   []ConnStats // every subscriber, the most lagging first
}

// RoomStats reports on room's subscribers on this node, the most lagging
// first, so a publisher can see who is falling behind. The counters start
// when the room gets its first subscriber on this node.
func (h *Handler) RoomStats(room string) RoomStats {
	st := RoomStats{Room: room, Options: h.cfg.roomOptions(room)}
	r := h.rooms.lookup(room)
	if r == nil {
		return st
	}
	st.Options = r.opts
	st.Dropped, st.SlowConsumers = r.dropped.Load(), r.slowConsumers.Load()
	for _, c := range h.rooms.conns(r) {
		st.Connections = append(st.Connections, c.stats())
	}
	st.Subscribers = len(st.Connections)
	slices.SortStableFunc(st.Connections, func(a, b ConnStats) int {
		if a.Lag != b.Lag {
			return cmp.Compare(b.Lag, a.Lag)
		}
		return cmp.Compare(b.QueueMessages, a.QueueMessages)
	})
	return st
}

// ConnStats reports how one connection on this node is keeping up. It
// fails with ErrConnNotFound.
func (h *Handler) ConnStats(connID string) (ConnStats, error) {
	c := h.conn(connID)
	if c == nil {
		return ConnStats{}, fmt.Errorf("pubsub: stats of connection %q: %w", connID, ErrConnNotFound)
	}
	return c.stats(), nil
}

// Stats returns a snapshot of the Handler's counters.
func (h *Handler) Stats() Stats {
	h.mu.Lock()
	n := len(h.conns)
	h.mu.Unlock()
	return Stats{
		Connections:   n,
		Rooms:         h.rooms.count(),
		MessagesIn:    h.stats.messagesIn.Load(),
		MessagesOut:   h.stats.messagesOut.Load(),
		Published:     h.stats.published.Load(),
		Duplicates:    h.stats.duplicates.Load(),
		SlowConsumers: h.stats.slowConsumers.Load(),
		Dropped:       h.stats.dropped.Load(),
		RateLimited:   h.stats.rateLimited.Load(),
		Refused:       h.stats.refused.Load(),
		HookPanics:    h.stats.hookPanics.Load(),
		Accepted:      h.stats.accepted.Load(),
	}
}

// Closed counts the connections that ended, by close code
// (protocol.CloseAbnormal for those lost without one): why clients leave.
// It returns a snapshot, safe to keep.
func (h *Handler) Closed() map[protocol.CloseCode]uint64 {
	h.stats.closedMu.Lock()
	defer h.stats.closedMu.Unlock()
	out := make(map[protocol.CloseCode]uint64, len(h.stats.closed))
	for code, n := range h.stats.closed {
		out[code] = n
	}
	return out
}

// Rooms lists the rooms with at least one subscriber on this node, sorted.
func (h *Handler) Rooms() []string {
	return h.rooms.names()
}
