package pubsub

import (
	"errors"
	"runtime"
	"testing"

	"github.com/coder/websocket"
)

// A parked connection lends its read buffer and its control frames' write
// buffer back to the heap (they are most of what a connection would
// otherwise keep while idle), and gets fresh ones before anything reads or
// writes. A client's ping wakes it; the Handler answers with a pong (the
// ping's payload, which coder/websocket's Ping checks) and the connection
// parks again, lending both again: a client that pings, as Python's
// websockets does every 20 s, keeps no goroutine. (Closing a parked
// connection, whose close frame goes through the write buffer:
// TestClosingAParkedConnection.)
func TestAParkedConnectionAnswersPingsAndParksAgain(t *testing.T) {
	t.Parallel()
	h, url := parkServer(t)
	ctx := testContext(t)
	ws, c := dialRaw(t, ctx, h, url, "lend")
	lent := func() bool {
		h.poll.mu.Lock() // what park and takeLocked swap the buffers under
		defer h.poll.mu.Unlock()
		return c.br.Size() == parkedReader.Size() && c.bw.Size() == parkedWriter.Size()
	}
	waitUntil(t, ctx, "parked, its buffers lent", func() bool { return c.isParked() && lent() })
	go func() { _, _, _ = ws.Read(ctx) }() // reads the pongs for Ping
	for i := range 3 {
		if err := ws.Ping(ctx); err != nil {
			t.Fatalf("ping %d to a parked connection: %v", i+1, err)
		}
		waitUntil(t, ctx, "parked again, its buffers lent", func() bool { return c.isParked() && lent() })
	}
	if err := h.Publish(ctx, "lend", []byte("still there")); err != nil {
		t.Fatal(err)
	}
	if n, err := parkedWriter.Write([]byte("x")); n != 0 || !errors.Is(err, errWriteWhileParked) {
		t.Fatalf("a write to the parked writer: %d, %v; want 0 and errWriteWhileParked (and its buffer untouched)", n, err)
	}
}

// BenchmarkParkedWakeUp: a parked raw connection's message, from the
// client's write until the connection is parked again (the reader started
// by the poller, the message published to the room's other connection,
// the park). What a chat's connection costs per message it sends.
func BenchmarkParkedWakeUp(b *testing.B) {
	h, url := parkServer(b, WithClientPublish(true), WithRateLimit(1e9, 1<<30))
	ctx := testContext(b)
	wsA, a := dialRaw(b, ctx, h, url, "wake")
	wsB, _ := dialRaw(b, ctx, h, url, "wake")
	waitUntil(b, ctx, "parked", a.isParked)
	msg := []byte("a line of chat")
	b.ReportAllocs()
	for b.Loop() {
		if err := wsA.Write(ctx, websocket.MessageText, msg); err != nil {
			b.Fatal(err)
		}
		if _, _, err := wsB.Read(ctx); err != nil {
			b.Fatal(err)
		}
		for !a.isParked() {
			runtime.Gosched()
		}
	}
}
