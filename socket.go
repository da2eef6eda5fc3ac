package pubsub

import (
	"bufio"
	"errors"
	"net"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Buffer sizes handed to coder/websocket for each connection. An idle
// connection keeps both for its whole life, so they are small: a read of a
// large frame bypasses the reader's buffer (256 bytes hold a typical client
// message in one read), and coder/websocket writes only control frames
// (ping, pong, close: at most 127 bytes each), so its writer's buffer
// holds any of them whole. Messages do not pass through it: the Handler
// frames them itself (see frame.wire) and writes them to the socket.
const (
	readBufferSize  = 256
	writeBufferSize = 128
	// gatherLimit bounds the bytes one write gathers from a batch of
	// queued frames, so a long batch costs at most this much memory.
	gatherLimit = 64 << 10
)

// parkedReader is what a parked connection's read buffer holds (see
// poller.park): no buffer of its own, and a read from it fails, though
// none is made: the poller gives the connection a fresh buffer before
// anything reads.
var parkedReader = bufio.NewReaderSize(parkedSource{}, 16)

type parkedSource struct{}

func (parkedSource) Read([]byte) (int, error) { return 0, errReadWhileParked }

var errReadWhileParked = errors.New("pubsub: read from a parked connection")

// parkedWriter is what a parked connection's control-frame writer (the
// bufio.Writer coder/websocket writes pongs and close frames through)
// holds: no buffer of its own, and an error, so that a write to it fails
// before touching any buffer; none is made: coder/websocket writes only
// from the connection's reader (a pong, the answer to a close) and from
// its close, and a parked connection has no reader, and is taken back
// from the poller (with a fresh buffer) before its close.
var parkedWriter = func() *bufio.Writer {
	w := bufio.NewWriterSize(parkedSource{}, 16)
	_, _ = w.Write(make([]byte, 32)) // larger than the buffer: written through, and the error stays
	return w
}()

func (parkedSource) Write([]byte) (int, error) { return 0, errWriteWhileParked }

var errWriteWhileParked = errors.New("pubsub: write to a parked connection")

// hijacker wraps the ResponseWriter given to websocket.Accept: its Hijack
// returns the connection with our small buffers instead of net/http's 4 KiB
// ones, and sets up sock (the connection's own, in its allocation) for the
// Handler's own writes.
//
// It also writes the 101 Switching Protocols itself, when the writer
// beneath is net/http's own: Accept's WriteHeader(101) is held, and Hijack
// writes the status line and the header (Accept's, and whatever the host's
// middleware set) to the connection. net/http would write the same at
// Hijack, but first clones the header, formats a Date and sorts the keys:
// about 4 % of the server's CPU per handshake (BENCHMARKS.md, "Fewer cache
// lines a delivery, a context made when needed, the 101"). A writer of the
// host's (a middleware's wrapper, which may record the status) gets
// Accept's WriteHeader as before.
type hijacker struct {
	http.ResponseWriter
	sock      *socket       // zero until Hijack
	br        *bufio.Reader // coder/websocket's reader over sock
	bw        *bufio.Writer // and its writer
	switching bool          // a 101 held for Hijack to write
}

// WriteHeader holds a 101 for Hijack when the writer beneath is net/http's
// own, and passes every other status (Accept's refusals) through.
func (w *hijacker) WriteHeader(code int) {
	if code == http.StatusSwitchingProtocols && isServerResponse(w.ResponseWriter) {
		w.switching = true
		return
	}
	w.ResponseWriter.WriteHeader(code)
}

// isServerResponse reports whether rw is net/http's own ResponseWriter,
// which nothing but net/http observes.
func isServerResponse(rw http.ResponseWriter) bool {
	t := reflect.TypeOf(rw)
	return t.Kind() == reflect.Pointer && t.Elem().Name() == "response" && t.Elem().PkgPath() == "net/http"
}

func (w *hijacker) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	nc, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	if w.switching {
		// Written through net/http's writer (4 KiB, already made for this
		// connection and let go once hijacked), into its free space.
		bw := brw.Writer
		if _, err := bw.Write(switchingHead(bw.AvailableBuffer(), w.Header())); err != nil {
			nc.Close()
			return nil, nil, err
		}
		if err := bw.Flush(); err != nil {
			nc.Close()
			return nil, nil, err
		}
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
	w.sock.init(nc, pre)
	w.br = bufio.NewReaderSize(w.sock, readBufferSize)
	w.bw = bufio.NewWriterSize(w.sock, writeBufferSize)
	return w.sock, bufio.NewReadWriter(w.br, w.bw), nil
}

// switchingHead appends to b a 101 Switching Protocols response with
// header h, as net/http writes one: every field whose name is a valid
// token, values with their line breaks turned to spaces and trimmed (so no
// value can add a line of its own), no body's framing fields.
func switchingHead(b []byte, h http.Header) []byte {
	b = append(b, "HTTP/1.1 101 Switching Protocols\r\n"...)
	for k, vs := range h {
		if !validFieldName(k) || k == "Content-Length" || k == "Transfer-Encoding" {
			continue
		}
		for _, v := range vs {
			b = append(b, k...)
			b = append(b, ": "...)
			b = appendFieldValue(b, v)
			b = append(b, "\r\n"...)
		}
	}
	return append(b, "\r\n"...)
}

// validFieldName reports whether k is an HTTP token (RFC 9110, 5.1).
func validFieldName(k string) bool {
	if k == "" {
		return false
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte(`"(),/:;<=>?@[\]{}`, c) >= 0 {
			return false
		}
	}
	return true
}

// appendFieldValue appends v with CR and LF turned to spaces, then leading
// and trailing spaces and tabs trimmed.
func appendFieldValue(b []byte, v string) []byte {
	if strings.ContainsAny(v, "\r\n") {
		v = newlinesToSpaces.Replace(v)
	}
	return append(b, strings.Trim(v, " \t")...)
}

var newlinesToSpaces = strings.NewReplacer("\r", " ", "\n", " ")

// Unwrap lets http.ResponseController reach the original writer.
func (w *hijacker) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// socket is a hijacked connection with two writers: coder/websocket writes
// control frames through Write, and the Handler writes message frames with
// tryWrite (from the writer pool, never waiting) and writeAll (from a
// connection's own writer, waiting up to a deadline). Every frame reaches
// the byte stream whole: writes are serialized by mu, and bytes that a
// tryWrite left unwritten (rest) go out before anything else.
//
// tryWrite writes to the file descriptor directly, one system call, inside
// the connection's syscall.RawConn Control: the descriptor cannot be closed
// (and its number reused by another connection) under it, even by a Close
// of the net.Conn that bypasses the socket (a host that tracked its
// connections through http.Server.ConnState can close a hijacked one): a
// closed connection fails the write instead. Control takes only a
// reference on the descriptor, not its write lock and deadline checks as
// RawConn.Write would: mu already serializes every write to the socket
// (coder/websocket's go through Write, below). Close also marks the
// socket closing and closes the connection only while holding mu, which
// tryWrite holds.
type socket struct {
	// What tryWrite touches comes first (see conn's layout).
	mu sync.Mutex
	// closing is set when Close begins: writes waiting on the network end
	// then, and tryWrite (holding mu, which Close takes before closing the
	// descriptor) writes no more.
	closing atomic.Bool
	rest    []byte          // the unwritten tail of a tryWrite, the next bytes on the wire; guarded by mu
	rc      syscall.RawConn // for tryWrite, fill and the poller; nil unless the connection is a plain *net.TCPConn or *net.UnixConn
	// tryWrite's system call, set once (a method value: no allocation per
	// write), with its argument and results; guarded by mu.
	writeFn func(fd uintptr)
	wp      []byte
	wn      int
	werr    error

	net.Conn
	pre []byte // read before the connection, or by fill; only the reader goroutine reads
	// owner is the connection on this socket, set by conn.attach: closing
	// the socket takes it back from the poller first (poller.unpark).
	owner *conn
	// polled and pollTok: the descriptor is registered with the Handler's
	// poller, and the token of its last park; guarded by poller.mu.
	polled  bool
	pollTok uint64
}

// newSocket returns a socket on nc (a connection's own is its sockMem,
// set up by init instead).
func newSocket(nc net.Conn, pre []byte) *socket {
	s := new(socket)
	s.init(nc, pre)
	return s
}

// init sets up a zero socket on nc, with pre as the bytes read before it.
func (s *socket) init(nc net.Conn, pre []byte) {
	s.Conn, s.pre = nc, pre
	if !canTryWrite {
		return
	}
	// Only the standard library's own connections: a wrapper (metering,
	// PROXY protocol, TLS) may do something in its Write that writing to
	// the descriptor beneath it would skip, even one that exposes the
	// descriptor by embedding a *net.TCPConn.
	var sc syscall.Conn
	switch c := nc.(type) {
	case *net.TCPConn:
		sc = c
	case *net.UnixConn:
		sc = c
	default:
		return
	}
	if rc, err := sc.SyscallConn(); err == nil {
		s.rc = rc
		s.writeFn = s.writeNow
	}
}

// canTry reports whether tryWrite may be used on this socket.
func (s *socket) canTry() bool { return s.rc != nil }

// writeNow is tryWrite's system call, inside s.rc.Control.
func (s *socket) writeNow(fd uintptr) {
	s.wn, s.werr = writeNonBlocking(int(fd), s.wp)
}

// control runs f with the descriptor, unless the connection is closed:
// then the descriptor's number may belong to another connection already.
func (s *socket) control(f func(fd uintptr)) error {
	if s.rc == nil {
		return net.ErrClosed
	}
	return s.rc.Control(f)
}

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

// Close closes the connection. A write waiting on the network (writeAll,
// or coder's Write) holds mu, so it is cut short first, through a write
// deadline in the past.
func (s *socket) Close() error {
	s.closing.Store(true)
	_ = s.Conn.SetWriteDeadline(time.Unix(1, 0))
	s.mu.Lock()
	defer s.mu.Unlock()
	s.unpark()
	return s.Conn.Close()
}

// unpark takes the socket's connection back from the poller before the
// descriptor closes, so that it is never left parked (its reader then
// meets the closed socket and ends the connection), and so that a
// descriptor number the system hands out again is never in the poller's
// set under this connection's name. The caller holds mu: park, which also
// holds it, either armed the descriptor before (and unpark disarms it) or
// sees closing and does not.
func (s *socket) unpark() {
	if s.owner != nil {
		s.owner.h.poll.unpark(s.owner)
	}
}

// closeWritten closes the connection after its writer's last write, with
// nothing waiting to be cut short: no deadline in the past, which an
// HTTP/2 stream would answer with a reset instead of its end.
func (s *socket) closeWritten() error {
	s.closing.Store(true)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.unpark()
	return s.Conn.Close()
}

// setWriteDeadline bounds writeAll and coder's writes, unless Close began.
// Close sets closing before its own deadline, so whichever order the two
// run in, a deadline set here never outlives Close's.
func (s *socket) setWriteDeadline(t time.Time) {
	_ = s.Conn.SetWriteDeadline(t)
	if s.closing.Load() {
		_ = s.Conn.SetWriteDeadline(time.Unix(1, 0))
	}
}

// isClosing reports whether Close was called: a write that failed since
// failed because of it, not because the peer stopped reading.
func (s *socket) isClosing() bool { return s.closing.Load() }

// Write is coder/websocket's path to the network. It waits for any rest a
// tryWrite left, so its frame never lands inside one of ours.
func (s *socket) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.writeRestLocked(); err != nil {
		return 0, err
	}
	return s.Conn.Write(p)
}

