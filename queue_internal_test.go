package pubsub

import (
	"testing"
	"time"
)

// The outbound queue on its own: bounds, the three slow-consumer policies,
// take and recycle. The end-to-end behaviour, through real clients, is in
// queue_test.go.

// drops records what a queue's policies discarded, per room.
type drops map[*room]int

func (d drops) countDrop(r *room) { d[r]++ }

func roomWith(name string, p SlowConsumerPolicy) *room {
	return &room{name: name, opts: RoomOptions{SlowConsumer: p}}
}

func frameOf(r *room, seq uint64, size int) *frame {
	f := newRoomFrame(Message{Kind: KindMessage, Room: r.name, Seq: seq, Time: time.Now(), Data: make([]byte, size)}, r)
	return f
}

// seqsQueued lists the seqs of the frames queued, nils (dropped) aside.
func seqsQueued(q *queue) []uint64 {
	var out []uint64
	for _, f := range q.frames {
		if f != nil {
			out = append(out, f.m.Seq)
		}
	}
	return out
}

func checkSeqs(t *testing.T, what string, got []uint64, want ...uint64) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %v, want %v", what, got, want)
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("%s: %v, want %v", what, got, want)
		}
	}
}

func TestQueueDisconnectPolicyOverflowsPastEitherBound(t *testing.T) {
	t.Parallel()
	r := roomWith("d", SlowConsumerDisconnect)
	for _, lim := range []queueLimits{{messages: 2, bytes: 1 << 20}, {messages: 100, bytes: 25}} {
		var q queue
		d := drops{}
		if q.push(frameOf(r, 1, 10), lim, d) != queued || q.push(frameOf(r, 2, 10), lim, d) != queued {
			t.Fatalf("%+v: the first two frames were not queued", lim)
		}
		if out := q.push(frameOf(r, 3, 10), lim, d); out != overflow {
			t.Fatalf("%+v: a third frame: %v, want overflow", lim, out)
		}
		checkSeqs(t, "queued", seqsQueued(&q), 1, 2)
		if len(d) != 0 || q.len() != 2 || q.size() != 20 {
			t.Fatalf("%+v: drops %v, len %d, size %d; want none, 2, 20", lim, d, q.len(), q.size())
		}
	}
}

func TestQueueDropOldestDiscardsTheOldestOfItsRoomsForAnyRoom(t *testing.T) {
	t.Parallel()
	lim := queueLimits{messages: 3, bytes: 1 << 20}
	old, other := roomWith("old", SlowConsumerDropOldest), roomWith("other", SlowConsumerDisconnect)
	var q queue
	d := drops{}
	q.push(frameOf(old, 1, 1), lim, d)
	q.push(frameOf(other, 1, 1), lim, d)
	q.push(frameOf(old, 2, 1), lim, d)
	// Full: a Disconnect room's frame evicts the oldest drop-oldest frame,
	// counted against its own room.
	if out := q.push(frameOf(other, 2, 1), lim, d); out != queued {
		t.Fatalf("a frame of another room: %v, want queued", out)
	}
	if d[old] != 1 || d[other] != 0 || q.len() != 3 {
		t.Fatalf("drops %v, len %d; want one of room old, 3 queued", d, q.len())
	}
	// The room's own new frame evicts its older one the same way.
	if out := q.push(frameOf(old, 3, 1), lim, d); out != queued || d[old] != 2 {
		t.Fatalf("push: %v, drops %v; want queued and two of room old dropped", out, d)
	}
	checkSeqs(t, "queued", seqsQueued(&q), 1, 2, 3)
	// With no drop-oldest frame queued, a drop-oldest frame is itself dropped.
	var q2 queue
	d2 := drops{}
	q2.push(frameOf(other, 1, 1), lim, d2)
	q2.push(frameOf(other, 2, 1), lim, d2)
	q2.push(frameOf(other, 3, 1), lim, d2)
	if out := q2.push(frameOf(old, 1, 1), lim, d2); out != dropped || d2[old] != 1 {
		t.Fatalf("a drop-oldest frame into a queue full of others: %v, drops %v; want dropped and counted", out, d2)
	}
}

