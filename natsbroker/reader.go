package natsbroker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/roomcast/pubsub"
)

// sub is this node's subscription to a room.
type sub struct {
	room string
	ns   *nats.Subscription // the room's delivery subjects, into the broker's msgs

	// Guarded by the broker's mu.
	pos     pos       // written by the reader, and once by Subscribe
	expires time.Time // when the newest record the reader saw expires (server time); zero when unknown

	// Owned by the reader goroutine.
	view      map[string]entry // connection id -> its presence entry
	counts    map[string]int   // member key -> its connections in view
	viewSeq   uint64           // view holds every entry record up to this stream sequence
	viewReady bool
	pending   []entry // entry records that arrived before the view
	behind    bool    // a catch-up failed: the reader tries again
}

// pos is the last position of a room this node delivered, or a baseline.
type pos struct {
	epoch string // "" with a baseline: the room had no state
	seq   uint64
	sseq  uint64 // the stream sequence of that record, where a fill starts
	state posState
}

type posState uint8

const (
	posUnknown   posState = iota // no position yet: no gap check
	posBaseline                  // the room's head when the subscription started; older messages may still arrive
	posDelivered                 // the last record handled; any message at or below it is a repeat
)

// maxPending bounds the entry records a subscription holds before its
// presence view is read.
const maxPending = 100_000

// Subscribe subscribes to the room's delivery subjects and returns once
// the server has the subscription, so every record stored after it
// returns reaches this node. It then notes the room's position, to
// recognise a gap later, and reads its presence.
func (b *Broker) Subscribe(ctx context.Context, room string) error {
	ctx, cancel := bounded(ctx)
	defer cancel()
	s := &sub{room: room, view: make(map[string]entry), counts: make(map[string]int)}
	subj := b.subjects(room)
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return pubsub.ErrClosed
	}
	if b.deliver == nil {
		b.mu.Unlock()
		return errors.New("natsbroker: subscribe before Bind: pass the broker to pubsub.NewHandler first")
	}
	// Under mu, so the reader finds s before any of its records.
	ns, err := b.nc.ChanSubscribe(subj.delivery, b.msgs)
	if err != nil {
		b.mu.Unlock()
		return fmt.Errorf("natsbroker: subscribe to room %q: %w", room, err)
	}
	s.ns = ns
	if old := b.subs[room]; old != nil {
		_ = old.ns.Unsubscribe()
	}
	b.subs[room] = s
	b.mu.Unlock()

	fail := func(err error) error {
		b.dropSub(room, s)
		return fmt.Errorf("natsbroker: subscribe to room %q: %w", room, err)
	}
	if err := b.nc.FlushWithContext(ctx); err != nil {
		return fail(err)
	}
	head, err := b.readHead(ctx, subj)
	if err != nil {
		return fail(err)
	}
	entries, upTo, err := b.entries(ctx, subj)
	if err != nil {
		return fail(err)
	}
	base := pos{state: posBaseline, sseq: head.sseq}
	if hasState(head) {
		base.epoch, base.seq = head.epoch, head.seq
	}
	b.mu.Lock()
	if s.pos.state == posUnknown {
		s.pos = base
	}
	if s.expires.IsZero() && hasState(head) {
		s.expires = head.stored.Add(head.ttl)
	}
	b.mu.Unlock()
	installed := make(chan struct{})
	install := func() {
		b.installView(s, entries, upTo)
		close(installed)
	}
	select {
	case b.ctl <- install:
	case <-ctx.Done():
		return fail(ctx.Err())
	case <-b.ctx.Done():
		return fail(pubsub.ErrClosed)
	}
	<-installed // the reader runs it as soon as it takes it
	return nil
}

// bounded gives ctx a deadline when it has none: NATS flushes need one.
func bounded(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, 30*time.Second)
}

// dropSub forgets a subscription that failed.
func (b *Broker) dropSub(room string, s *sub) {
	b.mu.Lock()
	if b.subs[room] == s {
		delete(b.subs, room)
	}
	b.mu.Unlock()
	_ = s.ns.Unsubscribe()
}

// Unsubscribe forgets the room at once (nothing more of it is delivered)
// and unsubscribes from its delivery subjects.
func (b *Broker) Unsubscribe(ctx context.Context, room string) error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return pubsub.ErrClosed
	}
	s := b.subs[room]
	delete(b.subs, room)
	b.mu.Unlock()
	if s != nil {
		// An error means the connection is closed; its subscriptions are
		// gone with it.
		_ = s.ns.Unsubscribe()
	}
	return nil
}

