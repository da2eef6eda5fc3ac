package pgbroker_test

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
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

// A node's batches run as a plain statement with the publish_batch
// function's plan settings (a generic plan, no hash or merge joins) made
// for their own transaction only: on the host's pool, the sessions keep
// their settings, and the statement never got a custom plan (PostgreSQL's
// default would plan the first five runs afresh).
func TestPlainStatementsKeepTheHostsSettings(t *testing.T) {
	t.Parallel()
	s := uniqueSchema()
	pool := newPool(t, shared.DSN)
	b, err := pgbroker.New(pubsubtest.Context(t), pool, pgbroker.WithSchema(s), pgbroker.WithLogger(pubsubtest.Logger()))
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan pubsub.Message, 100)
	b.Bind(func(m pubsub.Message) { got <- m })
	t.Cleanup(func() { b.Close() })
	if err := b.Subscribe(pubsubtest.Context(t), "room"); err != nil {
		t.Fatal(err)
	}
	const n = 20
	for i := range n {
		if _, err := b.Publish(pubsubtest.Context(t), "room", fmt.Append(nil, i), pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: 100}}); err != nil {
			t.Fatal(err)
		}
	}
	for seen := 0; seen < n; {
		select {
		case m := <-got:
			if m.Kind == pubsub.KindMessage {
				seen++
			}
		case <-pubsubtest.Context(t).Done():
			t.Fatalf("delivered %d of %d messages before the test's deadline", seen, n)
		}
	}
	// The reader and the keeper may hold a connection a while: look at
	// the idle ones until the statement was seen.
	var plans map[string][2]int64 // generic, custom, per statement
	pubsubtest.WaitFor(t, "the statement on idle connections", func() bool {
		plans = idlePlans(t, pool)
		return plans["batch"][0]+plans["batch"][1] > 0
	})
	if p := plans["batch"]; p[0] == 0 || p[1] != 0 {
		t.Errorf("the batch statement: %d generic plans and %d custom ones on the idle connections; want generic ones only", p[0], p[1])
	}
}

// idlePlans checks that the pool's idle sessions have PostgreSQL's
// default plan settings, and returns how many generic and custom plans
// the broker's batch statement ("batch") and read ("read") had on them: a
// run is one or the other.
func idlePlans(t *testing.T, pool *pgxpool.Pool) map[string][2]int64 {
	plans := map[string][2]int64{}
	conns := pool.AcquireAllIdle(pubsubtest.Context(t))
	defer func() {
		for _, c := range conns {
			c.Release()
		}
	}()
	for _, c := range conns {
		var mode, hash, merge string
		if err := c.QueryRow(pubsubtest.Context(t), `SELECT current_setting('plan_cache_mode'),
			current_setting('enable_hashjoin'), current_setting('enable_mergejoin')`).Scan(&mode, &hash, &merge); err != nil {
			t.Fatal(err)
		}
		if mode != "auto" || hash != "on" || merge != "on" {
			t.Fatalf("a pool session has plan_cache_mode %s, enable_hashjoin %s, enable_mergejoin %s; want the defaults", mode, hash, merge)
		}
		rows, err := c.Query(pubsubtest.Context(t), `SELECT CASE WHEN statement LIKE 'WITH c AS%' THEN 'batch' ELSE 'read' END,
			generic_plans, custom_plans FROM pg_prepared_statements
			WHERE statement LIKE 'WITH c AS%' OR statement LIKE 'SELECT o_room, o_kind,%'`)
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			var (
				stmt            string
				generic, custom int64
			)
			if err := rows.Scan(&stmt, &generic, &custom); err != nil {
				t.Fatal(err)
			}
			p := plans[stmt]
			plans[stmt] = [2]int64{p[0] + generic, p[1] + custom}
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
	}
	return plans
}

