package pubsub_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// History and recovery, end to end: what a room keeps, the last messages
// a subscribe asks for ("history", or ?history= in raw mode), and a
// resubscribe from a position ("since") that gets exactly what it missed,
// or is told why it cannot. Handler.History itself is in pubsub_test.go.

// since is the "since" field of a recovering subscribe.
func since(epoch string, seq uint64) pubsubtest.Fields {
	return pubsubtest.Fields{"epoch": epoch, "seq": seq}
}

// publishNumbered publishes {"n":from}..{"n":to} into room.
func publishNumbered(srv *pubsubtest.Server, room string, from, to int) {
	for n := from; n <= to; n++ {
		srv.Publish(room, fmt.Appendf(nil, `{"n":%d}`, n))
	}
}

// expectSeqs reads messages of room and expects exactly seqs, in order,
// each carrying {"n":seq}.
func expectSeqs(t *testing.T, p *pubsubtest.Conn, room string, seqs ...uint64) {
	t.Helper()
	for _, want := range seqs {
		e := p.NextMessage(room)
		if e.Seq != want || string(e.Data) != fmt.Sprintf(`{"n":%d}`, want) {
			t.Fatalf("got seq %d data %s, want seq %d with {\"n\":%d}", e.Seq, e.Data, want, want)
		}
	}
}

func seqRange(from, to uint64) []uint64 {
	var out []uint64
	for s := from; s <= to; s++ {
		out = append(out, s)
	}
	return out
}

var markers atomic.Int64

// publishMarker publishes a unique JSON payload into room and returns it;
// a reader that reaches it has seen everything queued for it before.
func publishMarker(srv *pubsubtest.Server, room string) string {
	m := fmt.Sprintf(`{"marker":%d}`, markers.Add(1))
	srv.Publish(room, []byte(m))
	return m
}

// readUntilMarker returns every envelope read before the marker message.
func readUntilMarker(p *pubsubtest.Conn, room, marker string) []pubsubtest.Envelope {
	var before []pubsubtest.Envelope
	for {
		e := p.Next()
		if e.Type == "message" && e.Room == room && string(e.Data) == marker {
			return before
		}
		before = append(before, e)
	}
}

// ---- history ----

func TestHistoryIsSetPerRoomByRoomOptions(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t,
		pubsub.WithHistory(2, time.Minute),
		pubsub.WithRoomOptions(func(room string, o *pubsub.RoomOptions) {
			switch room {
			case "long":
				o.HistorySize = 10
			case "none":
				o.HistorySize = 0
			}
		}))
	ctx := pubsubtest.Context(t)
	want := map[string]int{"default": 2, "long": 10, "none": 0}
	for room := range want {
		publishNumbered(srv, room, 1, 12)
	}
	for room, n := range want {
		ms, err := srv.History(ctx, room, 100)
		if err != nil {
			t.Fatal(err)
		}
		if len(ms) != n || (n > 0 && ms[len(ms)-1].Seq != 12) {
			t.Errorf("room %q keeps %d messages (last %v), want the newest %d", room, len(ms), ms, n)
		}
	}
}

