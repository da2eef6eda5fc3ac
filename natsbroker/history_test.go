package natsbroker_test

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/natsbroker"
	"github.com/roomcast/pubsub/pubsubtest"
)

// bound returns a broker bound to a deliver function that drops
// everything: for tests of publishing and reading.
func bound(t *testing.T, prefix string, opts ...natsbroker.Option) *natsbroker.Broker {
	t.Helper()
	b := newBroker(t, shared.URL, prefix, opts...)
	b.Bind(func(pubsub.Message) {})
	return b
}

func publishN(t *testing.T, b *natsbroker.Broker, room string, n int, h pubsub.HistoryOptions) []pubsub.Message {
	t.Helper()
	var out []pubsub.Message
	for i := range n {
		res, err := b.Publish(pubsubtest.Context(t), room, fmt.Append(nil, i+1), pubsub.PublishOptions{History: h})
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, res.Message)
	}
	return out
}

func seqsOf(ms []pubsub.Message) []uint64 {
	var out []uint64
	for _, m := range ms {
		out = append(out, m.Seq)
	}
	return out
}

func span(from, to uint64) []uint64 {
	var out []uint64
	for s := from; s <= to; s++ {
		out = append(out, s)
	}
	return out
}

// Reads by position in a long history: a read since any seq walks back
// the log's anchors (one every 32 messages) and returns exactly the
// messages after it, whichever node reads.
func TestHistoryReadsByPositionInALongLog(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	a, b := bound(t, p), bound(t, p)
	keep := pubsub.HistoryOptions{Size: 1000, TTL: time.Hour}
	all := publishN(t, a, "long", 300, keep)
	for _, c := range []struct {
		q        pubsub.HistoryQuery
		from, to uint64 // want seqs from..to; from > to: none
	}{
		{pubsub.HistoryQuery{Since: 0, Limit: 1000}, 1, 300},
		{pubsub.HistoryQuery{Since: 299, Limit: 10}, 300, 300},
		{pubsub.HistoryQuery{Since: 288, Limit: 10}, 289, 298},
		{pubsub.HistoryQuery{Since: 95, Limit: 40}, 96, 135},
		{pubsub.HistoryQuery{Since: 31, Limit: 3}, 32, 34},
		{pubsub.HistoryQuery{Since: 32, Limit: 3}, 33, 35},
		{pubsub.HistoryQuery{Since: 33, Limit: 300}, 34, 300},
		{pubsub.HistoryQuery{Limit: 5, Latest: true}, 296, 300},
		{pubsub.HistoryQuery{Limit: 70, Latest: true}, 231, 300},
		{pubsub.HistoryQuery{Since: 250, Limit: 70, Latest: true}, 251, 300},
		{pubsub.HistoryQuery{Since: 300, Limit: 5}, 1, 0},
	} {
		res, err := b.History(pubsubtest.Context(t), "long", c.q)
		if err != nil {
			t.Fatal(err)
		}
		want := span(c.from, c.to)
		if !slices.Equal(seqsOf(res.Messages), want) || res.Top != 300 || res.Epoch != all[0].Epoch {
			t.Fatalf("History%+v: seqs %v top %d, want %v top 300", c.q, seqsOf(res.Messages), res.Top, want)
		}
		for _, m := range res.Messages {
			if w := all[m.Seq-1]; m.ID != w.ID || string(m.Data) != string(w.Data) || !m.Time.Equal(w.Time) {
				t.Fatalf("History%+v: message %+v, want %+v", c.q, m, w)
			}
		}
	}
}

