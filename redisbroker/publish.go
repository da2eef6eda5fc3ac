package redisbroker

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"
	"github.com/roomcast/pubsub"
)

// Publishing in batches.
//
// Concurrent publishes are queued and sent together: one run of
// publishScript carries every message queued when its batch left (up to
// maxBatch messages, maxBatchBytes of payload), for any number of rooms,
// grouped by room in the order they were queued. At most
// WithPublishBatches batches are in flight at once, each on a lane of its
// own (a pooled connection while it runs). A lone publish is a batch of
// one: one round trip, as before; under load Redis runs one script per
// batch instead of one per message, and the calls a script makes per room
// are shared by the room's messages in the batch.
//
// There is no goroutine of the broker's own here: the publisher that finds
// a lane free leads (sends) the next batch, whose first message is its
// own; when the batch is answered it hands the lane to the first
// publisher still queued (who leads the next one) or, with nobody queued,
// frees it. A leader waits for its batch even when its ctx ends, since the
// others' results depend on it, so a Publish can return up to one Redis
// round trip (bounded by the client's timeouts) after its ctx ended; a
// queued publisher whose ctx ends leaves the queue and returns at once.
//
// A resent batch (go-redis resends a command whose reply it lost) never
// sequences a message twice: each lane keeps, in Redis, the id and result
// of the last batch it ran, and the script returns that result when it
// meets its own batch id there (see publishScript). One record per lane,
// not per batch, keeps Redis's memory bounded whatever the publish rate;
// it is enough because a lane sends its next batch only after the
// previous one's call returned, retries included.
const (
	maxBatch      = 256
	maxBatchBytes = 1 << 20
	// linger bounds how long a leader waits for its batch to grow back to
	// the previous batch's size: the publishers that batch answered are
	// about to publish again, and one script for all of them costs Redis
	// much less than several. A lone publisher (batches of one) never
	// waits.
	linger = 300 * time.Microsecond
)

// pubReq is one queued publish.
type pubReq struct {
	ctx   context.Context
	room  string
	data  []byte
	o     pubsub.PublishOptions
	id    string
	done  chan pubDone // one value: the lane to lead with, or the result
	state reqState     // guarded by the broker's pmu
}

type reqState uint8

const (
	reqQueued  reqState = iota // waiting in the queue
	reqLeading                 // given a lane: it sends the next batch
	reqTaken                   // in a batch; its result comes on done
)

type pubDone struct {
	lane string // non-empty: lead the next batch on this lane
	res  pubsub.PublishResult
	err  error
}

// Publish queues the message for the next batch and returns its result.
// See the package documentation for what one batch does in Redis. With
// h.Size > 0 and no h.TTL, messages have no age bound and the history
// lives as long as the room's state (WithRoomTTL). An idempotency key is a
// key of the room's own (so it shares the room's cluster slot) that
// expires with o.KeyTTL; a key whose message belongs to an older epoch of
// the room no longer counts.
func (b *Broker) Publish(ctx context.Context, room string, data []byte, o pubsub.PublishOptions) (pubsub.PublishResult, error) {
	if b.isClosed() {
		return pubsub.PublishResult{}, pubsub.ErrClosed
	}
	r := &pubReq{ctx: ctx, room: room, data: data, o: o, id: uuid.NewString(), done: make(chan pubDone, 1)}
	b.pmu.Lock()
	b.queue = append(b.queue, r)
	b.queued++
	if b.grown != nil && b.queued >= b.want {
		close(b.grown)
		b.grown = nil
	}
	if n := len(b.lanes); n > 0 {
		lane := b.lanes[n-1]
		b.lanes = b.lanes[:n-1]
		r.state = reqLeading
		b.queued--
		b.pmu.Unlock()
		return b.lead(r, lane)
	}
	b.pmu.Unlock()
	select {
	case d := <-r.done:
		if d.lane != "" {
			return b.lead(r, d.lane)
		}
		return d.res, d.err
	case <-ctx.Done():
	}
	b.pmu.Lock()
	switch r.state {
	case reqQueued:
		b.queue = remove(b.queue, r)
		b.queued--
		b.pmu.Unlock()
	case reqLeading: // the lane is already on its way: lead, or the others wait forever
		b.pmu.Unlock()
		return b.lead(r, (<-r.done).lane)
	case reqTaken: // sent, or about to be: its outcome is unknown
		b.pmu.Unlock()
	}
	return pubsub.PublishResult{}, fmt.Errorf("redisbroker: publish to room %q: %w", room, ctx.Err())
}

