package redisbroker_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/pubsubtest"
	"github.com/roomcast/pubsub/redisbroker"
)

// lossyConn loses the reply to the next EVALSHA it carries once armed:
// Redis ran the script, and go-redis, seeing the connection drop, sends
// the same command again on another connection.
type lossyConn struct {
	net.Conn
	armed  *atomic.Bool
	sent   *atomic.Int64 // EVALSHAs written, over every connection
	losing bool          // only this connection's goroutine touches it
}

func (c *lossyConn) Write(p []byte) (int, error) {
	if bytes.Contains(bytes.ToLower(p), []byte("evalsha")) {
		c.sent.Add(1)
		if c.armed.CompareAndSwap(true, false) {
			c.losing = true
		}
	}
	return c.Conn.Write(p)
}

func (c *lossyConn) Read(p []byte) (int, error) {
	if c.losing {
		_, _ = c.Conn.Read(p) // the reply: Redis ran it
		c.Conn.Close()
		return 0, io.EOF
	}
	return c.Conn.Read(p)
}

// lossyBroker is a broker whose client loses a reply when armed is set.
func lossyBroker(t *testing.T, prefix string, armed *atomic.Bool, sent *atomic.Int64, opts ...redisbroker.Option) (*redisbroker.Broker, *redis.Client) {
	t.Helper()
	c := newClient(t, shared.Addr, func(o *redis.Options) {
		o.Dialer = func(ctx context.Context, network, addr string) (net.Conn, error) {
			conn, err := (&net.Dialer{}).DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return &lossyConn{Conn: conn, armed: armed, sent: sent}, nil
		}
	})
	b := redisbroker.New(c, append([]redisbroker.Option{redisbroker.WithPrefix(prefix), redisbroker.WithLogger(pubsubtest.Logger())}, opts...)...)
	b.Bind(func(pubsub.Message) {})
	t.Cleanup(func() { b.Close() })
	// Load the script first: a lost NOSCRIPT reply proves nothing.
	if _, err := b.Publish(pubsubtest.Context(t), "warm-up", nil, hist); err != nil {
		t.Fatal(err)
	}
	return b, c
}

var hist = pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: 100, TTL: time.Minute}}

func TestAResentBatchIsSequencedOnce(t *testing.T) {
	t.Parallel()
	var armed atomic.Bool
	var sent atomic.Int64
	b, _ := lossyBroker(t, uniquePrefix(), &armed, &sent)
	ctx := pubsubtest.Context(t)

	armed.Store(true)
	before := sent.Load()
	first, err := b.Publish(ctx, "room", []byte("once"), hist)
	if err != nil {
		t.Fatal(err)
	}
	if n := sent.Load() - before; n < 2 {
		t.Fatalf("the publish was sent %d times; the test needs go-redis to resend it", n)
	}
	if first.Seq != 1 || first.Duplicate {
		t.Fatalf("Publish = %+v, want seq 1: the resent batch must return the first run's result", first)
	}
	second, err := b.Publish(ctx, "room", []byte("next"), hist)
	if err != nil {
		t.Fatal(err)
	}
	if second.Seq != 2 {
		t.Fatalf("the next publish got seq %d, want 2: the resent batch sequenced its message again", second.Seq)
	}
	h, err := b.History(ctx, "room", pubsub.HistoryQuery{Limit: 10})
	if err != nil {
		t.Fatal(err)
	}
	if len(h.Messages) != 2 || h.Messages[0].ID != first.ID || string(h.Messages[0].Data) != "once" || h.Messages[1].ID != second.ID {
		t.Fatalf("history holds %+v, want once (%s) then next (%s)", h.Messages, first.ID, second.ID)
	}
}