func TestSubscribeWithHistoryReplaysTheLastMessagesBeforeLiveOnes(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t,
		pubsub.WithHistory(5, time.Minute),
		pubsub.WithRoomOptions(func(room string, o *pubsub.RoomOptions) {
			if room == "bare" {
				o.HistorySize = 0
			}
		}))
	const room = "replay"
	publishNumbered(srv, room, 1, 8)

	p := srv.Dial("/ws")
	ack := p.SubscribeWith(pubsubtest.Fields{"room": room, "history": 3})
	if ack.Room != room || ack.Epoch == "" || ack.Seq != 8 || ack.Missed == nil || *ack.Missed != 3 || ack.Recovered != nil || ack.Reason != "" {
		t.Fatalf("ack %s: want room, epoch, seq 8, missed 3 and no recovered/reason (no since was sent)", ack)
	}
	expectSeqs(t, p, room, 6, 7, 8)
	publishNumbered(srv, room, 9, 9)
	expectSeqs(t, p, room, 9)

	// More than the room keeps: bounded by its HistorySize.
	p2 := srv.Dial("/ws")
	if f := p2.SubscribeWith(pubsubtest.Fields{"room": room, "history": 50}); *f.Missed != 5 {
		t.Fatalf("history 50 in a room keeping 5: missed %d, want 5", *f.Missed)
	}
	expectSeqs(t, p2, room, 5, 6, 7, 8, 9)

	// A room without history replays nothing.
	publishNumbered(srv, "bare", 1, 3)
	p3 := srv.Dial("/ws")
	if f := p3.SubscribeWith(pubsubtest.Fields{"room": "bare", "history": 10}); *f.Missed != 0 {
		t.Fatalf("history in a room that keeps nothing: missed %d, want 0", *f.Missed)
	}
	m := publishMarker(srv, "bare")
	if before := readUntilMarker(p3, "bare", m); len(before) != 0 {
		t.Fatalf("a room without history replayed %d envelopes: %s", len(before), before[0])
	}
}

func TestHistoryReplayIsCappedToWhatTheQueueHolds(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithHistory(100, time.Minute), pubsub.WithQueueLimits(8, 1<<20))
	const room = "capped"
	publishNumbered(srv, room, 1, 50)
	// Protocol: the ack and 7 messages fill the 8-message queue exactly.
	p := srv.Dial("/ws")
	if ack := p.SubscribeWith(pubsubtest.Fields{"room": room, "history": 50}); ack.Seq != 50 || *ack.Missed != 7 {
		t.Fatalf("ack %s: want seq 50 and missed 7 (a queue of 8 holds the ack and 7 messages)", ack)
	}
	expectSeqs(t, p, room, seqRange(44, 50)...)
	// Raw: the newest messages, contiguous, no more than the queue holds.
	c := srv.DialRaw("/ws?room=" + room + "&history=50")
	var got []int
	for len(got) == 0 || got[len(got)-1] != 50 {
		_, b := c.Read()
		var d struct{ N int }
		if err := json.Unmarshal(b, &d); err != nil || (len(got) > 0 && d.N != got[len(got)-1]+1) || len(got) == 8 {
			t.Fatalf("raw replay %v then %q: want the newest messages, contiguous, at most 8", got, b)
		}
		got = append(got, d.N)
	}
	publishNumbered(srv, room, 51, 51)
	expectSeqs(t, p, room, 51)
	c.ExpectText(`{"n":51}`)
	if s := srv.Stats(); s.SlowConsumers != 0 {
		t.Fatalf("a history replay closed %d connections as slow consumers", s.SlowConsumers)
	}
}

func TestRawHistoryReplaysVerbatimFramesBeforeLiveOnes(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithHistory(5, time.Minute))
	const room = "rawhist"
	payloads := [][]byte{[]byte("one"), []byte("two"), []byte("three"), {0xff, 0x00, 0x04}, []byte(`{"n":5}`), []byte("six")}
	for _, p := range payloads {
		srv.Publish(room, p)
	}
	c := srv.DialRaw("/ws?room=" + room + "&history=3")
	for _, want := range payloads[3:] {
		binary, got := c.Read()
		if wantBinary := want[0] == 0xff; binary != wantBinary || !bytes.Equal(got, want) {
			t.Fatalf("replayed %q (binary %v), want %q (binary %v)", got, binary, want, wantBinary)
		}
	}
	srv.Publish(room, []byte("live"))
	c.ExpectText("live")

	// history=0 replays nothing: the first frame is live.
	c0 := srv.DialRaw("/ws?room=" + room + "&history=0")
	srv.Publish(room, []byte("live2"))
	c0.ExpectText("live2")
}

func TestRawHistoryRejectsInvalidValuesWith400(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithHistory(5, time.Minute))
	for _, v := range []string{"abc", "-1", "1.5", strconv.Itoa(100_000 + 1)} {
		srv.Refused("/ws?room=r&history="+v, http.StatusBadRequest)
	}
}