func TestQueueKeepLatestReplacesItsRoomsFrameFullOrNot(t *testing.T) {
	t.Parallel()
	lim := queueLimits{messages: 2, bytes: 1 << 20}
	tick, other := roomWith("tick", SlowConsumerKeepLatest), roomWith("other", SlowConsumerDisconnect)
	var q queue
	d := drops{}
	q.push(frameOf(tick, 1, 1), lim, d)
	q.push(frameOf(tick, 2, 1), lim, d) // replaces 1, not full
	checkSeqs(t, "after a replacement", seqsQueued(&q), 2)
	q.push(frameOf(other, 1, 1), lim, d)
	q.push(frameOf(tick, 3, 1), lim, d) // replaces 2 in place, queue full
	checkSeqs(t, "after a replacement in a full queue", seqsQueued(&q), 3, 1)
	if d[tick] != 2 {
		t.Fatalf("drops %v, want two of room tick", d)
	}
	// A second keep-latest room may exceed the bound by its one frame.
	tock := roomWith("tock", SlowConsumerKeepLatest)
	if out := q.push(frameOf(tock, 1, 1), lim, d); out != queued || q.len() != 3 {
		t.Fatalf("another keep-latest room into a full queue: %v, len %d; want queued past the bound", out, q.len())
	}
	// Replayed frames are queued, never replaced.
	rep := frameOf(tick, 1, 1)
	rep.replay = true
	q.push(rep, lim, d)
	q.push(frameOf(tick, 4, 1), lim, d)
	checkSeqs(t, "a replayed frame stays", seqsQueued(&q), 4, 1, 1, 1)
}

func TestQueueTakeEmptiesAndRecycleReusesTheArray(t *testing.T) {
	t.Parallel()
	lim := queueLimits{messages: 8, bytes: 1 << 20}
	r := roomWith("r", SlowConsumerKeepLatest)
	var q queue
	d := drops{}
	q.push(frameOf(r, 1, 5), lim, d)
	batch := q.take()
	if len(batch) != 1 || q.len() != 0 || q.size() != 0 || len(q.latest) != 0 {
		t.Fatalf("take: %d frames, queue left with len %d size %d latest %v", len(batch), q.len(), q.size(), q.latest)
	}
	clear(batch)
	q.recycle(batch, lim)
	q.push(frameOf(r, 2, 5), lim, d)
	q.take() // the recycled array becomes the queue's
	q.push(frameOf(r, 3, 5), lim, d)
	if &q.frames[:1][0] != &batch[:1][0] {
		t.Fatal("the recycled array was not reused after the next take")
	}
	if d[r] != 0 {
		t.Fatalf("a frame pushed after take replaced one already taken: drops %v", d)
	}
}

func TestQueuePushIfRoomSkipsAFullQueue(t *testing.T) {
	t.Parallel()
	lim := queueLimits{messages: 1, bytes: 1 << 20}
	var q queue
	if !q.pushIfRoom(pingFrame, lim) || q.pushIfRoom(pingFrame, lim) {
		t.Fatal("pushIfRoom: want the first queued and the second skipped")
	}
}

func TestQueueLagIsTheAgeOfTheOldestTimedFrame(t *testing.T) {
	t.Parallel()
	lim := queueLimits{messages: 8, bytes: 1 << 20}
	var q queue
	now := time.Now()
	if q.lag(now) != 0 {
		t.Fatal("an empty queue lags")
	}
	q.push(newControlFrame([]byte(`{"type":"ack","id":"1"}`)), lim, drops{})
	f := frameOf(roomWith("r", SlowConsumerDisconnect), 1, 1)
	f.at = now.Add(-time.Second)
	q.push(f, lim, drops{})
	if got := q.lag(now); got != time.Second {
		t.Fatalf("lag %v, want 1s (a control frame has no time)", got)
	}
}