func (s *socket) writeRestLocked() error {
	if len(s.rest) == 0 {
		return nil
	}
	n, err := s.Conn.Write(s.rest)
	if err != nil {
		s.rest = s.rest[n:]
		return err
	}
	s.rest = nil
	return nil
}

// tryResult is what a tryWrite did with its bytes.
type tryResult uint8

const (
	tryWhole   tryResult = iota // all written
	tryPartial                  // some written, the rest kept as the socket's rest
	tryBusy                     // nothing written: another write holds the socket
)

// tryWrite writes p without waiting, not even for the socket's lock: a
// write of coder/websocket's (a pong, a close frame) may hold it while it
// waits on a full socket, and a pool goroutine must never wait behind one
// connection. What the kernel does not take at once is kept as the
// socket's rest, for writeAll (or coder's next Write) to finish. Only call
// it when canTry.
func (s *socket) tryWrite(p []byte) (tryResult, error) {
	if !s.mu.TryLock() {
		return tryBusy, nil
	}
	defer s.mu.Unlock()
	if s.closing.Load() {
		return tryBusy, net.ErrClosed
	}
	if len(s.rest) > 0 { // not expected: keep the order, let writeAll finish
		s.rest = append(s.rest, p...)
		return tryPartial, nil
	}
	s.wp = p
	err := s.rc.Control(s.writeFn)
	n := s.wn
	if err == nil {
		err = s.werr
	}
	s.wp, s.wn, s.werr = nil, 0, nil
	if err != nil {
		return tryBusy, err
	}
	if n == len(p) {
		return tryWhole, nil
	}
	s.rest = append([]byte(nil), p[n:]...)
	return tryPartial, nil
}

