package pubsub_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// The Handler's use of the Broker contract: one interest per room and
// node, Subscribe and Unsubscribe alternating, failures told to callers
// without the broker's text. testBroker, the tests' broker with faults on
// demand, lives here too.

// errBrokerDown is what testBroker fails with; clients must never see its
// text.
var errBrokerDown = errors.New("test broker down: secret-broker-detail")

// testBroker wraps the memory broker. It records the calls, checks that
// each room's Subscribe and Unsubscribe alternate (Subscribe first)
// without overlapping and that Join and Leave come between them, fails
// Subscribe or Publish on demand, and can hold deliveries, or lose some,
// on their way to the Handler.
type testBroker struct {
	inner   pubsub.Broker
	deliver func(pubsub.Message) // the Handler's, for a test to deliver what it wants

	failSubscribe atomic.Int64 // fail every n-th Subscribe (1: every one; 0: none)
	failPublish   atomic.Int64 // fail every n-th Publish
	hold          atomic.Bool  // hold deliveries until release
	closes        atomic.Int32
	subscribes    atomic.Int64 // Subscribe calls while failSubscribe is set
	publishes     atomic.Int64 // Publish calls while failPublish is set

	mu         sync.Mutex
	rooms      map[string]*testBrokerRoom
	events     []string
	violations []string
	lost       map[uint64]bool // seqs of room messages never delivered
	held       []pubsub.Message
}

type testBrokerRoom struct {
	busy, subscribed         bool
	subscribes, unsubscribes int
}

var _ pubsub.Broker = (*testBroker)(nil)

func newTestBroker() *testBroker {
	return &testBroker{inner: pubsub.NewMemoryBroker(), rooms: make(map[string]*testBrokerRoom), lost: make(map[uint64]bool)}
}

// failingBroker is a testBroker whose every Subscribe, or every Publish,
// fails.
func failingBroker(subscribe, publish bool) *testBroker {
	b := newTestBroker()
	if subscribe {
		b.failSubscribe.Store(1)
	}
	if publish {
		b.failPublish.Store(1)
	}
	return b
}

// fails counts a call against every, a failure rate set on the broker.
func fails(every *atomic.Int64, calls *atomic.Int64) bool {
	n := every.Load()
	return n > 0 && calls.Add(1)%n == 0
}

func (b *testBroker) Bind(deliver func(pubsub.Message)) {
	b.deliver = deliver
	b.inner.Bind(func(m pubsub.Message) {
		b.mu.Lock()
		lost := m.Kind == pubsub.KindMessage && b.lost[m.Seq]
		held := !lost && b.hold.Load()
		if held {
			b.held = append(b.held, m)
		}
		b.mu.Unlock()
		if !lost && !held {
			deliver(m)
		}
	})
}

// loseSeqs makes the broker lose the room messages with these seqs on
// their way to this node (they are still sequenced and kept in history),
// as a broker that lost its link to the cluster does.
func (b *testBroker) loseSeqs(seqs ...uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, s := range seqs {
		b.lost[s] = true
	}
}

// release delivers what the broker held, and stops holding.
func (b *testBroker) release() {
	b.mu.Lock()
	b.hold.Store(false)
	held := b.held
	b.held = nil
	b.mu.Unlock()
	for _, m := range held {
		b.deliver(m)
	}
}

func (b *testBroker) Publish(ctx context.Context, room string, data []byte, o pubsub.PublishOptions) (pubsub.PublishResult, error) {
	if fails(&b.failPublish, &b.publishes) {
		return pubsub.PublishResult{}, errBrokerDown
	}
	return b.inner.Publish(ctx, room, data, o)
}

func (b *testBroker) History(ctx context.Context, room string, q pubsub.HistoryQuery) (pubsub.HistoryResult, error) {
	return b.inner.History(ctx, room, q)
}

// Join and Leave must come between the room's Subscribe and Unsubscribe.
func (b *testBroker) Join(ctx context.Context, room string, m pubsub.Member, events bool) error {
	b.checkSubscribed("join", room)
	return b.inner.Join(ctx, room, m, events)
}

func (b *testBroker) Leave(ctx context.Context, room string, m pubsub.Member, events bool) error {
	b.checkSubscribed("leave", room)
	return b.inner.Leave(ctx, room, m, events)
}

func (b *testBroker) Presence(ctx context.Context, room string, countsOnly bool) (pubsub.Presence, error) {
	return b.inner.Presence(ctx, room, countsOnly)
}

func (b *testBroker) checkSubscribed(op, room string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if r := b.room(room); !r.subscribed || r.busy {
		b.violations = append(b.violations, fmt.Sprintf("%s %q outside the room's subscription", op, room))
	}
}

