package pubsub

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"testing"
	"time"
)

// tcpPair is a connected pair of loopback TCP connections.
func tcpPair(t *testing.T) (server, client *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	cc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	sc := <-accepted
	if sc == nil {
		t.Fatal("accept failed")
	}
	server, client = sc.(*net.TCPConn), cc.(*net.TCPConn)
	t.Cleanup(func() { server.Close(); client.Close() })
	return server, client
}

func TestTryWriteNeverWaitsAndKeepsWhatTheSocketRefusedForFirst(t *testing.T) {
	t.Parallel()
	if !canTryWrite {
		t.Skip("no non-blocking writes on this platform")
	}
	server, client := tcpPair(t)
	s := newSocket(server, nil)
	if !s.canTry() {
		t.Fatal("a TCP connection should allow writes that never wait")
	}
	big := bytes.Repeat([]byte("a"), 64<<20) // far more than the kernel buffers hold
	res, err := s.tryWrite(big)
	if err != nil || res != tryPartial {
		t.Fatalf("tryWrite of 64 MiB to a reader that reads nothing: %v, err %v; want a partial write", res, err)
	}
	s.mu.Lock()
	kept := len(s.rest)
	s.mu.Unlock()
	if kept == 0 {
		t.Fatal("the unwritten tail was not kept")
	}
	// A control frame written now (coder/websocket's path) must follow the
	// whole of big, and a wait-allowed write must follow both.
	done := make(chan error, 2)
	go func() {
		_, err := s.Write([]byte("control"))
		if err == nil {
			err = s.writeAll([]byte("then more"))
		}
		done <- err
	}()
	want := append(append(bytes.Clone(big), "control"...), "then more"...)
	got := make([]byte, 0, len(want))
	buf := make([]byte, 64<<10)
	client.SetReadDeadline(time.Now().Add(30 * time.Second))
	for len(got) < len(want) {
		n, err := client.Read(buf)
		if err != nil {
			t.Fatalf("read after %d of %d bytes: %v", len(got), len(want), err)
		}
		got = append(got, buf[:n]...)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("bytes reordered: the control frame did not wait for the rest")
	}
	s.mu.Lock()
	kept = len(s.rest)
	s.mu.Unlock()
	if kept != 0 {
		t.Fatal("rest kept after it was written")
	}
}

func TestTryWriteReportsAClosedSocket(t *testing.T) {
	t.Parallel()
	if !canTryWrite {
		t.Skip("no non-blocking writes on this platform")
	}
	server, _ := tcpPair(t)
	s := newSocket(server, nil)
	server.Close()
	if res, err := s.tryWrite([]byte("x")); err == nil || res == tryWhole {
		t.Fatalf("tryWrite on a closed socket: %v, err %v; want an error", res, err)
	}
}

func TestSocketCloseCutsShortAWriteWaitingOnTheNetwork(t *testing.T) {
	t.Parallel()
	server, _ := tcpPair(t)
	s := newSocket(server, nil)
	s.setWriteDeadline(time.Now().Add(time.Hour))
	done := make(chan error, 1)
	go func() { done <- s.writeAll(bytes.Repeat([]byte("a"), 64<<20)) }() // the peer reads nothing
	// Wait until the writer holds mu.
	for s.mu.TryLock() {
		s.mu.Unlock()
		runtime.Gosched()
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("a write to a peer that reads nothing succeeded")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not cut short the waiting write")
	}
	s.setWriteDeadline(time.Time{}) // after Close: must not revive the connection's writes
	if _, err := s.Write([]byte("x")); err == nil {
		t.Fatal("a write after Close succeeded")
	}
	if !s.isClosing() {
		t.Fatal("isClosing is false after Close")
	}
}