// writeAll writes the rest, then p, waiting as long as the socket's write
// deadline allows.
func (s *socket) writeAll(p []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.writeRestLocked(); err != nil {
		return err
	}
	if len(p) == 0 {
		return nil
	}
	_, err := s.Conn.Write(p)
	return err
}

// fill reads, without waiting, what the peer sent while the connection was
// parked into pre (where the next Read finds it), up to readBufferSize
// bytes. It reports pending when a read must follow whatever the buffers
// hold: the end of the stream or an error (for that read to report, as
// before), or a closed connection. Nothing yet (a wake-up without input)
// is not pending. It needs no lock: only the reader reads pre, and the
// read runs inside the RawConn's Control, whose reference on the
// descriptor keeps its number from being reused under the call; a write
// in progress does not stop it.
func (s *socket) fill() (pending bool) {
	if s.rc == nil {
		return true
	}
	r := fillReads.Get().(*fillRead)
	defer fillReads.Put(r)
	if err := s.rc.Control(r.readFn); err != nil {
		return true // closed
	}
	if r.eof || r.err != nil {
		return true
	}
	if r.n > 0 {
		s.pre = append(s.pre, r.b[:r.n]...)
	}
	return false
}

// fillRead is one fill's read: its buffer, its outcome and the RawConn
// callback that reads into them, made once. A callback closing over
// fill's own variables would move them all to the heap at every call
// (about 300 bytes, at every wake-up of a parked connection).
type fillRead struct {
	b      [readBufferSize]byte
	n      int
	eof    bool
	err    error
	readFn func(fd uintptr)
}

var fillReads = sync.Pool{New: func() any {
	r := &fillRead{}
	r.readFn = func(fd uintptr) { r.n, r.eof, r.err = readNonBlocking(int(fd), r.b[:]) }
	return r
}}

// waitReadable returns once the socket has something to read: bytes, the
// end of the stream, or an error (a closed socket among them). A
// connection's reader calls it before each read that would otherwise wait
// inside coder/websocket's Read (see conn.readLoop), so that an idle
// connection waits here, a few calls deep: a goroutine parked with less
// than a quarter of its stack in use has its stack halved by the garbage
// collector, and an idle connection's reader keeps 2 KiB of stack instead
// of 4 (see BENCHMARKS.md). It returns at once where tryWrite cannot be
// used, and on platforms without a way to peek.
func (s *socket) waitReadable() {
	if s.rc == nil {
		return
	}
	_ = s.rc.Read(readable) // an error (closed) is for the read that follows to report
}
