package pubsub

import (
	"context"
	"errors"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/roomcast/pubsub/protocol"

	"github.com/coder/websocket"
)

// Writing. A connection's queue is written by one writer at a time. Three
// kinds of writer:
//
//   - The Handler's writer pool: at most GOMAXPROCS goroutines, started
//     while connections have something queued and ended when none has,
//     each taking ready connections in turn and writing each one's batch
//     with a system call that never waits (socket.tryWrite). A message to
//     a room of 10,000 is 10,000 such writes shared by a few goroutines,
//     not 10,000 goroutine wake-ups.
//   - A connection's own writer goroutine, for what may wait: a socket
//     whose buffer filled (its reader is slow) or whose lock another write
//     holds (see socket.tryWrite), a connection that is not the standard
//     library's own TCP or Unix connection (TLS, a host's wrapper: see
//     newSocket), and the close. It writes with WithWriteTimeout as the
//     socket's deadline, and hands the connection back to the pool once
//     its queue is empty.
//   - The publisher, for a small room delivered on its goroutine (see
//     inlineWrites): it takes the pool's place for the subscribers no
//     writer has, writes each once without waiting, and leaves what is
//     left to the pool or the connection's own writer.
//
// All write every frame's bytes as frame.wire built them, several queued
// frames gathered into one write.

// writerState says who writes a connection's queue; guarded by conn.mu.
type writerState uint8

const (
	writerIdle   writerState = iota // nothing to write, or no socket yet
	writerPooled                    // in the pool's ready queue, or being written by a pool goroutine (or a publisher: inlineWrites)
	writerOwn                       // its own goroutine writes (after the close, none starts again)
)

// startWriterLocked makes sure a writer will write what is queued (or the
// close). Before the upgrade (no socket yet) frames wait in the queue, and
// conn.start wakes the writer then. The writer's time counts in c.wg.
func (c *conn) startWriterLocked() {
	if c.writer != writerIdle || c.sock == nil {
		return
	}
	c.wg.Add(1)
	if c.closing || !c.sock.canTry() {
		c.writer = writerOwn
		go c.writeLoop()
		return
	}
	c.writer = writerPooled
	c.h.writers.push(c)
}

// wakeWriter starts the writer when something waits: conn.start calls it
// once the socket is there, for what was queued before the upgrade.
func (c *conn) wakeWriter() {
	c.mu.Lock()
	if c.q.len() > 0 || c.closing {
		c.startWriterLocked()
	}
	c.mu.Unlock()
}

// inlineWrites are the subscribers a publish writes itself. A message to
// a small room, delivered on the publisher's own goroutine (the built-in
// broker delivers inside Publish), costs each subscriber one write that
// never waits (writePooled, as a pool goroutine would); handing the few
// writes to the pool instead costs a goroutine wake-up and a hand-off per
// message, more than the writes themselves (BENCHMARKS.md, "a chat").
// The publisher takes a connection's writing only when no writer has it
// (claimLocked, under the connection's lock, as the pool would), so its
// frames keep their order and one writer at a time; what does not go out
// without waiting goes to the connection's own writer, as from the pool.
// The rooms are small (inlineMax) so a publish waits for a few
// non-blocking writes at most; larger rooms, and the brokers that deliver
// on a goroutine shared by every room, use the pool.
type inlineWrites struct {
	conns [inlineMax]*conn
	n     int
}

// inlineMax is the largest room whose publishes write it themselves.
const inlineMax = 8

// claimLocked makes w the writer of c, as the pool would be
// (writerPooled, counted in c.wg), when w has room, no writer has c and its
// socket takes writes that never wait. A nil w claims nothing.
func (w *inlineWrites) claimLocked(c *conn) bool {
	if w == nil || w.n == len(w.conns) || c.writer != writerIdle || c.sock == nil || c.closing || !c.sock.canTry() {
		return false
	}
	c.wg.Add(1)
	c.writer = writerPooled
	w.conns[w.n] = c
	w.n++
	return true
}

