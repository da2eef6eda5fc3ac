package pubsub

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/base64"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub/protocol"
)

// The poller (poller_linux.go, conn.waitInput): an idle connection parks,
// with no goroutine, and misses neither its input, nor its heartbeat, nor
// its close.

// isParked reports whether c waits in the poller, with no goroutine.
func (c *conn) isParked() bool { return c.h.poll.has(c) }

// parkServer is poolServer for the poller: skipped where nothing parks.
func parkServer(t testing.TB, opts ...Option) (*Handler, string) {
	t.Helper()
	if !parkable {
		t.Skip("connections do not park on this platform")
	}
	return poolServer(t, nil, opts...)
}

func testContext(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestAParkedConnectionReadsItsInputAndParksAgain(t *testing.T) {
	t.Parallel()
	h, url := parkServer(t, WithClientPublish(true))
	ctx := testContext(t)
	wsA, a := dialRaw(t, ctx, h, url, "p")
	wsB, b := dialRaw(t, ctx, h, url, "p")
	waitUntil(t, ctx, "both connections parked", func() bool { return a.isParked() && b.isParked() })
	for i, text := range []string{"first", "second", "third"} {
		if err := wsA.Write(ctx, websocket.MessageText, []byte(text)); err != nil {
			t.Fatal(err)
		}
		if _, got, err := wsB.Read(ctx); err != nil || string(got) != text {
			t.Fatalf("message %d: b read %q, %v; want %q, published by a's parked connection", i+1, got, err, text)
		}
		waitUntil(t, ctx, "a parked again", a.isParked)
	}
	if n := h.Stats().MessagesIn; n != 3 {
		t.Fatalf("%d messages in, want 3", n)
	}
}

func TestAParkedConnectionAnswersItsHeartbeatAndParksAgain(t *testing.T) {
	t.Parallel()
	// A short interval, a generous timeout: a loaded machine cannot fail a
	// client that answers.
	h, url := parkServer(t, WithHeartbeat(20*time.Millisecond, 2*time.Second))
	ctx := testContext(t)
	var pings atomic.Int32
	var third atomic.Int64
	ws, _, err := websocket.Dial(ctx, url+"?room=hb", &websocket.DialOptions{
		OnPingReceived: func(context.Context, []byte) bool {
			if pings.Add(1) == 3 {
				third.Store(time.Now().UnixNano())
			}
			return true // coder/websocket answers with a pong
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.CloseNow() })
	frames := make(chan string, 1)
	go func() { // a read in progress answers the pings
		for {
			_, b, err := ws.Read(context.Background())
			if err != nil {
				close(frames)
				return
			}
			frames <- string(b)
		}
	}()
	var c *conn
	waitUntil(t, ctx, "registered", func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		for _, x := range h.conns {
			c = x
		}
		return c != nil
	})
	waitUntil(t, ctx, "three pings", func() bool { return pings.Load() >= 3 })
	// Parked with a pong of the third ping (or later) counted: the pong was
	// taken by the Handler (takeControl). Had coder/websocket read it, its
	// reader would still wait inside Read for a message, not parked.
	waitUntil(t, ctx, "parked after a pong", func() bool {
		return c.isParked() && c.lastSeen.Load() >= third.Load()
	})
	if err := h.Publish(ctx, "hb", []byte("still here")); err != nil {
		t.Fatal(err)
	}
	select {
	case f, ok := <-frames:
		if !ok || f != "still here" {
			t.Fatalf("read %q (open %v), want the message", f, ok)
		}
	case <-ctx.Done():
		t.Fatal("timed out")
	}
	if st := h.Stats(); st.Connections != 1 {
		t.Fatalf("%d connections, want the one", st.Connections)
	}
}

func TestAParkedSilentConnectionIsClosedByItsHeartbeat(t *testing.T) {
	t.Parallel()
	h, url := parkServer(t, WithHeartbeat(20*time.Millisecond, 20*time.Millisecond))
	ctx := testContext(t)
	ws, c := dialRaw(t, ctx, h, url, "silent") // never reads: never answers a ping
	waitUntil(t, ctx, "parked", c.isParked)
	waitUntil(t, ctx, "the heartbeat to close it", func() bool { return h.Stats().Connections == 0 })
	if code, _ := c.closeStatus(); code != protocol.CloseHeartbeatTimeout {
		t.Fatalf("closed with %d, want %d", code, protocol.CloseHeartbeatTimeout)
	}
	_ = ws
}

func TestClosingAParkedConnection(t *testing.T) {
	t.Parallel()
	for _, how := range []string{"disconnect", "client close", "client gone", "closed under the Handler", "shutdown", "close"} {
		t.Run(how, func(t *testing.T) {
			t.Parallel()
			h, url := parkServer(t)
			ctx := testContext(t)
			ws, c := dialRaw(t, ctx, h, url, "r")
			waitUntil(t, ctx, "parked", c.isParked)
			var want protocol.CloseCode
			switch how {
			case "disconnect":
				want = protocol.CloseDisconnected
				if err := h.Disconnect(c.client.ID, "bye"); err != nil {
					t.Fatal(err)
				}
				if _, _, err := ws.Read(ctx); websocket.CloseStatus(err) != websocket.StatusCode(want) {
					t.Fatalf("client read %v, want close %d", err, want)
				}
			case "client close":
				want = protocol.CloseNormal
				if err := ws.Close(websocket.StatusNormalClosure, "done"); err != nil {
					t.Fatalf("the close handshake with a parked connection: %v", err)
				}
			case "client gone":
				want = protocol.CloseAbnormal
				ws.CloseNow()
			case "closed under the Handler":
				// As a host that tracked its connections through
				// http.Server.ConnState may: no readiness is reported, the
				// poller's sweep finds it.
				want = protocol.CloseAbnormal
				_ = c.sock.Conn.Close()
				if err := h.Publish(ctx, "other", []byte("x")); err != nil {
					t.Fatal(err)
				}
			case "shutdown":
				want = protocol.CloseGoingAway
				go func() { _, _, _ = ws.Read(ctx) }() // answers the close
				if err := h.Shutdown(ctx); err != nil {
					t.Fatalf("shutdown with a parked connection: %v", err)
				}
			case "close":
				want = protocol.CloseGoingAway
				if err := h.Close(); err != nil {
					t.Fatal(err)
				}
			}
			waitUntil(t, ctx, "the connection to end", func() bool { return h.Stats().Connections == 0 })
			if code, _ := c.closeStatus(); code != want {
				t.Fatalf("closed with %d, want %d", code, want)
			}
			if c.isParked() {
				t.Fatal("an ended connection is still parked")
			}
		})
	}
}

// A client's first message, sent in the same packet as its upgrade
// request, sits in the handshake's buffer: the connection must read it,
// not park over it.
func TestAMessageSentWithTheUpgradeIsReadBeforeParking(t *testing.T) {
	t.Parallel()
	h, url := parkServer(t, WithClientPublish(true))
	ctx := testContext(t)
	wsB, _ := dialRaw(t, ctx, h, url, "early")

	addr := strings.TrimPrefix(strings.TrimSuffix(url, "/ws"), "ws://")
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	key := make([]byte, 16)
	_, _ = rand.Read(key)
	req := "GET /ws?room=early HTTP/1.1\r\nHost: " + addr + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + base64.StdEncoding.EncodeToString(key) + "\r\n\r\n"
	if _, err := nc.Write(append([]byte(req), maskedFrame(0x81, []byte("early bird"))...)); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(nc), nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	if _, got, err := wsB.Read(ctx); err != nil || string(got) != "early bird" {
		t.Fatalf("read %q, %v; want the message sent with the upgrade", got, err)
	}
}

// maskedFrame is a client frame: FIN and opcode in b0, payload masked.
func maskedFrame(b0 byte, payload []byte) []byte {
	mask := [4]byte{1, 2, 3, 4}
	f := []byte{b0, 0x80 | byte(len(payload)), mask[0], mask[1], mask[2], mask[3]}
	for i, b := range payload {
		f = append(f, b^mask[i%4])
	}
	return f
}

func TestControlSize(t *testing.T) {
	t.Parallel()
	pong := maskedFrame(0x8A, []byte("hb"))
	ping := maskedFrame(0x89, []byte("1234"))
	for _, tt := range []struct {
		name string
		b    []byte
		want int
		op   byte
	}{
		{"a pong", pong, len(pong), opPong},
		{"a pong and more", append(append([]byte(nil), pong...), 0x81), len(pong), opPong},
		{"an empty pong", maskedFrame(0x8A, nil), 6, opPong},
		{"a ping", ping, len(ping), opPing},
		{"an empty ping", maskedFrame(0x89, nil), 6, opPing},
		{"a ping and more", append(append([]byte(nil), ping...), 0x8A), len(ping), opPing},
		{"a partial pong", pong[:len(pong)-1], 0, 0},
		{"a partial ping", ping[:len(ping)-1], 0, 0},
		{"unmasked", []byte{0x8A, 0x00}, 0, 0},
		{"an unmasked ping", []byte{0x89, 0x00}, 0, 0},
		{"not final", append([]byte{0x0A}, pong[1:]...), 0, 0},
		{"a reserved bit", append([]byte{0xCA}, pong[1:]...), 0, 0},
		{"a close", maskedFrame(0x88, nil), 0, 0},
		{"a text frame", maskedFrame(0x81, []byte("x")), 0, 0},
		{"a 126-byte length", []byte{0x8A, 0x80 | 126, 0, 126, 1, 2, 3, 4}, 0, 0},
		{"nothing", nil, 0, 0},
	} {
		got, op, ok := controlSize(tt.b)
		if got != tt.want || op != tt.op || ok != (tt.want > 0) {
			t.Errorf("%s: %d, opcode %#x, %v; want %d, %#x", tt.name, got, op, ok, tt.want, tt.op)
		}
	}
}

// An event stream parks too: it only watches for the end of its
// connection, and must not miss it, nor a byte the client sends (which
// ends the stream: it takes no input).
func TestAParkedEventStreamSeesItsEnd(t *testing.T) {
	t.Parallel()
	for _, how := range []string{"client gone", "client sends"} {
		t.Run(how, func(t *testing.T) {
			t.Parallel()
			h, url := parkServer(t)
			ctx := testContext(t)
			addr := strings.TrimPrefix(strings.TrimSuffix(url, "/ws"), "ws://")
			nc, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { nc.Close() })
			req := "GET /ws?room=sse HTTP/1.1\r\nHost: " + addr + "\r\nAccept: text/event-stream\r\n\r\n"
			if _, err := nc.Write([]byte(req)); err != nil {
				t.Fatal(err)
			}
			resp, err := http.ReadResponse(bufio.NewReader(nc), nil)
			if err != nil || resp.StatusCode != http.StatusOK {
				t.Fatalf("event stream: %v %v", resp, err)
			}
			var c *conn
			waitUntil(t, ctx, "the stream parked", func() bool {
				h.mu.Lock()
				for _, x := range h.conns {
					c = x
				}
				h.mu.Unlock()
				return c != nil && c.isParked()
			})
			want := protocol.CloseAbnormal
			if how == "client sends" {
				want = protocol.ClosePolicyViolation
				_, _ = nc.Write([]byte("GET / HTTP/1.1\r\n\r\n"))
			} else {
				nc.Close()
			}
			waitUntil(t, ctx, "the stream to end", func() bool { return h.Stats().Connections == 0 })
			if code, _ := c.closeStatus(); code != want {
				t.Fatalf("closed with %d, want %d", code, want)
			}
		})
	}
}

// A ping whose pong does not fit in the connection's queue is left to
// coder/websocket, which answers it as before: a client's ping is always
// answered.
func TestAPingWhosePongDoesNotFitIsAnsweredByCoder(t *testing.T) {
	t.Parallel()
	h, url := parkServer(t, WithQueueLimits(1, 1<<20))
	ctx := testContext(t)
	ws, c := dialRaw(t, ctx, h, url, "full")
	waitUntil(t, ctx, "parked", c.isParked)
	c.mu.Lock()
	held := c.q.pushIfRoom(newDirectFrame([]byte("queued")), c.h.cfg.queue) // the queue's one slot, and no writer for it yet
	c.mu.Unlock()
	if !held {
		t.Fatal("could not fill the queue")
	}
	go func() { _, _, _ = ws.Read(ctx) }()
	if err := ws.Ping(ctx); err != nil {
		t.Fatalf("a ping with the queue full: %v", err)
	}
	c.mu.Lock()
	c.startWriterLocked()
	c.mu.Unlock()
}