// readLoop is the broker's one delivering goroutine: every room's records
// are handled here, so one room's deliveries are in order and never
// concurrent. It ends at Close.
func (b *Broker) readLoop() {
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	failures := 0
	for {
		behind := false
		select {
		case <-b.ctx.Done():
			return
		case m := <-b.msgs:
			behind = b.onMsg(m)
		case f := <-b.ctl:
			f()
		case <-b.resyncs:
			behind = b.resyncAll("the NATS connection came back", false)
		case <-retry.C:
			behind = b.resyncAll("an earlier catch-up failed", true)
		}
		if behind {
			// Try again soon, then less often, while NATS recovers.
			failures++
			retry.Reset(min(100*time.Millisecond<<min(failures, 6), 5*time.Second))
		} else if failures > 0 && !b.anyBehind() {
			failures = 0
		}
	}
}

// anyBehind reports whether a room waits for a catch-up that failed.
func (b *Broker) anyBehind() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, s := range b.subs {
		if s.behind {
			return true
		}
	}
	return false
}

// onMsg handles what arrives on the reader's channel, and reports whether
// a catch-up failed.
func (b *Broker) onMsg(m *nats.Msg) bool {
	if strings.HasPrefix(m.Subject, "$JS.EVENT.ADVISORY.") {
		return b.resyncAll("the stream has a new leader", false)
	}
	room, rest, ok := b.parseDelivery(m.Subject)
	if !ok {
		return false
	}
	b.mu.Lock()
	s := b.subs[room]
	b.mu.Unlock()
	if s == nil || s.ns != m.Sub {
		return false // unsubscribed, or a previous subscription's record
	}
	switch {
	case rest == "m":
		b.onRecord(room, s, m)
	case strings.HasPrefix(rest, "p."):
		b.onEntry(room, s, m, rest[2:])
	}
	return false
}

func (b *Broker) onRecord(room string, s *sub, m *nats.Msg) {
	sseq, stamp, err := streamMeta(m.Header)
	var r record
	if err == nil {
		r, err = decodeRecord(m.Header, m.Data)
	}
	if err != nil {
		b.log.Error("natsbroker: undecodable record in a room's log; is another application using the prefix?", "room", room, "err", err)
		return
	}
	r.sseq, r.stored = sseq, stamp
	b.mu.Lock()
	p := s.pos
	if !stamp.IsZero() {
		s.expires = stamp.Add(r.ttl)
	}
	b.mu.Unlock()
	if r.marker() {
		b.setPos(s, b.lost(room, p, r.sseq, "the room's state expired"))
		return
	}
	b.setPos(s, b.advance(room, p, r, false))
}

func (b *Broker) setPos(s *sub, p pos) {
	b.mu.Lock()
	if b.subs[s.room] == s {
		s.pos = p
	}
	b.mu.Unlock()
}

// advance handles a record of the room's log: it delivers a message after
// whatever this node missed before it, and returns the new position. With
// asHead the record is the room's head read after an outage: what came up
// to it is filled, and the head itself is not delivered again.
func (b *Broker) advance(room string, p pos, r record, asHead bool) pos {
	isMsg := r.kind == kindMsg && !asHead
	next := pos{epoch: r.epoch, seq: r.seq, sseq: r.sseq, state: posDelivered}
	switch {
	case p.state == posUnknown:
	case p.epoch == "" || p.epoch == r.epoch:
		last := p.seq
		if p.epoch == "" {
			last = 0 // the room had no state: its next life starts at 1
		}
		if r.seq <= last {
			if isMsg && p.state != posDelivered {
				b.deliver(r.message(room)) // published before the baseline was read
			}
			return p
		}
		to, through := r.seq, r.sseq
		if isMsg {
			to, through = r.seq-1, r.sseq-1
		}
		low := uint64(0)
		if uint64(r.keep) < r.seq {
			low = r.seq - uint64(r.keep)
		}
		if to > last && !b.fill(room, r.epoch, last, p.sseq, to, through, low) {
			b.reset(room)
		}
	default:
		b.log.Error("natsbroker: the room's epoch changed under its subscribers: the stream lost the room's state",
			"room", room, "epoch", p.epoch, "new_epoch", r.epoch)
		b.reset(room)
	}
	if isMsg {
		b.deliver(r.message(room))
	}
	return next
}