// ---- recovery ----

func TestRecoveryReplaysExactlyTheMissedMessagesAfterTheAck(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithHistory(100, time.Minute))
	const room = "recover"

	p1 := srv.Dial("/ws")
	ack := p1.SubscribeWith(pubsubtest.Fields{"room": room})
	if ack.Room != room || ack.Epoch == "" || ack.Seq != 0 || ack.Presence != "on" || ack.Missed == nil || *ack.Missed != 0 || ack.Recovered != nil {
		t.Fatalf("first ack %s: want room, an epoch, seq 0, presence on, missed 0, no recovered", ack)
	}
	epoch := ack.Epoch
	publishNumbered(srv, room, 1, 3)
	expectSeqs(t, p1, room, 1, 2, 3)
	p1.CloseNow() // the connection drops

	publishNumbered(srv, room, 4, 8) // missed while away

	p2 := srv.Dial("/ws")
	ack = p2.SubscribeWith(pubsubtest.Fields{"room": room, "since": since(epoch, 3)})
	if ack.Room != room || ack.Epoch != epoch || ack.Seq != 8 || ack.Presence != "on" ||
		ack.Recovered == nil || !*ack.Recovered || ack.Reason != "" || ack.Missed == nil || *ack.Missed != 5 {
		t.Fatalf("recovery ack %s: want epoch %q, seq 8, presence on, recovered true, missed 5, no reason", ack, epoch)
	}
	expectSeqs(t, p2, room, 4, 5, 6, 7, 8)
	publishNumbered(srv, room, 9, 10)
	expectSeqs(t, p2, room, 9, 10) // live, no gap and no duplicate at the junction
}

func TestRecoveryAtTheTopReplaysNothing(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithRoomOptions(func(room string, o *pubsub.RoomOptions) {
		if room == "kept" {
			o.HistorySize, o.HistoryTTL = 10, time.Minute
		}
	}))
	// "kept" keeps history; "bare" keeps none but, while a keeper stays
	// subscribed, can still confirm that nothing was missed.
	for _, room := range []string{"kept", "bare"} {
		keeper := srv.Dial("/ws")
		keeper.Subscribe(room)
		p := srv.Dial("/ws")
		ack := p.SubscribeWith(pubsubtest.Fields{"room": room})
		publishNumbered(srv, room, 1, 2)
		expectSeqs(t, p, room, 1, 2)
		p.Ack(pubsubtest.Fields{"type": "unsubscribe", "room": room})

		ack2 := p.SubscribeWith(pubsubtest.Fields{"room": room, "since": since(ack.Epoch, 2)})
		if ack2.Epoch != ack.Epoch || ack2.Seq != 2 || ack2.Recovered == nil || !*ack2.Recovered || ack2.Missed == nil || *ack2.Missed != 0 || ack2.Reason != "" {
			t.Fatalf("%s: ack %s, want epoch %q, seq 2, recovered true, missed 0", room, ack2, ack.Epoch)
		}
		publishNumbered(srv, room, 3, 3)
		expectSeqs(t, p, room, 3)
	}
}

