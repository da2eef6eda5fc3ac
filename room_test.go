package pubsub_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/roomcast/pubsub/pubsubtest"
)

// A room's fan-out (room.go), end to end: every subscriber gets every
// message once, numbered (epoch, seq) from 1 with no gap, in one order
// that keeps each publisher's own; and a room that empties keeps its
// epoch and sequence for a while. The memory broker that numbers the
// messages is tested on its own in memory_test.go.

// publishConcurrently starts publishers goroutines that each publish
// {"p":<its number>,"n":<i>} for i < each into room, and returns a func
// that waits for them. A Publish that fails fails the test.
func publishConcurrently(t *testing.T, srv *pubsubtest.Server, room string, publishers, each int) (wait func()) {
	ctx := pubsubtest.Context(t)
	var wg sync.WaitGroup
	for p := range publishers {
		wg.Go(func() {
			for n := range each {
				if err := srv.Handler.Publish(ctx, room, fmt.Appendf(nil, `{"p":%d,"n":%d}`, p, n)); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	return wg.Wait
}

// readInPublishOrder reads what publishConcurrently published, all of it,
// and checks that the messages are numbered 1, 2, ... in one non-empty
// epoch, with each publisher's messages in the order it published them.
func readInPublishOrder(t *testing.T, who string, p *pubsubtest.Conn, room string, publishers, each int) []pubsubtest.Envelope {
	t.Helper()
	got := make([]pubsubtest.Envelope, 0, publishers*each)
	next := make([]int, publishers) // each publisher's next n
	for k := range publishers * each {
		m := p.NextMessage(room)
		if m.Epoch == "" || (k > 0 && m.Epoch != got[0].Epoch) || m.Seq != uint64(k+1) {
			t.Fatalf("%s, message %d: %s, want seq %d in the room's one non-empty epoch", who, k, m, k+1)
		}
		var d struct{ P, N int }
		if err := json.Unmarshal(m.Data, &d); err != nil {
			t.Fatalf("data %s: %v", m.Data, err)
		}
		if d.N != next[d.P] {
			t.Fatalf("%s got publisher %d's message %d where %d was due: one publisher's order was lost", who, d.P, d.N, next[d.P])
		}
		next[d.P]++
		got = append(got, m)
	}
	return got
}

func TestProtocolRoomMessagesCarryEpochAndConsecutiveSeq(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	subs := []*pubsubtest.Conn{srv.Dial("/ws"), srv.Dial("/ws")}
	for _, p := range subs {
		p.Subscribe("seq")
	}
	for i := range 10 {
		srv.Publish("seq", fmt.Append(nil, i))
	}
	var epoch string
	for _, p := range subs {
		for i := range 10 {
			m := p.NextMessage("seq")
			if i == 0 && epoch == "" {
				epoch = m.Epoch
			}
			if m.Epoch == "" || m.Epoch != epoch || m.Seq != uint64(i+1) || string(m.Data) != fmt.Sprint(i) {
				t.Fatalf("message %d: %s, want epoch %q seq %d data %d", i, m, epoch, i+1, i)
			}
		}
	}
}

// TestProtocolConcurrentPublishersAllSubscribersSeeSameOrder: with several
// goroutines publishing into one room while its subscribers read, every
// subscriber sees the same (seq, payload) sequence, consecutive from 1,
// with each publisher's messages in the order it published them.
func TestProtocolConcurrentPublishersAllSubscribersSeeSameOrder(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	const publishers, each, subscribers = 4, 50, 3
	subs := make([]*pubsubtest.Conn, subscribers)
	for i := range subs {
		subs[i] = srv.Dial("/ws")
		subs[i].Subscribe("race")
	}
	defer publishConcurrently(t, srv, "race", publishers, each)() // waited for also when a check below fails
	type entry struct {
		seq  uint64
		data string
	}
	var first []entry
	for i, s := range subs {
		var got []entry
		for _, m := range readInPublishOrder(t, fmt.Sprint("subscriber ", i), s, "race", publishers, each) {
			got = append(got, entry{m.Seq, string(m.Data)})
		}
		if i == 0 {
			first = got
		} else if !slices.Equal(got, first) {
			t.Fatalf("subscriber %d saw a different order than subscriber 0", i)
		}
	}
}

// TestConcurrentPublishersAllSubscribersSeeOneGaplessSequence: the same,
// read once every publish returned, with each message's unique ID and
// time.
func TestConcurrentPublishersAllSubscribersSeeOneGaplessSequence(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	const (
		room       = "order"
		publishers = 4
		each       = 250
	)
	subs := make([]*pubsubtest.Conn, 3)
	for i := range subs {
		subs[i] = srv.Dial("/ws")
		subs[i].Subscribe(room)
	}
	start := time.Now()
	publishConcurrently(t, srv, room, publishers, each)()
	if t.Failed() {
		t.FailNow()
	}
	end := time.Now()

	var first []pubsubtest.Envelope
	for si, p := range subs {
		got := readInPublishOrder(t, fmt.Sprint("subscriber ", si), p, room, publishers, each)
		ids := make(map[string]bool, len(got))
		for _, e := range got {
			if e.MessageID == "" || ids[e.MessageID] {
				t.Fatalf("subscriber %d: seq %d has message_id %q: empty or already seen", si, e.Seq, e.MessageID)
			}
			ids[e.MessageID] = true
			if e.Time < start.Add(-time.Second).UnixMilli() || e.Time > end.Add(time.Second).UnixMilli() {
				t.Fatalf("subscriber %d: seq %d has time %d, want between %d and %d", si, e.Seq, e.Time, start.UnixMilli(), end.UnixMilli())
			}
		}
		if si == 0 {
			first = got
			continue
		}
		for k := range got {
			a, b := first[k], got[k]
			if a.Epoch != b.Epoch || a.MessageID != b.MessageID || !bytes.Equal(a.Data, b.Data) {
				t.Fatalf("seq %d differs between subscribers: %s vs %s", k+1, a, b)
			}
		}
	}
}

// visit subscribes p to room, publishes n messages into it, reads them
// and unsubscribes; it returns the messages.
func visit(t *testing.T, srv *pubsubtest.Server, p *pubsubtest.Conn, room string, n int) []pubsubtest.Envelope {
	t.Helper()
	p.Subscribe(room)
	for range n {
		srv.Publish(room, []byte("1"))
	}
	ms := p.Messages(room, n)
	p.Ack(pubsubtest.Fields{"type": "unsubscribe", "room": room})
	return ms
}

// TestProtocolRoomBackWithinTheGraceResumesItsSequence: a room that keeps
// no history keeps its epoch and sequence for a while after its last
// subscriber leaves (see IdleRoomGrace), so (epoch, seq) goes on where it
// was rather than naming a message twice. (Reclamation after the grace,
// with a new epoch, is tested on the broker with a fake clock.)
func TestProtocolRoomBackWithinTheGraceResumesItsSequence(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	p := srv.Dial("/ws")
	m1 := visit(t, srv, p, "life", 1)[0]
	m2 := visit(t, srv, p, "life", 1)[0]
	if m1.Epoch == "" || m1.Epoch != m2.Epoch || m1.Seq != 1 || m2.Seq != 2 {
		t.Fatalf("lives (%q, %d) and (%q, %d): want one epoch, seq 1 then 2", m1.Epoch, m1.Seq, m2.Epoch, m2.Seq)
	}
}

func TestRoomBackWithinTheGraceReachesClientsInTheSameEpoch(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	p := srv.Dial("/ws")
	ms := visit(t, srv, p, "r", 2) // idle after it, within the grace
	first, second := ms[0], ms[1]
	if first.Seq != 1 || second.Seq != 2 || second.Epoch != first.Epoch {
		t.Fatalf("messages %s, %s; want seq 1 and 2 in one epoch", first, second)
	}
	if again := visit(t, srv, p, "r", 1)[0]; again.Seq != 3 || again.Epoch != first.Epoch {
		t.Fatalf("back in the room: %s; want seq 3 in epoch %q", again, first.Epoch)
	}
}
