package pubsub_test

import (
	"errors"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/pubsubtest"
)

// The memory broker (memory.go) through its exported API: it numbers each
// room's messages from 1 in one epoch, delivers a room's messages one at
// a time, keeps an idle room for a grace, and belongs to one Handler.
// Its clock-driven behaviour (history age, reclamation) is tested with a
// fake clock in memory_internal_test.go; every broker's contract, in
// brokertest.

func TestMemoryBrokerSeqIncreasesStrictlyFromOnePerRoomUnderConcurrentPublish(t *testing.T) {
	t.Parallel()
	b := pubsub.NewMemoryBroker()
	t.Cleanup(func() { b.Close() })
	rooms := []string{"a", "b", "c"}
	busy := map[string]*atomic.Int32{}
	for _, r := range rooms {
		busy[r] = new(atomic.Int32)
	}
	var overlaps atomic.Int32
	var mu sync.Mutex
	delivered := map[string][]pubsub.Message{}
	b.Bind(func(m pubsub.Message) {
		n := busy[m.Room]
		if n.Add(1) != 1 {
			overlaps.Add(1)
		}
		runtime.Gosched()
		mu.Lock()
		delivered[m.Room] = append(delivered[m.Room], m)
		mu.Unlock()
		n.Add(-1)
	})
	ctx := pubsubtest.Context(t)
	for _, r := range rooms {
		if err := b.Subscribe(ctx, r); err != nil {
			t.Fatal(err)
		}
	}

	const goroutines, each = 8, 150
	returned := make(chan pubsub.Message, goroutines*each)
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := range each {
				res, err := b.Publish(ctx, rooms[(g+i)%len(rooms)], []byte{byte(i)}, pubsub.PublishOptions{})
				if err != nil {
					t.Error(err)
					return
				}
				returned <- res.Message
			}
		})
	}
	wg.Wait()
	close(returned)

	if n := overlaps.Load(); n != 0 {
		t.Errorf("deliver ran concurrently for one room %d times", n)
	}
	seqs := map[string][]uint64{}
	for m := range returned {
		seqs[m.Room] = append(seqs[m.Room], m.Seq)
	}
	total := 0
	for _, r := range rooms {
		ms := delivered[r]
		total += len(ms)
		for i, m := range ms {
			if m.Seq != uint64(i+1) || m.Epoch == "" || m.Epoch != ms[0].Epoch {
				t.Fatalf("room %s: delivery #%d has seq %d epoch %q, want seq %d in epoch %q",
					r, i, m.Seq, m.Epoch, i+1, ms[0].Epoch)
			}
		}
		got := seqs[r]
		slices.Sort(got)
		for i, s := range got {
			if s != uint64(i+1) {
				t.Fatalf("room %s: Publish returned seqs %v, want 1..%d once each", r, got, len(got))
			}
		}
		if len(got) != len(ms) {
			t.Fatalf("room %s: %d publishes returned, %d delivered", r, len(got), len(ms))
		}
	}
	if total != goroutines*each {
		t.Fatalf("%d messages delivered, want %d", total, goroutines*each)
	}
}

// An idle room that keeps nothing keeps its epoch and sequence for
// IdleRoomGrace (its reclamation after the grace is tested with a fake
// clock in memory_internal_test.go); meanwhile publishes nobody
// listens to are dropped, not numbered.
func TestMemoryBrokerResumesAnEmptyRoomWithinTheGrace(t *testing.T) {
	t.Parallel()
	b := pubsub.NewMemoryBroker()
	var mu sync.Mutex
	var delivered []pubsub.Message
	b.Bind(func(m pubsub.Message) {
		mu.Lock()
		delivered = append(delivered, m)
		mu.Unlock()
	})
	ctx := pubsubtest.Context(t)
	publish := func(wantSeq uint64) pubsub.Message {
		t.Helper()
		res, err := b.Publish(ctx, "r", []byte("x"), pubsub.PublishOptions{})
		if err != nil || res.Seq != wantSeq || res.Room != "r" {
			t.Fatalf("Publish = %+v, %v; want seq %d", res, err, wantSeq)
		}
		return res.Message
	}
	if err := b.Subscribe(ctx, "r"); err != nil {
		t.Fatal(err)
	}
	m1 := publish(1)
	if m2 := publish(2); m1.Epoch == "" || m2.Epoch != m1.Epoch {
		t.Fatalf("epochs %q then %q, want one non-empty epoch", m1.Epoch, m2.Epoch)
	}

	// Idle: publishes are dropped, not numbered.
	if err := b.Unsubscribe(ctx, "r"); err != nil {
		t.Fatal(err)
	}
	if m, err := b.Publish(ctx, "r", []byte("x"), pubsub.PublishOptions{}); err != nil || m.Seq != 0 || m.Epoch != "" {
		t.Fatalf("Publish to an idle room = %+v, %v; want the zero Message and nil", m, err)
	}
	if err := b.Subscribe(ctx, "r"); err != nil {
		t.Fatal(err)
	}
	if m3 := publish(3); m3.Epoch != m1.Epoch {
		t.Fatalf("the room's epoch is %q after a short idle time, want the same %q", m3.Epoch, m1.Epoch)
	}
	mu.Lock()
	n := len(delivered)
	mu.Unlock()
	if n != 3 {
		t.Fatalf("%d messages delivered, want 3 (the one to the idle room is dropped)", n)
	}

	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Publish(ctx, "r", []byte("x"), pubsub.PublishOptions{}); !errors.Is(err, pubsub.ErrClosed) {
		t.Fatalf("Publish after Close = %v, want ErrClosed", err)
	}
	if err := b.Subscribe(ctx, "r"); !errors.Is(err, pubsub.ErrClosed) {
		t.Fatalf("Subscribe after Close = %v, want ErrClosed", err)
	}
}

func TestMemoryBrokerBindTwicePanics(t *testing.T) {
	t.Parallel()
	b := pubsub.NewMemoryBroker()
	b.Bind(func(pubsub.Message) {})
	msg, panicked := panicOf(t, func() { b.Bind(func(pubsub.Message) {}) })
	if !panicked || !strings.HasPrefix(msg, "pubsub: ") {
		t.Fatalf("second Bind: panicked %v with %q, want a \"pubsub: \" panic", panicked, msg)
	}

	// Handing one broker to two Handlers is that mistake.
	shared := pubsub.NewMemoryBroker()
	h := quietHandler(pubsub.WithBroker(shared))
	t.Cleanup(func() { h.Close() })
	msg, panicked = panicOf(t, func() { pubsub.NewHandler(pubsub.WithBroker(shared)) })
	if !panicked || !strings.HasPrefix(msg, "pubsub: ") {
		t.Fatalf("NewHandler with a bound broker: panicked %v with %q, want a \"pubsub: \" panic", panicked, msg)
	}
}