// write writes each claimed connection's queue as a pool goroutine would
// (writePooled), and counts the data frames written. A nil w writes
// nothing.
func (w *inlineWrites) write() {
	if w == nil || w.n == 0 {
		return
	}
	out := w.conns[0].h.writers.out
	buf := gatherBuffers.Get().(*[]byte)
	sent := 0
	for i, c := range w.conns[:w.n] {
		sent += c.writePooled(buf)
		w.conns[i] = nil
	}
	w.n = 0
	if cap(*buf) <= gatherLimit {
		gatherBuffers.Put(buf)
	}
	if sent > 0 {
		out.Add(uint64(sent))
	}
}

// handOverLocked gives a pooled connection to its own writer goroutine,
// with the pool's count in c.wg.
func (c *conn) handOverLocked() {
	c.writer = writerOwn
	go c.writeLoop()
}

// recycle hands a written batch's backing array back to the queue.
func (c *conn) recycle(batch []*frame) {
	clear(batch)
	c.mu.Lock()
	c.q.recycle(batch, c.h.cfg.queue)
	c.mu.Unlock()
}

// writePooled writes one batch of a pooled connection on a pool goroutine,
// without waiting, and returns the data frames written. Then the
// connection goes back in the ready queue when more is queued, goes idle
// when nothing is, or goes to its own writer when the socket filled, a
// write failed or it is closing.
func (c *conn) writePooled(buf *[]byte) (sent int) {
	c.mu.Lock()
	if c.closing {
		c.handOverLocked()
		c.mu.Unlock()
		return 0
	}
	if c.q.len() == 0 {
		c.writer = writerIdle
		c.mu.Unlock()
		c.wg.Done()
		return 0
	}
	batch := c.q.take()
	c.mu.Unlock()

	sent, left, full, err := c.tryBatch(buf, batch)
	if full {
		left = append([]*frame(nil), left...) // batch goes back for reuse
	}
	clear(batch)
	if sent > 0 && c.h.cfg.idleTimeout > 0 {
		c.lastApp.Store(time.Now().UnixNano())
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	c.q.recycle(batch, c.h.cfg.queue)
	switch {
	case err != nil:
		c.beginCloseLocked(protocol.CloseAbnormal, "write failed", false)
		c.handOverLocked()
	case full:
		c.rest = left
		c.handOverLocked()
	case c.closing:
		c.handOverLocked()
	case c.q.len() > 0:
		c.h.writers.push(c) // behind the connections already waiting
	default:
		c.writer = writerIdle
		c.wg.Done()
	}
	return sent
}

// tryBatch writes batch without waiting, gathering frames into as few
// writes as gatherLimit allows. It returns the data frames written (those
// in the socket's rest included: they go out before anything else) and,
// when the socket filled or another write held it (full), the frames not
// yet written.
func (c *conn) tryBatch(buf *[]byte, batch []*frame) (sent int, left []*frame, full bool, err error) {
	for i := 0; i < len(batch); {
		p, next, n := c.gather(batch, i, buf)
		if p == nil {
			break
		}
		res, err := c.sock.tryWrite(p)
		switch {
		case err != nil:
			return sent, nil, false, err
		case res == tryBusy:
			c.gathered(false)
			return sent, batch[i:], true, nil
		case res == tryPartial:
			c.gathered(true) // the rest goes out first, from the socket's rest
			return sent + n, batch[next:], true, nil
		}
		c.gathered(true)
		sent += n
		i = next
	}
	return sent, nil, false, nil
}

// gather returns the bytes of batch's frames from index i on, as many as
// fit in gatherLimit but at least one frame: a lone frame's own bytes, or
// several copied into buf. next is the index after the last frame taken,
// data the number of data frames among them; p is nil when only nils (frames
// a drop policy removed) are left.
func (c *conn) gather(batch []*frame, i int, buf *[]byte) (p []byte, next, data int) {
	for i < len(batch) && batch[i] == nil {
		i++
	}
	if i == len(batch) {
		return nil, i, 0
	}
	if c.sse != nil {
		return c.gatherSSE(batch, i, buf)
	}
	first := batch[i]
	p = first.wire(c.mode)
	if first.data {
		data++
	}
	i++
	for i < len(batch) && batch[i] == nil {
		i++
	}
	if i == len(batch) || len(p) >= gatherLimit {
		return p, i, data // one frame: written as it is, no copy
	}
	b := append((*buf)[:0], p...)
	for ; i < len(batch); i++ {
		f := batch[i]
		if f == nil {
			continue
		}
		fw := f.wire(c.mode)
		if len(b)+len(fw) > gatherLimit {
			break
		}
		b = append(b, fw...)
		if f.data {
			data++
		}
	}
	*buf = b
	return b, i, data
}

// gatherSSE is gather for an event stream: every event is copied, with the
// id line that carries the stream's position, which the write in progress
// moves (see gathered).
func (c *conn) gatherSSE(batch []*frame, i int, buf *[]byte) (p []byte, next, data int) {
	c.sse.rewind()
	b := (*buf)[:0]
	if !c.sse.headed {
		b = append(b, c.sse.head...)
	}
	for ; i < len(batch); i++ {
		f := batch[i]
		if f == nil {
			continue
		}
		if len(b) > 0 && len(b)+len(f.wire(ModeSSE))+256 > gatherLimit {
			break
		}
		b = c.sse.appendEvent(b, f)
		if f.data {
			data++
		}
	}
	*buf = b
	if len(b) == 0 {
		return nil, i, 0
	}
	return b, i, data
}

// gathered says whether the bytes of the last gather went out (or are
// committed to the socket's rest): an event stream's position moves with
// them, or stays.
func (c *conn) gathered(written bool) {
	if c.sse != nil && written {
		c.sse.commit()
	}
}

// countWritten counts n data frames written.
func (c *conn) countWritten(n int) {
	if n == 0 {
		return
	}
	c.h.stats.messagesOut.Add(uint64(n))
	if c.h.cfg.idleTimeout > 0 {
		c.lastApp.Store(time.Now().UnixNano())
	}
}

var gatherBuffers = sync.Pool{New: func() any { b := make([]byte, 0, 4<<10); return &b }}

// writeLoop is a connection's own writer: it writes what a pool writer
// left, then what is queued, batch after batch, waiting on the socket as
// long as WithWriteTimeout allows, and ends when the queue is empty (the
// next message goes to the pool again). Once the connection is closing it
// sends the close instead, and no writer starts after it.
func (c *conn) writeLoop() {
	defer c.wg.Done()
	for first := true; ; first = false {
		c.mu.Lock()
		left := c.rest
		c.rest = nil
		if c.closing {
			var batch []*frame
			if c.flush {
				batch = c.q.take()
			} else {
				left = nil // unsent, like the queue; a frame cut short is still completed
			}
			c.mu.Unlock()
			c.finish(left, batch)
			return // the writer stays writerOwn: the socket is done
		}
		if !first && c.q.len() == 0 {
			c.writer = writerIdle
			c.mu.Unlock()
			return
		}
		batch := c.q.take()
		c.mu.Unlock()
		if err := c.writeWait(left, batch); err != nil {
			if c.sock.isClosing() {
				c.beginClose(protocol.CloseAbnormal, "connection closed", false)
			} else if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) {
				// Not reading for WithWriteTimeout is not keeping up.
				c.closeSlow(nil, "slow consumer: write timed out", true)
			} else {
				c.beginClose(protocol.CloseAbnormal, "write failed", false)
			}
		}
	}
}