func TestRecoveryRefusalsSayWhyAndLeaveALiveSubscription(t *testing.T) {
	t.Parallel()
	from := func(seq uint64) func(string) pubsubtest.Fields {
		return func(epoch string) pubsubtest.Fields { return since(epoch, seq) }
	}
	for _, tt := range []struct {
		name   string
		opts   []pubsub.Option
		seen   int                                  // messages the client reads before it leaves
		missed int                                  // messages published while it is away
		since  func(epoch string) pubsubtest.Fields // the position it comes back with
		reason protocol.Reason
	}{
		{
			name: "foreign epoch", opts: []pubsub.Option{pubsub.WithHistory(10, time.Minute)},
			seen: 2, since: func(string) pubsubtest.Fields { return since("not-an-epoch", 1) }, reason: protocol.ReasonEpochChanged,
		},
		{
			name: "history too short", opts: []pubsub.Option{pubsub.WithHistory(3, time.Minute)},
			seen: 1, missed: 10, since: from(1), reason: protocol.ReasonHistoryTooShort,
		},
		{
			name: "position ahead of the room", opts: []pubsub.Option{pubsub.WithHistory(10, time.Minute)},
			seen: 2, since: from(7), reason: protocol.ReasonUnknownPosition,
		},
		{
			name: "more missed than the queue holds", opts: []pubsub.Option{pubsub.WithHistory(100, time.Minute), pubsub.WithQueueLimits(8, 1<<20)},
			seen: 1, missed: 20, since: from(1), reason: protocol.ReasonTooManyMissed, // all kept, 8 fit the queue
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			srv := pubsubtest.Start(t, tt.opts...)
			const room = "refuse"
			p := srv.Dial("/ws")
			epoch := p.Subscribe(room).Epoch
			publishNumbered(srv, room, 1, tt.seen)
			expectSeqs(t, p, room, seqRange(1, uint64(tt.seen))...)
			p.Ack(pubsubtest.Fields{"type": "unsubscribe", "room": room})
			top := tt.seen + tt.missed
			publishNumbered(srv, room, tt.seen+1, top)

			ack := p.SubscribeWith(pubsubtest.Fields{"room": room, "since": tt.since(epoch)})
			if ack.Recovered == nil || *ack.Recovered || ack.Reason == "" || ack.Reason != tt.reason || ack.Missed == nil || *ack.Missed != 0 {
				t.Fatalf("ack %s: want recovered false, reason %q, missed 0", ack, tt.reason)
			}
			if ack.Seq != uint64(top) || ack.Epoch != epoch {
				t.Fatalf("ack %s: want seq %d and the room's current epoch %q", ack, top, epoch)
			}
			// Nothing is replayed, and the subscription is live from the ack.
			srv.Publish(room, []byte(`{"live":true}`))
			e := p.NextMessage(room)
			if e.Seq != uint64(top)+1 || e.Epoch != ack.Epoch || string(e.Data) != `{"live":true}` {
				t.Fatalf("after a refused recovery got %s, want the live message (epoch %q, seq %d)", e, ack.Epoch, top+1)
			}
		})
	}
}

// returner is a client that leaves a room and comes back, again and
// again, and checks that it sees every message of the room's one epoch
// once, in order, across all its subscriptions.
type returner struct {
	t     *testing.T
	p     *pubsubtest.Conn
	room  string
	epoch string
	last  uint64                  // the last seq it saw
	data  func(seq uint64) string // what message seq carries, when the test knows
}

// newReturner dials a protocol client and subscribes it to room.
func newReturner(t *testing.T, srv *pubsubtest.Server, room string) *returner {
	p := srv.Dial("/ws")
	return &returner{t: t, p: p, room: room, epoch: p.Subscribe(room).Epoch}
}

// next reads the next message and expects it to follow the last one.
func (r *returner) next() {
	r.t.Helper()
	e := r.p.Next()
	if e.Type != "message" || e.Room != r.room || e.Epoch != r.epoch || e.Seq != r.last+1 || (r.data != nil && string(e.Data) != r.data(e.Seq)) {
		r.t.Fatalf("after seq %d got %.120s: want seq %d of epoch %q (every seq once, in order)", r.last, e, r.last+1, r.epoch)
	}
	r.last = e.Seq
}

// upTo reads messages up to seq.
func (r *returner) upTo(seq uint64) {
	r.t.Helper()
	for r.last < seq {
		r.next()
	}
}

// leave unsubscribes, reading the messages that came before the ack.
func (r *returner) leave() {
	r.t.Helper()
	r.p.Ack(pubsubtest.Fields{"type": "unsubscribe", "room": r.room})
	for r.p.Buffered() > 0 {
		r.next()
	}
}

// back subscribes again from the last position.
func (r *returner) back() pubsubtest.Envelope {
	r.t.Helper()
	return r.p.SubscribeWith(pubsubtest.Fields{"room": r.room, "since": since(r.epoch, r.last)})
}

