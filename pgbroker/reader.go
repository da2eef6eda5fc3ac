package pgbroker

import (
	"context"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/roomcast/pubsub"
)

const (
	// readRooms bounds the rooms one read query covers.
	readRooms = 500
	// readLimit bounds the messages, and the events, one read takes of a
	// room; a room with more is read again at once.
	readLimit = 1000
	// retryRead is how soon a failed read is tried again.
	retryRead = 250 * time.Millisecond
	// Reconnection backoff of the listening connection.
	backoffMin = 100 * time.Millisecond
	backoffMax = 5 * time.Second
)

// mark asks the reader to read rooms (those this node is subscribed to).
func (b *Broker) mark(rooms ...string) {
	if len(rooms) == 0 {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, room := range rooms {
		b.markLocked(room)
	}
}

func (b *Broker) markLocked(room string) {
	if s := b.subs[room]; s != nil && s.ready {
		b.dirty[room] = true
		b.signal()
	}
}

func (b *Broker) markAllLocked() {
	b.readAll = true
	b.signal()
}

// signal wakes the reader; it never blocks.
func (b *Broker) signal() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// listenLoop owns the listening connection: a session of its own (not
// from the pool) that LISTENs on the schema's channel. A notification
// names the room to read, nothing more. When the connection fails, or
// stops answering, it reconnects with backoff, and every room is read from
// the table once it listens again.
func (b *Broker) listenLoop() {
	backoff := backoffMin
	failing := false
	for {
		conn, err := b.connectListener()
		if err != nil {
			if b.ctx.Err() != nil {
				return
			}
			if !failing {
				// Not listening is an outage too, even before the first
				// LISTEN: what it misses is read strictly (see lost).
				b.lost()
				b.log.Error("pgbroker: cannot open the listening connection; retrying", "err", err)
				failing = true
			}
			select {
			case <-b.ctx.Done():
				return
			case <-time.After(jitter(backoff)):
			}
			backoff = min(2*backoff, backoffMax)
			continue
		}
		if failing {
			b.log.Info("pgbroker: listening again; reading every room from the table")
			failing = false
		}
		backoff = backoffMin
		b.clearOwn()
		b.mu.Lock()
		b.markAllLocked() // what committed before the LISTEN took effect
		b.mu.Unlock()

		err = b.listen(conn)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_ = conn.Close(ctx)
		cancel()
		if b.ctx.Err() != nil {
			return
		}
		b.lost()
		b.log.Error("pgbroker: lost the listening connection; reconnecting, then reading from the table what was published meanwhile (as far as each room's history keeps it)", "err", err)
		failing = true
	}
}

// jitter spreads d by ±20%, so nodes do not reconnect in step.
func jitter(d time.Duration) time.Duration {
	return d - d/5 + rand.N(2*d/5+1)
}

// timeout bounds one of the broker's own calls (a read, a sweep, the
// listener's connect and check): twice the poll interval, from 1s to 10s,
// so a link that lost its bytes is found out about that fast.
func (b *Broker) timeout() time.Duration {
	return min(max(2*b.cfg.poll, time.Second), 10*time.Second)
}

// connectListener opens a session with the pool's connection settings
// (its application_name says what it is, in pg_stat_activity) and
// LISTENs.
func (b *Broker) connectListener() (*pgx.Conn, error) {
	ctx, cancel := context.WithTimeout(b.ctx, b.timeout())
	defer cancel()
	cfg := b.pool.Config().ConnConfig
	name := "roomcast pgbroker listener"
	if app := cfg.RuntimeParams["application_name"]; app != "" {
		name = app + " (" + name + ")"
	}
	cfg.RuntimeParams["application_name"] = name
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{b.cfg.schema}.Sanitize()); err != nil {
		_ = conn.Close(ctx)
		return nil, err
	}
	return conn, nil
}

// listen waits for notifications until the connection fails. A quiet
// connection is checked every poll interval, so a link that silently
// stopped carrying bytes is found out.
func (b *Broker) listen(conn *pgx.Conn) error {
	check := b.timeout()
	for {
		ctx, cancel := context.WithTimeout(b.ctx, b.cfg.poll)
		n, err := conn.WaitForNotification(ctx)
		cancel()
		switch {
		case err == nil:
			if !b.tookOwn(n.PID, n.Payload) {
				b.notified(n.Payload)
			}
			continue
		case b.ctx.Err() != nil:
			return err
		case !errors.Is(err, context.DeadlineExceeded) && !pgconn.Timeout(err):
			return err
		}
		ctx, cancel = context.WithTimeout(b.ctx, check)
		_, err = conn.Exec(ctx, "SELECT 1")
		cancel()
		if err != nil {
			return err
		}
	}
}

