package pubsub

import (
	"errors"
	"testing"
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
