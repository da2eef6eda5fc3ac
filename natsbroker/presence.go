package natsbroker

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/roomcast/pubsub"
)

// member is one of this node's presence entries. Its mu is held while its
// record is written, so a refresh never writes a join after the leave.
type member struct {
	mu     sync.Mutex
	m      pubsub.Member
	events bool
	left   bool
}

// leaveTTL is how long a leave record stays (the smallest TTL): long
// enough to be republished, after which the subject is empty.
const leaveTTL = markerTTL

// Join writes the connection's presence entry. Every node with
// subscribers in the room announces a member's first connection when
// events is set.
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

	h, body := encodeEntry(m, false, events, b.cfg.presenceTTL)
	if _, err := b.store(ctx, b.entrySubject(room, m.ConnID), h, body); err != nil {
		b.forget(room, mm)
		return fmt.Errorf("natsbroker: join room %q: %w", room, err)
	}
	return nil
}

func (b *Broker) entrySubject(room, conn string) string {
	return b.subjects(room).presence + "." + token(conn)
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

// Leave replaces the connection's presence entry with a leave record.
// Every node with subscribers in the room announces a member's last
// connection leaving when events is set. A connection this node never
// joined is left alone.
func (b *Broker) Leave(ctx context.Context, room string, m pubsub.Member, events bool) error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return pubsub.ErrClosed
	}
	mm := b.members[room][m.ConnID]
	b.mu.Unlock()
	if mm == nil {
		return nil
	}
	b.forget(room, mm)
	mm.mu.Lock()
	defer mm.mu.Unlock()
	mm.left = true
	h, body := encodeEntry(mm.m, true, events, leaveTTL)
	if _, err := b.store(ctx, b.entrySubject(room, m.ConnID), h, body); err != nil {
		return fmt.Errorf("natsbroker: leave room %q: %w", room, err)
	}
	return nil
}

