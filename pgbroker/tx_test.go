package pgbroker_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/client"
	"github.com/roomcast/pubsub/pgbroker"
	"github.com/roomcast/pubsub/pubsubtest"
)

// txNode is a node, its schema and a pool of the host's own on the same
// database, for its transactions.
func txNode(t *testing.T, bopts ...pgbroker.Option) (*node, string, *pgxpool.Pool) {
	t.Helper()
	s := uniqueSchema()
	n := newNode(t, shared.DSN, s, bopts)
	return n, s, newPool(t, shared.DSN)
}

// waitLockWaiters waits until n publishes of schema wait for a room's lock.
func waitLockWaiters(t *testing.T, admin *pgxpool.Pool, schema string, n int) {
	t.Helper()
	pubsubtest.WaitFor(t, fmt.Sprint(n, " publishes to wait for the room's lock"), func() bool {
		var waiting int
		err := admin.QueryRow(pubsubtest.Context(t), `SELECT count(*) FROM pg_stat_activity
			WHERE wait_event_type = 'Lock' AND query LIKE '%' || $1 || '.publish%'`, schema).Scan(&waiting)
		return err == nil && waiting >= n
	})
}

func TestRolledBackPublishTxPublishesNothing(t *testing.T) {
	t.Parallel()
	n, _, host := txNode(t)
	w := watch(t, n.url(""), "orders:1", false)
	ctx := pubsubtest.Context(t)
	tx, err := host.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	m, err := n.b.PublishTx(ctx, tx, "orders:1", []byte("never"))
	if err != nil || m.Seq != 1 {
		t.Fatalf("PublishTx: %+v, %v; want seq 1", m, err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	n.Publish("orders:1", []byte("after the rollback"))
	got := w.waitMessages(1)
	checkStream(t, got, got[0].Epoch, 1, "after the rollback") // seq 1 again: nothing was taken
	h, err := n.Handler.History(ctx, "orders:1", 10)
	if err != nil || len(h) != 1 || string(h[0].Data) != "after the rollback" {
		t.Fatalf("history %v, %v; want only the message after the rollback", h, err)
	}
}

func TestPublishTxIsDeliveredOnCommitInCommitOrder(t *testing.T) {
	t.Parallel()
	n, schema, host := txNode(t)
	w := watch(t, n.url(""), "room", false)
	ctx := pubsubtest.Context(t)
	tx, err := host.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := n.b.PublishTx(ctx, tx, "room", []byte("in tx")); err != nil {
		t.Fatal(err)
	}
	// A publish outside waits for the transaction's row lock: the room's
	// sequence is the commit order.
	published := make(chan error, 1)
	go func() { published <- n.Handler.Publish(context.Background(), "room", []byte("outside")) }()
	waitLockWaiters(t, host, schema, 1)
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-published; err != nil {
		t.Fatal(err)
	}
	got := w.waitMessages(2)
	checkStream(t, got, got[0].Epoch, 1, "in tx", "outside")
}

// A room held by a host's transaction (one it created, or one that
// existed) does not hold up publishes to other rooms that share a batch
// with it.
func TestABusyRoomDoesNotHoldUpOtherRooms(t *testing.T) {
	t.Parallel()
	for _, exists := range []bool{false, true} {
		t.Run(fmt.Sprint("room exists=", exists), func(t *testing.T) {
			t.Parallel()
			n, schema, host := txNode(t)
			ctx := pubsubtest.Context(t)
			if exists {
				n.Publish("busy", []byte("before"))
			}
			tx, err := host.Begin(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer tx.Rollback(ctx)
			if _, err := n.b.PublishTx(ctx, tx, "busy", []byte("held")); err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			busy := make(chan error, 4)
			for range 4 {
				wg.Go(func() { busy <- n.Handler.Publish(context.Background(), "busy", []byte("waits")) })
			}
			waitLockWaiters(t, host, schema, 1)
			for i := range 50 { // each in a batch with the busy ones, or after them
				if err := n.Handler.Publish(ctx, fmt.Sprint("free-", i%5), []byte("goes")); err != nil {
					t.Fatal(err)
				}
			}
			select {
			case err := <-busy:
				t.Fatalf("a publish to the busy room returned (%v) before the transaction ended", err)
			default:
			}
			if err := tx.Commit(ctx); err != nil {
				t.Fatal(err)
			}
			wg.Wait()
			for range 4 {
				if err := <-busy; err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

// Host transactions publish into one room concurrently, commit or roll
// back at random, while the broker publishes too: subscribers get exactly
// the committed messages, in one gap-free sequence, each with the seq its
// PublishTx returned.
func TestConcurrentHostTransactionsKeepOneGaplessSequence(t *testing.T) {
	t.Parallel()
	n, _, host := txNode(t)
	w := watch(t, n.url(""), "room", false)
	const workers, each = 6, 15
	var (
		mu        sync.Mutex
		committed = make(map[string]uint64) // payload -> seq
		wg        sync.WaitGroup
	)
	for g := range workers {
		wg.Go(func() {
			for i := range each {
				data := fmt.Sprintf("w%d-%d", g, i)
				ctx := context.Background()
				if g == 0 { // one worker publishes outside transactions
					res, err := n.b.Publish(ctx, "room", []byte(data), pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: 1000, TTL: time.Minute}})
					if err != nil {
						t.Error(err)
						return
					}
					mu.Lock()
					committed[data] = res.Seq
					mu.Unlock()
					continue
				}
				var seq uint64
				commit := rand.IntN(3) > 0
				err := pgx.BeginFunc(ctx, host, func(tx pgx.Tx) error {
					if _, err := tx.Exec(ctx, `SELECT pg_sleep(0.002)`); err != nil { // the host's own work
						return err
					}
					m, err := n.b.PublishTx(ctx, tx, "room", []byte(data))
					if err != nil {
						return err
					}
					seq = m.Seq
					if !commit {
						return errRollback
					}
					return nil
				})
				if err != nil && !errors.Is(err, errRollback) {
					t.Error(err)
					return
				}
				if commit {
					mu.Lock()
					committed[data] = seq
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	n.Publish("room", []byte("end"))
	got := messages(w.waitData("end"))
	got = got[:len(got)-1]
	checkGapless(t, got)
	if len(got) != len(committed) {
		t.Fatalf("got %d messages, %d were committed", len(got), len(committed))
	}
	for _, m := range got {
		if seq, ok := committed[string(m.Data)]; !ok || seq != m.Seq {
			t.Fatalf("message %q at seq %d: committed %v with seq %d", m.Data, m.Seq, ok, seq)
		}
	}
}

var errRollback = errors.New("rolled back on purpose")

// The options of PublishTxWith: an idempotency key, for the id of the
// business event the message announces.
func TestPublishTxWithAKey(t *testing.T) {
	t.Parallel()
	n, _, host := txNode(t)
	ctx := pubsubtest.Context(t)
	o := pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: 10, TTL: time.Minute}, Key: "event-7", KeyTTL: time.Minute}
	var first, again pubsub.PublishResult
	for _, res := range []*pubsub.PublishResult{&first, &again} {
		err := pgx.BeginFunc(ctx, host, func(tx pgx.Tx) error {
			var err error
			*res, err = n.b.PublishTxWith(ctx, tx, "room", []byte("shipped"), o)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if first.Duplicate || !again.Duplicate || again.ID != first.ID || again.Seq != 1 {
		t.Fatalf("first %+v, again %+v: want the second a duplicate of the first", first, again)
	}
}

// checkGapless checks one epoch, seqs from the first on by one.
func checkGapless(t *testing.T, ms []client.Message) {
	t.Helper()
	for i, m := range ms {
		if m.Epoch != ms[0].Epoch || m.Seq != ms[0].Seq+uint64(i) {
			seqs := make([]uint64, len(ms))
			for i, m := range ms {
				seqs[i] = m.Seq
			}
			t.Fatalf("message %d is %s/%d: not one gap-free sequence (%v)", i, m.Epoch, m.Seq, seqs)
		}
	}
}