// A node that serves the rooms it publishes to reads them once per batch:
// its own reader is marked when the batch commits, and the batch's
// notification, back on the node's listening connection, is not read
// again. (Each read runs the read statement once, with a generic plan or
// a custom one, so the idle sessions' plans count the reads.)
func TestANodeDoesNotReadItsOwnBatchesTwice(t *testing.T) {
	t.Parallel()
	s := uniqueSchema()
	pool := newPool(t, shared.DSN)
	b, got := quietNode(t, pool, s)
	waitListening(t, shared.DSN, s, 1)
	if err := b.Subscribe(pubsubtest.Context(t), "room"); err != nil {
		t.Fatal(err)
	}
	const n = 30
	for i := range n {
		if _, err := b.Publish(pubsubtest.Context(t), "room", fmt.Append(nil, i), pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: 100}}); err != nil {
			t.Fatal(err)
		}
		// Delivered before the next publish: each batch has its read.
		select {
		case <-got:
		case <-pubsubtest.Context(t).Done():
			t.Fatalf("message %d not delivered before the test's deadline", i)
		}
	}
	// Then another node publishes to a room of its own: delivered through
	// the listening connection, which got the batches' notifications
	// before it, and read with any room they marked, it comes after every
	// read they caused.
	other := newBroker(t, shared.DSN, s)
	other.Bind(func(pubsub.Message) {})
	t.Cleanup(func() { other.Close() })
	if err := b.Subscribe(pubsubtest.Context(t), "end"); err != nil {
		t.Fatal(err)
	}
	if _, err := other.Publish(pubsubtest.Context(t), "end", []byte("end"), pubsub.PublishOptions{}); err != nil {
		t.Fatal(err)
	}
	for end := false; !end; {
		select {
		case m := <-got:
			end = m.Room == "end"
		case <-pubsubtest.Context(t).Done():
			t.Fatal("the other node's message was not delivered before the test's deadline")
		}
	}
	var reads int64
	pubsubtest.WaitFor(t, "the reads on idle connections", func() bool {
		p := idlePlans(t, pool)["read"]
		reads = p[0] + p[1]
		return reads >= n+1
	})
	t.Logf("%d reads for %d batches and the other node's message", reads, n)
	if reads > n+5 { // subscribing reads too
		t.Fatalf("%d reads for %d batches, each delivered before the next, and the other node's message: want one each", reads, n)
	}
}

// Two brokers on one pool of one session: each one's notifications come
// from the session the other's come from too, with the same payload, and
// each still delivers the other's messages at once (polling every minute),
// the last one included.
func TestNodesOnOneSessionTakeOnlyTheirOwnNotifications(t *testing.T) {
	t.Parallel()
	s := uniqueSchema()
	pool := newPool(t, shared.DSN, func(c *pgxpool.Config) { c.MaxConns = 1 })
	nodes := make([]*pgbroker.Broker, 2)
	gots := make([]chan pubsub.Message, 2)
	for i := range nodes {
		nodes[i], gots[i] = quietNode(t, pool, s)
	}
	waitListening(t, shared.DSN, s, 2)
	for _, b := range nodes {
		if err := b.Subscribe(pubsubtest.Context(t), "room"); err != nil {
			t.Fatal(err)
		}
	}
	const n = 20
	for i := range n {
		if _, err := nodes[i%2].Publish(pubsubtest.Context(t), "room", fmt.Append(nil, i), pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: 100}}); err != nil {
			t.Fatal(err)
		}
		for j, got := range gots {
			select {
			case m := <-got:
				if m.Kind != pubsub.KindMessage || m.Seq != uint64(i+1) {
					t.Fatalf("node %d delivered %+v, want message %d", j, m, i+1)
				}
			case <-pubsubtest.Context(t).Done():
				t.Fatalf("node %d did not deliver message %d (published by node %d) before the test's deadline", j, i+1, i%2)
			}
		}
	}
}

