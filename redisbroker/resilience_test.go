package redisbroker_test

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"

	"github.com/redis/go-redis/v9"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/redisbroker"
	"github.com/roomcast/pubsub/redisbroker/internal/redistest"
)

// startRedis starts a redis-server of the test's own, for tests that stop
// or restart it. It is stopped after everything the test registers later.
func startRedis(t *testing.T) *redistest.Server {
	t.Helper()
	srv, err := redistest.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	return srv
}

// publishWhenBack publishes once Redis answers again (the first attempts
// fail while the pool's connections are being replaced).
func publishWhenBack(t *testing.T, n *node, room, data string) {
	t.Helper()
	var last error
	pubsubtest.WaitFor(t, "a publish to succeed after Redis came back", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		last = n.Handler.Publish(ctx, room, []byte(data))
		return last == nil
	})
}

func TestRedisRestartThatLostItsDataChangesTheEpoch(t *testing.T) {
	t.Parallel()
	srv := startRedis(t)
	logs := &pubsubtest.Logs{}
	a := startNode(t, srv.Addr, uniquePrefix(), []redisbroker.Option{
		redisbroker.WithLogger(logs.Logger()), redisbroker.WithPresenceTTL(300 * time.Millisecond),
	})
	c := pubsubtest.Dial(t, a.url("ann"))
	ack := c.Subscribe("room")
	for _, d := range []string{"1", "2", "3"} {
		a.Publish("room", []byte(d))
	}
	checkSeqs(t, c.Messages("room", 3), ack.Epoch, 1, "1", "2", "3")

	srv.Stop()
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	publishWhenBack(t, a, "room", "after")
	// The subscriber is not left in a silently new stream: it is closed
	// (4006) and, coming back with its position, told it cannot recover.
	c.ExpectClose(protocol.CloseRoomReset)
	pubsubtest.WaitFor(t, "the lost state to be logged at Error", func() bool {
		return logs.Find(slog.LevelError, "epoch changed", "room", "room") || logs.Find(slog.LevelError, "state is gone", "room", "room")
	})
	c2 := pubsubtest.Dial(t, a.url("ann"))
	ack2 := c2.SubscribeWith(pubsubtest.Fields{"room": "room", "since": pubsubtest.Fields{"epoch": ack.Epoch, "seq": 3}})
	if ack2.Recovered == nil || *ack2.Recovered || ack2.Reason != "epoch_changed" || ack2.Epoch == ack.Epoch || ack2.Seq != 1 {
		t.Fatalf("resubscribe with the old position: %s, want recovered false, reason epoch_changed, the new epoch at seq 1", ack2.Raw)
	}
	// Presence lives in Redis again.
	pubsubtest.WaitFor(t, "ann's presence to be restored", func() bool {
		p, err := a.Handler.Presence(pubsubtest.Context(t), "room")
		return err == nil && p.Count == 1 && p.Connections == 1
	})
}

func TestPublishFailsWhileRedisIsDownAndSubscriptionsResume(t *testing.T) {
	t.Parallel()
	srv := startRedis(t)
	a := startNode(t, srv.Addr, uniquePrefix(), nil)
	c := pubsubtest.Dial(t, a.url(""))
	c.Subscribe("live")
	a.Publish("live", []byte("before"))
	c.Messages("live", 1)

	srv.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	err := a.Handler.Publish(ctx, "live", []byte("during"))
	if err == nil || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Publish while Redis is down: %v after %v, want a connection error before the deadline", err, time.Since(start))
	}
	t.Logf("Publish failed after %v: %v", time.Since(start), err)
	if e := c.Request(pubsubtest.Fields{"type": "publish", "room": "live", "text": "x"}); e.Type != "error" || e.Code != "unavailable" {
		t.Fatalf("client publish while Redis is down: %s, want error unavailable", e.Raw)
	}

	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	admin := newClient(t, srv.Addr)
	pubsubtest.WaitFor(t, "the node's pub/sub connection to resubscribe", func() bool {
		list, err := admin.ClientList(pubsubtest.Context(t)).Result()
		return err == nil && strings.Contains(list, "sub=1")
	})
	// This Redis restarted empty: the room's stream broke, so the
	// subscriber is closed (4006) rather than left with a silent gap; a
	// client that comes back is served live again.
	publishWhenBack(t, a, "live", "after")
	c.ExpectClose(protocol.CloseRoomReset)
	c2 := pubsubtest.Dial(t, a.url(""))
	c2.Subscribe("live")
	publishWhenBack(t, a, "live", "after 2")
	if got := c2.Messages("live", 1)[0]; string(got.Payload()) != "after 2" {
		t.Fatalf("after the restart a new subscriber got %s, want the message published after it", got.Raw)
	}
}

// gatedDialer refuses new connections while closed, to keep a node's
// pub/sub connection down for as long as a test needs.
type gatedDialer struct{ closed atomic.Bool }

func (g *gatedDialer) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	if g.closed.Load() {
		return nil, errors.New("gated: connection refused by the test")
	}
	var d net.Dialer
	return d.DialContext(ctx, network, addr)
}

