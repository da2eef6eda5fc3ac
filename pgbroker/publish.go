package pgbroker

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"github.com/google/uuid"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/roomcast/pubsub"
)

// maxBatchBytes bounds the payload bytes one batch carries.
const maxBatchBytes = 8 << 20

// batchTimeout bounds a batch whose publishers set no deadline.
const batchTimeout = 30 * time.Second

// maxKeyBytes: longer idempotency keys are stored as their SHA-256.
const maxKeyBytes = 200

// publishCall is one publish on its way through a batch.
type publishCall struct {
	ctx     context.Context
	room    string
	data    []byte
	key     string // "" for none
	keyTTL  int64  // µs
	size    int32  // -1 keeps the room's bounds
	ttl     int64  // µs
	archive bool
	done    chan publishDone // capacity 1; finish is called once
}

type publishDone struct {
	res pubsub.PublishResult
	err error
}

func (c *publishCall) finish(res pubsub.PublishResult, err error) {
	c.done <- publishDone{res, err}
}

// call prepares a publish of data into room with o; keep makes it keep the
// room's history bounds instead of o.History.
func (b *Broker) call(ctx context.Context, room string, data []byte, o pubsub.PublishOptions, keep bool) (*publishCall, error) {
	if len(room) > MaxRoomNameBytes {
		return nil, ErrRoomName
	}
	c := &publishCall{
		ctx: ctx, room: room, data: data, key: o.Key, keyTTL: max(us(o.KeyTTL), 1),
		size: int32(min(max(o.History.Size, 0), maxHistorySize)), ttl: us(o.History.TTL),
		done: make(chan publishDone, 1),
	}
	if c.size == 0 {
		c.ttl = 0
	}
	if keep {
		c.size = -1
	}
	if len(c.key) > maxKeyBytes {
		sum := sha256.Sum256([]byte(c.key))
		c.key = "sha256:" + hex.EncodeToString(sum[:])
	}
	if b.cfg.archive != nil {
		c.archive = b.cfg.archive(room)
	}
	return c, nil
}

// Publish sequences data in the room: its row is inserted, and the room's
// sequence advanced, in one transaction, so the message is in the table
// (the truth every node reads) before Publish returns. Concurrent
// publishes on this node share a transaction and its commit (see
// WithPublishConns, WithMaxBatch). With o.History.Size > 0 and no TTL,
// messages have no age bound. An error means the publish failed, or that
// its outcome is unknown (the connection broke during the commit, ctx
// ended first): an idempotency key makes the retry safe.
func (b *Broker) Publish(ctx context.Context, room string, data []byte, o pubsub.PublishOptions) (pubsub.PublishResult, error) {
	res, err := b.publish(ctx, room, data, o)
	if err != nil && !errors.Is(err, pubsub.ErrClosed) && !errors.Is(err, ErrRoomName) {
		err = fmt.Errorf("pgbroker: publish to room %q: %w", room, err)
	}
	return res, err
}

func (b *Broker) publish(ctx context.Context, room string, data []byte, o pubsub.PublishOptions) (pubsub.PublishResult, error) {
	b.mu.Lock()
	closed, bound := b.closed, b.deliver != nil
	b.mu.Unlock()
	if closed {
		return pubsub.PublishResult{}, pubsub.ErrClosed
	}
	c, err := b.call(ctx, room, data, o, false)
	if err != nil {
		return pubsub.PublishResult{}, err
	}
	if !bound {
		// No publishers run before Bind: publish on its own.
		b.run(ctx, b.pool, []*publishCall{c}, lockWait)
		d := <-c.done
		return d.res, d.err
	}
	select {
	case b.queue <- c:
	case <-ctx.Done():
		return pubsub.PublishResult{}, ctx.Err()
	case <-b.ctx.Done():
		return pubsub.PublishResult{}, pubsub.ErrClosed
	}
	select {
	case d := <-c.done:
		return d.res, d.err
	case <-ctx.Done():
	case <-b.ctx.Done():
	}
	select {
	case d := <-c.done: // it finished meanwhile
		return d.res, d.err
	default:
	}
	if ctx.Err() != nil {
		return pubsub.PublishResult{}, ctx.Err()
	}
	return pubsub.PublishResult{}, pubsub.ErrClosed
}