func (b *testBroker) Subscribe(ctx context.Context, room string) (err error) {
	b.begin("subscribe", room, false)
	defer func() { b.end(room, err == nil) }()
	runtime.Gosched() // widen the window for an overlapping call
	if fails(&b.failSubscribe, &b.subscribes) {
		return errBrokerDown
	}
	return b.inner.Subscribe(ctx, room)
}

func (b *testBroker) Unsubscribe(ctx context.Context, room string) error {
	b.begin("unsubscribe", room, true)
	defer b.end(room, false)
	runtime.Gosched()
	return b.inner.Unsubscribe(ctx, room)
}

func (b *testBroker) Close() error {
	b.closes.Add(1)
	b.mu.Lock()
	b.events = append(b.events, "close")
	b.mu.Unlock()
	return b.inner.Close()
}

func (b *testBroker) room(name string) *testBrokerRoom {
	r := b.rooms[name]
	if r == nil {
		r = &testBrokerRoom{}
		b.rooms[name] = r
	}
	return r
}

func (b *testBroker) begin(op, room string, wantSubscribed bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	r := b.room(room)
	if r.busy {
		b.violations = append(b.violations, fmt.Sprintf("%s %q overlaps another call for the room", op, room))
	}
	if r.subscribed != wantSubscribed {
		b.violations = append(b.violations, fmt.Sprintf("%s %q while subscribed is %v", op, room, r.subscribed))
	}
	r.busy = true
	if op == "subscribe" {
		r.subscribes++
	} else {
		r.unsubscribes++
	}
	b.events = append(b.events, op+" "+room)
}

func (b *testBroker) end(room string, subscribed bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	r := b.room(room)
	r.busy, r.subscribed = false, subscribed
}

func (b *testBroker) eventLog() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.events)
}

// counts returns the room's Subscribe and Unsubscribe calls so far, and
// whether the node is subscribed.
func (b *testBroker) counts(room string) (subscribes, unsubscribes int, subscribed bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	r := b.room(room)
	return r.subscribes, r.unsubscribes, r.subscribed
}

// subscribed lists the rooms the node is subscribed to.
func (b *testBroker) subscribed() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
	for name, r := range b.rooms {
		if r.subscribed {
			out = append(out, name)
		}
	}
	return out
}

func (b *testBroker) checkAlternation(t *testing.T) {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, v := range b.violations {
		t.Error(v)
	}
}

func TestBrokerSubscribeAndUnsubscribeAlternatePerRoomUnderChurn(t *testing.T) {
	t.Parallel()
	b := newTestBroker()
	srv := pubsubtest.Start(t, pubsub.WithBroker(b), pubsub.WithRateLimit(1e6, 1_000_000))
	rooms := []string{"churn-a", "churn-b", "churn-c", "churn-d"}
	const workers, lives, rounds = 12, 2, 15
	ctx := pubsubtest.Context(t)
	d := newBareDialer(t)

	errs := churnWorkers(workers, lives, func(w, life int) error {
		c, _, err := d.dial(ctx, srv.WS("/ws"), true)
		if err != nil {
			return err
		}
		// Few subscribers per room at a time, so that rooms empty and fill
		// again often: each of those is a broker call.
		for r := range rounds {
			room := rooms[(w+r)%len(rooms)]
			for _, op := range []string{"subscribe", "unsubscribe"} {
				if err := c.ack(ctx, op, room); err != nil {
					c.c.CloseNow()
					return err
				}
			}
		}
		// End each life in two rooms: the disconnect leaves them.
		for _, room := range []string{rooms[w%len(rooms)], rooms[(w+1)%len(rooms)]} {
			if err := c.ack(ctx, "subscribe", room); err != nil {
				c.c.CloseNow()
				return err
			}
		}
		if (w+life)%2 == 0 {
			c.end(bareDrop)
		} else {
			c.end(bareClose)
		}
		return nil
	})
	errs.report(t)

	// Every subscriber left, so the node must have withdrawn its interest in
	// every room, with as many Unsubscribes as Subscribes.
	pubsubtest.WaitFor(t, "the node to leave every room", func() bool {
		for _, room := range rooms {
			if subs, unsubs, subscribed := b.counts(room); subscribed || subs != unsubs {
				return false
			}
		}
		return srv.Stats().Rooms == 0
	})
	b.checkAlternation(t)
	total := 0
	for _, room := range rooms {
		subs, _, _ := b.counts(room)
		total += subs
	}
	t.Logf("%d Subscribe calls", total)
	if total <= len(rooms) {
		t.Errorf("%d Subscribe calls for %d rooms: no room was emptied and refilled, so the churn did not exercise the seam", total, len(rooms))
	}
}