// The log of a room is trimmed to its size as publishes go (a quarter of
// the size past it at most), the reads apply the size exactly, and what
// remains is read by position even when the anchors it pointed to are
// gone.
func TestHistoryIsTrimmedToTheRoomsSize(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	b := bound(t, p)
	small := pubsub.HistoryOptions{Size: 40, TTL: time.Hour}
	publishN(t, b, "trimmed", 500, small)
	res, err := b.History(pubsubtest.Context(t), "trimmed", pubsub.HistoryQuery{Limit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(seqsOf(res.Messages), span(461, 500)) {
		t.Fatalf("history of a room keeping 40 after 500: %v", seqsOf(res.Messages))
	}
	res, err = b.History(pubsubtest.Context(t), "trimmed", pubsub.HistoryQuery{Since: 470, Limit: 5})
	if err != nil || !slices.Equal(seqsOf(res.Messages), span(471, 475)) {
		t.Fatalf("history since 470: %v, %v", seqsOf(res.Messages), err)
	}
	js, err := jetstream.New(connect(t, shared.URL))
	if err != nil {
		t.Fatal(err)
	}
	stored := func() uint64 {
		st, err := js.Stream(pubsubtest.Context(t), p)
		if err != nil {
			t.Fatal(err)
		}
		info, err := st.Info(pubsubtest.Context(t), jetstream.WithSubjectFilter(p+".r.trimmed.m"))
		if err != nil {
			t.Fatal(err)
		}
		return info.State.Subjects[p+".r.trimmed.m"]
	}
	// The trimmer runs in the background, after the publish that asks.
	pubsubtest.WaitFor(t, "the log to be trimmed", func() bool { return stored() <= 40+2+10 })
	// Publishes that keep nothing: the log is trimmed every 8 of them,
	// to its head, the last at seq 512.
	publishN(t, b, "trimmed", 12, pubsub.HistoryOptions{})
	pubsubtest.WaitFor(t, "the log to keep its head alone", func() bool { return stored() == 1 })
	res, err = b.History(pubsubtest.Context(t), "trimmed", pubsub.HistoryQuery{Limit: 1000})
	if err != nil || len(res.Messages) != 0 || res.Top != 512 {
		t.Fatalf("history of a room that now keeps nothing: %v top %d, %v", seqsOf(res.Messages), res.Top, err)
	}
}

// Messages older than the room's history TTL are never read, and leave
// the stream at the room's next trim (or with their own TTL).
func TestHistoryAgesOutOfStorage(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	b := bound(t, p)
	short := pubsub.HistoryOptions{Size: 100, TTL: time.Second}
	first := publishN(t, b, "aging", 7, short)
	pubsubtest.WaitFor(t, "the messages to age out", func() bool {
		res, err := b.History(pubsubtest.Context(t), "aging", pubsub.HistoryQuery{Limit: 100})
		return err == nil && len(res.Messages) == 0 && time.Since(first[6].Time) > short.TTL
	})
	publishN(t, b, "aging", 1, short) // seq 8: a trim is due
	js, err := jetstream.New(connect(t, shared.URL))
	if err != nil {
		t.Fatal(err)
	}
	subject := p + ".r.aging.m"
	// The trim compares the server's timestamps with its clock, the reads
	// the publishing node's: the youngest aged record may straddle them.
	pubsubtest.WaitFor(t, "the aged records to leave the stream", func() bool {
		st, err := js.Stream(pubsubtest.Context(t), p)
		if err != nil {
			t.Fatal(err)
		}
		info, err := st.Info(pubsubtest.Context(t), jetstream.WithSubjectFilter(subject))
		return err == nil && info.State.Subjects[subject] <= 2
	})
	res, err := b.History(pubsubtest.Context(t), "aging", pubsub.HistoryQuery{Limit: 100})
	if err != nil || !slices.Equal(seqsOf(res.Messages), []uint64{8}) {
		t.Fatalf("history after the trim: %v, %v; want the young message 8", seqsOf(res.Messages), err)
	}
}

// Room names of any bytes map to subjects and back: dots, wildcards,
// spaces and the escape character itself.
func TestRoomNamesOfAnyBytes(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	got := make(chan pubsub.Message, 16)
	b := newBroker(t, shared.URL, p)
	b.Bind(func(m pubsub.Message) { got <- m })
	for _, room := range []string{"a.b:c@d/e", "orders.>", "* .=3D", "ünïcødé", "x=", "="} {
		if err := b.Subscribe(pubsubtest.Context(t), room); err != nil {
			t.Fatal(err)
		}
		res, err := b.Publish(pubsubtest.Context(t), room, []byte(room), pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: 5, TTL: time.Minute}})
		if err != nil {
			t.Fatal(err)
		}
		if m := <-got; m.Room != room || string(m.Data) != room || m.Seq != 1 {
			t.Fatalf("room %q delivered %+v", room, m)
		}
		h, err := b.History(pubsubtest.Context(t), room, pubsub.HistoryQuery{Limit: 5})
		if err != nil || len(h.Messages) != 1 || h.Messages[0].ID != res.ID || h.Messages[0].Room != room {
			t.Fatalf("room %q history %+v, %v", room, h, err)
		}
	}
}

