package pubsub

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// countingConn records every Write that reaches "the network".
type countingConn struct {
	net.Conn
	writes [][]byte
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes = append(c.writes, bytes.Clone(p))
	return len(p), nil
}
func (c *countingConn) SetWriteDeadline(time.Time) error { return nil }

func TestCorkedWritesLeaveInOneSystemCall(t *testing.T) {
	t.Parallel()
	under := &countingConn{}
	s := &socket{Conn: under}
	s.cork(time.Now().Add(time.Second))
	for _, p := range []string{"frame one|", "frame two|", "frame three"} {
		if _, err := s.Write([]byte(p)); err != nil {
			t.Fatal(err)
		}
	}
	if len(under.writes) != 0 {
		t.Fatalf("corked writes reached the network early: %q", under.writes)
	}
	if err := s.uncork(); err != nil {
		t.Fatal(err)
	}
	if len(under.writes) != 1 || string(under.writes[0]) != "frame one|frame two|frame three" {
		t.Fatalf("writes %q, want the three frames in one write, in order", under.writes)
	}
	if _, err := s.Write([]byte("after")); err != nil || len(under.writes) != 2 {
		t.Fatalf("uncorked write: %v, %d writes", err, len(under.writes))
	}
}

func TestCorkingNeverHoldsMoreThanItsLimit(t *testing.T) {
	t.Parallel()
	under := &countingConn{}
	s := &socket{Conn: under}
	s.cork(time.Now().Add(time.Second))
	chunk := bytes.Repeat([]byte("x"), corkLimit/3+1)
	var want []byte
	for range 5 {
		s.Write(chunk)
		want = append(want, chunk...)
		if len(s.buf) > corkLimit {
			t.Fatalf("cork buffer holds %d bytes, limit %d", len(s.buf), corkLimit)
		}
	}
	big := bytes.Repeat([]byte("y"), corkLimit+1)
	s.Write(big)
	want = append(want, big...)
	s.uncork()
	if got := bytes.Join(under.writes, nil); !bytes.Equal(got, want) {
		t.Fatalf("bytes reordered or lost: got %d bytes, want %d", len(got), len(want))
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
		hw := &hijacker{ResponseWriter: w}
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