// PublishTx publishes data into room as part of the host's transaction
// tx: subscribers on every node get it if and only if tx commits, in
// commit order, and a rollback publishes nothing. It applies the bounds
// of WithTxHistory (by default the room keeps its own). tx must be on the
// database the broker uses.
//
// The room's sequence is a row the publish updates: it stays locked until
// tx ends, so seqs follow commit order with no gap, and every other
// publish to the room, on any node, waits for tx to commit or roll back.
// Keep such transactions short, and publish to several rooms in one
// transaction in a consistent order (PostgreSQL resolves a deadlock by
// failing one of the transactions). Under REPEATABLE READ or SERIALIZABLE
// isolation, a concurrent publish to the room makes tx fail with a
// serialization error, to be retried as usual. An error from PublishTx
// leaves tx aborted: roll it back.
//
// The message is sequenced, and its Time taken, when PublishTx runs; it
// becomes visible when tx commits, and nodes deliver it then, woken by the
// commit's NOTIFY (or by their poll, WithPollOnly).
func (b *Broker) PublishTx(ctx context.Context, tx pgx.Tx, room string, data []byte) (pubsub.Message, error) {
	var o pubsub.PublishOptions
	keep := b.cfg.txHistory == nil
	if !keep {
		o.History = *b.cfg.txHistory
	}
	res, err := b.publishTx(ctx, tx, room, data, o, keep)
	return res.Message, err
}

// PublishTxWith is PublishTx with options: the history bounds to apply,
// and an idempotency key (see pubsub.PublishOptions), for instance the id
// of the business event the message announces.
func (b *Broker) PublishTxWith(ctx context.Context, tx pgx.Tx, room string, data []byte, o pubsub.PublishOptions) (pubsub.PublishResult, error) {
	return b.publishTx(ctx, tx, room, data, o, false)
}

func (b *Broker) publishTx(ctx context.Context, tx pgx.Tx, room string, data []byte, o pubsub.PublishOptions, keep bool) (pubsub.PublishResult, error) {
	if b.isClosed() {
		return pubsub.PublishResult{}, pubsub.ErrClosed
	}
	c, err := b.call(ctx, room, data, o, keep)
	if err != nil {
		return pubsub.PublishResult{}, err
	}
	if _, err := b.exec(ctx, tx, []*publishCall{c}, lockWait); err != nil {
		return pubsub.PublishResult{}, fmt.Errorf("pgbroker: publish to room %q in a transaction: %w", room, err)
	}
	d := <-c.done
	return d.res, d.err
}

// publishLoop is one of the broker's publishers: it takes what is queued,
// up to a batch, and publishes it in one call. With several publishers a
// batch is sent while the previous one commits. It never waits for a room
// another transaction holds: those calls go to the waiters.
//
// The batch is as large as the concurrency: when the previous batch had k
// publishes, their publishers are likely to be back soon (they were
// woken as it committed), so it waits up to linger for the batch to reach
// k again before sending it. A lone publisher (k = 1) never waits.
func (b *Broker) publishLoop() {
	batch := make([]*publishCall, 0, b.cfg.maxBatch)
	linger := time.NewTimer(time.Hour)
	linger.Stop()
	defer linger.Stop()
	last := 1
	for {
		select {
		case <-b.ctx.Done():
			return
		case c := <-b.queue:
			batch = append(batch[:0], c)
		}
		size := len(batch[0].data)
		waiting := false
	fill:
		for len(batch) < b.cfg.maxBatch && size < maxBatchBytes {
			select {
			case c := <-b.queue:
				batch = append(batch, c)
				size += len(c.data)
				continue
			default:
			}
			if len(batch) >= last {
				break
			}
			if !waiting {
				waiting = true
				linger.Reset(lingerFor)
			}
			select {
			case c := <-b.queue:
				batch = append(batch, c)
				size += len(c.data)
			case <-linger.C:
				waiting = false
				break fill
			case <-b.ctx.Done():
				break fill
			}
		}
		if waiting && !linger.Stop() {
			<-linger.C
		}
		last = len(batch)
		ctx, cancel := b.batchContext(batch)
		busy := b.run(ctx, b.pool, batch, lockFree)
		if len(busy) > 0 {
			busy = b.run(ctx, b.pool, busy, lockCreate)
		}
		cancel()
		clear(batch)
		if len(busy) > 0 {
			b.wait(busy)
		}
	}
}

// lingerFor is the longest a publisher waits for a batch to grow back to
// the previous one's size. Woken together as their batch commits, 16
// publishers on 2 busy cores took longer than 200µs to come back, and the
// batches settled at about 11 of them; a batch costs the server about as
// much for 16 messages as for 11.
const lingerFor = time.Millisecond