func TestWireFrameHeaders(t *testing.T) {
	t.Parallel()
	for _, n := range []int{0, 1, 125, 126, 127, 65535, 65536, 1 << 20} {
		payload := bytes.Repeat([]byte{'p'}, n)
		for _, op := range []byte{opText, opBinary} {
			b := wireFrame(op, payload)
			if b[0] != 0x80|op {
				t.Fatalf("len %d: first byte %#x, want FIN and opcode %d, no RSV bits", n, b[0], op)
			}
			if b[1]&0x80 != 0 {
				t.Fatalf("len %d: a server frame must not be masked", n)
			}
			var length, hdr int
			switch l := int(b[1] & 0x7f); l {
			case 126:
				length, hdr = int(binary.BigEndian.Uint16(b[2:])), 4
			case 127:
				length, hdr = int(binary.BigEndian.Uint64(b[2:])), 10
			default:
				length, hdr = l, 2
			}
			wantHdr := 2
			if n >= 126 {
				wantHdr = 4
			}
			if n > 65535 {
				wantHdr = 10
			}
			if length != n || hdr != wantHdr || !bytes.Equal(b[hdr:], payload) {
				t.Fatalf("len %d: header says %d in a %d-byte header; want %d in %d (the shortest encoding)", n, length, hdr, n, wantHdr)
			}
		}
	}
}

func TestGatherJoinsFramesWithinTheLimitAndSkipsDropped(t *testing.T) {
	t.Parallel()
	c := &conn{}
	mk := func(n int) *frame {
		return newRoomFrame(Message{Kind: KindMessage, Data: bytes.Repeat([]byte{'x'}, n)}, nil)
	}
	one := mk(10)
	var buf []byte
	p, next, data := c.gather([]*frame{nil, one, nil}, 0, &buf)
	if &p[0] != &one.wire(ModeRaw)[0] || next != 3 || data != 1 {
		t.Fatalf("a lone frame: next %d, data %d, copied %v; want its own bytes, next 3, data 1", next, data, &p[0] != &one.wire(ModeRaw)[0])
	}
	big := gatherLimit / 3
	batch := []*frame{mk(big), nil, mk(big), mk(big), mk(10)}
	var all []byte
	for i := 0; i < len(batch); {
		p, next, _ := c.gather(batch, i, &buf)
		if p == nil {
			break
		}
		if len(p) > gatherLimit {
			t.Fatalf("gathered %d bytes, limit %d", len(p), gatherLimit)
		}
		all = append(all, p...)
		i = next
	}
	var want []byte
	for _, f := range batch {
		if f != nil {
			want = append(want, f.wire(ModeRaw)...)
		}
	}
	if !bytes.Equal(all, want) {
		t.Fatal("gathered bytes lost or reordered frames")
	}
	if p, _, _ := c.gather([]*frame{nil, nil}, 0, &buf); p != nil {
		t.Fatal("only dropped frames left should gather nothing")
	}
}

func TestSocketReadsCarriedOverBytesFirst(t *testing.T) {
	t.Parallel()
	a, b := net.Pipe()
	t.Cleanup(func() { a.Close(); b.Close() })
	s := &socket{Conn: a, pre: []byte("early")}
	go b.Write([]byte(" then the wire"))
	got := make([]byte, 0, 32)
	buf := make([]byte, 3)
	for len(got) < len("early then the wire") {
		n, err := s.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, buf[:n]...)
	}
	if string(got) != "early then the wire" {
		t.Fatalf("read %q", got)
	}
}

func TestHijackHandsOverSmallBuffersAndBufferedBytes(t *testing.T) {
	t.Parallel()
	type result struct {
		rd, wr int
		first  string
	}
	got := make(chan result, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hw := &hijacker{ResponseWriter: w, sock: new(socket)}
		_, brw, err := hw.Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		defer hw.sock.Close()
		line, _ := brw.Reader.ReadString('\n')
		got <- result{brw.Reader.Size(), brw.Writer.Size(), line}
	}))
	t.Cleanup(srv.Close)
	nc, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	// The request and the bytes after it arrive together, so net/http has
	// already buffered the latter when the handler hijacks.
	io.WriteString(nc, "GET / HTTP/1.1\r\nHost: x\r\n\r\nsent with the request\n")
	select {
	case r := <-got:
		if r.rd != readBufferSize || r.wr != writeBufferSize {
			t.Fatalf("buffers %d/%d bytes, want %d/%d", r.rd, r.wr, readBufferSize, writeBufferSize)
		}
		if r.first != "sent with the request\n" {
			t.Fatalf("first read %q: bytes buffered by net/http were lost", r.first)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("handler never ran")
	}
	_ = bufio.ErrBufferFull
}

