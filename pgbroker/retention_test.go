package pgbroker_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/pgbroker"
	"github.com/roomcast/pubsub/pubsubtest"
)

// retentionBroker is a bound broker whose delivery window is short, so
// the sweep may trim soon after a publish.
func retentionBroker(t *testing.T, opts ...pgbroker.Option) (*pgbroker.Broker, string, *pgxpool.Pool) {
	t.Helper()
	s := uniqueSchema()
	b := newBroker(t, shared.DSN, s, append([]pgbroker.Option{
		pgbroker.WithDeliveryWindow(100 * time.Millisecond), pgbroker.WithPollInterval(20 * time.Millisecond),
	}, opts...)...)
	b.Bind(func(pubsub.Message) {})
	t.Cleanup(func() { b.Close() })
	return b, s, newPool(t, shared.DSN)
}

// rowsOf returns the seqs of the room's messages still in the table.
func rowsOf(t *testing.T, db *pgxpool.Pool, schema, room string) []uint64 {
	t.Helper()
	rows, err := db.Query(pubsubtest.Context(t), `SELECT seq FROM `+schema+`.history WHERE room = $1 ORDER BY seq`, room)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []uint64
	for rows.Next() {
		var s int64
		if err := rows.Scan(&s); err != nil {
			t.Fatal(err)
		}
		out = append(out, uint64(s))
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

// sweepUntil runs the sweep until cond holds.
func sweepUntil(t *testing.T, b *pgbroker.Broker, what string, cond func() bool) {
	t.Helper()
	pubsubtest.WaitFor(t, what, func() bool {
		if _, err := b.Sweep(pubsubtest.Context(t)); err != nil {
			t.Fatal(err)
		}
		return cond()
	})
}

func publishN(t *testing.T, b *pgbroker.Broker, room string, n int, h pubsub.HistoryOptions) []pubsub.Message {
	t.Helper()
	var out []pubsub.Message
	for i := range n {
		res, err := b.Publish(pubsubtest.Context(t), room, fmt.Appendf(nil, "m%d", i+1), pubsub.PublishOptions{History: h})
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, res.Message)
	}
	return out
}

// The table holds what each room's bounds keep, once the delivery window
// passed: the newest messages by count, none older than the TTL, none for
// a room that keeps none, and everything for an archived room (whose
// History still keeps to its bounds).
func TestRetentionBoundsHold(t *testing.T) {
	t.Parallel()
	b, s, db := retentionBroker(t, pgbroker.WithArchive(func(room string) bool { return room == "archive" }))
	publishN(t, b, "count", 100, pubsub.HistoryOptions{Size: 10, TTL: time.Hour})
	publishN(t, b, "age", 20, pubsub.HistoryOptions{Size: 100, TTL: 300 * time.Millisecond})
	publishN(t, b, "none", 30, pubsub.HistoryOptions{})
	archived := publishN(t, b, "archive", 50, pubsub.HistoryOptions{Size: 5, TTL: time.Hour})

	sweepUntil(t, b, "the rooms to be trimmed to their bounds", func() bool {
		return slices.Equal(rowsOf(t, db, s, "count"), span(91, 100)) &&
			len(rowsOf(t, db, s, "age")) == 0 && len(rowsOf(t, db, s, "none")) == 0
	})
	if got := rowsOf(t, db, s, "archive"); !slices.Equal(got, span(1, 50)) {
		t.Fatalf("archived room's rows: %v, want all 50", got)
	}
	res, err := b.History(pubsubtest.Context(t), "archive", pubsub.HistoryQuery{Limit: 100})
	if err != nil || len(res.Messages) != 5 || res.Messages[0].ID != archived[45].ID {
		t.Fatalf("archived room's History: %d messages, %v; want the newest 5", len(res.Messages), err)
	}
	// Trimmed rooms keep their position: the next message follows on.
	for room, top := range map[string]uint64{"count": 100, "age": 20, "none": 30} {
		res, err := b.History(pubsubtest.Context(t), room, pubsub.HistoryQuery{})
		if err != nil || res.Top != top {
			t.Fatalf("room %s: position %+v, %v; want top %d", room, res, err, top)
		}
	}
}

// Expired idempotency keys and old presence events leave the table; an
// idle room with nothing left is reclaimed, and its next life has a new
// epoch; a room this node is subscribed to is not.
func TestSweepForgetsKeysEventsAndIdleRooms(t *testing.T) {
	t.Parallel()
	b, s, db := retentionBroker(t, pgbroker.WithRoomTTL(time.Second))
	ctx := pubsubtest.Context(t)
	count := func(table string) int {
		var n int
		if err := db.QueryRow(ctx, `SELECT count(*) FROM `+s+`.`+table).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	if _, err := b.Publish(ctx, "keyed", []byte("x"), pubsub.PublishOptions{Key: "k", KeyTTL: 200 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	m := pubsub.Member{ConnID: "c1", UserID: "ann"}
	if err := b.Join(ctx, "events", m, true); err != nil {
		t.Fatal(err)
	}
	if err := b.Leave(ctx, "events", m, true); err != nil {
		t.Fatal(err)
	}
	first, err := b.History(ctx, "idle", pubsub.HistoryQuery{})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Subscribe(ctx, "watched"); err != nil {
		t.Fatal(err)
	}
	watched, err := b.History(ctx, "watched", pubsub.HistoryQuery{})
	if err != nil {
		t.Fatal(err)
	}
	if count("keys") != 1 || count("events") != 2 {
		t.Fatalf("%d keys and %d events, want 1 and 2", count("keys"), count("events"))
	}
	sweepUntil(t, b, "the keys, events and idle rooms to go", func() bool {
		var rooms []string
		rows, err := db.Query(ctx, `SELECT name FROM `+s+`.rooms ORDER BY name`)
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			var n string
			rows.Scan(&n)
			rooms = append(rooms, n)
		}
		return count("keys") == 0 && count("events") == 0 && slices.Equal(rooms, []string{"watched"})
	})
	again, err := b.History(ctx, "idle", pubsub.HistoryQuery{})
	if err != nil || again.Epoch == first.Epoch {
		t.Fatalf("the reclaimed room's next life: %+v, %v; want a new epoch (was %s)", again, err, first.Epoch)
	}
	if now, err := b.History(ctx, "watched", pubsub.HistoryQuery{}); err != nil || now.Epoch != watched.Epoch {
		t.Fatalf("the subscribed room: %+v, %v; want its epoch %s kept", now, err, watched.Epoch)
	}
}

// Payloads of any size the Handler allows travel, far past NOTIFY's 8,000
// bytes: NOTIFY carries only the room's name.
func TestMessagesLargerThanANotifyPayload(t *testing.T) {
	t.Parallel()
	s := uniqueSchema()
	a, b := newNode(t, shared.DSN, s, nil), newNode(t, shared.DSN, s, nil)
	w := watch(t, b.url(""), "big", false)
	var want [][]byte
	for _, size := range []int{8001, 100 << 10, 1 << 20} {
		data := make([]byte, size)
		rand.Read(data)
		want = append(want, data)
		if err := a.Handler.Publish(pubsubtest.Context(t), "big", data); err != nil {
			t.Fatal(err)
		}
	}
	got := w.waitMessages(3)
	for i := range want {
		if !bytes.Equal(got[i].Data, want[i]) {
			t.Fatalf("message %d: %d bytes arrived, not the %d published", i, len(got[i].Data), len(want[i]))
		}
	}
	h, err := b.Handler.History(pubsubtest.Context(t), "big", 3)
	if err != nil || len(h) != 3 || !bytes.Equal(h[2].Data, want[2]) {
		t.Fatalf("history of the large messages: %d, %v", len(h), err)
	}
}

// The history is a plain table: a host reads (searches, exports) it with
// SQL, by room name.
func TestHistoryIsQueryableWithSQL(t *testing.T) {
	t.Parallel()
	s := uniqueSchema()
	n := newNode(t, shared.DSN, s, nil)
	for _, text := range []string{`{"nick":"ann","text":"hello"}`, `{"nick":"bob","text":"hi ann"}`, `{"nick":"ann","text":"bye"}`} {
		n.Publish("lobby", []byte(text))
	}
	db := newPool(t, shared.DSN)
	rows, err := db.Query(pubsubtest.Context(t), `SELECT seq, convert_from(data, 'UTF8')::json->>'text' FROM `+s+`.history
		WHERE room = 'lobby' AND convert_from(data, 'UTF8')::json->>'nick' = 'ann' ORDER BY seq`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var got []string
	for rows.Next() {
		var seq int
		var text string
		if err := rows.Scan(&seq, &text); err != nil {
			t.Fatal(err)
		}
		got = append(got, fmt.Sprint(seq, ":", text))
	}
	if !slices.Equal(got, []string{"1:hello", "3:bye"}) {
		t.Fatalf("ann's messages by SQL: %v", got)
	}
}

// Every node of a cluster restarts, PostgreSQL too: rooms, epochs and
// history are in the table, so a client that comes back recovers exactly
// what it missed.
func TestWholeClusterRestartRecoversExactly(t *testing.T) {
	t.Parallel()
	srv := startPostgres(t)
	s := uniqueSchema()
	a := newNode(t, srv.DSN, s, nil)
	lb := startFront(t, a)
	w := watch(t, lb.url("ann"), "room", false)
	for i := 1; i <= 5; i++ {
		a.Publish("room", []byte(fmt.Sprint(i)))
	}
	before := w.waitMessages(5)
	if err := a.Handler.Shutdown(pubsubtest.Context(t)); err != nil {
		t.Fatal(err)
	}
	srv.Stop()
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	a2, b2 := newNode(t, srv.DSN, s, nil), newNode(t, srv.DSN, s, nil)
	for i := 6; i <= 8; i++ {
		b2.Publish("room", []byte(fmt.Sprint(i))) // while ann is away
	}
	lb.point(a2)
	items := w.waitUntil("the recovery", func(items []item) bool { return len(recoveries(items)) > 0 })
	if r := recoveries(items)[0]; !r.Recovered || r.Missed != 3 {
		t.Fatalf("recovery after the whole cluster restarted: %+v, want recovered with 3 missed", r)
	}
	b2.Publish("room", []byte("9"))
	got := w.waitMessages(9)
	checkStream(t, got, before[0].Epoch, 1, numbered(1, 9)...)
}

// A database restored from an older backup reuses seqs that nodes already
// delivered: a node finds the message at its position is not the one it
// delivered, logs it and resets the room rather than going on silently.
func TestHistoryRewrittenUnderANodeResetsTheRoom(t *testing.T) {
	t.Parallel()
	s, logs, n, w := fiveDelivered(t)
	db := newPool(t, shared.DSN)
	ctx := pubsubtest.Context(t)
	// The backup had the room at seq 2.
	if _, err := db.Exec(ctx, `WITH r AS (UPDATE `+s+`.rooms SET seq = 2, last_at = now() WHERE name = 'room' RETURNING id)
		DELETE FROM `+s+`.messages m USING r WHERE m.room_id = r.id AND m.seq > 2`); err != nil {
		t.Fatal(err)
	}
	for i := 3; i <= 5; i++ {
		if err := n.Handler.Publish(context.Background(), "room", fmt.Appendf(nil, "new %d", i)); err != nil {
			t.Fatal(err)
		}
	}
	waitRewriteReset(t, logs, w)
}

// When the rewritten room is back at the node's position by its next read
// (the backup's seqs refilled in the transaction that restored it), only
// the message at the position tells: its id is not the one delivered.
func TestHistoryRewrittenToTheSameSeqResetsTheRoom(t *testing.T) {
	t.Parallel()
	s, logs, n, w := fiveDelivered(t)
	ctx := pubsubtest.Context(t)
	err := pgx.BeginFunc(ctx, newPool(t, shared.DSN), func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `WITH r AS (UPDATE `+s+`.rooms SET seq = 2, last_at = now() WHERE name = 'room' RETURNING id)
			DELETE FROM `+s+`.messages m USING r WHERE m.room_id = r.id AND m.seq > 2`); err != nil {
			return err
		}
		for i := 3; i <= 5; i++ {
			if _, err := n.b.PublishTx(ctx, tx, "room", fmt.Appendf(nil, "new %d", i)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	waitRewriteReset(t, logs, w)
}

// fiveDelivered is a node in a schema of its own, logging to logs, whose
// room "room" has five messages that w, a subscriber, has received.
func fiveDelivered(t *testing.T) (schema string, logs *pubsubtest.Logs, n *node, w *watcher) {
	t.Helper()
	schema = uniqueSchema()
	logs = &pubsubtest.Logs{}
	n = newNode(t, shared.DSN, schema, []pgbroker.Option{pgbroker.WithLogger(logs.Logger())})
	w = watch(t, n.url(""), "room", false)
	for i := 1; i <= 5; i++ {
		n.Publish("room", []byte(fmt.Sprint(i)))
	}
	w.waitMessages(5)
	return schema, logs, n, w
}

// waitRewriteReset waits for w to be reset and checks that the node
// logged the rewritten history at Error.
func waitRewriteReset(t *testing.T, logs *pubsubtest.Logs, w *watcher) {
	t.Helper()
	w.waitUntil("a reset", func(items []item) bool { return len(recoveries(items)) > 0 })
	if !logs.Find(slog.LevelError, "history was rewritten", "room", "room") {
		t.Fatal("the rewritten history was not logged at Error")
	}
}
