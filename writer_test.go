package pubsub_test

import (
	"bytes"
	"fmt"
	"net"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// Who writes, end to end: messages whole and in order whatever writes
// them (the pool, a connection's own writer over TLS or a host's wrapped
// connection), control frames between messages, and a write that times
// out. The pool itself is tested from the inside in
// writer_internal_test.go.

// writerPayload is message i of n bytes: its index, then a filler that
// depends on it, so a message cut short, joined with another or reordered
// shows.
func writerPayload(i, n int) []byte {
	head := fmt.Sprintf("%06d:", i)
	b := bytes.Repeat([]byte{byte('a' + i%26)}, max(n, len(head)))
	copy(b, head)
	return b
}

// Messages cross every WebSocket length encoding (7-bit, 16-bit, 64-bit)
// whole and in order, in raw and protocol mode, to a client over TLS: a
// connection without a file descriptor of its own, written by its own
// writer rather than the pool.
func TestTLSClientsGetEveryMessageWhole(t *testing.T) {
	t.Parallel()
	h := quietHandler()
	srv := pubsubtest.ServeOn(t, h, httptest.NewTLSServer(h))

	c := srv.DialRaw("/ws?room=tls")
	pubsubtest.WaitFor(t, "the TLS client in the room", func() bool { return len(srv.Connections("tls")) == 1 })
	sizes := []int{1, 125, 126, 65535, 65536, 300 << 10}
	for i, n := range sizes {
		srv.Publish("tls", writerPayload(i, n))
	}
	for i, n := range sizes {
		if binary, b := c.Read(); binary || !bytes.Equal(b, writerPayload(i, n)) {
			t.Fatalf("message %d: %d bytes (binary %v), want text of %d bytes as published", i, len(b), binary, n)
		}
	}

	p := srv.Dial("/ws")
	p.Subscribe("tls2")
	big := writerPayload(7, 200<<10)
	srv.Publish("tls2", big)
	if m := p.NextMessage("tls2"); m.Text == nil || *m.Text != string(big) {
		t.Fatalf("protocol-mode message over TLS: not the %d bytes of text published", len(big))
	}

	if err := srv.Disconnect(srv.Connections("tls")[0].ID, "bye"); err != nil {
		t.Fatal(err)
	}
	c.ExpectClose(protocol.CloseDisconnected)
}

// The server's pings, its pongs to the client's pings and the messages
// share one byte stream, written by different goroutines: every control
// frame must land between two messages, never inside one, even when
// messages are large enough to fill the socket and be written in pieces.
// The client pings as it reads: a bare client (churn_test.go).
func TestControlFramesNeverLandInsideAMessage(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t,
		pubsub.WithHeartbeat(10*time.Millisecond, 10*time.Second), // a ping whenever the client is silent
		pubsub.WithQueueLimits(4096, 256<<20))
	c := newBareDialer(t).must(t, srv.WS("/ws?room=mix"), false).c
	pubsubtest.WaitFor(t, "the client in the room", func() bool { return len(srv.Connections("mix")) == 1 })
	ctx := pubsubtest.Context(t)

	const n = 120
	sizes := []int{3, 200, 70 << 10, 600 << 10}
	got := make(chan error, 1)
	go func() {
		for i := 0; ; i++ {
			typ, b, err := c.Read(ctx)
			if err != nil {
				if i < n {
					got <- fmt.Errorf("read of message %d: %w", i, err)
				}
				return
			}
			if i < n && (typ != websocket.MessageText || !bytes.Equal(b, writerPayload(i, sizes[i%len(sizes)]))) {
				got <- fmt.Errorf("message %d: %d bytes, not the %d published", i, len(b), sizes[i%len(sizes)])
				return
			}
			if i == n-1 {
				got <- nil // keep reading: a ping in flight needs its pong read
			}
		}
	}()
	for i := range n {
		srv.Publish("mix", writerPayload(i, sizes[i%len(sizes)]))
	}
	pings := 0
	for done := false; !done; {
		select {
		case err := <-got:
			if err != nil {
				t.Fatal(err)
			}
			done = true
		default:
			if err := c.Ping(ctx); err != nil {
				t.Fatalf("ping %d: %v", pings+1, err)
			}
			pings++
		}
	}
	if pings == 0 {
		t.Fatal("no ping crossed the messages")
	}
	if st := srv.Stats(); st.SlowConsumers != 0 {
		t.Fatalf("%d slow consumers, want 0", st.SlowConsumers)
	}
}

