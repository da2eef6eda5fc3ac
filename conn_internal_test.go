package pubsub

import (
	"context"
	"errors"
	"testing"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub/protocol"
)

// A connection's context (conn.context) is made only when something needs
// its Done channel: raw clients that listen, and one that publishes through
// the built-in broker, never make one, so an idle connection does not keep
// one for its whole life. Once made it ends with the connection; asked for
// after the connection began closing, it has ended already.
func TestAConnectionMakesItsContextOnlyWhenNeeded(t *testing.T) {
	t.Parallel()
	h, url := poolServer(t, nil, WithClientPublish(true))
	ctx := testContext(t)
	wsA, a := dialRaw(t, ctx, h, url, "ctx")
	wsB, b := dialRaw(t, ctx, h, url, "ctx")
	if err := h.Publish(ctx, "ctx", []byte("from the server")); err != nil {
		t.Fatal(err)
	}
	if err := wsA.Write(ctx, websocket.MessageText, []byte("from a")); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"from the server", "from a"} {
		if _, got, err := wsB.Read(ctx); err != nil || string(got) != want {
			t.Fatalf("b read %q, %v; want %q", got, err, want)
		}
	}
	made := func(c *conn) bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.ctx != nil
	}
	if made(a) || made(b) {
		t.Fatalf("contexts made: a (which published) %v, b (which listened) %v; want neither", made(a), made(b))
	}

	done := a.context().Done()
	select {
	case <-done:
		t.Fatal("a's context ended while a is connected")
	default:
	}
	if err := a.context().Err(); err != nil {
		t.Fatalf("a's context: %v while a is connected", err)
	}
	if err := h.Disconnect(a.client.ID, "bye"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-ctx.Done():
		t.Fatal("a's context did not end with a's connection")
	}
	if err := a.context().Err(); !errors.Is(err, context.Canceled) {
		t.Fatalf("a's context after the close: %v, want context.Canceled", err)
	}

	b.beginClose(protocol.CloseGoingAway, "bye", false)
	if err := b.context().Err(); !errors.Is(err, context.Canceled) {
		t.Fatalf("b's context after the close began: %v, want context.Canceled", err)
	}
	if made(b) {
		t.Fatal("Err made b's context")
	}
	select {
	case <-b.context().Done():
	default:
		t.Fatal("b's context, first asked for after the close began, has not ended")
	}
}