// A batch of existing rooms goes to PostgreSQL as publish_batch's own
// statement, sent by the node (queryPipelined); a poll-only node calls the
// function for every batch. The statement repeats the function's body, so
// the two must write the same: the same publishes through each (new rooms,
// existing ones, history bounds that change on the way, a room that keeps
// none) leave the same rooms and the same messages.
func TestTheBatchStatementWritesWhatTheFunctionWrites(t *testing.T) {
	t.Parallel()
	ctx := pubsubtest.Context(t)
	histories := [][]pubsub.HistoryOptions{
		{{Size: 3}, {Size: 3, TTL: time.Hour}},                     // the age bound comes later
		{{Size: 100, TTL: time.Hour}, {Size: 5, TTL: time.Minute}}, // both bounds shrink
		{{}, {}}, // keeps none
	}
	write := func(opts ...pgbroker.Option) (schema string, pool *pgxpool.Pool) {
		schema = uniqueSchema()
		pool = newPool(t, shared.DSN)
		b, err := pgbroker.New(ctx, pool, append([]pgbroker.Option{pgbroker.WithSchema(schema), pgbroker.WithLogger(pubsubtest.Logger()),
			pgbroker.WithDeliveryWindow(time.Hour)}, opts...)...) // nothing swept while the test compares
		if err != nil {
			t.Fatal(err)
		}
		b.Bind(func(pubsub.Message) {}) // a bound broker's publishers batch (before Bind, each publish waits for its room alone)
		t.Cleanup(func() { b.Close() })
		for i := range 30 {
			r := i % len(histories)
			h := histories[r][min(i/15, 1)]
			if _, err := b.Publish(ctx, fmt.Sprintf("room-%d", r), fmt.Append(nil, "message ", i), pubsub.PublishOptions{History: h}); err != nil {
				t.Fatal(err)
			}
		}
		return schema, pool
	}
	written := func(schema string, pool *pgxpool.Pool) string {
		var out strings.Builder
		rows, err := pool.Query(ctx, `SELECT 'room', r.name, r.seq, r.keep_size, r.keep_ttl::text, r.archive::text, '' FROM `+schema+`.rooms r
			UNION ALL SELECT 'message', r.name, m.seq, 0, '', '', convert_from(m.data, 'UTF8') FROM `+schema+`.messages m JOIN `+schema+`.rooms r ON r.id = m.room_id
			ORDER BY 1, 2, 3`)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		for rows.Next() {
			var kind, name, ttl, archive, data string
			var seq, size int64
			if err := rows.Scan(&kind, &name, &seq, &size, &ttl, &archive, &data); err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(&out, "%s %s seq %d size %d ttl %s archive %s %s\n", kind, name, seq, size, ttl, archive, data)
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
		return out.String()
	}
	stmtSchema, stmtPool := write()
	funcSchema, funcPool := write(pgbroker.WithPollOnly(100 * time.Millisecond))
	byStatement, byFunction := written(stmtSchema, stmtPool), written(funcSchema, funcPool)
	if byStatement != byFunction {
		t.Errorf("the statement wrote:\n%s\nthe function wrote:\n%s", byStatement, byFunction)
	}
	if n := strings.Count(byStatement, "message room-"); n != 30 {
		t.Errorf("%d messages in the table, want all 30:\n%s", n, byStatement)
	}
	// And the first node did send the statement (the second never does).
	var plans map[string][2]int64
	pubsubtest.WaitFor(t, "the statement on idle connections", func() bool {
		plans = idlePlans(t, stmtPool)
		return plans["batch"][0]+plans["batch"][1] > 0
	})
	if p := idlePlans(t, funcPool)["batch"]; p[0]+p[1] != 0 {
		t.Errorf("the poll-only node sent the statement %d times; want the function only", p[0]+p[1])
	}
}

// quietNode is a broker on pool in schema s that polls and sweeps only
// once a minute (so what it reads is what notifications and its own
// batches make it read), bound to a channel of what it delivers, and
// closed at the test's cleanup.
func quietNode(t *testing.T, pool *pgxpool.Pool, s string) (*pgbroker.Broker, chan pubsub.Message) {
	t.Helper()
	b, err := pgbroker.New(pubsubtest.Context(t), pool, pgbroker.WithSchema(s), pgbroker.WithLogger(pubsubtest.Logger()),
		pgbroker.WithDeliveryWindow(time.Minute), pgbroker.WithPollInterval(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan pubsub.Message, 100)
	b.Bind(func(m pubsub.Message) { got <- m })
	t.Cleanup(func() { b.Close() })
	return b, got
}