// cutPubSub kills the named client's pub/sub connection and keeps it down
// until the returned function is called.
func cutPubSub(t *testing.T, gate *gatedDialer, name string) (reopen func()) {
	t.Helper()
	admin := newClient(t, shared.Addr)
	list, err := admin.ClientList(pubsubtest.Context(t)).Result()
	if err != nil {
		t.Fatal(err)
	}
	id := ""
	for line := range strings.Lines(list) {
		if strings.Contains(line, " name="+name+" ") && strings.Contains(line, "sub=1") {
			for f := range strings.FieldsSeq(line) {
				if v, ok := strings.CutPrefix(f, "id="); ok {
					id = v
				}
			}
		}
	}
	if id == "" {
		t.Fatalf("no pub/sub connection named %s in\n%s", name, list)
	}
	gate.closed.Store(true)
	if err := admin.Do(pubsubtest.Context(t), "CLIENT", "KILL", "ID", id).Err(); err != nil {
		t.Fatal(err)
	}
	return func() { gate.closed.Store(false) }
}

// gatedNode starts a node whose Redis client dials through gate.
func gatedNode(t *testing.T, prefix, name string, gate *gatedDialer, logs *pubsubtest.Logs, hopts ...pubsub.Option) *node {
	t.Helper()
	c := newClient(t, shared.Addr, func(o *redis.Options) {
		o.ClientName = name
		o.Dialer = gate.dial
	})
	b := redisbroker.New(c, redisbroker.WithPrefix(prefix), redisbroker.WithLogger(logs.Logger()))
	return startNodeWith(t, b, hopts...)
}

func TestMessagesPublishedWhilePubSubIsDownAreFilledFromHistory(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	gate, logs := &gatedDialer{}, &pubsubtest.Logs{}
	a := gatedNode(t, p, p+"-a", gate, logs)
	b := startNode(t, shared.Addr, p, nil)
	c := pubsubtest.Dial(t, a.url(""))
	ack := c.Subscribe("room")
	b.Publish("room", []byte("1"))
	c.Messages("room", 1)

	reopen := cutPubSub(t, gate, p+"-a")
	for _, d := range []string{"2", "3", "4", "5", "6"} {
		b.Publish("room", []byte(d)) // node a cannot hear these
	}
	reopen()
	b.Publish("room", []byte("7"))
	checkSeqs(t, c.Messages("room", 6), ack.Epoch, 2, "2", "3", "4", "5", "6", "7")
	pubsubtest.WaitFor(t, "the filled gap to be logged", func() bool {
		return logs.Find(slog.LevelWarn, "from the room's history", "room", "room")
	})
}

// A gap the history cannot fill is never silent: it is logged at Error and
// the room's subscribers on the node are closed with 4006, so they
// reconnect and learn what they can recover.
func TestGapHistoryCannotFillResetsTheRoomsSubscribers(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	gate, logs := &gatedDialer{}, &pubsubtest.Logs{}
	a := gatedNode(t, p, p+"-a", gate, logs, pubsub.WithHistory(0, 0))
	b := startNode(t, shared.Addr, p, nil, pubsub.WithHistory(0, 0))
	c := pubsubtest.Dial(t, a.url(""))
	ack := c.Subscribe("room")
	b.Publish("room", []byte("1"))
	c.Messages("room", 1)

	reopen := cutPubSub(t, gate, p+"-a")
	b.Publish("room", []byte("2"))
	b.Publish("room", []byte("3"))
	reopen()
	pubsubtest.WaitFor(t, "the lost messages to be logged at Error", func() bool {
		return logs.Find(slog.LevelError, "messages were lost", "room", "room")
	})
	_ = ack
	c.ExpectClose(protocol.CloseRoomReset)
}

func TestCloseReturnsWhileRedisIsDown(t *testing.T) {
	t.Parallel()
	srv := startRedis(t)
	a := startNode(t, srv.Addr, uniquePrefix(), []redisbroker.Option{redisbroker.WithPresenceTTL(90 * time.Millisecond)})
	c := pubsubtest.Dial(t, a.url("ann"))
	c.Subscribe("room")
	srv.Stop()
	done := make(chan struct{})
	go func() {
		a.Handler.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("Close did not return while Redis was down")
	}
}

// The reader pings a pub/sub connection that stays silent (a ping that
// cannot be written breaks the connection, and go-redis reconnects and
// subscribes again), and the connection delivers on after it.
func TestASilentPubSubConnectionIsPinged(t *testing.T) {
	t.Parallel()
	srv := startRedis(t)
	a := startNode(t, srv.Addr, uniquePrefix(), nil)
	admin := newClient(t, srv.Addr)
	c := pubsubtest.Dial(t, a.url(""))
	c.Subscribe("room")
	pings := func() int64 {
		s, err := admin.Info(pubsubtest.Context(t), "commandstats").Result()
		if err != nil {
			t.Fatal(err)
		}
		for line := range strings.SplitSeq(s, "\n") {
			if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "cmdstat_ping:calls="); ok {
				n, _ := strconv.ParseInt(rest[:strings.IndexByte(rest, ',')], 10, 64)
				return n
			}
		}
		return 0
	}
	before := pings() // the server's start pinged it too
	pubsubtest.WaitFor(t, "the reader to ping its silent connection", func() bool { return pings() > before })
	a.Publish("room", []byte("after"))
	if got := c.Messages("room", 1)[0]; string(got.Payload()) != "after" {
		t.Fatalf("after the ping the subscriber got %s, want the message published after it", got.Raw)
	}
}