func remove(q []*pubReq, r *pubReq) []*pubReq {
	for i, x := range q {
		if x == r {
			return append(q[:i], q[i+1:]...)
		}
	}
	return q
}

// lead sends the next batch, starting with r, on lane, then hands the
// lane on, and returns r's result.
func (b *Broker) lead(r *pubReq, lane string) (pubsub.PublishResult, error) {
	b.grow()
	batch := b.take(r)
	b.run(lane, batch)
	b.pmu.Lock()
	handed := false
	for _, next := range b.queue {
		if next.state == reqQueued {
			next.state = reqLeading
			b.queued--
			next.done <- pubDone{lane: lane}
			handed = true
			break
		}
	}
	if !handed {
		b.lanes = append(b.lanes, lane)
	}
	b.pmu.Unlock()
	d := <-r.done
	return d.res, d.err
}

// take removes the next batch from the queue: r, then the queued
// publishes behind it, in order (on a Redis Cluster, only those of r's
// room: a script touches one slot). Publishes whose ctx ended are answered
// with its error and not sent.
func (b *Broker) take(r *pubReq) []*pubReq {
	b.pmu.Lock()
	defer b.pmu.Unlock()
	batch := make([]*pubReq, 0, min(len(b.queue), maxBatch))
	size := 0
	kept := b.queue[:0]
	for _, q := range b.queue {
		switch {
		case q != r && (q.state != reqQueued || len(batch) >= maxBatch || size+len(q.data) > maxBatchBytes ||
			(b.cluster && q.room != r.room)):
			kept = append(kept, q)
		case q.ctx.Err() != nil:
			if q.state == reqQueued {
				b.queued--
			}
			q.state = reqTaken
			q.done <- pubDone{err: fmt.Errorf("redisbroker: publish to room %q: %w", q.room, q.ctx.Err())}
		default:
			if q.state == reqQueued {
				b.queued--
			}
			q.state = reqTaken
			batch = append(batch, q)
			size += len(q.data)
		}
	}
	clear(b.queue[len(kept):])
	b.queue = kept
	b.last = len(batch)
	return batch
}

// grow waits, up to linger, until as many publishes are queued as the
// last batch carried (the leader's own counts: it is no longer queued).
// One leader at a time waits; another goes at once.
func (b *Broker) grow() {
	b.pmu.Lock()
	want := min(b.last, maxBatch) - 1
	if b.queued >= want || b.grown != nil {
		b.pmu.Unlock()
		return
	}
	grown := make(chan struct{})
	b.grown, b.want = grown, want
	b.pmu.Unlock()
	t := time.NewTimer(linger)
	select {
	case <-grown:
	case <-t.C:
	}
	t.Stop()
	b.pmu.Lock()
	if b.grown == grown {
		b.grown = nil
	}
	b.pmu.Unlock()
}

// run sends one batch and answers each of its publishes.
func (b *Broker) run(lane string, batch []*pubReq) {
	if len(batch) == 0 {
		return
	}
	groups := groupByRoom(batch)
	id := uuid.NewString()
	rkeys, args := b.batchArgs(lane, id, groups, len(batch))
	out, err := publishScript.Run(b.ctx, b.client, rkeys, args...).Text()
	if err == nil {
		var first string
		var ok bool
		if first, out, ok = field(out); !ok || first != id {
			err = errMalformed // not this batch's answer
		}
	}
	for _, g := range groups {
		for _, q := range g.reqs {
			var d pubDone
			if err == nil {
				var ok bool
				d.res, out, ok = parseResult(q, out)
				if !ok {
					err = errMalformed
				}
			}
			if err != nil {
				d = pubDone{err: fmt.Errorf("redisbroker: publish to room %q: %w", q.room, err)}
			}
			q.done <- d
		}
	}
}

