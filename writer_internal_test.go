package pubsub

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/coder/websocket"
)

// writerState of the connection, read under its lock.
func (c *conn) writerNow() writerState {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.writer
}

// A client that stops reading fills its socket: the pool hands the
// connection to its own writer, which waits on the socket, so a slow
// client never holds up a pool goroutine. Once the client reads again it
// gets every message, in order, and the connection goes back to the pool;
// when nothing is queued no pool goroutine is left.
func TestAFullSocketGoesToItsOwnWriterAndBackToThePool(t *testing.T) {
	t.Parallel()
	h, url := poolServer(t, nil, WithQueueLimits(defaultQueueMessages, 256<<20))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ws, c := dialRaw(t, ctx, h, url, "slow")
	ws.SetReadLimit(-1)
	if !c.sock.canTry() {
		t.Fatal("a plain TCP connection should be written by the pool")
	}

	payload := func(i int) []byte {
		b := bytes.Repeat([]byte{byte('a' + i%26)}, 1<<20)
		copy(b, fmt.Sprintf("%06d:", i))
		return b
	}
	const n = 24 // 24 MiB: far more than the socket buffers of a client that reads nothing
	for i := range n {
		if err := h.Publish(ctx, "slow", payload(i)); err != nil {
			t.Fatal(err)
		}
	}
	waitUntil(t, ctx, "the connection handed to its own writer", func() bool { return c.writerNow() == writerOwn })

	for i := range n {
		_, b, err := ws.Read(ctx)
		if err != nil {
			t.Fatalf("read of message %d: %v", i, err)
		}
		if !bytes.Equal(b, payload(i)) {
			t.Fatalf("message %d: %d bytes starting %q, not as published", i, len(b), b[:min(len(b), 7)])
		}
	}
	waitUntil(t, ctx, "the own writer done", func() bool { return c.writerNow() == writerIdle })
	if err := h.Publish(ctx, "slow", []byte("after")); err != nil {
		t.Fatal(err)
	}
	if _, b, err := ws.Read(ctx); err != nil || string(b) != "after" {
		t.Fatalf("message after catching up: %q, %v", b, err)
	}
	waitUntil(t, ctx, "no pool goroutine left", func() bool {
		h.writers.mu.Lock()
		defer h.writers.mu.Unlock()
		return h.writers.running == 0 && h.writers.n == 0
	})
	if st := h.Stats(); st.MessagesOut != n+1 || st.SlowConsumers != 0 {
		t.Fatalf("MessagesOut %d, SlowConsumers %d; want %d and 0", st.MessagesOut, st.SlowConsumers, n+1)
	}
}