// A batch of several rooms, keyed publishes among them, loses its reply:
// every publish gets one sequence number, its own, and keys still dedupe.
func TestAResentBatchOfManyRoomsIsSequencedOnce(t *testing.T) {
	t.Parallel()
	var armed atomic.Bool
	var sent atomic.Int64
	b, _ := lossyBroker(t, uniquePrefix(), &armed, &sent, redisbroker.WithPublishBatches(1))
	ctx := pubsubtest.Context(t)

	const rooms, per = 3, 20
	armed.Store(true)
	var (
		mu      sync.Mutex
		results = make(map[string][]pubsub.PublishResult)
		wg      sync.WaitGroup
	)
	for g := range rooms * 4 {
		wg.Go(func() {
			room := fmt.Sprint("room-", g%rooms)
			for i := range per / 4 {
				o := hist
				if i%2 == 0 {
					o.Key, o.KeyTTL = fmt.Sprint("k", g, "-", i), time.Minute
				}
				res, err := b.Publish(ctx, room, fmt.Appendf(nil, "%d/%d", g, i), o)
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				results[room] = append(results[room], res)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if armed.Load() {
		t.Fatal("no reply was lost")
	}
	for r := range rooms {
		room := fmt.Sprint("room-", r)
		got := results[room]
		slices.SortFunc(got, func(a, b pubsub.PublishResult) int { return int(a.Seq) - int(b.Seq) })
		h, err := b.History(ctx, room, pubsub.HistoryQuery{Limit: 1000})
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != per || len(h.Messages) != per || h.Top != per {
			t.Fatalf("%s: %d results, %d kept, top %d; want %d of each", room, len(got), len(h.Messages), h.Top, per)
		}
		for i, res := range got {
			m := h.Messages[i]
			if res.Duplicate || res.Seq != uint64(i+1) || m.Seq != res.Seq || m.ID != res.ID || !bytes.Equal(m.Data, res.Data) {
				t.Fatalf("%s: result %d is %+v, history has %+v", room, i, res, m)
			}
		}
	}
	// The keyed publishes, again: each is recognised.
	for g := range rooms * 4 {
		o := hist
		o.Key, o.KeyTTL = fmt.Sprint("k", g, "-0"), time.Minute
		res, err := b.Publish(ctx, fmt.Sprint("room-", g%rooms), []byte("again"), o)
		if err != nil {
			t.Fatal(err)
		}
		if !res.Duplicate {
			t.Fatalf("key %s was sequenced again: %+v", o.Key, res)
		}
	}
}

// Concurrent publishes share script runs, each room's in order, and the
// records that answer resent batches stay one per lane.
func TestConcurrentPublishesShareBatches(t *testing.T) {
	t.Parallel()
	srv := startRedis(t)
	prefix := uniquePrefix()
	b := newBroker(t, srv.Addr, prefix, redisbroker.WithPublishBatches(2))
	b.Bind(func(pubsub.Message) {})
	t.Cleanup(func() { b.Close() })
	admin := newClient(t, srv.Addr)
	ctx := pubsubtest.Context(t)

	const publishers, per = 32, 50
	var wg sync.WaitGroup
	for g := range publishers {
		wg.Go(func() {
			room := fmt.Sprint("room-", g%8)
			last := uint64(0)
			for i := range per {
				res, err := b.Publish(ctx, room, fmt.Appendf(nil, "%d", i), hist)
				if err != nil {
					t.Error(err)
					return
				}
				if res.Seq <= last {
					t.Errorf("%s: a publisher's publishes got seqs %d then %d", room, last, res.Seq)
				}
				last = res.Seq
			}
		})
	}
	wg.Wait()
	stats, err := admin.Info(ctx, "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	calls := commandCalls(stats, "evalsha") + commandCalls(stats, "eval")
	if calls == 0 || calls >= publishers*per {
		t.Fatalf("%d script runs for %d publishes, want fewer", calls, publishers*per)
	}
	t.Logf("%d publishes in %d script runs", publishers*per, calls)
	for r := range 8 {
		h, err := b.History(ctx, fmt.Sprint("room-", r), pubsub.HistoryQuery{Limit: 1000})
		if err != nil {
			t.Fatal(err)
		}
		if h.Top != publishers/8*per || len(h.Messages) != 100 || h.Messages[99].Seq != h.Top {
			t.Fatalf("room-%d: top %d, %d kept, want %d and the last 100", r, h.Top, len(h.Messages), publishers/8*per)
		}
	}
	lanes, err := admin.Keys(ctx, prefix+":l:*").Result()
	if err != nil {
		t.Fatal(err)
	}
	if len(lanes) > 2 {
		t.Fatalf("%d lane records %v, want at most one per lane (2)", len(lanes), lanes)
	}
}

func commandCalls(stats, cmd string) int {
	for line := range strings.SplitSeq(stats, "\n") {
		rest, ok := strings.CutPrefix(strings.TrimSpace(line), "cmdstat_"+cmd+":calls=")
		if ok {
			n, _ := strconv.Atoi(rest[:strings.IndexByte(rest, ',')])
			return n
		}
	}
	return 0
}

// Publishes extend the expiries of a room's keys only now and then; every
// message must still outlive its TTL, and the room's state its idle time.
func TestEveryPublishLeavesTheRoomAliveForItsTTL(t *testing.T) {
	t.Parallel()
	prefix := uniquePrefix()
	const roomTTL = 400 * time.Millisecond
	b := newBroker(t, shared.Addr, prefix, redisbroker.WithRoomTTL(roomTTL))
	b.Bind(func(pubsub.Message) {})
	t.Cleanup(func() { b.Close() })
	admin := newClient(t, shared.Addr)
	ctx := pubsubtest.Context(t)
	hist, meta := prefix+":{room}:h", prefix+":{room}:m"
	for _, ttl := range []time.Duration{200 * time.Millisecond, time.Second} {
		o := pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: 10, TTL: ttl}}
		renewed, skipped := 0, 0
		var lastHist time.Duration
		for start := time.Now(); time.Since(start) < ttl/3; {
			sent := time.Now()
			if _, err := b.Publish(ctx, "room", []byte("m"), o); err != nil {
				t.Fatal(err)
			}
			h, err := admin.PTTL(ctx, hist).Result()
			if err != nil {
				t.Fatal(err)
			}
			m, err := admin.PTTL(ctx, meta).Result()
			if err != nil {
				t.Fatal(err)
			}
			since := time.Since(sent)
			if h < ttl-since {
				t.Fatalf("history TTL %v: the stream expires in %v, %v after the publish: its message would not live its TTL", ttl, h, since)
			}
			if m < max(ttl, roomTTL)-since {
				t.Fatalf("history TTL %v: the room's state expires in %v, %v after the publish, want at least %v", ttl, m, since, max(ttl, roomTTL))
			}
			if h > lastHist {
				renewed++
			} else {
				skipped++
			}
			lastHist = h
		}
		if renewed == 0 || skipped == 0 {
			t.Fatalf("history TTL %v: %d publishes extended the expiries, %d did not; want both", ttl, renewed, skipped)
		}
	}
}

// Nodes of the earlier version share the Redis during a rolling upgrade:
// the entries their publish script wrote (fields i, t and d, as this one
// writes them) are served beside the current ones.
func TestHistoryReadsEntriesAnEarlierVersionWrote(t *testing.T) {
	t.Parallel()
	prefix := uniquePrefix()
	b := newBroker(t, shared.Addr, prefix)
	b.Bind(func(pubsub.Message) {})
	t.Cleanup(func() { b.Close() })
	admin := newClient(t, shared.Addr)
	ctx := pubsubtest.Context(t)
	first, err := b.Publish(ctx, "room", []byte("new 1"), hist)
	if err != nil {
		t.Fatal(err)
	}
	// What the earlier publish script did for seq 2.
	now := time.Now().UnixMicro()
	if err := admin.XAdd(ctx, &redis.XAddArgs{Stream: prefix + ":{room}:h", ID: "0-2",
		Values: []any{"i", "old-id", "t", strconv.FormatInt(now, 10), "d", "old 2"}}).Err(); err != nil {
		t.Fatal(err)
	}
	if err := admin.HSet(ctx, prefix+":{room}:m", "s", 2).Err(); err != nil {
		t.Fatal(err)
	}
	third, err := b.Publish(ctx, "room", []byte("new 3"), hist)
	if err != nil {
		t.Fatal(err)
	}
	h, err := b.History(ctx, "room", pubsub.HistoryQuery{Limit: 10})
	if err != nil {
		t.Fatal(err)
	}
	want := []struct{ id, data string }{{first.ID, "new 1"}, {"old-id", "old 2"}, {third.ID, "new 3"}}
	if len(h.Messages) != len(want) {
		t.Fatalf("history holds %d messages, want 3: %+v", len(h.Messages), h.Messages)
	}
	for i, w := range want {
		m := h.Messages[i]
		if m.Seq != uint64(i+1) || m.ID != w.id || string(m.Data) != w.data || m.Time.IsZero() {
			t.Fatalf("message %d is %+v, want %s %q", i, m, w.id, w.data)
		}
	}
	if got := h.Messages[1].Time.UnixMicro(); got != now {
		t.Fatalf("the old entry's time is %d, want %d", got, now)
	}
}

// gatedConn holds back the next EVALSHA it carries once armed, until
// released: a batch stuck on its way to Redis.
type gatedConn struct {
	net.Conn
	armed   *atomic.Bool
	held    chan struct{} // gets a value when an EVALSHA is held
	release chan struct{} // closed to let it go
}

func (c *gatedConn) Write(p []byte) (int, error) {
	if bytes.Contains(bytes.ToLower(p), []byte("evalsha")) && c.armed.CompareAndSwap(true, false) {
		c.held <- struct{}{}
		<-c.release
	}
	return c.Conn.Write(p)
}

// A publish still queued behind a batch in flight when its ctx ends
// returns at once and is never sent; the batch in flight is answered.
func TestAQueuedPublishWhoseContextEndsIsNeverSent(t *testing.T) {
	t.Parallel()
	var armed atomic.Bool
	held, release := make(chan struct{}, 1), make(chan struct{})
	c := newClient(t, shared.Addr, func(o *redis.Options) {
		o.Dialer = func(ctx context.Context, network, addr string) (net.Conn, error) {
			conn, err := (&net.Dialer{}).DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return &gatedConn{Conn: conn, armed: &armed, held: held, release: release}, nil
		}
	})
	b := redisbroker.New(c, redisbroker.WithPrefix(uniquePrefix()), redisbroker.WithLogger(pubsubtest.Logger()),
		redisbroker.WithPublishBatches(1))
	b.Bind(func(pubsub.Message) {})
	t.Cleanup(func() { b.Close() })
	ctx := pubsubtest.Context(t)
	if _, err := b.Publish(ctx, "room", []byte("1"), hist); err != nil {
		t.Fatal(err)
	}

	armed.Store(true)
	first := make(chan error, 1)
	go func() {
		res, err := b.Publish(ctx, "room", []byte("2"), hist)
		if err == nil && res.Seq != 2 {
			err = fmt.Errorf("seq %d, want 2", res.Seq)
		}
		first <- err
	}()
	<-held // the only lane's batch is on its way, and stays there
	gone, cancel := context.WithCancel(ctx)
	second := make(chan error, 1)
	go func() {
		_, err := b.Publish(gone, "room", []byte("never"), hist)
		second <- err
	}()
	cancel()
	select {
	case err := <-second:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("the queued publish returned %v, want context.Canceled", err)
		}
	case <-ctx.Done():
		t.Fatal("a queued publish whose ctx ended did not return while the batch ahead of it was stuck")
	}
	close(release)
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	third, err := b.Publish(ctx, "room", []byte("3"), hist)
	if err != nil {
		t.Fatal(err)
	}
	h, err := b.History(ctx, "room", pubsub.HistoryQuery{Limit: 10})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, m := range h.Messages {
		got = append(got, string(m.Data))
	}
	if third.Seq != 3 || !slices.Equal(got, []string{"1", "2", "3"}) {
		t.Fatalf("history %q, third publish seq %d; want 1 2 3: the abandoned publish must not be sequenced", got, third.Seq)
	}
}

// During a rolling upgrade, nodes of the version before batches (its
// publish script, verbatim in testdata) and of this one publish into the
// same rooms: one sequence, one history, every message delivered in order.
func TestNodesOfTheEarlierVersionShareTheRedis(t *testing.T) {
	t.Parallel()
	src, err := os.ReadFile("testdata/publish-242384c.lua")
	if err != nil {
		t.Fatal(err)
	}
	old := redis.NewScript(string(src))
	prefix := uniquePrefix()
	var mu sync.Mutex
	var got []pubsub.Message
	b := newBroker(t, shared.Addr, prefix)
	b.Bind(func(m pubsub.Message) {
		mu.Lock()
		got = append(got, m)
		mu.Unlock()
	})
	t.Cleanup(func() { b.Close() })
	admin := newClient(t, shared.Addr)
	ctx := pubsubtest.Context(t)
	if err := b.Subscribe(ctx, "room"); err != nil {
		t.Fatal(err)
	}
	base := prefix + ":{room}"
	publishOld := func(data, id string) uint64 {
		t.Helper()
		// KEYS: meta, hist. ARGV: data, id, epoch candidate, size, ttl ms, idle ms, channel, key ttl ms.
		vals, err := old.Run(ctx, admin, []string{base + ":m", base + ":h"},
			data, id, "old-epoch", 100, 60000, 3600000, base, 1).Slice()
		if err != nil {
			t.Fatalf("the earlier script: %v", err)
		}
		seq, _ := strconv.ParseUint(vals[1].(string), 10, 64)
		return seq
	}
	want := []string{"new 1", "old 2", "new 3", "old 4", "new 5"}
	for i, d := range want {
		var seq uint64
		if strings.HasPrefix(d, "old") {
			seq = publishOld(d, fmt.Sprint("old-id-", i+1))
		} else {
			res, err := b.Publish(ctx, "room", []byte(d), hist)
			if err != nil {
				t.Fatal(err)
			}
			seq = res.Seq
		}
		if seq != uint64(i+1) {
			t.Fatalf("%q got seq %d, want %d", d, seq, i+1)
		}
	}
	h, err := b.History(ctx, "room", pubsub.HistoryQuery{Limit: 10})
	if err != nil {
		t.Fatal(err)
	}
	pubsubtest.WaitFor(t, "every message to be delivered", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(got) >= len(want)
	})
	mu.Lock()
	defer mu.Unlock()
	if len(h.Messages) != len(want) || len(got) != len(want) {
		t.Fatalf("history holds %d, the node delivered %d; want %d", len(h.Messages), len(got), len(want))
	}
	for i, d := range want {
		if m := h.Messages[i]; m.Seq != uint64(i+1) || string(m.Data) != d || m.Epoch != h.Epoch {
			t.Fatalf("history message %d is %+v, want %q at seq %d", i, m, d, i+1)
		}
		if m := got[i]; m.Seq != uint64(i+1) || string(m.Data) != d || m.Epoch != h.Epoch {
			t.Fatalf("delivered message %d is %+v, want %q at seq %d", i, m, d, i+1)
		}
	}
}