// group is one room's publishes in a batch, in order.
type group struct {
	room string
	reqs []*pubReq
}

// groupByRoom groups a batch by room, keeping each room's order. A small
// batch (the usual one) is grouped without a map.
func groupByRoom(batch []*pubReq) []group {
	groups := make([]group, 0, min(len(batch), 8))
	var index map[string]int
	for _, q := range batch {
		i := -1
		if index != nil {
			if j, ok := index[q.room]; ok {
				i = j
			}
		} else {
			for j := range groups {
				if groups[j].room == q.room {
					i = j
					break
				}
			}
		}
		if i < 0 {
			i = len(groups)
			groups = append(groups, group{room: q.room})
			if index != nil {
				index[q.room] = i
			} else if len(groups) > 16 {
				index = make(map[string]int, len(batch))
				for j, g := range groups {
					index[g.room] = j
				}
			}
		}
		groups[i].reqs = append(groups[i].reqs, q)
	}
	return groups
}

// batchArgs is publishScript's KEYS and ARGV for a batch. Of a room's
// keys it makes only those the script uses.
func (b *Broker) batchArgs(lane, id string, groups []group, n int) ([]string, []any) {
	laneKey := b.cfg.prefix + ":l:" + lane
	if b.cluster {
		laneKey = b.cfg.prefix + ":{" + groups[0].room + "}:l:" + lane
	}
	rkeys := make([]string, 0, 1+2*len(groups)+n)
	args := make([]any, 0, 2+3*len(groups)+3*n)
	rkeys = append(rkeys, laneKey)
	args = append(args, id, b.idle)
	for _, g := range groups {
		base := b.cfg.prefix + ":{" + g.room + "}" // the room's channel; see keys
		h := g.reqs[0].o.History
		size := max(h.Size, 0)
		ttl := int64(0)
		if size > 0 {
			ttl = ms(h.TTL)
		}
		keyed := false
		for _, q := range g.reqs {
			if q.o.Key != "" {
				keyed = true
				break
			}
		}
		rkeys = append(rkeys, base+":m", base+":h")
		msgs := len(g.reqs)
		if keyed {
			msgs = -msgs // a keyed room: each message carries a key ttl
		}
		args = append(args, msgs, size, ttl)
		for _, q := range g.reqs {
			args = append(args, q.id, q.data)
			if !keyed {
				continue
			}
			kttl := int64(0)
			if q.o.Key != "" {
				rkeys = append(rkeys, base+":k:"+q.o.Key)
				kttl = max(ms(q.o.KeyTTL), 1)
			}
			args = append(args, kttl)
		}
	}
	return rkeys, args
}

// parseResult reads one message's result, f(epoch) f(seq) f(time) f(dup),
// off the front of out.
func parseResult(q *pubReq, out string) (pubsub.PublishResult, string, bool) {
	epoch, rest, ok1 := field(out)
	seqS, rest, ok2 := field(rest)
	ts, rest, ok3 := field(rest)
	dup, rest, ok4 := field(rest)
	if !ok1 || !ok2 || !ok3 || !ok4 {
		return pubsub.PublishResult{}, "", false
	}
	seq, err := strconv.ParseUint(seqS, 10, 64)
	t, tok := parseMicros(ts)
	if err != nil || !tok {
		return pubsub.PublishResult{}, "", false
	}
	m := pubsub.Message{Kind: pubsub.KindMessage, Room: q.room, ID: q.id, Epoch: epoch, Seq: seq, Time: t, Data: q.data}
	if dup != "" { // the key's first message
		m.ID, m.Data = dup, nil
		return pubsub.PublishResult{Message: m, Duplicate: true}, rest, true
	}
	return pubsub.PublishResult{Message: m}, rest, true
}

// isCluster says whether the client spreads keys over a Redis Cluster's
// slots, where one script may touch only one slot.
func isCluster(c redis.UniversalClient) bool {
	_, ok := c.(*redis.ClusterClient)
	return ok
}
