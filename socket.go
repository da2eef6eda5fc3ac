package pubsub

import (
	"bufio"
	"net"
	"net/http"
	"sync"
	"time"
)

// Buffer sizes handed to coder/websocket for each connection. An idle
// connection keeps both for its whole life, so they are small: a read of a
// large frame bypasses the reader's buffer (256 bytes hold a typical client
// message in one read), and writes are batched by socket.cork, so the
// writer's buffer only decides how many cheap appends a frame takes.
const (
	readBufferSize  = 256
	writeBufferSize = 128
	// corkLimit bounds what one corked batch holds before it is written
	// out, so a long batch costs at most this much memory.
	corkLimit = 64 << 10
)

// hijacker wraps the ResponseWriter given to websocket.Accept: its Hijack
// returns the connection with our small buffers instead of net/http's 4 KiB
// ones, and keeps the socket for corking.
type hijacker struct {
	http.ResponseWriter
	sock *socket
}

func (w *hijacker) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	nc, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	// Bytes the client sent right after its handshake may already sit in
	// net/http's reader; carry them over, then let that reader go.
	var pre []byte
	if n := brw.Reader.Buffered(); n > 0 {
		pre = make([]byte, n)
		if _, err := brw.Reader.Read(pre); err != nil {
			nc.Close()
			return nil, nil, err
		}
	}
	w.sock = &socket{Conn: nc, pre: pre}
	return w.sock, bufio.NewReadWriter(
		bufio.NewReaderSize(w.sock, readBufferSize),
		bufio.NewWriterSize(w.sock, writeBufferSize),
	), nil
}

// Unwrap lets http.ResponseController reach the original writer.
func (w *hijacker) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// socket is a hijacked connection. While corked, writes collect in one
// buffer and reach the network in one system call when uncorked: a batch of
// queued messages costs one write, whatever the number of frames, without
// changing the framing.
type socket struct {
	net.Conn
	pre []byte // read before the connection; only the reader goroutine reads

	mu     sync.Mutex
	corked bool
	buf    []byte
}

var corkBuffers = sync.Pool{New: func() any { b := make([]byte, 0, 16<<10); return &b }}

func (s *socket) Read(p []byte) (int, error) {
	if len(s.pre) > 0 {
		n := copy(p, s.pre)
		s.pre = s.pre[n:]
		if len(s.pre) == 0 {
			s.pre = nil
		}
		return n, nil
	}
	return s.Conn.Read(p)
}

// cork starts collecting writes; every write until uncork must reach the
// network by deadline.
func (s *socket) cork(deadline time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.corked = true
	s.buf = (*corkBuffers.Get().(*[]byte))[:0]
	_ = s.Conn.SetWriteDeadline(deadline)
}

// uncork writes what was collected and stops collecting.
func (s *socket) uncork() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	err := s.flushLocked()
	s.corked = false
	if cap(s.buf) <= corkLimit {
		b := s.buf[:0]
		corkBuffers.Put(&b)
	}
	s.buf = nil
	_ = s.Conn.SetWriteDeadline(time.Time{})
	return err
}

func (s *socket) flushLocked() error {
	if len(s.buf) == 0 {
		return nil
	}
	_, err := s.Conn.Write(s.buf)
	s.buf = s.buf[:0]
	return err
}

func (s *socket) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.corked {
		return s.Conn.Write(p)
	}
	if len(s.buf)+len(p) > corkLimit {
		if err := s.flushLocked(); err != nil {
			return 0, err
		}
		if len(p) > corkLimit {
			return s.Conn.Write(p)
		}
	}
	s.buf = append(s.buf, p...)
	return len(p), nil
}
