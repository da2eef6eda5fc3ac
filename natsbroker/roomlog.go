package natsbroker

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/roomcast/pubsub"
)

// roomLog is this node's state for appending to one room's log.
type roomLog struct {
	room string
	mu   chan struct{} // a lock that waits with a context: this node's appends to the room are serial
	refs int           // guarded by the broker's logsMu

	// Guarded by mu.
	head      record    // the room's last record as this node last saw it
	known     bool      // head is worth trying; a refused append proves it stale
	fresh     bool      // head was read from the stream during this append
	completed bool      // the head's key record is known to be written
	trimmed   time.Time // when this node last asked for the room to be trimmed

	// The write of the key record of the keyed message this node appended
	// last (keyFor is its id), under way: the next append waits for it
	// rather than read the record back.
	keyWrite jetstream.PubAckFuture
	keyFor   string
}

// maxIdleLogs bounds the rooms whose head this node remembers while no
// append uses them.
const maxIdleLogs = 10_000

// lockLog returns the room's append state, locked, or the context's error.
func (b *Broker) lockLog(ctx context.Context, room string) (*roomLog, error) {
	b.logsMu.Lock()
	lg := b.logs[room]
	if lg == nil {
		if len(b.logs) >= maxIdleLogs {
			for name, l := range b.logs {
				if l.refs == 0 {
					delete(b.logs, name)
					if len(b.logs) < maxIdleLogs/2 {
						break
					}
				}
			}
		}
		lg = &roomLog{room: room, mu: make(chan struct{}, 1)}
		b.logs[room] = lg
	}
	lg.refs++
	b.logsMu.Unlock()
	select {
	case lg.mu <- struct{}{}:
		lg.fresh = false
		return lg, nil
	case <-ctx.Done():
		b.releaseLog(lg, false)
		return nil, ctx.Err()
	}
}

// unlockLog releases a room's append state.
func (b *Broker) unlockLog(lg *roomLog) { b.releaseLog(lg, true) }

func (b *Broker) releaseLog(lg *roomLog, locked bool) {
	if locked {
		<-lg.mu
	}
	b.logsMu.Lock()
	lg.refs--
	b.logsMu.Unlock()
}

// hasState reports whether a head names a live room: a record, not the
// server's marker or an empty log.
func hasState(h record) bool { return h.sseq > 0 && !h.marker() }

// current returns the room's head: the cached one, or one read from the
// stream's leader.
func (b *Broker) current(ctx context.Context, lg *roomLog, s subjects) (record, error) {
	if lg.known {
		return lg.head, nil
	}
	h, err := b.readHead(ctx, s)
	if err != nil {
		return record{}, err
	}
	lg.head, lg.known, lg.fresh, lg.completed = h, true, true, false
	return h, nil
}

// readHead reads the room's last record from the stream's leader: a record
// with sseq 0 when the log is empty.
func (b *Broker) readHead(ctx context.Context, s subjects) (record, error) {
	m, err := b.getLast(ctx, s.log)
	if errors.Is(err, errNotFound) {
		return record{}, nil
	}
	if err != nil {
		return record{}, err
	}
	r, err := decodeRecord(m.header, m.data)
	if err != nil {
		return record{}, err
	}
	r.sseq, r.stored = m.sseq, m.time
	return r, nil
}

// stale forgets the cached head.
func (lg *roomLog) stale() { lg.known = false }

// set records the head this node just appended.
func (lg *roomLog) set(r record) {
	lg.head, lg.known, lg.completed = r, true, r.key == ""
}

