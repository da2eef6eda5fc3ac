package client_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/client"
	"github.com/roomcast/pubsub/internal/faultproxy"
	"github.com/roomcast/pubsub/pubsubtest"
)

// Publishing exactly once across dropped connections: the client reaches
// the server through a proxy, and the server's broker cuts that proxy at
// the worst moments, right after a publish was sequenced and before its
// ack could go back. Every message must appear in its room exactly once,
// in the order the client published them, and Publish must return the
// position subscribers saw.

// cuttingBroker is the memory broker with a hook that runs after each
// publish with a key was sequenced (or recognised), before the Handler can
// answer it: where a connection drop hurts most.
type cuttingBroker struct {
	pubsub.Broker
	mu    sync.Mutex
	after func(res pubsub.PublishResult, attempt int) // attempt counts the publishes of one key, from 1
	seen  map[string]int
}

func newCuttingBroker() *cuttingBroker {
	return &cuttingBroker{Broker: pubsub.NewMemoryBroker(), seen: make(map[string]int)}
}

func (b *cuttingBroker) Publish(ctx context.Context, room string, data []byte, o pubsub.PublishOptions) (pubsub.PublishResult, error) {
	res, err := b.Broker.Publish(ctx, room, data, o)
	if err != nil || o.Key == "" {
		return res, err
	}
	b.mu.Lock()
	b.seen[o.Key]++
	attempt, after := b.seen[o.Key], b.after
	b.mu.Unlock()
	if after != nil {
		after(res, attempt)
	}
	return res, err
}

func (b *cuttingBroker) onPublish(f func(res pubsub.PublishResult, attempt int)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.after = f
}

// blip cuts every connection through p and lets new ones through at once:
// the client reconnects straight away.
func blip(p *faultproxy.Proxy) {
	p.Cut()
	p.Heal()
}