// writeWait writes the socket's rest, then the frames of left and batch,
// within WithWriteTimeout for the whole. It recycles batch.
func (c *conn) writeWait(left, batch []*frame) error {
	c.sock.setWriteDeadline(time.Now().Add(c.h.cfg.writeTimeout))
	buf := gatherBuffers.Get().(*[]byte)
	err := c.sock.writeAll(nil)
	sent := 0
	for _, part := range [2][]*frame{left, batch} {
		for i := 0; i < len(part) && err == nil; {
			p, next, n := c.gather(part, i, buf)
			if p == nil {
				break
			}
			if err = c.sock.writeAll(p); err == nil {
				c.gathered(true)
				sent += n
			}
			i = next
		}
	}
	if cap(*buf) <= gatherLimit {
		gatherBuffers.Put(buf)
	}
	c.sock.setWriteDeadline(time.Time{})
	c.countWritten(sent)
	if batch != nil {
		c.recycle(batch)
	}
	return err
}

// finish completes a frame a pool writer cut short (the socket's rest),
// writes left and batch (what was queued, when flushing), then sends the
// close frame and closes the socket. It runs on the connection's own
// writer.
func (c *conn) finish(left, batch []*frame) {
	c.mu.Lock()
	code, reason, abort := c.code, c.reason, c.abort
	c.mu.Unlock()
	if c.sse != nil {
		// An event stream has no close handshake: what was queued, the
		// server's reason (so a page can stop EventSource's reconnecting),
		// and the end of the connection, which ends the response.
		if code != protocol.CloseAbnormal && !abort && c.writeWait(left, batch) == nil {
			c.sock.setWriteDeadline(time.Now().Add(c.h.cfg.writeTimeout))
			_ = c.sock.writeAll(sseCloseEvent(code, reason))
		}
		_ = c.sock.closeWritten()
		return
	}
	if code == protocol.CloseAbnormal || abort {
		_ = c.ws.CloseNow() // the peer is gone or reads nothing: no handshake
		return
	}
	if err := c.writeWait(left, batch); err != nil {
		_ = c.ws.CloseNow()
		return
	}
	// Close writes the close frame and waits a bounded time for the peer's.
	_ = c.ws.Close(websocket.StatusCode(code), reason)
}