// lost handles the room's state being gone (a delete marker, or no head
// after an outage): subscribers that had a position are reset.
func (b *Broker) lost(room string, p pos, sseq uint64, why string) pos {
	if p.state != posUnknown && p.epoch != "" {
		b.log.Error("natsbroker: "+why+" while this node had subscribers; resetting the room", "room", room, "epoch", p.epoch)
		b.reset(room)
	}
	return pos{state: posBaseline, sseq: sseq}
}

// reset tells the node that the room's stream broke for its subscribers
// (see pubsub.KindReset): they are closed, reconnect and recover.
func (b *Broker) reset(room string) {
	b.deliver(pubsub.Message{Kind: pubsub.KindReset, Room: room})
}

// fill delivers the messages of epoch after seq from (stored after stream
// sequence fromSeq), up to seq to (stored by through), that follow on from
// it in the room's log, in order, and reports whether it found them all.
// A message at or below low is past the room's size bound: gone, even if
// its record is not trimmed yet. It stops at the first hole: nothing past
// a hole is delivered before the reset that must come first.
func (b *Broker) fill(room, epoch string, from, fromSeq, to, through, low uint64) bool {
	want := to - from
	if from+1 <= low {
		b.log.Error("natsbroker: messages were lost for this node's subscribers: the room's history no longer holds them; resetting the room",
			"room", room, "missed", want, "recovered", 0)
		return false
	}
	ctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
	defer cancel()
	next := from
	err := b.scan(ctx, b.subjects(room).log, fromSeq+1, through, func(r record) bool {
		if r.kind != kindMsg || r.epoch != epoch || r.seq <= next {
			return true
		}
		if r.seq != next+1 || r.seq > to {
			return false
		}
		b.deliver(r.message(room))
		next = r.seq
		return next < to
	})
	if next == to {
		b.log.Warn("natsbroker: delivered messages missed on the delivery subscription from the room's log",
			"room", room, "missed", want)
		return true
	}
	b.log.Error("natsbroker: messages were lost for this node's subscribers: the room's history no longer holds them; resetting the room",
		"room", room, "missed", want, "recovered", next-from, "err", err)
	return false
}

// resyncAll runs after the connection came back, or a new stream leader
// was elected: every subscribed room (or, with onlyBehind, every room
// whose last catch-up failed) gets what it missed meanwhile. It reports
// whether a room's catch-up failed.
func (b *Broker) resyncAll(why string, onlyBehind bool) bool {
	b.mu.Lock()
	subs := make([]*sub, 0, len(b.subs))
	for _, s := range b.subs {
		if s.behind || !onlyBehind {
			subs = append(subs, s)
		}
	}
	b.mu.Unlock()
	behind := false
	for _, s := range subs {
		if b.ctx.Err() != nil {
			return false
		}
		ok := b.resync(s, why)
		b.mu.Lock()
		s.behind = !ok
		b.mu.Unlock()
		behind = behind || !ok
	}
	return behind
}

// resyncTimeout bounds one catch-up: while a new stream leader is being
// elected reads go unanswered, and the reader tries again soon rather
// than wait.
const resyncTimeout = 2 * time.Second

// resync reads the room's head and presence and catches up with both. It
// reports false when it could not read them.
func (b *Broker) resync(s *sub, why string) bool {
	ctx, cancel := context.WithTimeout(b.ctx, resyncTimeout)
	defer cancel()
	subj := b.subjects(s.room)
	head, err := b.readHead(ctx, subj)
	if err != nil {
		b.log.Warn("natsbroker: could not check a room for messages missed; trying again",
			"room", s.room, "why", why, "err", err)
		return false
	}
	b.mu.Lock()
	current := b.subs[s.room] == s
	p := s.pos
	b.mu.Unlock()
	if !current {
		return true
	}
	if !hasState(head) {
		b.setPos(s, b.lost(s.room, p, head.sseq, "the room's state is gone from the stream"))
	} else {
		b.setPos(s, b.advance(s.room, p, head, true))
	}
	entries, upTo, err := b.entries(ctx, subj)
	if err != nil {
		b.log.Warn("natsbroker: could not read a room's presence again; trying again", "room", s.room, "why", why, "err", err)
		return false
	}
	b.replaceView(s, entries, upTo)
	return true
}
