package redisbroker_test

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/roomcast/pubsub/protocol"

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
	waitFor(t, "a publish to succeed after Redis came back", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		last = n.h.Publish(ctx, room, []byte(data))
		return last == nil
	})
}

func TestRedisRestartThatLostItsDataChangesTheEpoch(t *testing.T) {
	t.Parallel()
	srv := startRedis(t)
	logs := &logRecorder{}
	a := startNode(t, srv.Addr, uniquePrefix(), []redisbroker.Option{
		redisbroker.WithLogger(logs.logger()), redisbroker.WithPresenceTTL(300 * time.Millisecond),
	})
	c := dialProto(t, a.url("ann"))
	ack := c.subscribe("room", nil)
	for _, d := range []string{"1", "2", "3"} {
		a.publish(t, "room", d)
	}
	checkSeqs(t, c.readMessages("room", 3), ack.Epoch, 1, "1", "2", "3")

	srv.Stop()
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	publishWhenBack(t, a, "room", "after")
	// The subscriber is not left in a silently new stream: it is closed
	// (4006) and, coming back with its position, told it cannot recover.
	c.expectClose(t, protocol.CloseRoomReset)
	waitFor(t, "the lost state to be logged at Error", func() bool {
		return logs.find(slog.LevelError, "epoch changed", "room") || logs.find(slog.LevelError, "state is gone", "room")
	})
	c2 := dialProto(t, a.url("ann"))
	ack2 := c2.subscribe("room", map[string]any{"since": map[string]any{"epoch": ack.Epoch, "seq": 3}})
	if ack2.Recovered == nil || *ack2.Recovered || ack2.Reason != "epoch_changed" || ack2.Epoch == ack.Epoch || ack2.Seq != 1 {
		t.Fatalf("resubscribe with the old position: %s, want recovered false, reason epoch_changed, the new epoch at seq 1", ack2.raw)
	}
	// Presence lives in Redis again.
	waitFor(t, "ann's presence to be restored", func() bool {
		p, err := a.h.Presence(testCtx(t), "room")
		return err == nil && p.Count == 1 && p.Connections == 1
	})
}

func TestPublishFailsWhileRedisIsDownAndSubscriptionsResume(t *testing.T) {
	t.Parallel()
	srv := startRedis(t)
	a := startNode(t, srv.Addr, uniquePrefix(), nil)
	c := dialProto(t, a.url(""))
	c.subscribe("live", nil)
	a.publish(t, "live", "before")
	c.readMessages("live", 1)

	srv.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	err := a.h.Publish(ctx, "live", []byte("during"))
	if err == nil || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Publish while Redis is down: %v after %v, want a connection error before the deadline", err, time.Since(start))
	}
	t.Logf("Publish failed after %v: %v", time.Since(start), err)
	if e := c.request(map[string]any{"type": "publish", "room": "live", "text": "x"}); e.Type != "error" || e.Code != "unavailable" {
		t.Fatalf("client publish while Redis is down: %s, want error unavailable", e.raw)
	}

	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	admin := newClient(t, srv.Addr)
	waitFor(t, "the node's pub/sub connection to resubscribe", func() bool {
		list, err := admin.ClientList(testCtx(t)).Result()
		return err == nil && strings.Contains(list, "sub=1")
	})
	// This Redis restarted empty: the room's stream broke, so the
	// subscriber is closed (4006) rather than left with a silent gap; a
	// client that comes back is served live again.
	publishWhenBack(t, a, "live", "after")
	c.expectClose(t, protocol.CloseRoomReset)
	c2 := dialProto(t, a.url(""))
	c2.subscribe("live", nil)
	publishWhenBack(t, a, "live", "after 2")
	if got := c2.readMessages("live", 1)[0]; got.payload() != "after 2" {
		t.Fatalf("after the restart a new subscriber got %s, want the message published after it", got.raw)
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
	list, err := admin.ClientList(testCtx(t)).Result()
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
	if err := admin.Do(testCtx(t), "CLIENT", "KILL", "ID", id).Err(); err != nil {
		t.Fatal(err)
	}
	return func() { gate.closed.Store(false) }
}

// gatedNode starts a node whose Redis client dials through gate.
func gatedNode(t *testing.T, prefix, name string, gate *gatedDialer, logs *logRecorder, hopts ...pubsub.Option) *node {
	t.Helper()
	c := newClient(t, shared.Addr, func(o *redis.Options) {
		o.ClientName = name
		o.Dialer = gate.dial
	})
	b := redisbroker.New(c, redisbroker.WithPrefix(prefix), redisbroker.WithLogger(logs.logger()))
	return startNodeWith(t, b, hopts...)
}

func TestMessagesPublishedWhilePubSubIsDownAreFilledFromHistory(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	gate, logs := &gatedDialer{}, &logRecorder{}
	a := gatedNode(t, p, p+"-a", gate, logs)
	b := startNode(t, shared.Addr, p, nil)
	c := dialProto(t, a.url(""))
	ack := c.subscribe("room", nil)
	b.publish(t, "room", "1")
	c.readMessages("room", 1)

	reopen := cutPubSub(t, gate, p+"-a")
	for _, d := range []string{"2", "3", "4", "5", "6"} {
		b.publish(t, "room", d) // node a cannot hear these
	}
	reopen()
	b.publish(t, "room", "7")
	checkSeqs(t, c.readMessages("room", 6), ack.Epoch, 2, "2", "3", "4", "5", "6", "7")
	waitFor(t, "the filled gap to be logged", func() bool {
		return logs.find(slog.LevelWarn, "from the room's history", "room")
	})
}

// A gap the history cannot fill is never silent: it is logged at Error and
// the room's subscribers on the node are closed with 4006, so they
// reconnect and learn what they can recover.
func TestGapHistoryCannotFillResetsTheRoomsSubscribers(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	gate, logs := &gatedDialer{}, &logRecorder{}
	a := gatedNode(t, p, p+"-a", gate, logs, pubsub.WithHistory(0, 0))
	b := startNode(t, shared.Addr, p, nil, pubsub.WithHistory(0, 0))
	c := dialProto(t, a.url(""))
	ack := c.subscribe("room", nil)
	b.publish(t, "room", "1")
	c.readMessages("room", 1)

	reopen := cutPubSub(t, gate, p+"-a")
	b.publish(t, "room", "2")
	b.publish(t, "room", "3")
	reopen()
	waitFor(t, "the lost messages to be logged at Error", func() bool {
		return logs.find(slog.LevelError, "messages were lost", "room")
	})
	_ = ack
	c.expectClose(t, protocol.CloseRoomReset)
}

func TestCloseReturnsWhileRedisIsDown(t *testing.T) {
	t.Parallel()
	srv := startRedis(t)
	a := startNode(t, srv.Addr, uniquePrefix(), []redisbroker.Option{redisbroker.WithPresenceTTL(90 * time.Millisecond)})
	c := dialProto(t, a.url("ann"))
	c.subscribe("room", nil)
	srv.Stop()
	done := make(chan struct{})
	go func() {
		a.h.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("Close did not return while Redis was down")
	}
}