// batchContext ends at Close, or at the latest deadline of the batch's
// publishers (batchTimeout when one has none).
func (b *Broker) batchContext(batch []*publishCall) (context.Context, context.CancelFunc) {
	var latest time.Time
	for _, c := range batch {
		d, ok := c.ctx.Deadline()
		if !ok {
			latest = time.Now().Add(batchTimeout)
			break
		}
		if d.After(latest) {
			latest = d
		}
	}
	return context.WithDeadline(b.ctx, latest)
}

// querier is a pool or a transaction.
type querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// The publish function's ways of locking the rooms (see its p_mode).
const (
	lockFree   = 0 // the rooms that exist and nobody holds, without waiting
	lockCreate = 1 // the rooms nobody holds, creating those that have no row, without waiting
	lockWait   = 2 // every room, waiting for each
)

// run publishes a batch and finishes every call in it, but those whose
// room another transaction holds, when mode does not wait: they are
// returned.
// A publisher whose context already ended is dropped first. A deadlock or
// a serialization failure (a host's transaction locking rooms in another
// order) is retried.
func (b *Broker) run(ctx context.Context, q querier, batch []*publishCall, mode int) (busy []*publishCall) {
	live := batch[:0:0]
	for _, c := range batch {
		if err := c.ctx.Err(); err != nil {
			c.finish(pubsub.PublishResult{}, err)
			continue
		}
		live = append(live, c)
	}
	for attempt := 0; len(live) > 0; attempt++ {
		busy, err := b.exec(ctx, q, live, mode)
		var pgErr *pgconn.PgError
		if err != nil && attempt < 3 && errors.As(err, &pgErr) && (pgErr.Code == "40P01" || pgErr.Code == "40001") {
			continue // nothing was published
		}
		if err != nil {
			for _, c := range live {
				c.finish(pubsub.PublishResult{}, err)
			}
			return nil
		}
		return busy
	}
	return nil
}

// wait hands calls whose room was busy to the waiters, room by room: a
// room is served by one waiter at a time, so rooms held for long take one
// waiter each at most.
func (b *Broker) wait(calls []*publishCall) {
	var fresh []string
	b.wmu.Lock()
	for _, c := range calls {
		w := b.waiting[c.room]
		if w == nil {
			w = &waitingRoom{}
			b.waiting[c.room] = w
			fresh = append(fresh, c.room)
		}
		w.calls = append(w.calls, c)
	}
	b.wmu.Unlock()
	for _, room := range fresh {
		select {
		case b.ready <- room:
		case <-b.ctx.Done():
			b.failWaiting(room)
		}
	}
}

// waitingRoom is a room's calls waiting for a waiter. It stays in the
// broker's waiting map while a waiter serves it.
type waitingRoom struct {
	calls []*publishCall
}

// failWaiting fails the calls waiting for room, at Close.
func (b *Broker) failWaiting(room string) {
	b.wmu.Lock()
	var calls []*publishCall
	if w := b.waiting[room]; w != nil {
		calls = w.calls
		delete(b.waiting, room)
	}
	b.wmu.Unlock()
	for _, c := range calls {
		c.finish(pubsub.PublishResult{}, pubsub.ErrClosed)
	}
}

// waitLoop is one of the broker's waiters: it publishes the calls of one
// busy room at a time, waiting for the room's lock (a host's transaction
// holds it, or another node's batch). Waiting room by room, on goroutines
// of their own, a long transaction holds up only its room's publishes
// (and, while every waiter waits on one, other busy rooms), never the
// batches of the rooms nobody holds.
func (b *Broker) waitLoop() {
	for {
		var room string
		select {
		case <-b.ctx.Done():
			return
		case room = <-b.ready:
		}
		for b.ctx.Err() == nil {
			b.wmu.Lock()
			w := b.waiting[room]
			if w == nil || len(w.calls) == 0 {
				delete(b.waiting, room) // served; its next busy calls queue it afresh
				b.wmu.Unlock()
				break
			}
			n := min(len(w.calls), b.cfg.maxBatch)
			batch := slices.Clone(w.calls[:n])
			w.calls = slices.Delete(w.calls, 0, n)
			b.wmu.Unlock()
			ctx, cancel := b.batchContext(batch)
			b.run(ctx, b.pool, batch, lockWait)
			cancel()
		}
	}
}