func TestWaitReadableReturnsOnlyWhenThereIsSomethingToRead(t *testing.T) {
	t.Parallel()
	server, client := tcpPair(t)
	s := newSocket(server, nil)
	returned := func() <-chan struct{} {
		done := make(chan struct{})
		go func() {
			s.waitReadable()
			close(done)
		}()
		return done
	}

	done := returned()
	select {
	case <-done:
		if canTryWrite {
			t.Fatal("waitReadable returned with nothing to read")
		}
	case <-time.After(50 * time.Millisecond): // it waits, as it should
	}
	client.Write([]byte("ab"))
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("waitReadable did not return when bytes arrived")
	}
	// Unread bytes are something to read: no wait, however often asked.
	select {
	case <-returned():
	case <-time.After(10 * time.Second):
		t.Fatal("waitReadable waited with bytes in the socket")
	}
	buf := make([]byte, 2)
	if _, err := io.ReadFull(s, buf); err != nil {
		t.Fatal(err)
	}
	// The end of the stream is something to read.
	done = returned()
	client.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("waitReadable did not return at the end of the stream")
	}
}

func TestWaitReadableReturnsWhenTheSocketCloses(t *testing.T) {
	t.Parallel()
	server, _ := tcpPair(t)
	s := newSocket(server, nil)
	done := make(chan struct{})
	go func() {
		s.waitReadable()
		close(done)
	}()
	s.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("waitReadable kept waiting on a closed socket")
	}
}

// A net.Conn closed under the socket (not through Close) fails tryWrite:
// its descriptor's number may already be another connection's.
func TestTryWriteFailsOnAConnectionClosedUnderTheSocket(t *testing.T) {
	t.Parallel()
	if !canTryWrite {
		t.Skip("no non-blocking writes on this platform")
	}
	server, _ := tcpPair(t)
	s := newSocket(server, nil)
	server.Close()
	if _, err := s.tryWrite([]byte("after the close")); err == nil {
		t.Fatal("tryWrite on a closed connection succeeded")
	}
	if s.fill() != true {
		t.Fatal("fill on a closed connection found nothing pending")
	}
}

// fill takes what waits on the socket without waiting, and keeps nothing
// on the heap but the bytes it read: it runs at every wake-up of a parked
// connection (before fillRead, about 300 bytes in five allocations each).
func TestFillTakesWhatWaitsAndMakesNoGarbage(t *testing.T) {
	if !canTryWrite {
		t.Skip("no non-blocking reads on this platform")
	}
	server, client := tcpPair(t)
	s := newSocket(server, nil)
	if s.fill() || len(s.pre) != 0 {
		t.Fatalf("fill with nothing sent: pending, or took %q", s.pre)
	}
	if n := testing.AllocsPerRun(1000, func() { s.fill() }); n != 0 {
		t.Fatalf("fill with nothing to read made %v allocations, want 0", n)
	}
	if _, err := client.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); string(s.pre) != "hello"; {
		if s.fill() {
			t.Fatalf("fill found the stream's end or an error, holding %q", s.pre)
		}
		if time.Now().After(deadline) {
			t.Fatalf("fill took %q, want %q", s.pre, "hello")
		}
		time.Sleep(time.Millisecond)
	}
	client.Close()
	for deadline := time.Now().Add(5 * time.Second); !s.fill(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("fill never saw the stream's end")
		}
	}
	if string(s.pre) != "hello" {
		t.Fatalf("after the end, fill holds %q, want %q", s.pre, "hello")
	}
}
