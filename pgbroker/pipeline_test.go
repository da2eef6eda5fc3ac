package pgbroker_test

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/pgbroker"
	"github.com/roomcast/pubsub/pubsubtest"
)

// A node's batches wake the other nodes by themselves (the notification
// rides in the batch's round trip, after its commit): with polling every
// minute, every message published concurrently to rooms whose names fill
// several notifications reaches the other node, each room in order.
func TestBatchesWakeTheOtherNodes(t *testing.T) {
	t.Parallel()
	s := uniqueSchema()
	slow := []pgbroker.Option{pgbroker.WithDeliveryWindow(time.Minute), pgbroker.WithPollInterval(time.Minute)}
	a, b := newBroker(t, shared.DSN, s, slow...), newBroker(t, shared.DSN, s, slow...)
	got := make(chan pubsub.Message, 1000)
	a.Bind(func(pubsub.Message) {})
	b.Bind(func(m pubsub.Message) { got <- m })
	t.Cleanup(func() { a.Close(); b.Close() })
	waitListening(t, shared.DSN, s, 2)
	rooms := make([]string, 20) // 20 names of 1,000 bytes: 3 notifications per batch that has them all
	for i := range rooms {
		rooms[i] = fmt.Sprintf("%03d", i) + strings.Repeat("x", pgbroker.MaxRoomNameBytes-3)
		if err := b.Subscribe(pubsubtest.Context(t), rooms[i]); err != nil {
			t.Fatal(err)
		}
	}
	const each = 10
	var wg sync.WaitGroup
	for _, room := range rooms {
		wg.Go(func() {
			for i := range each {
				if _, err := a.Publish(pubsubtest.Context(t), room, fmt.Append(nil, i), pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: 100}}); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	next := make(map[string]uint64)
	for n := 0; n < len(rooms)*each; {
		select {
		case m := <-got:
			if m.Kind != pubsub.KindMessage {
				continue
			}
			if m.Seq != next[m.Room]+1 || string(m.Data) != fmt.Sprint(m.Seq-1) {
				t.Fatalf("room %.3s…: got seq %d %q after %d", m.Room, m.Seq, m.Data, next[m.Room])
			}
			next[m.Room] = m.Seq
			n++
		case <-pubsubtest.Context(t).Done():
			t.Fatalf("node B delivered %d of %d messages before the test's deadline", n, len(rooms)*each)
		}
	}
}

// When the notification a batch sends in its round trip fails (the batch
// committed), the notifier sends it: with polling every minute, the
// other node still delivers at once.
func TestAFailedBatchNotificationGoesToTheNotifier(t *testing.T) {
	t.Parallel()
	s := uniqueSchema()
	slow := []pgbroker.Option{pgbroker.WithDeliveryWindow(time.Minute), pgbroker.WithPollInterval(time.Minute)}
	a, b := newBroker(t, shared.DSN, s, slow...), newBroker(t, shared.DSN, s, slow...)
	pgbroker.BreakPipelinedWake(a)
	got := make(chan pubsub.Message, 10)
	a.Bind(func(pubsub.Message) {})
	b.Bind(func(m pubsub.Message) { got <- m })
	t.Cleanup(func() { a.Close(); b.Close() })
	waitListening(t, shared.DSN, s, 2)
	if err := b.Subscribe(pubsubtest.Context(t), "room"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Publish(pubsubtest.Context(t), "room", []byte("hi"), pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: 10}}); err != nil {
		t.Fatal(err)
	}
	for {
		select {
		case m := <-got:
			if m.Kind == pubsub.KindMessage && string(m.Data) == "hi" {
				return
			}
		case <-pubsubtest.Context(t).Done():
			t.Fatal("node B did not deliver the message before the test's deadline")
		}
	}
}