// meteredConn is what a host's listener might hand net/http: a TCP
// connection it wraps to count what is written, exposing the descriptor
// through the embedded *net.TCPConn.
type meteredConn struct {
	*net.TCPConn
	written *atomic.Int64
}

func (c meteredConn) Write(p []byte) (int, error) {
	n, err := c.TCPConn.Write(p)
	c.written.Add(int64(n))
	return n, err
}

type meteredListener struct {
	net.Listener
	written *atomic.Int64
}

func (l meteredListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return meteredConn{c.(*net.TCPConn), l.written}, nil
}

// A connection wrapped by the host's listener is written through the
// wrapper, never to the descriptor beneath it, even when the wrapper
// exposes that descriptor.
func TestWrappedConnectionsAreWrittenThroughTheirWrapper(t *testing.T) {
	t.Parallel()
	h := quietHandler()
	hs := httptest.NewUnstartedServer(h)
	var written atomic.Int64
	hs.Listener = meteredListener{hs.Listener, &written}
	hs.Start()
	srv := pubsubtest.ServeOn(t, h, hs)
	c := srv.DialRaw("/ws?room=metered")
	pubsubtest.WaitFor(t, "the client in the room", func() bool { return len(srv.Connections("metered")) == 1 })
	before := written.Load() // the handshake's response
	msg := writerPayload(1, 4<<10)
	srv.Publish("metered", msg)
	if _, b := c.Read(); !bytes.Equal(b, msg) {
		t.Fatalf("got %d bytes, not the message", len(b))
	}
	// The wrapper counts after its Write returned, which may be after the
	// client read the bytes: wait for the count.
	pubsubtest.WaitFor(t, "the wrapper's Write to have seen the message (else it was bypassed)", func() bool {
		return written.Load()-before >= int64(len(msg))
	})
}

// A client that stops reading is closed as soon as a write to it times out:
// 4002 "slow consumer: write timed out", counted, whatever its queue bound;
// the clients that read never notice.
func TestAWriteThatTimesOutClosesTheClientWith4002(t *testing.T) {
	t.Parallel()
	const attackers = 6
	var hooks hookLog
	srv := pubsubtest.Start(t, hooks.options(
		pubsub.WithQueueLimits(1_000_000, 1<<30), // out of reach: only a write can time out
		pubsub.WithWriteTimeout(200*time.Millisecond))...)
	reader := secWatch(t, "reading", newBareDialer(t).must(t, srv.WS("/ws?room=flood"), false))
	for range attackers {
		srv.DialRaw("/ws?room=flood") // never reads
	}
	pubsubtest.WaitFor(t, "every client in the room", func() bool { return len(srv.Connections("flood")) == attackers+1 })

	// Bursts of messages make batches larger than the socket's cork
	// buffer, so writes reach the network inside the WebSocket library's
	// Write too, not only when the batch is uncorked. The reader gets each
	// burst before the next: only the non-reading clients fall behind.
	const burst = 16
	chunk := bytes.Repeat([]byte("x"), 16<<10)
	gone := func() int {
		_, ds := hooks.snapshot()
		return len(ds)
	}
	for i := 1; gone() < attackers; i++ {
		if i > 5_000 {
			t.Fatalf("only %d of %d non-reading clients closed after %d bursts of %d messages of 16 KiB", gone(), attackers, i, burst)
		}
		for range burst {
			srv.Publish("flood", chunk)
		}
		reader.await(t, fmt.Sprintf("burst %d", i), func() bool { return reader.frames >= i*burst })
	}
	_, ds := hooks.snapshot()
	for _, ev := range ds {
		if ev.Code != protocol.CloseSlowConsumer || !strings.Contains(ev.Reason, "write timed out") {
			t.Errorf("client %s closed with %d %q, want 4002 \"slow consumer: write timed out\"", ev.Client.ID, ev.Code, ev.Reason)
		}
	}
	if n := srv.Stats().SlowConsumers; n != attackers {
		t.Errorf("Stats().SlowConsumers = %d, want %d", n, attackers)
	}
	srv.Publish("flood", []byte("after"))
	reader.await(t, "the message after", func() bool { return reader.got["after"] })
}
