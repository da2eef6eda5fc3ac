package pgbroker_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/pgbroker"
	"github.com/roomcast/pubsub/pubsubtest"
)

// Concurrent publishes share batches: messages of one room sequenced by
// one call carry the same time, so fewer distinct times than messages
// means fewer commits than publishes. Every publish still gets its own
// seq, one gap-free sequence.
func TestConcurrentPublishesShareCommits(t *testing.T) {
	t.Parallel()
	s := uniqueSchema()
	b := newBroker(t, shared.DSN, s)
	b.Bind(func(pubsub.Message) {})
	t.Cleanup(func() { b.Close() })
	const publishers, each = 16, 20
	var wg sync.WaitGroup
	for g := range publishers {
		wg.Go(func() {
			for i := range each {
				if _, err := b.Publish(pubsubtest.Context(t), "room", fmt.Appendf(nil, "%d-%d", g, i),
					pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: 1000, TTL: time.Minute}}); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	db := newPool(t, shared.DSN)
	var n, times, top int
	err := db.QueryRow(pubsubtest.Context(t), `SELECT count(*), count(DISTINCT published_at), max(seq) FROM `+s+`.history WHERE room = 'room'`).
		Scan(&n, &times, &top)
	if err != nil || n != publishers*each || top != n {
		t.Fatalf("%d messages up to seq %d, %v; want %d", n, top, err, publishers*each)
	}
	t.Logf("%d publishes in %d batches", n, times)
	if times >= n {
		t.Fatalf("%d publishes from %d goroutines took %d commits: no batch was shared", n, publishers, times)
	}
}

// A broker no Handler bound (a worker process that only publishes) still
// publishes, and the nodes that serve the room deliver it.
func TestPublishBeforeBindReachesTheNodes(t *testing.T) {
	t.Parallel()
	s := uniqueSchema()
	// The node polls every minute: only the worker's NOTIFY can wake it.
	n := newNode(t, shared.DSN, s, []pgbroker.Option{pgbroker.WithDeliveryWindow(time.Minute), pgbroker.WithPollInterval(time.Minute)})
	waitListening(t, shared.DSN, s, 1)
	w := watch(t, n.url(""), "room", false)
	worker := newBroker(t, shared.DSN, s)
	t.Cleanup(func() { worker.Close() })
	res, err := worker.Publish(pubsubtest.Context(t), "room", []byte("from a worker"),
		pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: 10, TTL: time.Minute}})
	if err != nil || res.Seq != 1 {
		t.Fatalf("Publish on an unbound broker: %+v, %v", res, err)
	}
	got := w.waitMessages(1)
	checkStream(t, got, res.Epoch, 1, "from a worker")
}

// The notifications a node sends for its batches are the very ones the
// schema's notify function sends (nodes of schema version 1 call it, and
// the readers of both parse them): a LISTENing session gets the same
// payloads, split at the same place.
func TestNotifyPayloadsAreTheNotifyFunctions(t *testing.T) {
	t.Parallel()
	ctx := pubsubtest.Context(t)
	s := uniqueSchema()
	if _, err := pgbroker.New(ctx, newPool(t, shared.DSN), pgbroker.WithSchema(s)); err != nil {
		t.Fatal(err)
	}
	rooms := []string{"a", "ü", "with:colon", "m12:x"}
	for i := range 12 {
		rooms = append(rooms, fmt.Sprint(i)+strings.Repeat("y", 990))
	}
	conn, err := pgx.Connect(ctx, shared.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "LISTEN "+s); err != nil {
		t.Fatal(err)
	}
	if _, err := newPool(t, shared.DSN).Exec(ctx, `SELECT `+s+`.notify($1::text[])`, rooms); err != nil {
		t.Fatal(err)
	}
	want := pgbroker.NotifyPayloads(rooms)
	if len(want) < 2 {
		t.Fatalf("%d payloads for rooms of 12,000 bytes, want them split", len(want))
	}
	for i, w := range want {
		n, err := conn.WaitForNotification(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if n.Payload != w {
			t.Fatalf("notification %d: the notify function sent %q, NotifyPayloads makes %q", i, n.Payload, w)
		}
	}
}