func TestBrokerInterestIsDroppedWhenTheLastSubscriberLeaves(t *testing.T) {
	t.Parallel()
	b := newTestBroker()
	srv := pubsubtest.Start(t, pubsub.WithBroker(b))
	want := func(subs, unsubs int, subscribed bool) {
		t.Helper()
		pubsubtest.WaitFor(t, fmt.Sprintf("%d Subscribe and %d Unsubscribe calls, subscribed %v", subs, unsubs, subscribed),
			func() bool {
				s, u, on := b.counts("r")
				return s == subs && u == unsubs && on == subscribed
			})
	}
	p1 := srv.Dial("/ws")
	p2 := srv.Dial("/ws")
	p1.Subscribe("r")
	want(1, 0, true)
	p2.Subscribe("r") // one interest per node, not per subscriber
	raw := srv.DialRaw("/ws?room=r")
	want(1, 0, true)

	p1.Ack(pubsubtest.Fields{"type": "unsubscribe", "room": "r"})
	raw.Close(protocol.CloseNormal, "")
	pubsubtest.WaitFor(t, "one subscriber left", func() bool { return len(srv.Connections("r")) == 1 })
	want(1, 0, true)

	p2.Close(protocol.CloseNormal, "") // the last one
	want(1, 1, false)
	if n := srv.Stats().Rooms; n != 0 {
		t.Fatalf("Stats().Rooms = %d, want 0", n)
	}

	// A new subscriber brings the interest back.
	p3 := srv.Dial("/ws")
	p3.Subscribe("r")
	want(2, 1, true)
	b.checkAlternation(t)
}

func TestBrokerSubscribeFailureIsUnavailableAndTheServerRecovers(t *testing.T) {
	t.Parallel()
	b := failingBroker(true, false)
	srv := pubsubtest.Start(t, pubsub.WithBroker(b))
	p := srv.Dial("/ws")

	e := p.Error(pubsubtest.Fields{"type": "subscribe", "room": "r"}, protocol.CodeUnavailable)
	if strings.Contains(e.Message, errBrokerDown.Error()) {
		t.Errorf("the client was sent the broker's error text: %s", e)
	}
	srv.Refused("/ws?room=r", http.StatusServiceUnavailable)
	if s := srv.Stats(); s.Rooms != 0 || len(srv.Connections("r")) != 0 || s.Refused != 1 {
		t.Fatalf("after failed subscribes: %+v, members %v; want no room and one refusal", s, srv.Connections("r"))
	}

	b.failSubscribe.Store(0)
	p.Subscribe("r")
	raw := srv.DialRaw("/ws?room=r")
	srv.Publish("r", []byte(`"back"`))
	p.NextMessage("r")
	raw.ExpectText(`"back"`)
	if subs, unsubs, _ := b.counts("r"); subs != 3 || unsubs != 0 {
		t.Fatalf("%d Subscribe and %d Unsubscribe calls, want 3 (two failed) and 0", subs, unsubs)
	}
	b.checkAlternation(t)
}

func TestBrokerPublishFailureIsWrappedAndUnavailable(t *testing.T) {
	t.Parallel()
	b := newTestBroker()
	srv := pubsubtest.Start(t, pubsub.WithBroker(b), pubsub.WithClientPublish(true))
	p := srv.Dial("/ws")
	p.Subscribe("r")
	raw := srv.DialRaw("/ws?room=r")
	b.failPublish.Store(1)

	err := srv.Handler.Publish(pubsubtest.Context(t), "r", []byte("x"))
	if !errors.Is(err, errBrokerDown) || !strings.HasPrefix(err.Error(), "pubsub: ") {
		t.Fatalf("Publish with a failing broker = %v, want a \"pubsub: \" error wrapping the broker's", err)
	}
	e := p.Error(pubsubtest.Fields{"type": "publish", "room": "r", "text": "x"}, protocol.CodeUnavailable)
	if strings.Contains(e.Message, errBrokerDown.Error()) {
		t.Errorf("the client was sent the broker's error text: %s", e)
	}
	raw.Send("x")
	raw.ExpectClose(protocol.CloseTryAgainLater)
	if n := srv.Stats().Published; n != 0 {
		t.Fatalf("Stats().Published = %d after failed publishes, want 0", n)
	}

	b.failPublish.Store(0)
	srv.Publish("r", []byte(`"ok"`))
	if e := p.NextMessage("r"); string(e.Data) != `"ok"` {
		t.Fatalf("got %s", e)
	}
}
