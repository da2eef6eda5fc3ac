package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/roomcast/pubsub/protocol"
)

// retryMin and retryMax bound the delays between the Client's own retries
// of a rate-limited request.
const (
	retryMin = 50 * time.Millisecond
	retryMax = time.Second
)

// Message is one message of a room, or a direct message (with only Data
// and Kind set).
type Message struct {
	Room  string
	Epoch string    // names the current life of the room's sequence
	Seq   uint64    // 1 for the first message of an epoch, then +1 per message
	ID    string    // unique across rooms and servers
	Time  time.Time // when the server sequenced it; zero when not sent
	Data  []byte    // the payload; the Handler may keep it
	Kind  Kind      // how the payload travelled, chosen by the server from its bytes
}

// Handler receives a subscription's messages, one call at a time, in the
// room's order.
type Handler func(Message)

// EventType tells a join from a leave.
type EventType uint8

const (
	EventJoin  EventType = iota + 1 // a member's first connection subscribed
	EventLeave                      // a member's last connection left
)

func (t EventType) String() string {
	switch t {
	case EventJoin:
		return "join"
	case EventLeave:
		return "leave"
	}
	return fmt.Sprintf("EventType(%d)", uint8(t))
}

// Event is a presence change in a room (see OnPresence).
type Event struct {
	Type   EventType
	Room   string
	ConnID string          // the connection that joined or left
	UserID string          // empty for an anonymous member
	Info   json.RawMessage // the member's info; may be empty
}

// Presence lists a room's members.
type Presence struct {
	Count       int      // members: a user with several connections is one
	Connections int      // their connections
	Members     []Member // nil when the room only tracks counts
}

// Member is one member of a room.
type Member struct {
	UserID string          // empty for an anonymous member
	Conns  []string        // its connection ids
	Info   json.RawMessage // may be empty
}

// Recovery is the outcome of resubscribing after a reconnect, passed to
// OnRecover.
type Recovery struct {
	Room string
	// Recovered is true when exactly the messages missed while
	// disconnected follow, before any live one. When false, the missed
	// messages are lost: reload the room's state from the application.
	Recovered bool
	// Reason says why recovery was refused (protocol.ReasonEpochChanged,
	// …); empty when Recovered.
	Reason protocol.Reason
	// Missed is how many messages the server replays now.
	Missed int
	// Epoch and Seq are the room's position when the subscription resumed.
	Epoch string
	Seq   uint64
	// Err is set when the room could not be subscribed again (for example
	// the server now answers forbidden). The subscription has then ended:
	// its handlers are not called again.
	Err error
}

type subState uint8

const (
	subJoining subState = iota // subscribe sent, no ack yet
	subActive                  // acknowledged: it has a position
	subLeaving                 // unsubscribe under way, or the subscribe was abandoned
	subGone                    // removed from the client
)

// Subscription is a room this Client is subscribed to. It survives
// reconnections: the Client subscribes again from its position.
type Subscription struct {
	c    *Client
	room string
	h    Handler
	cfg  subConfig
	q    *queue
	gone chan struct{} // closed when it is removed from the client

	// Guarded by c.mu.
	state  subState
	sentOn *session // where its first subscribe went
	pos    position // the last message received, or the last ack's
}

// Room is the subscription's room.
func (s *Subscription) Room() string { return s.room }

// Position is where the subscription stands: the epoch and seq of the last
// message of the room the Client received (it may still be waiting for the
// Handler), or of the subscribe's acknowledgement when none came since. A
// resubscription resumes right after it.
func (s *Subscription) Position() (epoch string, seq uint64) {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.pos.epoch, s.pos.seq
}

// Unsubscribe leaves the room. Messages still waiting for the Handler are
// discarded and no handler call starts once it returns (a call under way
// finishes; a Handler may itself call Unsubscribe). It returns nil when
// the server confirmed, or when the connection is down (the server then
// forgot the subscription anyway); calling it again is safe.
func (s *Subscription) Unsubscribe(ctx context.Context) error {
	if err := s.unsubscribe(ctx); err != nil {
		return fmt.Errorf("client: unsubscribe from room %q: %w", s.room, err)
	}
	return nil
}

