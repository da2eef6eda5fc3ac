package redisbroker

import (
	"context"
	"errors"
	"net"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"
	"github.com/roomcast/pubsub"
)

// Reading the pub/sub connection.
const (
	// pingAfter is how long the pub/sub connection may stay silent before
	// the reader pings Redis: a ping that cannot be written breaks the
	// connection, and go-redis reconnects and subscribes again.
	pingAfter   = 3 * time.Second
	pingTimeout = 5 * time.Second
	// retryAfter paces the reader when receiving fails twice in a row.
	retryAfter = 100 * time.Millisecond
)

// readLoop is the broker's one delivering goroutine: every room's messages
// are delivered from here, so one room's are in order and never
// concurrent. It receives from the pub/sub connection itself (go-redis's
// Channel would hand each message through a goroutine and a channel of
// its own, and wake its health check, on every message) and pings
// Redis when the connection is silent, as Channel would. It ends when
// Close closes the pub/sub connection.
func (b *Broker) readLoop(ps *redis.PubSub) {
	failures := 0
	for {
		msg, err := ps.ReceiveTimeout(b.ctx, pingAfter)
		switch {
		case b.ctx.Err() != nil || errors.Is(err, redis.ErrClosed):
			return
		case err != nil && isTimeout(err):
			ctx, cancel := context.WithTimeout(b.ctx, pingTimeout)
			_ = ps.Ping(ctx) // its error, if any, reconnects the connection
			cancel()
			continue
		case err != nil:
			if failures++; failures > 1 {
				select {
				case <-b.ctx.Done():
				case <-time.After(retryAfter):
				}
			}
			continue
		}
		failures = 0
		switch msg := msg.(type) {
		case *redis.Subscription:
			if msg.Kind == "subscribe" {
				b.onSubscribed(b.roomOf(msg.Channel))
			}
		case *redis.Message:
			b.onMessage(b.roomOf(msg.Channel), msg.Payload)
		}
	}
}

// isTimeout says whether err is a read that timed out.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// onSubscribed handles Redis's confirmation of a SUBSCRIBE: the first one
// releases the waiting Subscribe; a later one means the pub/sub connection
// was re-established, and whatever was published meanwhile is fetched.
func (b *Broker) onSubscribed(room string) {
	b.mu.Lock()
	s := b.subs[room]
	if s == nil {
		b.mu.Unlock()
		return
	}
	if !s.confirmed {
		s.confirmed = true
		close(s.ready)
		b.mu.Unlock()
		return
	}
	p := s.pos
	b.mu.Unlock()
	b.setPos(room, s, b.resync(room, p))
}

func (b *Broker) setPos(room string, s *sub, p pos) {
	b.mu.Lock()
	if b.subs[room] == s {
		s.pos = p
	}
	b.mu.Unlock()
}

func (b *Broker) onMessage(room, payload string) {
	m, err := decode(room, payload)
	if err != nil {
		b.log.Error("redisbroker: undecodable message on a room channel; is another application using the prefix?",
			"room", room, "err", err)
		return
	}
	b.mu.Lock()
	s := b.subs[room]
	if s == nil || !s.confirmed {
		// Unsubscribed, or a previous subscription's message still in
		// flight ahead of this one's confirmation.
		b.mu.Unlock()
		return
	}
	p := s.pos
	b.mu.Unlock()
	if m.Kind != pubsub.KindMessage {
		b.deliver(m)
		return
	}
	b.setPos(room, s, b.advance(room, p, m))
}

// advance delivers m after whatever this node missed before it, and
// returns the new position.
func (b *Broker) advance(room string, p pos, m pubsub.Message) pos {
	next := pos{epoch: m.Epoch, seq: m.Seq, state: posDelivered}
	switch {
	case p.state == posUnknown:
		if b.cluster {
			// A Redis Cluster carries PUBLISH between its servers
			// asynchronously: a message published before the SUBSCRIBE
			// may arrive after it. Subscribe promises only what is
			// published after it returns, which comes after the baseline.
			return p
		}
	case p.epoch == "" || p.epoch == m.Epoch:
		last := p.seq
		if p.epoch == "" {
			last = 0 // the room had no state: its next life starts at 1
		}
		if m.Seq <= last {
			if p.state == posDelivered || b.cluster {
				return p // already delivered, from history; or, on a cluster, perhaps published before the SUBSCRIBE
			}
			b.deliver(m) // published before the baseline was read
			return p
		}
		if m.Seq > last+1 && !b.fill(room, m.Epoch, last, m.Seq-1) {
			b.reset(room)
		}
	default:
		b.log.Error("redisbroker: the room's epoch changed under its subscribers: Redis lost the room's state",
			"room", room, "epoch", p.epoch, "new_epoch", m.Epoch)
		b.reset(room)
	}
	b.deliver(m)
	return next
}

// resync runs after the pub/sub connection came back: it delivers what the
// room's history kept of the messages published while it was down.
func (b *Broker) resync(room string, p pos) pos {
	ctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
	defer cancel()
	k := b.keys(room)
	vals, err := rangeScript.Run(ctx, b.client, []string{k.meta, k.hist}, 0, 0, 1).Slice()
	if err != nil {
		b.log.Error("redisbroker: could not check a room for messages missed while disconnected",
			"room", room, "err", err)
		return p
	}
	if len(vals) == 0 {
		if p.state != posUnknown && p.epoch != "" {
			b.log.Error("redisbroker: the room's state is gone from Redis (data lost or expired) while this node was disconnected",
				"room", room, "epoch", p.epoch)
			b.reset(room)
		}
		return pos{state: posBaseline}
	}
	epoch, top, err := position(vals)
	if err != nil {
		b.log.Error("redisbroker: could not check a room for messages missed while disconnected", "room", room, "err", err)
		return p
	}
	switch {
	case p.state == posUnknown:
		return pos{epoch: epoch, seq: top, state: posBaseline}
	case p.epoch == "" || p.epoch == epoch:
		last := p.seq
		if p.epoch == "" {
			last = 0
		}
		if top <= last {
			return p
		}
		if !b.fill(room, epoch, last, top) {
			b.reset(room)
		}
	default:
		b.log.Error("redisbroker: the room's epoch changed under its subscribers: Redis lost the room's state",
			"room", room, "epoch", p.epoch, "new_epoch", epoch)
		b.reset(room)
	}
	return pos{epoch: epoch, seq: top, state: posDelivered}
}