// writerPool runs the pool writers of one Handler: at most max goroutines,
// started by push while connections wait and ending when none does.
type writerPool struct {
	max int
	out *atomic.Uint64 // counts the data frames written (Stats.MessagesOut)

	mu      sync.Mutex
	ring    []*conn // ready connections, in order, from head
	head, n int
	running int
	wg      sync.WaitGroup // the running pool goroutines
}

// popBatch bounds how many connections a pool goroutine takes at once.
const popBatch = 32

// push puts c, pooled, at the end of the ready queue and starts a pool
// goroutine when fewer than max run.
func (p *writerPool) push(c *conn) {
	p.mu.Lock()
	if p.n == len(p.ring) {
		p.grow()
	}
	p.ring[(p.head+p.n)%len(p.ring)] = c
	p.n++
	start := p.running < p.max
	if start {
		p.running++
		p.wg.Add(1)
	}
	p.mu.Unlock()
	if start {
		go p.work()
	}
}

func (p *writerPool) grow() {
	ring := make([]*conn, max(64, 2*len(p.ring)))
	for i := range p.n {
		ring[i] = p.ring[(p.head+i)%len(p.ring)]
	}
	p.ring, p.head = ring, 0
}

// work writes ready connections until none is left. Each takes a fair
// share of the queue at a time, so that the pool's goroutines split a
// room's fan-out between them.
func (p *writerPool) work() {
	defer p.wg.Done()
	var buf []byte
	var batch [popBatch]*conn
	for {
		p.mu.Lock()
		k := min(p.n, popBatch, (p.n+p.max-1)/p.max)
		if k == 0 {
			p.running--
			if len(p.ring) > 1024 {
				p.ring, p.head = nil, 0 // a burst's queue is not kept for life
			}
			p.mu.Unlock()
			return
		}
		for i := range k {
			j := (p.head + i) % len(p.ring)
			batch[i], p.ring[j] = p.ring[j], nil
		}
		p.head = (p.head + k) % len(p.ring)
		p.n -= k
		p.mu.Unlock()
		sent := 0
		for i, c := range batch[:k] {
			sent += c.writePooled(&buf)
			batch[i] = nil
		}
		if sent > 0 { // once per batch of connections: the counter is shared
			p.out.Add(uint64(sent))
		}
		if cap(buf) > gatherLimit {
			buf = nil
		}
	}
}