func (s *Subscription) unsubscribe(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	c := s.c
	c.mu.Lock()
	switch s.state {
	case subGone:
		c.mu.Unlock()
		return nil
	case subLeaving:
		c.mu.Unlock()
		select {
		case <-s.gone:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	s.state = subLeaving
	s.q.stop()
	sess := c.sess
	c.mu.Unlock()
	if sess == nil {
		c.forget(s)
		return nil
	}
	forget := func(r *inbound) error {
		if r.Code != protocol.CodeRateLimited {
			c.forget(s)
		}
		return nil
	}
	for delay := retryMin; ; delay = min(2*delay, retryMax) {
		id := c.newID()
		_, sent, err := c.roundTrip(ctx, sess, id, encodeRoomRequest("unsubscribe", id, s.room), forget)
		var e *Error
		switch {
		case err == nil:
			return nil
		case errors.As(err, &e) && e.Code == protocol.CodeRateLimited:
			if !sleepFor(ctx, sess.done, delay) {
				// The connection ended (and the server forgot the room),
				// or ctx did: then the server may still send the room's
				// messages, which the Client ignores, until it reconnects.
				c.forget(s)
				return ctx.Err()
			}
		case errors.As(err, &e): // not_subscribed: the server agrees
			return nil
		case errors.Is(err, ErrDisconnected), errors.Is(err, ErrClosed), !sent:
			// The connection is gone, and the server forgot the room with it.
			c.forget(s)
			return nil
		default: // ctx ended while waiting: the reply or the session's end forgets s
			return err
		}
	}
}

// Presence lists the room's members, on every server of the cluster. It
// fails with an *Error coded not_supported when the room does not track
// presence.
func (s *Subscription) Presence(ctx context.Context) (Presence, error) {
	p, err := s.presence(ctx)
	if err != nil {
		return Presence{}, fmt.Errorf("client: presence of room %q: %w", s.room, err)
	}
	return p, nil
}

func (s *Subscription) presence(ctx context.Context) (Presence, error) {
	sess, err := s.c.session()
	if err != nil {
		return Presence{}, err
	}
	id := s.c.newID()
	r, _, err := s.c.roundTrip(ctx, sess, id, encodeRoomRequest("presence", id, s.room), nil)
	if err != nil {
		return Presence{}, err
	}
	p := Presence{Count: deref(r.Count), Connections: deref(r.Connections)}
	if r.Members != nil {
		p.Members = make([]Member, len(r.Members))
		for i, m := range r.Members {
			p.Members[i] = Member{UserID: m.UserID, Conns: m.Conns, Info: m.Info}
		}
	}
	return p, nil
}

// dispatch runs the subscription's callbacks, one at a time, in order.
func (s *Subscription) dispatch() {
	for {
		it, ok := s.q.pop()
		if !ok {
			return
		}
		switch {
		case it.rec != nil:
			if s.cfg.onRecover != nil {
				s.cfg.onRecover(*it.rec)
			}
		case it.ev != nil:
			s.cfg.onPresence(*it.ev)
		default:
			s.h(it.msg)
		}
		s.q.done()
	}
}

// item is one thing waiting for a subscription's goroutine.
type item struct {
	msg Message
	ev  *Event
	rec *Recovery
}

// queue is a bounded FIFO with one consumer goroutine.
type queue struct {
	mu      sync.Mutex
	items   []item
	head    int
	max     int
	busy    bool          // the consumer is running a callback
	stopped bool          // nothing more is delivered
	ending  bool          // deliver what is queued, then stop
	idle    chan struct{} // closed when the queue is empty and not busy; nil until awaited
	wake    chan struct{} // capacity 1
}

func newQueue(max int) *queue {
	return &queue{max: max, wake: make(chan struct{}, 1)}
}

func (q *queue) len() int { return len(q.items) - q.head }

// push appends it, unless the queue holds max items already (force
// ignores the bound: for the one recovery notice per reconnection). It
// reports false only when the queue was full; a stopped queue swallows.
func (q *queue) push(it item, force bool) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.stopped || q.ending {
		return true
	}
	n := q.len()
	if n >= q.max && !force {
		return false
	}
	if q.head > 0 && len(q.items) == cap(q.items) {
		copy(q.items, q.items[q.head:])
		clear(q.items[n:])
		q.items, q.head = q.items[:n], 0
	}
	q.items = append(q.items, it)
	select {
	case q.wake <- struct{}{}:
	default:
	}
	return true
}

// pop waits for the next item; false means the queue stopped.
func (q *queue) pop() (item, bool) {
	for {
		q.mu.Lock()
		if q.stopped {
			q.mu.Unlock()
			return item{}, false
		}
		if q.len() > 0 {
			it := q.items[q.head]
			q.items[q.head] = item{}
			q.head++
			if q.head == len(q.items) {
				q.items, q.head = q.items[:0], 0
			}
			q.busy = true
			q.mu.Unlock()
			return it, true
		}
		if q.ending {
			q.stopLocked()
			q.mu.Unlock()
			return item{}, false
		}
		q.mu.Unlock()
		<-q.wake
	}
}

// done marks the end of the callback of the last popped item.
func (q *queue) done() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.busy = false
	if q.len() == 0 && q.idle != nil {
		close(q.idle)
		q.idle = nil
	}
}

// stop discards what is queued and ends the consumer after its current
// callback.
func (q *queue) stop() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.stopLocked()
}

func (q *queue) stopLocked() {
	if q.stopped {
		return
	}
	q.stopped = true
	q.items, q.head = nil, 0
	if q.idle != nil {
		close(q.idle)
		q.idle = nil
	}
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// end lets the consumer deliver what is queued, then stop.
func (q *queue) end() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.ending = true
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// waitIdle waits until the queue is empty with no callback running (or
// stopped). It reports false when ctx ended first.
func (q *queue) waitIdle(ctx context.Context) bool {
	q.mu.Lock()
	if q.stopped || (!q.busy && q.len() == 0) {
		q.mu.Unlock()
		return true
	}
	if q.idle == nil {
		q.idle = make(chan struct{})
	}
	ch := q.idle
	q.mu.Unlock()
	select {
	case <-ch:
		return true
	case <-ctx.Done():
		return false
	}
}
