package pubsub_test

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/roomcast/pubsub/protocol"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub"
)

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
	h := pubsub.NewHandler(pubsub.WithLogger(quietLogger()))
	mux := http.NewServeMux()
	mux.Handle("/ws", h)
	srv := httptest.NewTLSServer(mux)
	t.Cleanup(func() {
		h.Close()
		srv.Close()
	})
	base := "wss" + strings.TrimPrefix(srv.URL, "https") + "/ws"
	ctx := testCtx(t)

	c, _, err := websocket.Dial(ctx, base+"?room=tls", &websocket.DialOptions{HTTPClient: srv.Client()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseNow()
	c.SetReadLimit(-1)
	waitFor(t, "the TLS client in the room", func() bool { return len(h.Connections("tls")) == 1 })
	sizes := []int{1, 125, 126, 65535, 65536, 300 << 10}
	for i, n := range sizes {
		if err := h.Publish(ctx, "tls", writerPayload(i, n)); err != nil {
			t.Fatal(err)
		}
	}
	for i, n := range sizes {
		typ, b := readFrame(t, c)
		if typ != websocket.MessageText || !bytes.Equal(b, writerPayload(i, n)) {
			t.Fatalf("message %d: %v of %d bytes, want text of %d bytes as published", i, typ, len(b), n)
		}
	}

	pc, _, err := websocket.Dial(ctx, base, &websocket.DialOptions{HTTPClient: srv.Client(), Subprotocols: []string{protocol.Subprotocol}})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.CloseNow()
	pc.SetReadLimit(-1)
	p := &protoClient{t: t, c: pc}
	if p.welcome = p.read(); p.welcome.Type != "welcome" {
		t.Fatalf("first envelope %s, want welcome", p.welcome.raw)
	}
	p.subscribe("tls2")
	big := writerPayload(7, 200<<10)
	if err := h.Publish(ctx, "tls2", big); err != nil {
		t.Fatal(err)
	}
	if m := p.readMessage("tls2"); m.Text == nil || *m.Text != string(big) {
		t.Fatalf("protocol-mode message over TLS: not the %d bytes of text published", len(big))
	}

	if err := h.Disconnect(h.Connections("tls")[0].ID, "bye"); err != nil {
		t.Fatal(err)
	}
	expectClose(t, c, protocol.CloseDisconnected)
}

// The server's pings, its pongs to the client's pings and the messages
// share one byte stream, written by different goroutines: every control
// frame must land between two messages, never inside one, even when
// messages are large enough to fill the socket and be written in pieces.
func TestControlFramesNeverLandInsideAMessage(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t,
		pubsub.WithHeartbeat(10*time.Millisecond, 10*time.Second), // a ping whenever the client is silent
		pubsub.WithQueueLimits(4096, 256<<20))
	c := dial(t, wsURL(srv, "/ws?room=mix"))
	waitFor(t, "the client in the room", func() bool { return len(h.Connections("mix")) == 1 })
	ctx := testCtx(t)

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
		if err := h.Publish(ctx, "mix", writerPayload(i, sizes[i%len(sizes)])); err != nil {
			t.Fatal(err)
		}
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
	if st := h.Stats(); st.SlowConsumers != 0 {
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
	h := pubsub.NewHandler(pubsub.WithLogger(quietLogger()))
	srv := httptest.NewUnstartedServer(h)
	var written atomic.Int64
	srv.Listener = meteredListener{srv.Listener, &written}
	srv.Start()
	t.Cleanup(func() {
		h.Close()
		srv.Close()
	})
	c := dial(t, wsURL(srv, "/ws?room=metered"))
	waitFor(t, "the client in the room", func() bool { return len(h.Connections("metered")) == 1 })
	before := written.Load() // the handshake's response
	msg := writerPayload(1, 4<<10)
	if err := h.Publish(testCtx(t), "metered", msg); err != nil {
		t.Fatal(err)
	}
	if _, b := readFrame(t, c); !bytes.Equal(b, msg) {
		t.Fatalf("got %d bytes, not the message", len(b))
	}
	// The wrapper counts after its Write returned, which may be after the
	// client read the bytes: wait for the count.
	waitFor(t, "the wrapper's Write to have seen the message (else it was bypassed)", func() bool {
		return written.Load()-before >= int64(len(msg))
	})
}
