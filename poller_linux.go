//go:build linux

package pubsub

import (
	"bufio"
	"sync"
	"syscall"
	"time"
)

// poller waits, with one epoll instance and one goroutine per Handler, for
// input on idle connections, so that an idle connection has no goroutine
// at all: its reader parks the connection here and ends (conn.waitInput),
// and when the socket becomes readable (bytes, the end of the stream, an
// error) the poller starts a new reader for it. Closing a parked
// connection (conn.beginCloseLocked) or its socket (socket.Close) takes it
// back first and starts its reader the same way, so a parked connection
// never misses its close.
//
// The goroutine starts with the first park (NewHandler starts none) and
// the Handler stops it and waits for it in wait, once every connection has
// ended. Every registration is one-shot (EPOLLONESHOT): a socket reports
// readiness once, to the one reader it wakes, and is armed again only by
// the next park.
//
// One case has no readiness to report: a net.Conn closed under the Handler,
// not through the socket (a host that tracked its connections through
// http.Server.ConnState may close a hijacked one): the descriptor leaves
// the epoll set silently. The poller looks for those, at most parkSweepBatch
// parked connections every parkSweepEvery (sweep), so with up to a few
// thousand parked connections such a connection ends within about a
// second, as it did when its reader goroutine waited on the descriptor,
// and with many more the heartbeat finds it (its ping's write fails), at
// a bounded cost either way.
//
// Locks: conn.mu, then socket.mu, then poller.mu; the poller's goroutine
// holds only poller.mu, and starts readers after releasing it.
type poller struct {
	mu      sync.Mutex
	started bool
	failed  bool // epoll or its wake-up pipe could not be made: readers wait as before
	stopped bool
	epfd    int
	wake    [2]int           // a pipe; a byte in it ends the goroutine
	parked  map[uint64]*conn // by the token the socket was armed with
	next    uint64           // the last token handed out; 0 is the pipe's
	ctl     epollCall        // the epoll_ctl being made, under mu
	wg      sync.WaitGroup
}

// epollCall is one epoll_ctl of a parked socket's descriptor, made through
// the socket's RawConn (socket.control) with a callback made once: a
// callback closing over park's own variables would move them to the heap
// at every park and unpark.
type epollCall struct {
	op  int
	ev  syscall.EpollEvent
	err error
	fn  func(fd uintptr)
}

// epollCtl makes the epoll_ctl op, with ev, on s's descriptor. The caller
// holds p.mu.
func (p *poller) epollCtl(s *socket, op int, ev syscall.EpollEvent) error {
	if p.ctl.fn == nil {
		p.ctl.fn = func(fd uintptr) { p.ctl.err = syscall.EpollCtl(p.epfd, p.ctl.op, int(fd), &p.ctl.ev) }
	}
	p.ctl.op, p.ctl.ev, p.ctl.err = op, ev, nil
	if err := s.control(p.ctl.fn); err != nil {
		return err
	}
	return p.ctl.err
}

// parkable reports whether this platform parks idle connections.
const parkable = true

// parkResult is what park did.
type parkResult uint8

const (
	parked   parkResult = iota
	notHere             // no poller, a socket it cannot poll, or closing: the reader waits as before
	lockBusy            // a write holds the socket's lock: try again once it is free
)

// park registers c's socket for one readiness report and records c as
// parked. The caller holds c.mu and has checked that c is not closing and
// has nothing buffered.
func (p *poller) park(c *conn) parkResult {
	s := c.sock
	if s.rc == nil {
		return notHere
	}
	if !s.mu.TryLock() {
		return lockBusy
	}
	defer s.mu.Unlock()
	if s.closing.Load() {
		return notHere // the descriptor may be closed already: never arm it
	}
	if c.bw != nil && c.bw.Buffered() > 0 {
		return notHere // not expected: coder/websocket flushes each frame it writes
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.startLocked() {
		return notHere
	}
	p.next++
	tok := p.next
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP | syscall.EPOLLONESHOT, Fd: int32(uint32(tok)), Pad: int32(uint32(tok >> 32))}
	op := syscall.EPOLL_CTL_ADD
	if s.polled {
		op = syscall.EPOLL_CTL_MOD // registered by an earlier park, disabled since its report
	}
	if p.epollCtl(s, op, ev) != nil {
		return notHere
	}
	s.polled, s.pollTok = true, tok
	p.parked[tok] = c
	// The read buffer and the control frames' write buffer go back to the
	// heap while parked.
	*c.br = *parkedReader
	if c.bw != nil {
		*c.bw = *parkedWriter
	}
	return parked
}