// TestRecoveryUnderRapidResubscribesIsContiguous races a publisher against
// a client that keeps leaving and recovering: the client hands the
// publisher a few messages to publish right before each unsubscribe and
// each resubscribe, so publishes land in every window of the server's
// subscribe (before the broker subscription, between it and the history
// read, between that and going live). Across every resubscribe the client
// must see each seq exactly once, in order.
func TestRecoveryUnderRapidResubscribesIsContiguous(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithHistory(1000, time.Minute), pubsub.WithRateLimit(1e6, 1e6))
	const rounds = 200
	r := newReturner(t, srv, "race")
	r.data = func(seq uint64) string { return strconv.FormatUint(seq, 10) }

	tokens := make(chan struct{}, 44*rounds+10)
	give := func(n int) {
		for range n {
			tokens <- struct{}{}
		}
	}
	stop := make(chan struct{})
	var stopOnce sync.Once
	halt := func() { stopOnce.Do(func() { close(stop) }) }
	t.Cleanup(halt)
	published := make(chan int, 1)
	ctx := pubsubtest.Context(t)
	go func() {
		n := 0
		defer func() { published <- n }()
		for {
			select {
			case <-stop:
				return
			case <-tokens:
			}
			if err := srv.Handler.Publish(ctx, r.room, []byte(strconv.Itoa(n+1))); err != nil {
				return
			}
			n++
		}
	}()

	missedTotal, recoveredSome := 0, 0
	for round := range rounds {
		give(4)
		r.next() // progress: at least one message per round
		give(8)
		r.leave()
		give(32) // enough to keep publishing through the whole subscribe
		ack := r.back()
		if ack.Epoch != r.epoch || ack.Recovered == nil || !*ack.Recovered || ack.Missed == nil || uint64(*ack.Missed) != ack.Seq-r.last {
			t.Fatalf("round %d: ack %s, want recovered true with missed = seq - %d", round, ack, r.last)
		}
		missedTotal += *ack.Missed
		if *ack.Missed > 0 {
			recoveredSome++
		}
	}
	halt()
	r.upTo(uint64(<-published))
	t.Logf("%d messages; %d of %d resubscribes recovered messages (%d in all)", r.last, recoveredSome, rounds, missedTotal)
	if recoveredSome == 0 {
		t.Fatalf("no resubscribe recovered anything: the race was not exercised")
	}
}

// TestRecoveryJunctionHasNoGapOrDuplicateDuringALongReplay makes the
// window between the server's history read and the subscription going live
// wide: hundreds of large JSON messages to replay (each is classified
// while the server builds the replay), while another goroutine keeps
// publishing. Live messages land in that window and must come after the
// replay, each once.
func TestRecoveryJunctionHasNoGapOrDuplicateDuringALongReplay(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithHistory(2000, time.Minute), pubsub.WithQueueLimits(8192, 64<<20))
	const missed = 300
	r := newReturner(t, srv, "junction")
	ctx := pubsubtest.Context(t)
	big := fmt.Appendf(nil, `{"pad":%q}`, strings.Repeat("x", 4<<10))

	srv.Publish(r.room, big) // a room holding a message is kept while nobody is subscribed
	r.next()
	published := 1 // publishes so far: the room's top seq
	for round := range 3 {
		r.leave()
		for range missed {
			srv.Publish(r.room, big)
		}
		published += missed

		stop := make(chan struct{})
		count := make(chan int, 1)
		go func() {
			n := 0
			defer func() { count <- n }()
			// As costly per message as the replay: it keeps pace, no more.
			// At most 1600, so missed ones (300 + 1600) always fit the
			// 2000-message history, however slow the resubscribe.
			for n < 1600 {
				select {
				case <-stop:
					return
				default:
				}
				if srv.Handler.Publish(ctx, r.room, big) != nil {
					return
				}
				n++
			}
		}()
		var ack pubsubtest.Envelope
		if round == 1 { // the same junction after a history replay
			ack = r.p.SubscribeWith(pubsubtest.Fields{"room": r.room, "history": missed})
		} else {
			ack = r.back()
		}
		close(stop)
		published += <-count
		if round == 1 {
			if *ack.Missed != missed {
				t.Fatalf("round %d: ack %s, want missed %d", round, ack, missed)
			}
			r.last = ack.Seq - missed // the replay is the room's newest messages
		} else if ack.Recovered == nil || !*ack.Recovered || *ack.Missed < missed {
			t.Fatalf("round %d: ack %s, want recovered true with at least %d missed", round, ack, missed)
		}
		r.upTo(uint64(published))
	}
}