// The pool never runs more goroutines than its bound, however many
// connections wait, and visits every connection pushed.
func TestWriterPoolRunsAtMostItsBoundAndVisitsEveryConnection(t *testing.T) {
	t.Parallel()
	h := NewHandler(WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	defer h.Close()
	h.writers.max = 2
	cs := make([]*conn, 2000)
	for i := range cs {
		c := newConn(h, Client{ID: fmt.Sprint(i)})
		c.writer = writerPooled // as startWriterLocked leaves it; nothing queued
		c.wg.Add(1)
		cs[i] = c
	}
	for _, c := range cs {
		h.writers.push(c)
		h.writers.mu.Lock()
		running := h.writers.running
		h.writers.mu.Unlock()
		if running > 2 {
			t.Fatalf("%d pool goroutines running, bound 2", running)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i, c := range cs {
		waitUntil(t, ctx, fmt.Sprintf("connection %d visited", i), func() bool { return c.writerNow() == writerIdle })
		c.wg.Wait() // its pool count was given back
	}
	waitUntil(t, ctx, "no pool goroutine left", func() bool {
		h.writers.mu.Lock()
		defer h.writers.mu.Unlock()
		return h.writers.running == 0
	})
}

func waitUntil(t testing.TB, ctx context.Context, what string, cond func() bool) {
	t.Helper()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s", what)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// A write of coder/websocket's that waits on a full socket holds the
// socket's lock; the pool never waits behind it. The connection goes to its
// own writer, and the pool goes on serving the others.
func TestAPoolWriterNeverWaitsForABusySocket(t *testing.T) {
	t.Parallel()
	// One pool goroutine: if it waited, nobody would write.
	h, url := poolServer(t, func(h *Handler) { h.writers.max = 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	wsA, a := dialRaw(t, ctx, h, url, "a")
	wsB, _ := dialRaw(t, ctx, h, url, "b")

	a.sock.mu.Lock() // as a control frame waiting on a full socket would
	var once sync.Once
	unlock := func() { once.Do(a.sock.mu.Unlock) }
	t.Cleanup(unlock) // runs before the Handler's Close, even when the test fails
	if err := h.Publish(ctx, "a", []byte("to a")); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, ctx, "a handed to its own writer", func() bool { return a.writerNow() == writerOwn })
	if err := h.Publish(ctx, "b", []byte("to b")); err != nil {
		t.Fatal(err)
	}
	if _, b, err := wsB.Read(ctx); err != nil || string(b) != "to b" {
		t.Fatalf("b read %q, %v: the pool waited behind a's socket", b, err)
	}
	unlock()
	if _, b, err := wsA.Read(ctx); err != nil || string(b) != "to a" {
		t.Fatalf("a read %q, %v once its socket was free", b, err)
	}
}

// poolServer serves a Handler built with opts (after setup, if any, has
// adjusted it before any connection) for a test of the writer pool, which
// it skips where there is no pool. It returns the Handler and the
// WebSocket URL of its endpoint.
func poolServer(t testing.TB, setup func(*Handler), opts ...Option) (*Handler, string) {
	t.Helper()
	if !canTryWrite {
		t.Skip("no writer pool on this platform")
	}
	h := NewHandler(append([]Option{WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil)))}, opts...)...)
	if setup != nil {
		setup(h)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(func() {
		h.Close()
		srv.Close()
	})
	return h, "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws"
}

// dialRaw connects a raw-mode client to room and returns it with the
// server's side of it, found once registered (under h.mu, after its socket
// is set, so reading c.sock needs no lock).
func dialRaw(t testing.TB, ctx context.Context, h *Handler, url, room string) (*websocket.Conn, *conn) {
	t.Helper()
	ws, _, err := websocket.Dial(ctx, url+"?room="+room, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.CloseNow() })
	var c *conn
	waitUntil(t, ctx, "the connection to "+room+" registered", func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		for _, x := range h.conns {
			if x.first != nil && x.first.name == room {
				c = x
			}
		}
		return c != nil
	})
	return ws, c
}

// A publish to a small room, with the built-in broker, writes to its
// subscribers' sockets itself before it returns (inlineWrites): no pool
// goroutine is woken for a few writes. A room larger than inlineMax goes
// to the pool, and its publish returns having written nothing itself.
func TestAPublishToASmallRoomWritesItBeforeReturning(t *testing.T) {
	t.Parallel()
	h, url := poolServer(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	small := make([]*websocket.Conn, 3)
	for i := range small {
		small[i], _ = dialRaw(t, ctx, h, url, "small")
	}
	// A raw client is in its room before its socket is attached (its frames
	// wait for it): wait for every socket, so that every subscriber can be
	// written at once.
	waitRegistered(t, ctx, h, "small", len(small))
	const n = 50
	for i := range n {
		before := h.Stats().MessagesOut
		if err := h.Publish(ctx, "small", []byte(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
		if got := h.Stats().MessagesOut - before; got != uint64(len(small)) {
			t.Fatalf("publish %d returned with %d of its %d frames written", i, got, len(small))
		}
	}
	for i, ws := range small {
		for j := range n {
			_, b, err := ws.Read(ctx)
			if err != nil || string(b) != fmt.Sprint(j) {
				t.Fatalf("client %d, message %d: %q, %v", i, j, b, err)
			}
		}
	}

	// A room of more than inlineMax: its fan-out claims no write for the
	// publisher, the pool writes every subscriber.
	large := make([]*websocket.Conn, inlineMax+1)
	for i := range large {
		large[i], _ = dialRaw(t, ctx, h, url, "large")
	}
	waitRegistered(t, ctx, h, "large", len(large))
	for name, want := range map[string]int{"small": len(small), "large": 0} {
		r := h.rooms.lookup(name)
		m := Message{Kind: KindMessage, Room: name, Data: []byte("direct")}
		w := new(inlineWrites)
		r.mu.RLock()
		h.rooms.fanOut(r, m, newRoomFrame(m, r), w)
		r.mu.RUnlock()
		if w.n != want {
			t.Errorf("a fan-out to room %q (%d subscribers) claimed %d writes for its publisher, want %d", name, len(r.subs), w.n, want)
		}
		w.write()
	}
	for i, ws := range append(small, large...) {
		if _, b, err := ws.Read(ctx); err != nil || string(b) != "direct" {
			t.Fatalf("client %d: %q, %v", i, b, err)
		}
	}
}

// waitRegistered waits until n connections of room are registered, their
// sockets attached.
func waitRegistered(t *testing.T, ctx context.Context, h *Handler, room string, n int) {
	t.Helper()
	waitUntil(t, ctx, fmt.Sprint(n, " connections to ", room, " registered"), func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		k := 0
		for _, x := range h.conns {
			if x.first != nil && x.first.name == room {
				k++
			}
		}
		return k == n
	})
}

// TestConnLayout: what a delivery touches of a connection (its lock,
// queue, writer state, wait group, and its socket's lock, rest, descriptor
// and write arguments) lies in four adjacent cache lines of the
// connection's allocation, so that a message to a room of 10,000 touches
// four lines of each connection, not a dozen scattered ones
// (BENCHMARKS.md, "Fewer cache lines a delivery").
func TestConnLayout(t *testing.T) {
	const line, most = 64, 4
	var c conn
	sock := unsafe.Offsetof(c.sockMem)
	hot := []struct {
		name      string
		off, size uintptr
	}{
		{"mu", unsafe.Offsetof(c.mu), unsafe.Sizeof(c.mu)},
		{"writer", unsafe.Offsetof(c.writer), unsafe.Sizeof(c.writer)},
		{"closing", unsafe.Offsetof(c.closing), unsafe.Sizeof(c.closing)},
		{"mode", unsafe.Offsetof(c.mode), unsafe.Sizeof(c.mode)},
		{"q", unsafe.Offsetof(c.q), unsafe.Sizeof(c.q)},
		{"wg", unsafe.Offsetof(c.wg), unsafe.Sizeof(c.wg)},
		{"h", unsafe.Offsetof(c.h), unsafe.Sizeof(c.h)},
		{"sock", unsafe.Offsetof(c.sock), unsafe.Sizeof(c.sock)},
		{"sse", unsafe.Offsetof(c.sse), unsafe.Sizeof(c.sse)},
		{"sockMem.mu", sock + unsafe.Offsetof(c.sockMem.mu), unsafe.Sizeof(c.sockMem.mu)},
		{"sockMem.closing", sock + unsafe.Offsetof(c.sockMem.closing), unsafe.Sizeof(c.sockMem.closing)},
		{"sockMem.rest", sock + unsafe.Offsetof(c.sockMem.rest), unsafe.Sizeof(c.sockMem.rest)},
		{"sockMem.rc", sock + unsafe.Offsetof(c.sockMem.rc), unsafe.Sizeof(c.sockMem.rc)},
		{"sockMem.writeFn", sock + unsafe.Offsetof(c.sockMem.writeFn), unsafe.Sizeof(c.sockMem.writeFn)},
		{"sockMem.wp", sock + unsafe.Offsetof(c.sockMem.wp), unsafe.Sizeof(c.sockMem.wp)},
		{"sockMem.wn", sock + unsafe.Offsetof(c.sockMem.wn), unsafe.Sizeof(c.sockMem.wn)},
		{"sockMem.werr", sock + unsafe.Offsetof(c.sockMem.werr), unsafe.Sizeof(c.sockMem.werr)},
	}
	var end uintptr
	for _, f := range hot {
		end = max(end, f.off+f.size)
	}
	// A connection's subscription to a room, one per room joined, stays
	// in the allocator's 112-byte class.
	if n := unsafe.Sizeof(sub{}); n > 112 {
		t.Errorf("a sub is %d bytes, past the 112-byte size class (the next is 128)", n)
	}
	// Where the allocator puts a connection decides the lines: an object of
	// this size (a 576-byte size class, 9 lines) starts a line, or 8 bytes
	// after (Go's allocation header for objects over 512 bytes).
	keep := make([]*conn, 64)
	for i := range keep {
		keep[i] = new(conn)
		p := uintptr(unsafe.Pointer(keep[i]))
		if n := (p+end-1)/line - p/line + 1; n > most {
			t.Fatalf("a delivery touches bytes 0 to %d of a connection (%d bytes), allocated at %#x: %d cache lines, want at most %d", end, unsafe.Sizeof(c), p, n, most)
		}
	}
}