// reset tells the node that the room's stream broke for its subscribers
// (see pubsub.KindReset): they are closed, reconnect and recover.
func (b *Broker) reset(room string) {
	b.deliver(pubsub.Message{Kind: pubsub.KindReset, Room: room})
}

// fill delivers the messages of epoch after from, up to to, that follow on
// from it in the room's history, in order, and reports whether it found
// them all. It stops at the first hole (a message the history no longer
// holds): nothing past a hole is delivered before the reset that must come
// first, and the Handler would close the room's subscribers on it anyway.
// What it cannot find is logged.
func (b *Broker) fill(room, epoch string, from, to uint64) bool {
	ctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
	defer cancel()
	k := b.keys(room)
	want, got := to-from, uint64(0)
	var failure error
	for next := from; next < to; {
		vals, err := rangeScript.Run(ctx, b.client, []string{k.meta, k.hist}, next, to, fillBatch).Slice()
		if err != nil {
			failure = err
			break
		}
		if len(vals) == 0 {
			break // the room's state is gone
		}
		e, _, err := position(vals)
		if err != nil {
			failure = err
			break
		}
		if e != epoch {
			break // a newer life: nothing of epoch is left
		}
		msgs, err := entries(room, epoch, vals[2:])
		if err != nil {
			failure = err
			break
		}
		if len(msgs) == 0 || msgs[0].Seq != next+1 {
			break // trimmed: the next one is gone
		}
		for _, m := range msgs {
			if m.Seq != next+1 {
				break
			}
			b.deliver(m)
			got++
			next = m.Seq
		}
		if next < msgs[len(msgs)-1].Seq {
			break // a hole inside the batch
		}
	}
	if got == want {
		b.log.Warn("redisbroker: delivered messages missed on the pub/sub connection from the room's history",
			"room", room, "missed", want)
		return true
	}
	b.log.Error("redisbroker: messages were lost for this node's subscribers: the room's history no longer holds them; resetting the room",
		"room", room, "missed", want, "recovered", got, "err", failure)
	return false
}

// refreshLoop keeps this node's rooms alive in Redis: every third of the
// presence TTL it extends their state and its presence entries.
func (b *Broker) refreshLoop() {
	tick := time.NewTicker(b.cfg.presenceTTL / 3)
	defer tick.Stop()
	failing := false
	for {
		select {
		case <-b.ctx.Done():
			return
		case <-tick.C:
		}
		err := b.refresh()
		switch {
		case err != nil && !failing && b.ctx.Err() == nil:
			b.log.Error("redisbroker: presence refresh failed; this node's members expire if it keeps failing", "err", err)
			failing = true
		case err == nil && failing:
			b.log.Info("redisbroker: presence refresh works again")
			failing = false
		}
	}
}

// refreshBatch bounds the rooms one pipeline refreshes.
const refreshBatch = 200

func (b *Broker) refresh() error {
	b.mu.Lock()
	rooms := make(map[string][]*member, len(b.subs)+len(b.members))
	for room := range b.subs {
		rooms[room] = nil
	}
	for room, conns := range b.members {
		for _, mm := range conns {
			rooms[room] = append(rooms[room], mm)
		}
	}
	b.mu.Unlock()

	type call struct {
		keys []string
		args []any
	}
	var (
		batch  []call
		locked []*member
		first  error
	)
	flush := func() {
		if len(batch) == 0 {
			return
		}
		ctx, cancel := context.WithTimeout(b.ctx, b.cfg.presenceTTL/3)
		defer cancel()
		run := func(c redis.Pipeliner) error {
			for _, cl := range batch {
				refreshScript.EvalSha(ctx, c, cl.keys, cl.args...)
			}
			return nil
		}
		cmds, err := b.client.Pipelined(ctx, run)
		if err != nil && redis.HasErrorPrefix(err, "NOSCRIPT") {
			// Redis restarted or flushed its scripts: load it and retry.
			if err = refreshScript.Load(ctx, b.client).Err(); err == nil {
				cmds, err = b.client.Pipelined(ctx, run)
			}
		}
		if err == nil {
			for _, c := range cmds {
				if err = c.Err(); err != nil {
					break
				}
			}
		}
		if err != nil && first == nil {
			first = err
		}
		for _, mm := range locked {
			mm.mu.Unlock()
		}
		batch, locked = batch[:0], locked[:0]
	}
	ttl, keyTTL, idle := ms(b.cfg.presenceTTL), ms(2*b.cfg.presenceTTL), ms(b.cfg.roomTTL)
	for room, mms := range rooms {
		k := b.keys(room)
		args := []any{ttl, keyTTL, uuid.NewString(), idle, k.channel}
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
			args = append(args, mm.m.ConnID, memberKey(mm.m), flag(mm.events), record(mm.m))
		}
		batch = append(batch, call{[]string{k.meta, k.hist, k.pres, k.conns, k.users}, args})
		if len(batch) >= refreshBatch {
			flush()
		}
	}
	flush()
	return first
}