// exec calls the publish function for calls, sorted by room, and finishes
// each call it published (or found a duplicate of). With wait false, calls
// whose room was busy are left unfinished and returned. On an error it
// finishes none.
func (b *Broker) exec(ctx context.Context, q querier, calls []*publishCall, mode int) (busy []*publishCall, err error) {
	slices.SortStableFunc(calls, func(x, y *publishCall) int { return strings.Compare(x.room, y.room) })
	_, inTx := q.(pgx.Tx)
	if !inTx && !slices.ContainsFunc(calls, func(c *publishCall) bool { return c.key != "" || c.size < 0 }) {
		return b.execBatch(ctx, q, calls, mode)
	}
	n := len(calls)
	var (
		rooms   = make([]string, n)
		data    = make([][]byte, n)
		keys    = make([]string, n)
		keyTTLs = make([]int64, n)
		sizes   = make([]int32, n)
		ttls    = make([]int64, n)
		archive = make([]bool, n)
	)
	for i, c := range calls {
		rooms[i], data[i], keys[i], keyTTLs[i] = c.room, c.data, c.key, c.keyTTL
		sizes[i], ttls[i], archive[i] = c.size, c.ttl, c.archive
		if data[i] == nil {
			data[i] = []byte{} // NULL is not an empty payload
		}
	}
	// In a host's transaction the nodes are woken by its commit's NOTIFY
	// (nobody listens when polling only).
	notify := inTx && !b.cfg.pollOnly
	rows, err := q.Query(ctx, b.sql.publish, rooms, data, keys, keyTTLs, sizes, ttls, archive, us(b.cfg.window), mode, notify)
	if err != nil {
		return nil, err
	}
	type outcome struct {
		item      int32
		epoch, id *string
		seq       *int64
		at        *time.Time
		dup, busy bool
	}
	var outs []outcome
	for rows.Next() {
		var o outcome
		if err := rows.Scan(&o.item, &o.epoch, &o.seq, &o.id, &o.at, &o.dup, &o.busy); err != nil {
			rows.Close()
			return nil, err
		}
		if o.item < 1 || int(o.item) > n || (!o.busy && (o.epoch == nil || o.id == nil || o.seq == nil || o.at == nil)) {
			rows.Close()
			return nil, fmt.Errorf("the publish function returned a malformed row for item %d of %d", o.item, n)
		}
		outs = append(outs, o)
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	if len(outs) != n {
		return nil, fmt.Errorf("the publish function returned %d rows for %d items", len(outs), n)
	}
	// Only now is it committed (or, in a host's transaction, done).
	var woken []string
	for _, o := range outs {
		c := calls[o.item-1]
		if o.busy {
			busy = append(busy, c)
			continue
		}
		m := pubsub.Message{Kind: pubsub.KindMessage, Room: c.room, ID: *o.id, Epoch: *o.epoch, Seq: uint64(*o.seq), Time: *o.at}
		if !o.dup {
			m.Data = c.data
			if len(woken) == 0 || woken[len(woken)-1] != c.room {
				woken = append(woken, c.room)
			}
		}
		c.finish(pubsub.PublishResult{Message: m, Duplicate: o.dup}, nil)
	}
	if !inTx {
		// This node's subscribers need not wait for the NOTIFY.
		b.mark(woken...)
		b.notify(woken)
	}
	return busy, nil
}

// notify hands rooms whose publishes committed to the notifier; before
// Bind, when there is none, it notifies itself.
func (b *Broker) notify(rooms []string) {
	if b.cfg.pollOnly || len(rooms) == 0 {
		return
	}
	if !b.bound() {
		ctx, cancel := context.WithTimeout(b.ctx, b.timeout())
		defer cancel()
		_, _ = b.pool.Exec(ctx, b.sql.wake, notifyPayloads(rooms)) // best effort: the nodes poll too
		return
	}
	b.nmu.Lock()
	for _, room := range rooms {
		b.notifyTo[room] = true
	}
	b.nmu.Unlock()
	select {
	case b.notifyUp <- struct{}{}:
	default:
	}
}

// notifyLoop is the broker's notifier: it wakes the other nodes for the
// rooms this node published to, in a transaction of its own after the
// publishes committed (see the notify function), the rooms of every batch
// that committed meanwhile in one call. A notification that fails is
// logged; the nodes read the rooms at their next poll.
func (b *Broker) notifyLoop() {
	var failing failure
	for {
		select {
		case <-b.ctx.Done():
			return
		case <-b.notifyUp:
		}
		b.nmu.Lock()
		rooms := make([]string, 0, len(b.notifyTo))
		for room := range b.notifyTo {
			rooms = append(rooms, room)
		}
		clear(b.notifyTo)
		b.nmu.Unlock()
		ctx, cancel := context.WithTimeout(b.ctx, b.timeout())
		_, err := b.pool.Exec(ctx, b.sql.wake, notifyPayloads(rooms))
		cancel()
		failing.report(b, err, "notifying the other nodes failed; they read what was published at their next poll")
	}
}

// maxNotifyPayload bounds the bytes of one notification's payload
// (PostgreSQL's limit is 8,000).
const maxNotifyPayload = 7900

// notifyPayloads are the notifications that wake the nodes for rooms, as
// the schema's notify function makes them: "m" then, per room, its name's
// length in bytes, ":" and the name, up to maxNotifyPayload bytes each.
func notifyPayloads(rooms []string) []string {
	var out []string
	var p []byte
	for _, room := range rooms {
		item := strconv.Itoa(len(room)) + ":" + room
		if len(p) > 1 && len(p)+len(item) > maxNotifyPayload {
			out = append(out, string(p))
			p = p[:0]
		}
		if len(p) == 0 {
			p = append(p, 'm')
		}
		p = append(p, item...)
	}
	if len(p) > 0 {
		out = append(out, string(p))
	}
	return out
}

// execBatch is exec for calls with no idempotency key, sorted by room,
// outside a host's transaction: the publish_batch function, which returns
// one row per room rather than per message. On the pool it sends the
// notification in the same round trip (see queryPipelined).
func (b *Broker) execBatch(ctx context.Context, q querier, calls []*publishCall, mode int) (busy []*publishCall, err error) {
	n := len(calls)
	var (
		rooms   = make([]string, n)
		ids     = make([][16]byte, n) // plain arrays: pgx encodes a string, or a uuid.UUID (a driver.Valuer, giving a string), for uuid[] only after failing to in binary
		ks      = make([]int32, n)
		data    = make([][]byte, n)
		last    = make([]bool, n)
		sizes   = make([]int32, n)
		ttls    = make([]int64, n)
		archive = make([]bool, n)
		woken   []string
	)
	for i, c := range calls {
		rooms[i], ids[i], data[i], sizes[i], ttls[i], archive[i] = c.room, [16]byte(uuid.New()), c.data, c.size, c.ttl, c.archive
		if data[i] == nil {
			data[i] = []byte{} // NULL is not an empty payload
		}
		ks[i] = 1
		if i > 0 && rooms[i-1] == c.room {
			ks[i] = ks[i-1] + 1
		}
		last[i] = i == n-1 || calls[i+1].room != c.room
		if last[i] {
			woken = append(woken, c.room)
		}
	}
	args := []any{rooms, ids, ks, data, last, sizes, ttls, archive, us(b.cfg.window), mode}
	var (
		got      map[string]position
		notified bool
	)
	if _, onPool := q.(*pgxpool.Pool); onPool && b.pipelines() {
		got, notified, err = b.queryPipelined(ctx, args, mode, woken)
	} else {
		got, err = queryBatch(ctx, q, b.sql.publishBatch, args)
	}
	if err != nil {
		return nil, err
	}
	// Only now is it committed.
	woken = woken[:0]
	for i, c := range calls {
		p, ok := got[c.room]
		if !ok {
			busy = append(busy, c)
			continue
		}
		if last[i] {
			woken = append(woken, c.room)
		}
		c.finish(pubsub.PublishResult{Message: pubsub.Message{
			Kind: pubsub.KindMessage, Room: c.room, ID: uuid.UUID(ids[i]).String(), Epoch: p.epoch, Seq: uint64(p.base) + uint64(ks[i]), Time: p.at, Data: c.data,
		}}, nil)
	}
	b.mark(woken...)
	if !notified {
		b.notify(woken)
	}
	return busy, nil
}

// queryBatch runs publish_batch with args on q and returns its rows.
func queryBatch(ctx context.Context, q querier, sql string, args []any) (map[string]position, error) {
	rows, err := q.Query(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	got := make(map[string]position)
	for rows.Next() {
		var (
			room string
			p    position
		)
		if err := rows.Scan(&room, &p.epoch, &p.base, &p.at); err != nil {
			rows.Close()
			return nil, err
		}
		got[room] = p
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	return got, nil
}