// takeLocked removes the parked c (by its token) and gives it its read
// and write buffers back, before any reader, coder/websocket's close
// handshake included, can read or write: each starts after this, under
// p.mu or c.mu.
func (p *poller) takeLocked(tok uint64, c *conn) {
	delete(p.parked, tok)
	*c.br = *bufio.NewReaderSize(c.sock, readBufferSize)
	if c.bw != nil {
		*c.bw = *bufio.NewWriterSize(c.sock, writeBufferSize)
	}
}

// unpark takes c back from the poller, if it is parked, and starts its
// reader; it reports whether it did. The socket is still open: every close
// of it calls unpark first (socket.Close).
func (p *poller) unpark(c *conn) bool {
	p.mu.Lock()
	s := c.sock
	if p.parked[s.pollTok] != c {
		p.mu.Unlock()
		return false
	}
	p.takeLocked(s.pollTok, c)
	// Through control: once the net.Conn is closed (by whoever), the
	// descriptor left the epoll set with it, and its number may be
	// another connection's, whose registration must stay.
	_ = p.epollCtl(s, syscall.EPOLL_CTL_DEL, syscall.EpollEvent{})
	s.polled = false
	p.mu.Unlock()
	go c.serveRead(true) // the connection's count in h.live goes with it
	return true
}

// has reports whether c is parked.
func (p *poller) has(c *conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.parked != nil && p.parked[c.sock.pollTok] == c
}

// startLocked makes the epoll instance and starts the goroutine, once.
func (p *poller) startLocked() bool {
	if p.started || p.failed || p.stopped {
		return p.started && !p.stopped
	}
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		p.failed = true
		return false
	}
	var wake [2]int
	if err := syscall.Pipe2(wake[:], syscall.O_CLOEXEC|syscall.O_NONBLOCK); err != nil {
		syscall.Close(epfd)
		p.failed = true
		return false
	}
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN} // token 0
	if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, wake[0], &ev); err != nil {
		syscall.Close(epfd)
		syscall.Close(wake[0])
		syscall.Close(wake[1])
		p.failed = true
		return false
	}
	p.epfd, p.wake, p.started = epfd, wake, true
	p.parked = make(map[uint64]*conn)
	p.wg.Go(p.run)
	return true
}

// parkSweepEvery and parkSweepBatch: how often the poller looks for parked
// connections whose net.Conn was closed under the Handler, and at how many
// at most each time (sweep).
const (
	parkSweepEvery = 100 * time.Millisecond
	parkSweepBatch = 256
)

// run waits for readiness and starts a reader for each connection that has
// input, until stop.
func (p *poller) run() {
	var events [128]syscall.EpollEvent
	swept := time.Now()
	for {
		if time.Since(swept) >= parkSweepEvery {
			p.sweep()
			swept = time.Now()
		}
		n, err := syscall.EpollWait(p.epfd, events[:], int(parkSweepEvery/time.Millisecond))
		if err != nil {
			if err == syscall.EINTR {
				continue
			}
			return // not expected: a bad epoll descriptor
		}
		for _, ev := range events[:n] {
			tok := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
			if tok == 0 {
				return // stop
			}
			p.mu.Lock()
			c := p.parked[tok]
			if c != nil {
				p.takeLocked(tok, c)
			}
			p.mu.Unlock()
			if c != nil {
				go c.serveRead(true) // the connection's count in h.live goes with it
			}
		}
	}
}

// sweep looks at up to parkSweepBatch parked connections (a map's iteration
// starts at a random place, so successive sweeps cover them all) and
// starts the reader of each whose net.Conn is closed: it reads the closed
// socket and ends the connection.
func (p *poller) sweep() {
	var closed []*conn
	p.mu.Lock()
	n := 0
	for tok, c := range p.parked {
		if n++; n > parkSweepBatch {
			break
		}
		if c.sock.control(func(uintptr) {}) != nil {
			p.takeLocked(tok, c)
			c.sock.polled = false
			closed = append(closed, c)
		}
	}
	p.mu.Unlock()
	for _, c := range closed {
		go c.serveRead(true) // the connection's count in h.live goes with it
	}
}

// stop ends the goroutine and waits for it; the Handler calls it once no
// connection is left (none is parked). It is safe to call more than once.
func (p *poller) stop() {
	p.mu.Lock()
	if p.stopped || !p.started {
		p.stopped = true
		p.mu.Unlock()
		return
	}
	p.stopped = true
	_, _ = syscall.Write(p.wake[1], []byte{0})
	p.mu.Unlock()
	p.wg.Wait()
	syscall.Close(p.epfd)
	syscall.Close(p.wake[0])
	syscall.Close(p.wake[1])
}