// backoff waits a little before another attempt at a contended append.
func backoff(ctx context.Context, attempt int) error {
	if attempt == 0 {
		return nil
	}
	d := time.Duration(rand.Int64N(int64(time.Millisecond) << min(attempt, 6)))
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// recordTTL is a new record's life: the longer of the history TTL and the
// room TTL, and never shorter than its predecessor's, so that the newest
// record is always the last to expire.
func (b *Broker) recordTTL(head record, age time.Duration) time.Duration {
	ttl := max(b.cfg.roomTTL, age, markerTTL)
	if hasState(head) && head.ttl > ttl {
		ttl = head.ttl
	}
	return ttl
}

// now is the time a record is stamped with, with no monotonic reading, so
// that it compares equal to the same time read back.
func now() time.Time { return time.Unix(0, time.Now().UnixNano()) }

// Publish appends data to the room's log as the room's next message (see
// the package documentation), or returns the first publish of o.Key.
func (b *Broker) Publish(ctx context.Context, room string, data []byte, o pubsub.PublishOptions) (pubsub.PublishResult, error) {
	if b.isClosed() {
		return pubsub.PublishResult{}, pubsub.ErrClosed
	}
	res, err := b.publish(ctx, room, data, o)
	if err != nil {
		return pubsub.PublishResult{}, fmt.Errorf("natsbroker: publish to room %q: %w", room, err)
	}
	return res, nil
}

func (b *Broker) publish(ctx context.Context, room string, data []byte, o pubsub.PublishOptions) (pubsub.PublishResult, error) {
	s := b.subjects(room)
	lg, err := b.lockLog(ctx, room)
	if err != nil {
		return pubsub.PublishResult{}, err
	}
	defer b.unlockLog(lg)
	kh := ""
	if o.Key != "" {
		kh = keyHash(o.Key)
	}
	for attempt := 0; ; attempt++ {
		if err := backoff(ctx, attempt); err != nil {
			return pubsub.PublishResult{}, err
		}
		head, err := b.current(ctx, lg, s)
		if err != nil {
			return pubsub.PublishResult{}, err
		}
		t := now()
		var keyRec keyRecord
		if kh != "" {
			dup, kr, err := b.checkKey(ctx, room, s, kh, head, t)
			if err != nil {
				return pubsub.PublishResult{}, err
			}
			if dup != nil {
				if !lg.fresh {
					lg.stale() // decide a duplicate on the room's true head only
					attempt = -1
					continue
				}
				return *dup, nil
			}
			keyRec = kr
		}
		if err := b.complete(ctx, s, lg, head, t); errors.Is(err, errConflict) {
			lg.stale()
			continue
		} else if err != nil {
			return pubsub.PublishResult{}, err
		}
		rec := b.nextMessage(head, data, o, kh, t)
		sseq, err := b.appendRecord(ctx, s.log, rec.header(), data, head.sseq)
		if errors.Is(err, errConflict) {
			lg.stale()
			continue
		}
		if err != nil {
			lg.stale()
			return pubsub.PublishResult{}, err
		}
		rec.sseq = sseq
		lg.set(rec)
		if kh != "" && !b.skipKeyRecords {
			// The message is stored: the publish succeeded whatever
			// happens to its key record, which is written meanwhile. The
			// next append on the room, from any node, makes sure it was
			// (see complete), and a resend finds the message as the head
			// until then.
			lg.keyWrite, lg.keyFor = b.writeKeyAsync(s, kh, keyOf(rec), keyRec.sseq), rec.id
		}
		b.trims.maybe(room, rec, lg)
		return pubsub.PublishResult{Message: rec.message(room)}, nil
	}
}

// nextMessage builds the message record that follows head.
func (b *Broker) nextMessage(head record, data []byte, o pubsub.PublishOptions, kh string, t time.Time) record {
	r := record{kind: kindMsg, id: uuid.NewString(), time: t, data: data, keep: max(o.History.Size, 0)}
	if r.keep > 0 && o.History.TTL > 0 {
		r.age = o.History.TTL
	}
	if hasState(head) {
		r.epoch, r.seq, r.ptr = head.epoch, head.seq+1, head.next()
	} else {
		r.epoch, r.seq = newEpoch(), 1
	}
	r.ttl = b.recordTTL(head, r.age)
	if kh != "" {
		r.key, r.until = kh, t.Add(max(o.KeyTTL, 0))
	}
	return r
}

// checkKey looks for the first publish of a key: the head itself, or the
// key's record. It returns the duplicate's result, or the key's record as
// it stands (its sseq is what a new key record expects).
func (b *Broker) checkKey(ctx context.Context, room string, s subjects, kh string, head record, t time.Time) (*pubsub.PublishResult, keyRecord, error) {
	if hasState(head) && head.kind == kindMsg && head.key == kh && head.until.After(t) {
		m := head.message(room)
		m.Data = nil
		return &pubsub.PublishResult{Message: m, Duplicate: true}, keyRecord{}, nil
	}
	kr, found, err := b.readKey(ctx, s, kh)
	if err != nil {
		return nil, keyRecord{}, err
	}
	if found && hasState(head) && kr.epoch == head.epoch && kr.until.After(t) {
		m := pubsub.Message{Kind: pubsub.KindMessage, Room: room, ID: kr.id, Epoch: kr.epoch, Seq: kr.seq, Time: kr.time}
		return &pubsub.PublishResult{Message: m, Duplicate: true}, keyRecord{}, nil
	}
	return nil, kr, nil
}

// readKey reads a key's record. When there is none, the result still
// carries the sseq of the subject's last message (the server's marker
// after a record expired), for the next write to expect.
func (b *Broker) readKey(ctx context.Context, s subjects, kh string) (keyRecord, bool, error) {
	m, err := b.getLast(ctx, s.keys+"."+kh)
	if errors.Is(err, errNotFound) {
		return keyRecord{}, false, nil
	}
	if err != nil {
		return keyRecord{}, false, err
	}
	if m.header.Get(hdrMarker) != "" {
		return keyRecord{sseq: m.sseq}, false, nil
	}
	kr, err := decodeKeyRecord(m.header)
	if err != nil {
		return keyRecord{}, false, err
	}
	kr.sseq = m.sseq
	return kr, true, nil
}

// writeKey writes a key's record, expecting the key's subject to end at
// expect. It lives until the key expires.
func (b *Broker) writeKey(ctx context.Context, s subjects, kh string, k keyRecord, expect uint64) error {
	_, err := b.appendRecord(ctx, s.keys+"."+kh, b.keyHeader(k, expect), nil, expect)
	return err
}

// writeKeyAsync starts writing a key's record, or returns nil when it
// cannot be sent.
func (b *Broker) writeKeyAsync(s subjects, kh string, k keyRecord, expect uint64) jetstream.PubAckFuture {
	if !b.nc.IsConnected() {
		return nil
	}
	f, err := b.js.PublishMsgAsync(&nats.Msg{Subject: s.keys + "." + kh, Header: b.keyHeader(k, expect)})
	if err != nil {
		return nil
	}
	return f
}

func (b *Broker) keyHeader(k keyRecord, expect uint64) nats.Header {
	h := k.header(max(time.Until(k.until), markerTTL))
	h.Set(hdrExpected, strconv.FormatUint(expect, 10))
	return h
}

// complete makes sure the head's key record is written before anything is
// appended after the head (see the package documentation: it is what
// makes a key's earlier messages findable). A head whose key has expired
// needs nothing.
func (b *Broker) complete(ctx context.Context, s subjects, lg *roomLog, head record, t time.Time) error {
	if lg.completed || !hasState(head) || head.kind != kindMsg || head.key == "" || !head.until.After(t) {
		return nil
	}
	if f := lg.keyWrite; f != nil && lg.keyFor == head.id {
		lg.keyWrite = nil
		select {
		case <-f.Ok():
			lg.completed = true
			return nil
		case <-f.Err(): // read it back, below
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	for range 2 {
		kr, found, err := b.readKey(ctx, s, head.key)
		if err != nil {
			return err
		}
		if found && kr.id == head.id {
			lg.completed = true
			return nil
		}
		err = b.writeKey(ctx, s, head.key, keyOf(head), kr.sseq)
		if err == nil {
			lg.completed = true
			return nil
		}
		if !errors.Is(err, errConflict) {
			return err
		}
		// Another node wrote it meanwhile: read it again.
	}
	// The key's subject holds another message's record: the head moved on.
	return errConflict
}

// open returns the room's head, starting the room's life (a new epoch, an
// open record at seq 0) when it has none, so the position a client learns
// stays valid.
func (b *Broker) open(ctx context.Context, room string, s subjects) (record, error) {
	lg, err := b.lockLog(ctx, room)
	if err != nil {
		return record{}, err
	}
	defer b.unlockLog(lg)
	lg.stale()
	for attempt := 0; ; attempt++ {
		if err := backoff(ctx, attempt); err != nil {
			return record{}, err
		}
		head, err := b.current(ctx, lg, s)
		if err != nil {
			return record{}, err
		}
		if hasState(head) {
			return head, nil
		}
		rec := record{kind: kindOpen, epoch: newEpoch(), time: now()}
		rec.ttl = b.recordTTL(head, 0)
		sseq, err := b.appendRecord(ctx, s.log, rec.header(), nil, head.sseq)
		if errors.Is(err, errConflict) {
			lg.stale()
			continue
		}
		if err != nil {
			lg.stale()
			return record{}, err
		}
		rec.sseq = sseq
		lg.set(rec)
		return rec, nil
	}
}

// touch appends a touch record to a live room whose head expires before
// by: the room's state lives WithRoomTTL longer. It does nothing to a room
// with no state (its subscribers were reset when it was lost).
func (b *Broker) touch(ctx context.Context, room string, by time.Time) error {
	s := b.subjects(room)
	lg, err := b.lockLog(ctx, room)
	if err != nil {
		return err
	}
	defer b.unlockLog(lg)
	lg.stale()
	for attempt := 0; ; attempt++ {
		if err := backoff(ctx, attempt); err != nil {
			return err
		}
		head, err := b.current(ctx, lg, s)
		if err != nil || !hasState(head) {
			return err
		}
		if !head.stored.IsZero() && head.stored.Add(head.ttl).After(by) {
			return nil // appended since the caller looked
		}
		t := now()
		if err := b.complete(ctx, s, lg, head, t); errors.Is(err, errConflict) {
			lg.stale()
			continue
		} else if err != nil {
			return err
		}
		rec := record{kind: kindTouch, epoch: head.epoch, seq: head.seq, time: t, keep: head.keep, age: head.age, ptr: head.next()}
		rec.ttl = b.recordTTL(head, rec.age)
		sseq, err := b.appendRecord(ctx, s.log, rec.header(), nil, head.sseq)
		if errors.Is(err, errConflict) {
			lg.stale()
			continue
		}
		if err != nil {
			lg.stale()
			return err
		}
		rec.sseq = sseq
		lg.set(rec)
		return nil
	}
}

// History returns the room's position and the kept messages q selects. A
// room with no state gets one (a new epoch), so the position a client
// learns stays valid.
func (b *Broker) History(ctx context.Context, room string, q pubsub.HistoryQuery) (pubsub.HistoryResult, error) {
	if b.isClosed() {
		return pubsub.HistoryResult{}, pubsub.ErrClosed
	}
	res, err := b.history(ctx, room, q)
	if err != nil {
		return pubsub.HistoryResult{}, fmt.Errorf("natsbroker: history of room %q: %w", room, err)
	}
	return res, nil
}

func (b *Broker) history(ctx context.Context, room string, q pubsub.HistoryQuery) (pubsub.HistoryResult, error) {
	s := b.subjects(room)
	head, err := b.readHead(ctx, s)
	if err != nil {
		return pubsub.HistoryResult{}, err
	}
	if !hasState(head) {
		if head, err = b.open(ctx, room, s); err != nil {
			return pubsub.HistoryResult{}, err
		}
	}
	res := pubsub.HistoryResult{Epoch: head.epoch, Top: head.seq}
	if q.Limit <= 0 {
		return res, nil
	}
	lo := q.Since
	if kept := uint64(head.keep); head.seq > kept && head.seq-kept > lo {
		lo = head.seq - kept // older ones are past the size bound
	}
	if q.Latest && head.seq > lo && head.seq-lo > uint64(q.Limit) {
		lo = head.seq - uint64(q.Limit)
	}
	if lo >= head.seq {
		return res, nil
	}
	var msgs []pubsub.Message
	err = b.readRange(ctx, s, head, lo, func(r record) bool {
		msgs = append(msgs, r.message(room))
		return true
	})
	if err != nil {
		return pubsub.HistoryResult{}, err
	}
	if head.age > 0 {
		cutoff := time.Now().Add(-head.age)
		old := 0
		for old < len(msgs) && msgs[old].Time.Before(cutoff) {
			old++
		}
		msgs = msgs[old:]
	}
	if len(msgs) > q.Limit {
		if q.Latest {
			msgs = msgs[len(msgs)-q.Limit:]
		} else {
			msgs = msgs[:q.Limit]
		}
	}
	res.Messages = msgs
	return res, nil
}

// readRange calls fn, in order, for the messages of head's epoch with a
// seq above lo, up to the head, as far as they follow one another with no
// hole, until fn returns false. It finds where to start from the anchors,
// then reads forward in batches.
func (b *Broker) readRange(ctx context.Context, s subjects, head record, lo uint64, fn func(record) bool) error {
	start := uint64(1)
	p := head.ptr
	for p.sseq > 0 && p.seq > lo {
		var r record
		_, err := b.direct(ctx, map[string]any{"seq": p.sseq}, func(m stored) bool {
			if m.subject == s.log {
				r, _ = decodeRecord(m.header, m.data)
			}
			return false
		})
		if errors.Is(err, errNotFound) || r.epoch != head.epoch || r.marker() {
			p = anchor{} // trimmed: whatever is left of the log is recent enough
			break
		}
		if err != nil {
			return err
		}
		p = r.ptr
	}
	if p.sseq > 0 {
		start = p.sseq
	}
	next := lo
	return b.scan(ctx, s.log, start, head.sseq, func(r record) bool {
		if r.kind != kindMsg || r.epoch != head.epoch || r.seq <= next {
			return true
		}
		if r.seq != next+1 && next != lo {
			return false // a hole: nothing past it
		}
		if r.seq > head.seq {
			return false
		}
		next = r.seq
		return fn(r) && next < head.seq
	})
}

// scanAttempts bounds how often a scan reads again when it stopped short
// of the record it was told exists (a replica serving the direct get lags
// its leader by a few milliseconds).
const scanAttempts = 5

// scan calls fn for each record of the log subject stored from stream
// sequence from through through, in order, until fn returns false.
func (b *Broker) scan(ctx context.Context, subject string, from, through uint64, fn func(record) bool) error {
	for attempt := 0; from <= through; attempt++ {
		stop := false
		err := b.each(ctx, subject, from, func(m stored) bool {
			if m.sseq > through {
				stop = true
				return false
			}
			from = m.sseq + 1
			r, err := decodeRecord(m.header, m.data)
			if err != nil {
				return true // not a record: skip it
			}
			r.sseq, r.stored = m.sseq, m.time
			if !fn(r) {
				stop = true
				return false
			}
			return true
		})
		if err != nil || stop || from > through || attempt+1 >= scanAttempts {
			return err
		}
		if err := backoff(ctx, attempt+3); err != nil {
			return err
		}
	}
	return nil
}
