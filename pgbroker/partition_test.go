package pgbroker_test

import (
	"fmt"
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/roomcast/pubsub/pgbroker"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// A node cut off from PostgreSQL while the room goes on: its subscribers
// either get every message they missed, in order, on the same
// subscription, or are closed with 4006 before anything past the hole, and
// told on their resubscribe what they cannot recover. Never a silent gap.
//
// Three nodes share one database; node C reaches it through a proxy that
// the test cuts (connections dropped), or blackholes (bytes lost while the
// connections stay open, found out by the listener's check), while nodes A
// and B publish. Every room keeps 100 messages.
func TestANodeCutOffFromPostgresNeverSkipsSilently(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name     string
		missed   int
		drop     bool // blackhole instead of cutting the connections
		recovers bool
	}{
		{"cut for fewer messages than history keeps", 40, false, true},
		{"cut for more messages than history keeps", 150, false, false},
		{"blackholed for more messages than history keeps", 150, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := uniqueSchema()
			a, b := newNode(t, shared.DSN, s, nil), newNode(t, shared.DSN, s, nil)
			proxy := startProxy(t, addr(shared))
			logs := &pubsubtest.Logs{}
			c := newNode(t, viaProxy(shared, proxy), s, []pgbroker.Option{
				pgbroker.WithLogger(logs.Logger()), pgbroker.WithPollInterval(200 * time.Millisecond),
			})
			waitListening(t, shared.DSN, s, 3)
			w := watch(t, c.url(""), "room", false)
			publishAlternately(t, "room", 1, 46, a, b)
			got := w.waitMessages(46)
			epoch := got[0].Epoch
			checkStream(t, got, epoch, 1, numbered(1, 46)...)

			if tc.drop {
				proxy.Drop()
			} else {
				proxy.Cut()
			}
			publishAlternately(t, "room", 47, 46+tc.missed, a, b)
			pubsubtest.WaitFor(t, "node c to find its listening connection gone", func() bool {
				return logs.Find(slog.LevelError, "lost the listening connection")
			})
			proxy.Heal()
			last := 46 + tc.missed + 1
			a.Publish("room", []byte(fmt.Sprint(last)))

			if tc.recovers {
				items := w.waitData(fmt.Sprint(last))
				// The same subscription goes on, with every missed message.
				if r := recoveries(items); len(r) > 0 {
					t.Fatalf("the subscriber reconnected (%+v); the history held what it missed", r)
				}
				checkStream(t, messages(items), epoch, 1, numbered(1, last)...)
				return
			}
			// The reset comes before any message past the hole: the
			// subscriber's last position stays 46, and its resubscribe is
			// told the history no longer holds what it missed; then it is
			// live again.
			items := w.waitUntil("a reset", func(items []item) bool { return len(recoveries(items)) > 0 })
			i := slices.IndexFunc(items, func(it item) bool { return it.rec != nil })
			checkStream(t, messages(items[:i]), epoch, 1, numbered(1, 46)...)
			if r := items[i].rec; r.Recovered || r.Reason != protocol.ReasonHistoryTooShort {
				t.Fatalf("resubscribe from seq 46 after %d were published and 100 are kept: %+v, want not recovered, history_too_short", tc.missed, *r)
			}
			a.Publish("room", []byte("next"))
			items = w.waitData("next")
			if after := messages(items[i+1:]); after[len(after)-1].Seq != items[i].rec.Seq+1 {
				t.Fatalf("after the reset: %v, want the next message after the position the resubscribe got", after)
			}
			pubsubtest.WaitFor(t, "the lost messages to be logged", func() bool {
				return logs.Find(slog.LevelError, "no longer in the room's history", "room", "room")
			})
		})
	}
}

// publishAlternately publishes the numbers from..to into room, in turn on
// each node.
func publishAlternately(t *testing.T, room string, from, to int, nodes ...*node) {
	t.Helper()
	for i := from; i <= to; i++ {
		nodes[i%len(nodes)].Publish(room, []byte(fmt.Sprint(i)))
	}
}