// outboxSetup is a server whose broker can cut, a subscriber on it, and a
// client reaching it through a proxy.
func outboxSetup(t *testing.T, opts ...pubsub.Option) (*pubsubtest.Server, *cuttingBroker, *faultproxy.Proxy, *pubsubtest.Conn, *client.Client) {
	t.Helper()
	b := newCuttingBroker()
	srv := pubsubtest.Start(t, append([]pubsub.Option{pubsub.WithBroker(b), pubsub.WithClientPublish(true)}, opts...)...)
	watcher := srv.Dial("/ws")
	watcher.Subscribe("room")
	p, err := faultproxy.Start(strings.TrimPrefix(srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	c := dialClient(t, "ws://"+p.Addr()+"/ws")
	return srv, b, p, watcher, c
}

// expectOnce reads the next messages of the room and checks they are
// exactly payloads, in order, at the positions Publish returned.
func expectOnce(t *testing.T, watcher *pubsubtest.Conn, pubs []client.Published, payloads ...string) {
	t.Helper()
	for i, m := range watcher.Messages("room", len(payloads)) {
		if string(m.Payload()) != payloads[i] {
			t.Fatalf("message %d is %s, want %q", i, m.Raw, payloads[i])
		}
		if i < len(pubs) && (pubs[i].Seq != m.Seq || pubs[i].Epoch != m.Epoch || pubs[i].MessageID != m.MessageID) {
			t.Fatalf("Publish said %+v, the subscriber saw %s", pubs[i], m.Raw)
		}
	}
}

// marker publishes from the backend and expects it next: nothing else
// (no second copy) came in between.
func marker(t *testing.T, srv *pubsubtest.Server, watcher *pubsubtest.Conn) {
	t.Helper()
	srv.Publish("room", []byte("marker"))
	if m := watcher.NextMessage("room"); string(m.Payload()) != "marker" {
		t.Fatalf("got %s, want the marker: a message appeared twice", m.Raw)
	}
}

func TestAPublishWhoseAckIsLostIsPublishedOnce(t *testing.T) {
	t.Parallel()
	srv, b, p, watcher, c := outboxSetup(t)
	b.onPublish(func(_ pubsub.PublishResult, attempt int) {
		if attempt == 1 {
			blip(p) // sequenced; the ack dies with the connection
		}
	})
	pub, err := c.Publish(testCtx(t), "room", []byte("hello"))
	if err != nil {
		t.Fatal(err)
	}
	if !pub.Duplicate || pub.Seq != 1 || pub.Room != "room" {
		t.Fatalf("Publish = %+v, want the first attempt's position, seq 1, as a duplicate", pub)
	}
	expectOnce(t, watcher, []client.Published{pub}, "hello")
	marker(t, srv, watcher)
	if st := srv.Handler.Stats(); st.Duplicates != 1 {
		t.Fatalf("Stats.Duplicates = %d, want 1", st.Duplicates)
	}
}

func TestAPublishWhoseResendIsCutTooIsPublishedOnce(t *testing.T) {
	t.Parallel()
	srv, b, p, watcher, c := outboxSetup(t)
	b.onPublish(func(_ pubsub.PublishResult, attempt int) {
		if attempt <= 2 {
			blip(p) // after the first attempt, and again during the resend
		}
	})
	pub, err := c.Publish(testCtx(t), "room", []byte("hello"))
	if err != nil || !pub.Duplicate || pub.Seq != 1 {
		t.Fatalf("Publish = %+v, %v; want seq 1 as a duplicate, after three attempts", pub, err)
	}
	expectOnce(t, watcher, []client.Published{pub}, "hello")
	marker(t, srv, watcher)
}

func TestPublishesKeepTheirOrderAndAppearOnceUnderRepeatedDrops(t *testing.T) {
	t.Parallel()
	srv, b, p, watcher, c := outboxSetup(t)
	var n sync.Mutex
	count := 0
	b.onPublish(func(_ pubsub.PublishResult, attempt int) {
		n.Lock()
		count++
		cut := count%3 == 0
		n.Unlock()
		if cut {
			blip(p)
		}
	})
	var pubs []client.Published
	var want []string
	for i := range 20 {
		pub, err := c.Publish(testCtx(t), "room", []byte(fmt.Sprint(i)))
		if err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
		pubs = append(pubs, pub)
		want = append(want, fmt.Sprint(i))
	}
	expectOnce(t, watcher, pubs, want...)
	marker(t, srv, watcher)
}

func TestPublishesMadeWhileDisconnectedGoOutInOrderOnReconnect(t *testing.T) {
	t.Parallel()
	srv, _, p, watcher, c := outboxSetup(t)
	p.Cut() // stays cut: the client waits to reconnect
	pubsubtest.WaitFor(t, "the client to notice", func() bool { return c.State() == client.StateReconnecting })
	for i := range 3 {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		_, err := c.Publish(ctx, "room", []byte(fmt.Sprint("offline ", i)))
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("publish while disconnected: %v, want the caller's deadline (it stays in the outbox)", err)
		}
	}
	p.Heal()
	pub, err := c.Publish(testCtx(t), "room", []byte("online"))
	if err != nil {
		t.Fatal(err)
	}
	if pub.Seq != 4 {
		t.Fatalf("the publish made after the reconnect landed at %d, want 4: after the three that waited", pub.Seq)
	}
	expectOnce(t, watcher, nil, "offline 0", "offline 1", "offline 2", "online")
	marker(t, srv, watcher)
}

func TestAFullOutboxRefusesAtOnce(t *testing.T) {
	t.Parallel()
	b := newCuttingBroker()
	srv := pubsubtest.Start(t, pubsub.WithBroker(b), pubsub.WithClientPublish(true))
	p, err := faultproxy.Start(strings.TrimPrefix(srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	c := dialClient(t, "ws://"+p.Addr()+"/ws", client.WithOutbox(2))
	p.Cut()
	pubsubtest.WaitFor(t, "the client to notice", func() bool { return c.State() == client.StateReconnecting })
	for i := range 2 {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
		c.Publish(ctx, "room", []byte(fmt.Sprint(i)))
		cancel()
	}
	if _, err := c.Publish(testCtx(t), "room", []byte("third")); !errors.Is(err, client.ErrOutboxFull) {
		t.Fatalf("a third publish into an outbox of 2: %v, want ErrOutboxFull", err)
	}
}

// A publish that cannot be confirmed within the server's key window fails
// rather than risk a second copy: the server would no longer recognise it.
func TestAPublishUnconfirmedWithinTheKeyWindowExpires(t *testing.T) {
	t.Parallel()
	srv, b, p, watcher, c := outboxSetup(t, pubsub.WithIdempotencyWindow(time.Second))
	cutAt := make(chan time.Time, 1)
	b.onPublish(func(_ pubsub.PublishResult, attempt int) {
		if attempt == 1 {
			p.Cut() // and stays cut past the window
			cutAt <- time.Now()
		}
	})
	done := make(chan error, 1)
	go func() {
		_, err := c.Publish(context.Background(), "room", []byte("hello"))
		done <- err
	}()
	at := <-cutAt
	expectOnce(t, watcher, nil, "hello")
	pubsubtest.WaitFor(t, "the key window to pass", func() bool { return time.Since(at) > 1200*time.Millisecond })
	p.Heal()
	select {
	case err := <-done:
		if !errors.Is(err, client.ErrExpired) {
			t.Fatalf("Publish = %v, want ErrExpired", err)
		}
	case <-time.After(pubsubtest.Timeout):
		t.Fatal("Publish did not return after the reconnect")
	}
	marker(t, srv, watcher)
}

func TestPublishFailsWithErrClosedWhenTheClientCloses(t *testing.T) {
	t.Parallel()
	_, _, p, _, c := outboxSetup(t)
	p.Cut()
	pubsubtest.WaitFor(t, "the client to notice", func() bool { return c.State() == client.StateReconnecting })
	done := make(chan error, 1)
	go func() {
		_, err := c.Publish(context.Background(), "room", []byte("never"))
		done <- err
	}()
	pubsubtest.WaitFor(t, "the publish to wait in the outbox", func() bool { return len(done) == 0 })
	c.Close()
	if err := <-done; !errors.Is(err, client.ErrClosed) {
		t.Fatalf("Publish = %v, want ErrClosed", err)
	}
}