// Nodes that ask a new room's position at once agree on one epoch: the
// first open record wins, the others read it.
func TestConcurrentFirstReadsAgreeOnOneEpoch(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	var brokers []*natsbroker.Broker
	for range 4 {
		brokers = append(brokers, bound(t, p))
	}
	for round := range 5 {
		room := fmt.Sprint("fresh-", round)
		epochs := make([]string, 3*len(brokers))
		var wg sync.WaitGroup
		for i := range epochs {
			wg.Go(func() {
				res, err := brokers[i%len(brokers)].History(pubsubtest.Context(t), room, pubsub.HistoryQuery{})
				if err != nil {
					t.Error(err)
				}
				epochs[i] = res.Epoch
			})
		}
		wg.Wait()
		if epochs[0] == "" || slices.ContainsFunc(epochs, func(e string) bool { return e != epochs[0] }) {
			t.Fatalf("round %d: epochs %v, want one", round, epochs)
		}
	}
}

// A room with no subscriber and no activity expires after WithRoomTTL (its
// last record does, and the server's delete marker says so): it starts a
// new epoch.
func TestAnIdleRoomStartsANewEpochAfterItsTTL(t *testing.T) {
	t.Parallel()
	b := bound(t, uniquePrefix(), natsbroker.WithRoomTTL(time.Second))
	first := publishN(t, b, "idle", 2, pubsub.HistoryOptions{Size: 10, TTL: time.Second})
	var res pubsub.HistoryResult
	pubsubtest.WaitFor(t, "the room to expire", func() bool {
		var err error
		res, err = b.History(pubsubtest.Context(t), "idle", pubsub.HistoryQuery{Limit: 10})
		return err == nil && res.Epoch != first[0].Epoch
	})
	if res.Top != 0 || len(res.Messages) != 0 {
		t.Fatalf("the room's new life: top %d with %d messages, want 0 and none", res.Top, len(res.Messages))
	}
	if m := publishN(t, b, "idle", 1, pubsub.HistoryOptions{}); m[0].Epoch != res.Epoch || m[0].Seq != 1 {
		t.Fatalf("next publish %s/%d, want %s/1", m[0].Epoch, m[0].Seq, res.Epoch)
	}
}

// A room this node has subscribers in stays alive past WithRoomTTL: the
// node touches it before it would expire.
func TestASubscribedRoomOutlivesItsTTL(t *testing.T) {
	t.Parallel()
	// The node touches a room whose state expires within half the room
	// TTL, looking every quarter of it: two chances before it would.
	b := bound(t, uniquePrefix(), natsbroker.WithRoomTTL(3*time.Second))
	if err := b.Subscribe(pubsubtest.Context(t), "kept"); err != nil {
		t.Fatal(err)
	}
	first := publishN(t, b, "kept", 1, pubsub.HistoryOptions{})
	deadline := time.Now().Add(7 * time.Second)
	pubsubtest.WaitFor(t, "twice the room TTL to pass", func() bool {
		res, err := b.History(pubsubtest.Context(t), "kept", pubsub.HistoryQuery{})
		if err != nil || res.Epoch != first[0].Epoch || res.Top != 1 {
			t.Fatalf("a subscribed room's position became %s/%d (%v), want %s/1", res.Epoch, res.Top, err, first[0].Epoch)
		}
		return time.Now().After(deadline)
	})
	if m := publishN(t, b, "kept", 1, pubsub.HistoryOptions{}); m[0].Epoch != first[0].Epoch || m[0].Seq != 2 {
		t.Fatalf("next publish %s/%d, want %s/2", m[0].Epoch, m[0].Seq, first[0].Epoch)
	}
}

// Presence lists rooms of any size (its reads page through the entries).
func TestPresenceOfALargeRoom(t *testing.T) {
	t.Parallel()
	b := bound(t, uniquePrefix())
	const conns = 600
	for i := range conns {
		m := pubsub.Member{ConnID: fmt.Sprintf("c%04d", i), UserID: fmt.Sprint("u", i%200)}
		if err := b.Join(pubsubtest.Context(t), "big", m, false); err != nil {
			t.Fatal(err)
		}
	}
	p, err := b.Presence(pubsubtest.Context(t), "big", false)
	if err != nil {
		t.Fatal(err)
	}
	if p.Count != 200 || p.Connections != conns || len(p.Members) != 200 || len(p.Members[0].Conns) != 3 {
		t.Fatalf("presence of 600 connections of 200 users: count %d, connections %d, %d members", p.Count, p.Connections, len(p.Members))
	}
}
