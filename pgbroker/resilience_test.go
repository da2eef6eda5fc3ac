package pgbroker_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/roomcast/pubsub/client"
	"github.com/roomcast/pubsub/pgbroker"
	"github.com/roomcast/pubsub/pgbroker/internal/pgtest"
	"github.com/roomcast/pubsub/pubsubtest"
)

// startPostgres starts a server of the test's own, for tests that stop or
// restart it. It is stopped after everything the test registers later.
func startPostgres(t *testing.T) *pgtest.Server {
	t.Helper()
	srv, err := pgtest.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	return srv
}

// publisher publishes "1", "2", … into room on node n, paced, until
// stopped, and remembers which publishes succeeded and which failed (a
// failed one may or may not have been published).
type publisher struct {
	stop   chan struct{}
	done   chan struct{}
	mu     sync.Mutex
	ok     []int
	failed []error
	change chan struct{}
}

func startPublisher(t *testing.T, n *node, room string) *publisher {
	p := &publisher{stop: make(chan struct{}), done: make(chan struct{}), change: make(chan struct{})}
	tick := time.NewTicker(3 * time.Millisecond) // paced: an outage must not become a busy loop
	go func() {
		defer close(p.done)
		defer tick.Stop()
		for i := 1; ; i++ {
			select {
			case <-p.stop:
				return
			case <-tick.C:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			err := n.Handler.Publish(ctx, room, []byte(strconv.Itoa(i)))
			cancel()
			p.mu.Lock()
			if err == nil {
				p.ok = append(p.ok, i)
			} else {
				p.failed = append(p.failed, err)
			}
			close(p.change)
			p.change = make(chan struct{})
			p.mu.Unlock()
		}
	}()
	t.Cleanup(p.halt)
	return p
}

func (p *publisher) halt() {
	select {
	case <-p.stop:
	default:
		close(p.stop)
	}
	<-p.done
}

// waitUntil waits until cond holds for the publishes that succeeded and
// the errors of those that failed.
func (p *publisher) waitUntil(t *testing.T, what string, cond func(ok []int, failed []error) bool) {
	t.Helper()
	ctx := pubsubtest.Context(t)
	for {
		p.mu.Lock()
		done, change := cond(p.ok, p.failed), p.change
		p.mu.Unlock()
		if done {
			return
		}
		select {
		case <-change:
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// checkPublished checks that a subscriber got one gap-free stream holding
// every publish that succeeded, in order, and nothing but what was
// published (a failed publish may be there: its outcome was unknown).
func checkPublished(t *testing.T, got []client.Message, ok []int, failed int) {
	t.Helper()
	for i, m := range got {
		if m.Epoch != got[0].Epoch || m.Seq != got[0].Seq+uint64(i) {
			t.Fatalf("message %d is %s/%d after %s/%d: not one gap-free stream", i, m.Epoch, m.Seq, got[0].Epoch, got[0].Seq+uint64(i)-1)
		}
	}
	var nums []int
	for _, m := range got {
		n, err := strconv.Atoi(string(m.Data))
		if err != nil {
			t.Fatalf("unexpected payload %q", m.Data)
		}
		nums = append(nums, n)
	}
	if !slices.IsSorted(nums) || len(slices.Compact(slices.Clone(nums))) != len(nums) {
		t.Fatalf("payloads out of publish order or repeated: %v", nums)
	}
	for _, n := range ok {
		if _, found := slices.BinarySearch(nums, n); !found {
			t.Fatalf("publish %d succeeded but never arrived; got %v", n, nums)
		}
	}
	if len(nums) > len(ok)+failed {
		t.Fatalf("got %d messages, more than the %d publishes that may have happened", len(nums), len(ok)+failed)
	}
}

// PostgreSQL restarted under a running cluster, cleanly or as a crash:
// publishes fail while it is down (an error, never a silent loss), the
// nodes reconnect by themselves, and subscribers keep their subscription:
// the same epoch, every message once, in order. The table is durable, so
// nothing is reset.
func TestPostgresRestartMidStream(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		stop func(*pgtest.Server)
	}{
		{"fast shutdown", (*pgtest.Server).Stop},
		{"crash", (*pgtest.Server).Crash},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv := startPostgres(t)
			s := uniqueSchema()
			logs := &pubsubtest.Logs{}
			opts := []pgbroker.Option{pgbroker.WithLogger(logs.Logger()), pgbroker.WithPollInterval(500 * time.Millisecond)}
			a, b := newNode(t, srv.DSN, s, opts), newNode(t, srv.DSN, s, opts)
			waitListening(t, srv.DSN, s, 2)
			w := watch(t, a.url(""), "room", false)
			pub := startPublisher(t, b, "room")
			pub.waitUntil(t, "20 publishes", func(ok []int, _ []error) bool { return len(ok) >= 20 })

			tc.stop(srv)
			pub.waitUntil(t, "a publish to fail", func(_ []int, failed []error) bool { return len(failed) > 0 })
			pub.mu.Lock()
			first := pub.failed[0]
			pub.mu.Unlock()
			if errors.Is(first, context.DeadlineExceeded) {
				t.Fatalf("a publish while PostgreSQL is down: %v, want a connection error before the deadline", first)
			}
			if err := srv.Restart(); err != nil {
				t.Fatal(err)
			}
			var before int
			pub.mu.Lock()
			before = len(pub.ok)
			pub.mu.Unlock()
			pub.waitUntil(t, "20 publishes after the restart", func(ok []int, _ []error) bool { return len(ok) >= before+20 })
			pub.halt()

			last := pub.ok[len(pub.ok)-1]
			got := w.waitData(strconv.Itoa(last))
			checkPublished(t, messages(got), pub.ok, len(pub.failed))
			if r := recoveries(got); len(r) > 0 {
				t.Fatalf("the subscriber reconnected (%+v): a PostgreSQL restart must not cost it its subscription", r)
			}
			pubsubtest.WaitFor(t, "the lost listening connection to be logged", func() bool {
				return logs.Find(slog.LevelError, "lost the listening connection")
			})
		})
	}
}

// A node whose listening connection is killed reconnects and reads from
// the table what was published meanwhile: its subscribers miss nothing.
func TestListeningConnectionKilledIsReopenedAndCaughtUp(t *testing.T) {
	t.Parallel()
	s := uniqueSchema()
	logs := &pubsubtest.Logs{}
	a := newNode(t, shared.DSN, s, []pgbroker.Option{pgbroker.WithLogger(logs.Logger())})
	b := newNode(t, shared.DSN, s, nil)
	waitListening(t, shared.DSN, s, 2)
	w := watch(t, a.url(""), "room", false)
	b.Publish("room", []byte("1"))
	w.waitMessages(1)

	admin := newPool(t, shared.DSN)
	var killed *bool
	err := admin.QueryRow(pubsubtest.Context(t), `SELECT bool_or(pg_terminate_backend(pid)) FROM pg_stat_activity
		WHERE application_name LIKE '%pgbroker listener%' AND query = 'LISTEN "' || $1 || '"'`, s).Scan(&killed)
	if err != nil || killed == nil || !*killed {
		t.Fatalf("terminating node a's listening connection: %v, %v", killed, err)
	}
	for i := 2; i <= 6; i++ {
		b.Publish("room", []byte(fmt.Sprint(i))) // node a may not hear these
	}
	got := w.waitMessages(6)
	checkStream(t, got, got[0].Epoch, 1, numbered(1, 6)...)
	pubsubtest.WaitFor(t, "the lost listening connection to be logged", func() bool {
		return logs.Find(slog.LevelError, "lost the listening connection")
	})
	if r := recoveries(w.items); len(r) > 0 {
		t.Fatalf("the subscriber reconnected (%+v): a lost listening connection must not cost it its subscription", r)
	}
}

// The broker's Close returns promptly, its goroutines ended (TestMain
// checks none is left), whatever state PostgreSQL is in: stopped, or
// unreachable with its bytes lost.
func TestCloseReturnsWhilePostgresIsUnreachable(t *testing.T) {
	t.Parallel()
	for _, tc := range []string{"stopped", "blackholed"} {
		t.Run(tc, func(t *testing.T) {
			t.Parallel()
			srv := startPostgres(t)
			proxy := startProxy(t, addr(srv))
			n := newNode(t, viaProxy(srv, proxy), uniqueSchema(), []pgbroker.Option{pgbroker.WithPresenceTTL(600 * time.Millisecond)})
			watch(t, n.url("ann"), "room", true)
			n.Publish("room", []byte("x"))
			if tc == "stopped" {
				srv.Stop()
			} else {
				proxy.Drop()
			}
			start := time.Now()
			done := make(chan struct{})
			go func() {
				n.b.Close()
				close(done)
			}()
			select {
			case <-done:
				t.Logf("Close returned in %v", time.Since(start))
			case <-time.After(5 * time.Second):
				t.Fatal("Close did not return while PostgreSQL was unreachable")
			}
		})
	}
}