// notified handles one notification: "r" and a room's name (a
// PublishTx's commit, a presence change), or "m" and rooms, each as its
// length in bytes, ":" and its name (the notifier's). Anything else, or a
// malformed list, reads every room.
func (b *Broker) notified(payload string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case len(payload) > 0 && payload[0] == 'r':
		b.markLocked(payload[1:])
		return
	case len(payload) > 0 && payload[0] == 'm':
		for rest := payload[1:]; rest != ""; {
			colon := strings.IndexByte(rest, ':')
			n, err := strconv.Atoi(rest[:max(colon, 0)])
			if colon < 1 || err != nil || n < 0 || n > len(rest)-colon-1 {
				break
			}
			b.markLocked(rest[colon+1 : colon+1+n])
			rest = rest[colon+1+n:]
			if rest == "" {
				return
			}
		}
	}
	b.markAllLocked()
}

// lost marks an outage: every room is read strictly at its next read.
func (b *Broker) lost() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.outages++
	for _, s := range b.subs {
		s.strict = b.outages
	}
}

// readLoop is the broker's one delivering goroutine: every room's
// messages are delivered from here, so one room's are in order and never
// concurrent. It reads the rooms it is woken for (by a notification, or
// by this node's own publishes), and every room each poll interval.
func (b *Broker) readLoop() {
	tick := time.NewTicker(b.cfg.poll)
	defer tick.Stop()
	retry := time.NewTimer(retryRead)
	retry.Stop()
	defer retry.Stop()
	failing := false
	for {
		select {
		case <-b.ctx.Done():
			return
		case <-b.wake:
		case <-retry.C:
		case <-tick.C:
			b.mu.Lock()
			b.readAll = true
			b.mu.Unlock()
		}
		err := b.readRooms()
		switch {
		case err != nil && b.ctx.Err() == nil:
			if !failing {
				b.log.Error("pgbroker: cannot read rooms from the table; retrying", "err", err)
				failing = true
			}
			retry.Reset(jitter(retryRead))
		case err == nil && failing:
			b.log.Info("pgbroker: reading rooms from the table works again")
			failing = false
		}
	}
}

// readRooms reads the rooms marked for it, until none is left.
func (b *Broker) readRooms() error {
	for b.ctx.Err() == nil {
		b.mu.Lock()
		var rooms []string
		if b.readAll {
			b.readAll = false
			clear(b.dirty)
			for room, s := range b.subs {
				if s.ready {
					rooms = append(rooms, room)
				}
			}
		} else {
			for room := range b.dirty {
				rooms = append(rooms, room)
			}
			clear(b.dirty)
		}
		b.mu.Unlock()
		if len(rooms) == 0 {
			return nil
		}
		slices.Sort(rooms)
		for i := 0; i < len(rooms); i += readRooms {
			if err := b.readChunk(rooms[i:min(i+readRooms, len(rooms))]); err != nil {
				b.mark(rooms[i:]...)
				return err
			}
		}
	}
	return nil
}

// snapshot is a subscription as a read found it.
type snapshot struct {
	room   string
	s      *sub
	pos    pos
	strict uint64
}

// roomRead is what one read found of a room.
type roomRead struct {
	found  bool
	epoch  string
	top    uint64
	evTop  int64
	check  string // the id of the message at the node's position, if still in the table
	msgs   []pubsub.Message
	events []event
}

// event is a presence event read from the table.
type event struct {
	ev    int64
	after uint64 // the room's seq when it happened: it comes after that message
	m     pubsub.Message
}