// Presence lists the room's live entries, from every node.
func (b *Broker) Presence(ctx context.Context, room string, countsOnly bool) (pubsub.Presence, error) {
	if b.isClosed() {
		return pubsub.Presence{}, pubsub.ErrClosed
	}
	entries, _, err := b.entries(ctx, b.subjects(room))
	if err != nil {
		return pubsub.Presence{}, fmt.Errorf("natsbroker: presence of room %q: %w", room, err)
	}
	type group struct {
		pm    pubsub.PresenceMember
		first string
	}
	groups := make(map[string]*group)
	for conn, e := range entries {
		k := memberKey(e.member)
		g := groups[k]
		if g == nil {
			g = &group{pm: pubsub.PresenceMember{UserID: e.member.UserID}, first: conn}
			g.pm.Info = e.member.Info
			groups[k] = g
		}
		g.pm.Conns = append(g.pm.Conns, conn)
		if conn < g.first {
			g.first, g.pm.Info = conn, e.member.Info
		}
	}
	p := pubsub.Presence{Count: len(groups), Connections: len(entries)}
	if countsOnly {
		return p, nil
	}
	p.Members = make([]pubsub.PresenceMember, 0, len(groups))
	for _, g := range groups {
		slices.Sort(g.pm.Conns)
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

// entries reads the room's live presence entries (connection id -> entry)
// and the stream sequence they are current as of. Each connection's
// subject holds one record (they are rolled up), so reading every record
// of the room's presence subjects reads each entry once.
func (b *Broker) entries(ctx context.Context, s subjects) (map[string]entry, uint64, error) {
	out := make(map[string]entry)
	var upTo uint64
	prefix := s.presence + "."
	err := b.each(ctx, prefix+">", 1, func(m stored) bool {
		upTo = m.sseq
		conn, ok := untoken(strings.TrimPrefix(m.subject, prefix))
		if !ok {
			return true
		}
		e, err := decodeEntry(m.header, m.data)
		if err != nil {
			return true
		}
		if e.leave {
			delete(out, conn) // a later record of the same subject, after a refresh
		} else {
			e.sseq, e.member.ConnID = m.sseq, conn
			out[conn] = e
		}
		return true
	})
	if err != nil {
		return nil, 0, err
	}
	return out, upTo, nil
}

// onEntry handles a republished presence record: it updates the room's
// view and announces a member's first and last connection.
func (b *Broker) onEntry(room string, s *sub, m *nats.Msg, connToken string) {
	sseq, _, err := streamMeta(m.Header)
	var e entry
	if err == nil {
		e, err = decodeEntry(m.Header, m.Data)
	}
	conn, ok := untoken(connToken)
	if err != nil || !ok {
		b.log.Error("natsbroker: undecodable presence record; is another application using the prefix?", "room", room, "err", err)
		return
	}
	e.member.ConnID, e.sseq = conn, sseq
	if !s.viewReady {
		if len(s.pending) < maxPending {
			s.pending = append(s.pending, e)
		}
		return
	}
	if sseq <= s.viewSeq {
		return // already in the view
	}
	b.applyEntry(room, s, e)
}

// applyEntry applies one presence record to the view.
func (b *Broker) applyEntry(room string, s *sub, e entry) {
	conn := e.member.ConnID
	old, had := s.view[conn]
	if !e.leave {
		s.view[conn] = e
		if had {
			return // a refresh
		}
		k := memberKey(e.member)
		if s.counts[k]++; s.counts[k] == 1 && e.events {
			b.deliver(pubsub.Message{Kind: pubsub.KindJoin, Room: room, Epoch: b.epochOf(s), Time: time.Now(), Member: e.member})
		}
		return
	}
	if !had {
		return
	}
	delete(s.view, conn)
	k := memberKey(old.member)
	if s.counts[k]--; s.counts[k] > 0 {
		return
	}
	delete(s.counts, k)
	events := e.events
	if e.marker {
		events = old.events // expired: as it asked when it joined
	}
	if events {
		b.deliver(pubsub.Message{Kind: pubsub.KindLeave, Room: room, Epoch: b.epochOf(s), Time: time.Now(), Member: old.member})
	}
}

func (b *Broker) epochOf(s *sub) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return s.pos.epoch
}

// installView sets a new subscription's view from the entries read when
// it started, then applies the records that arrived meanwhile.
func (b *Broker) installView(s *sub, entries map[string]entry, upTo uint64) {
	for conn, e := range entries {
		s.view[conn] = e
		s.counts[memberKey(e.member)]++
	}
	s.viewSeq, s.viewReady = upTo, true
	pending := s.pending
	s.pending = nil
	for _, e := range pending {
		if e.sseq > upTo {
			b.applyEntry(s.room, s, e)
		}
	}
}

// replaceView brings the view up to entries read after an outage,
// announcing who joined and left meanwhile.
func (b *Broker) replaceView(s *sub, entries map[string]entry, upTo uint64) {
	if !s.viewReady {
		return
	}
	for conn, old := range s.view {
		if _, ok := entries[conn]; !ok {
			b.applyEntry(s.room, s, entry{leave: true, marker: true, member: old.member})
		}
	}
	for _, e := range entries {
		b.applyEntry(s.room, s, e)
	}
	s.viewSeq = max(s.viewSeq, upTo)
}

// refreshLoop keeps this node's presence entries and rooms alive: every
// third of the presence TTL (or quarter of the room TTL, when shorter) it
// rewrites its entries and touches the subscribed rooms whose state would
// expire within half the room TTL. It also creates the stream again when
// it was lost.
func (b *Broker) refreshLoop() {
	every := b.cfg.presenceTTL / 3
	period := min(every, b.cfg.roomTTL/4)
	tick := time.NewTicker(period)
	defer tick.Stop()
	failing := false
	var refreshed time.Time
	for {
		select {
		case <-b.ctx.Done():
			return
		case <-b.recreate:
			b.recreateStream()
			continue
		case <-tick.C:
		}
		var err error
		if time.Since(refreshed) >= every-period/2 {
			refreshed = time.Now()
			err = b.refresh()
		}
		err = errors.Join(err, b.touchRooms())
		switch {
		case err != nil && !failing && b.ctx.Err() == nil:
			b.log.Error("natsbroker: refreshing presence or keeping rooms alive failed; this node's members and idle rooms expire if it keeps failing", "err", err)
			failing = true
		case err == nil && failing:
			b.log.Info("natsbroker: presence refresh works again")
			failing = false
		}
	}
}

// recreateStream creates the stream when it is gone (a server that lost
// its storage, someone deleted it). Its rooms start new epochs.
func (b *Broker) recreateStream() {
	ctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
	defer cancel()
	if !b.nc.IsConnected() {
		return
	}
	if _, err := b.js.Stream(ctx, b.cfg.prefix); !errors.Is(err, jetstream.ErrStreamNotFound) {
		return
	}
	if err := b.ensureStream(ctx); err != nil {
		b.log.Error("natsbroker: the stream is gone and could not be created again", "err", err)
		return
	}
	b.log.Error("natsbroker: the stream was gone (the server lost it, or it was deleted); created it again: every room starts a new epoch",
		"stream", b.cfg.prefix)
	b.logsMu.Lock()
	clear(b.logs)
	b.logsMu.Unlock()
}

// refresh rewrites every one of this node's presence entries, so it
// outlives the presence TTL, and restores those the stream lost.
func (b *Broker) refresh() error {
	b.mu.Lock()
	var mms []*member
	rooms := make(map[*member]string)
	for room, conns := range b.members {
		for _, mm := range conns {
			mms = append(mms, mm)
			rooms[mm] = room
		}
	}
	b.mu.Unlock()
	if len(mms) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(b.ctx, b.cfg.presenceTTL/3)
	defer cancel()
	var (
		acks   []jetstream.PubAckFuture
		locked []*member
		first  error
	)
	defer func() {
		for _, mm := range locked {
			mm.mu.Unlock()
		}
	}()
	for _, mm := range mms {
		// A member joining or leaving right now is its own call's job.
		if !mm.mu.TryLock() {
			continue
		}
		if mm.left {
			mm.mu.Unlock()
			continue
		}
		locked = append(locked, mm)
		h, body := encodeEntry(mm.m, false, mm.events, b.cfg.presenceTTL)
		ack, err := b.js.PublishMsgAsync(&nats.Msg{Subject: b.entrySubject(rooms[mm], mm.m.ConnID), Header: h, Data: body})
		if err != nil {
			first = err
			break
		}
		acks = append(acks, ack)
	}
	for _, ack := range acks {
		select {
		case <-ack.Ok():
		case err := <-ack.Err():
			if first == nil {
				first = err
			}
		case <-ctx.Done():
			if first == nil {
				first = ctx.Err()
			}
			return first
		}
	}
	return first
}

// touchRooms keeps the state of the rooms this node serves: a room whose
// newest record expires within half the room TTL gets a touch record.
func (b *Broker) touchRooms() error {
	by := time.Now().Add(b.cfg.roomTTL / 2)
	b.mu.Lock()
	var due []string
	for room, s := range b.subs {
		if !s.expires.IsZero() && s.expires.Before(by) && s.pos.epoch != "" {
			due = append(due, room)
		}
	}
	b.mu.Unlock()
	var first error
	for _, room := range due {
		ctx, cancel := context.WithTimeout(b.ctx, 5*time.Second)
		err := b.touch(ctx, room, by)
		cancel()
		if err != nil && first == nil {
			first = err
		}
	}
	return first
}