// The ack of a subscribe says how many messages are replayed after it
// (missed), and recovered:true promises exactly the missed ones. In a
// keep-latest room the replay must not be collapsed by the room's policy
// behind the ack's back.
func TestReplayInAKeepLatestRoomDeliversWhatTheAckAnnounces(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithHistory(10, time.Minute), pubsub.WithSlowConsumerPolicy(pubsub.SlowConsumerKeepLatest))
	const room = "ticker"
	p := srv.Dial("/ws")
	ack := p.SubscribeWith(pubsubtest.Fields{"room": room})
	publishNumbered(srv, room, 1, 1)
	expectSeqs(t, p, room, 1)
	p.Ack(pubsubtest.Fields{"type": "unsubscribe", "room": room})
	publishNumbered(srv, room, 2, 6)

	// After the ack come exactly the missed messages: the room's newest
	// ones up to the ack's seq.
	check := func(p *pubsubtest.Conn, fields pubsubtest.Fields) {
		t.Helper()
		ack2 := p.SubscribeWith(fields)
		m := publishMarker(srv, room)
		var seqs []uint64
		for _, e := range readUntilMarker(p, room, m) {
			seqs = append(seqs, e.Seq)
		}
		if len(seqs) != *ack2.Missed {
			t.Errorf("ack %s announced missed=%d, then %d messages came: %v", ack2, *ack2.Missed, len(seqs), seqs)
		}
		if want := seqRange(ack2.Seq-uint64(*ack2.Missed)+1, ack2.Seq); !slices.Equal(seqs, want) {
			t.Errorf("ack %s, then seqs %v; want %v", ack2, seqs, want)
		}
	}
	check(p, pubsubtest.Fields{"room": room, "since": since(ack.Epoch, 1)}) // recovered:true, missed 5
	check(srv.Dial("/ws"), pubsubtest.Fields{"room": room, "history": 3})
}

// A server that lost its state (here: a new Handler, as after a restart)
// tells a client coming back with its old position that it cannot recover.
func TestRecoveryAfterTheServerLostItsStateSaysEpochChanged(t *testing.T) {
	t.Parallel()
	srv1 := pubsubtest.Start(t, pubsub.WithHistory(10, time.Minute))
	a := srv1.Dial("/ws")
	a.Subscribe("orders")
	srv1.Publish("orders", []byte(`{"n":1}`))
	last := a.NextMessage("orders")

	srv2 := pubsubtest.Start(t, pubsub.WithHistory(10, time.Minute))
	b := srv2.Dial("/ws")
	ack := b.SubscribeWith(pubsubtest.Fields{"room": "orders", "since": since(last.Epoch, last.Seq)})
	if ack.Recovered == nil || *ack.Recovered || ack.Reason != protocol.ReasonEpochChanged || (ack.Missed != nil && *ack.Missed != 0) || ack.Epoch == last.Epoch {
		t.Fatalf("ack %s: want recovered false, reason %q, nothing replayed, a new epoch", ack, protocol.ReasonEpochChanged)
	}
	// The subscription is live on the new server.
	srv2.Publish("orders", []byte(`{"n":2}`))
	if m := b.NextMessage("orders"); m.Seq != 1 || m.Epoch != ack.Epoch {
		t.Fatalf("live message %s: want seq 1 of epoch %q", m, ack.Epoch)
	}
}