// readChunk reads rooms (at most readRooms) in one query and delivers
// what it found.
func (b *Broker) readChunk(rooms []string) error {
	b.mu.Lock()
	snaps := make([]snapshot, 0, len(rooms))
	for _, room := range rooms {
		if s := b.subs[room]; s != nil && s.ready {
			snaps = append(snaps, snapshot{room, s, s.pos, s.strict})
		}
	}
	b.mu.Unlock()
	if len(snaps) == 0 {
		return nil
	}
	names := make([]string, len(snaps))
	seqs := make([]int64, len(snaps))
	evs := make([]int64, len(snaps))
	strict := make([]bool, len(snaps))
	for i, sn := range snaps {
		names[i], strict[i] = sn.room, sn.strict != 0
		if sn.pos.epoch != "" {
			seqs[i], evs[i] = int64(sn.pos.seq), sn.pos.ev
		}
	}
	reads, err := b.query(names, seqs, evs, strict)
	if err != nil {
		if b.cfg.pollOnly {
			// Polling only, a failed poll is the outage.
			b.mu.Lock()
			b.outages++
			for _, sn := range snaps {
				if b.subs[sn.room] == sn.s {
					sn.s.strict = b.outages
				}
			}
			b.mu.Unlock()
		}
		return err
	}
	for _, sn := range snaps {
		b.dmu.Lock()
		b.mu.Lock()
		current := b.subs[sn.room] == sn.s
		b.mu.Unlock()
		if !current {
			b.dmu.Unlock()
			continue // unsubscribed meanwhile
		}
		next, more := b.apply(sn, reads[sn.room])
		b.mu.Lock()
		if b.subs[sn.room] == sn.s {
			sn.s.pos = next
			if more {
				b.dirty[sn.room] = true
			} else if sn.s.strict == sn.strict {
				sn.s.strict = 0 // caught up since the outage
			}
		}
		b.mu.Unlock()
		b.dmu.Unlock()
	}
	return nil
}

// query runs the read statement (the read_rooms function): one row per
// message from each room's position on (the one at the position is its
// check), or per event, or for a room with neither, each with the room's
// epoch and newest seq and event.
func (b *Broker) query(names []string, seqs, evs []int64, strict []bool) (map[string]*roomRead, error) {
	ctx, cancel := context.WithTimeout(b.ctx, b.timeout())
	defer cancel()
	rows, err := b.pool.Query(ctx, b.sql.read, names, seqs, evs, strict, readLimit)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	after := make(map[string]int64, len(names))
	for i, name := range names {
		after[name] = seqs[i]
	}
	reads := make(map[string]*roomRead, len(names))
	for rows.Next() {
		var (
			room, epoch      string
			kind, conn, user *string
			top, evTop       int64
			seq, ev          *int64
			id               pgtype.UUID
			at               *time.Time
			data             []byte
		)
		if err := rows.Scan(&room, &kind, &epoch, &top, &evTop, &seq, &ev, &id, &at, &data, &conn, &user); err != nil {
			return nil, err
		}
		rr := reads[room]
		if rr == nil {
			rr = &roomRead{found: true, epoch: epoch, top: uint64(top), evTop: evTop}
			reads[room] = rr
		}
		switch {
		case kind == nil:
		case *kind == "m" && *seq == after[room]:
			rr.check = uuid.UUID(id.Bytes).String()
		case *kind == "m":
			rr.msgs = append(rr.msgs, pubsub.Message{Kind: pubsub.KindMessage, Room: room, ID: uuid.UUID(id.Bytes).String(), Seq: uint64(*seq), Time: *at, Data: data})
		case *kind == "join", *kind == "leave":
			m := pubsub.Message{Kind: pubsub.KindJoin, Room: room, Time: *at, Member: pubsub.Member{ConnID: *conn, UserID: *user}}
			if *kind == "leave" {
				m.Kind = pubsub.KindLeave
			}
			if len(data) > 0 {
				m.Member.Info = json.RawMessage(data)
			}
			rr.events = append(rr.events, event{ev: *ev, after: uint64(*seq), m: m})
		}
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	for _, rr := range reads {
		slices.SortFunc(rr.msgs, func(x, y pubsub.Message) int { return cmpUint(x.Seq, y.Seq) })
		slices.SortFunc(rr.events, func(x, y event) int { return cmpInt(x.ev, y.ev) })
		for i := range rr.msgs {
			rr.msgs[i].Epoch = rr.epoch
		}
		for i := range rr.events {
			rr.events[i].m.Epoch = rr.epoch
		}
	}
	return reads, nil
}

func cmpUint(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func cmpInt(a, b int64) int { return cmpUint(uint64(a), uint64(b)) }

// apply delivers what a read found of a room, in the room's order, and
// returns the room's new position and whether there is more to read. The
// caller holds dmu.
func (b *Broker) apply(sn snapshot, rr *roomRead) (pos, bool) {
	p := sn.pos
	switch {
	case rr == nil || !rr.found:
		if p.epoch != "" {
			b.log.Error("pgbroker: the room's row is gone while this node was subscribed (deleted by hand?); resetting the room",
				"room", sn.room, "epoch", p.epoch)
			b.reset(sn.room)
		}
		return pos{}, false
	case p.epoch == "":
		// The room had no life: its new one is delivered from the start.
		return pos{epoch: rr.epoch}, true
	case p.epoch != rr.epoch:
		b.log.Error("pgbroker: the room's epoch changed under its subscribers (its row was deleted and created again); resetting the room",
			"room", sn.room, "epoch", p.epoch, "new_epoch", rr.epoch)
		b.reset(sn.room)
		return pos{epoch: rr.epoch}, true
	case rr.top < p.seq || (p.id != "" && rr.check != "" && rr.check != p.id):
		// Committed messages this node delivered are gone, and their seqs
		// may name others now: PostgreSQL lost transactions it had
		// acknowledged (synchronous_commit off, then a crash), or the
		// database was restored from a backup.
		b.log.Error("pgbroker: the room's history was rewritten: messages this node delivered are not in the table any more (was the database restored from a backup, or did it lose commits with synchronous_commit off?); resetting the room",
			"room", sn.room, "epoch", p.epoch, "seq", p.seq, "top", rr.top)
		b.reset(sn.room)
		return pos{epoch: rr.epoch, seq: rr.top, ev: rr.evTop}, false
	}
	if rr.top > p.seq && (len(rr.msgs) == 0 || rr.msgs[0].Seq != p.seq+1) {
		b.lostMessages(sn, rr, p)
		return pos{epoch: rr.epoch, seq: rr.top, ev: rr.evTop}, false
	}
	// Deliver messages and events interleaved: event e comes after message
	// e.after. When the events were cut short, messages past the last one
	// read wait for the next read, so the order holds.
	upTo := rr.top
	if len(rr.msgs) > 0 {
		upTo = rr.msgs[len(rr.msgs)-1].Seq
	}
	if len(rr.events) == readLimit {
		upTo = min(upTo, rr.events[len(rr.events)-1].after)
	}
	ei := 0
	for _, m := range rr.msgs {
		if m.Seq > upTo {
			break
		}
		if m.Seq != p.seq+1 {
			b.lostMessages(sn, rr, p) // a hole inside the rows: not made by any trim
			return pos{epoch: rr.epoch, seq: rr.top, ev: rr.evTop}, false
		}
		for ; ei < len(rr.events) && rr.events[ei].after < m.Seq; ei++ {
			b.deliver(rr.events[ei].m)
			p.ev = rr.events[ei].ev
		}
		b.deliver(m)
		p.seq, p.id = m.Seq, m.ID
	}
	for ; ei < len(rr.events) && rr.events[ei].after <= p.seq; ei++ {
		b.deliver(rr.events[ei].m)
		p.ev = rr.events[ei].ev
	}
	more := p.seq < rr.top || ei < len(rr.events) || len(rr.events) == readLimit
	return p, more
}

// lostMessages resets a room whose next messages are gone for this node.
func (b *Broker) lostMessages(sn snapshot, rr *roomRead, p pos) {
	if sn.strict != 0 {
		b.log.Error("pgbroker: messages published while this node was cut off are no longer in the room's history; resetting the room",
			"room", sn.room, "epoch", p.epoch, "delivered", p.seq, "top", rr.top)
	} else {
		b.log.Error("pgbroker: this node fell further behind than the delivery window and messages are gone; resetting the room",
			"room", sn.room, "epoch", p.epoch, "delivered", p.seq, "top", rr.top)
	}
	b.reset(sn.room)
}

// reset tells the node that the room's stream broke for its subscribers
// (see pubsub.KindReset): they are closed, reconnect and recover.
func (b *Broker) reset(room string) {
	b.deliver(pubsub.Message{Kind: pubsub.KindReset, Room: room})
}
