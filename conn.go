package pubsub

import (
	"bufio"
	"context"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/roomcast/pubsub/protocol"

	"github.com/coder/websocket"
)

// conn is one WebSocket connection, from admission to its end. Its life:
// newConn when the upgrade is admitted (upgrade.go), attach once the
// WebSocket exists, start to hand it to its reader goroutine (run, which the
// Handler owns and waits for), and the end of run (leave every room, give
// the slot back, report the disconnect); abandon undoes an admission that
// never became a connection. The reader goroutine owns the fields marked
// "reader" (reading and dispatch are in reader.go). Its queue is written by
// one writer at a time, the Handler's writer pool or a goroutine of its
// own (see writer.go), and only while something is queued. Heartbeats are
// a timer, not a goroutine. On Linux an idle connection has no goroutine
// at all: its reader parks it with the Handler's poller and ends, and the
// poller starts a new reader when input arrives (see poller_linux.go and
// conn.waitInput); the reader goroutine is one at a time, a relay, and
// "reader" below means whichever runs. Elsewhere an idle connection keeps
// its one reader goroutine.
type conn struct {
	// What a delivery touches comes first, in this order, so that a message
	// to a room of 10,000 touches a few adjacent cache lines of each
	// connection instead of a dozen scattered ones: the connection's lock,
	// queue and writer state (the fan-out and the writer), then the socket
	// the writer writes (sockMem, its own hot fields first). The struct's
	// size is a multiple of 64 bytes, so that these fields start a cache line
	// (see TestConnLayout and BENCHMARKS.md, "Fewer cache lines a delivery").
	mu      sync.Mutex
	writer  writerState // who writes the queue, if anyone
	closing bool
	mode    Mode
	q       queue // the outbound queue
	// wg counts the connection's other goroutines: its writer (pooled or
	// its own), a raw-mode ping, a running heartbeat. No Add once closing
	// (every Add is made under mu after checking), so run's Wait, after
	// beginClose, waits for all of them.
	wg   sync.WaitGroup
	h    *Handler
	sock *socket    // the hijacked connection under ws: &sockMem once attached, nil before
	sse  *sseStream // ModeSSE's state; nil in the other modes
	// sockMem is the connection's socket, in the connection's own
	// allocation (see hijacker).
	sockMem socket

	ws     *websocket.Conn // set once, before the writer may start
	br     *bufio.Reader   // ws's reader over sock
	bw     *bufio.Writer   // ws's writer over sock (control frames); nil for an event stream
	client Client
	// ctx and cancel are the context behind context(), made at its first
	// use (see connContext); nil until then. Guarded by mu.
	ctx    context.Context
	cancel context.CancelFunc

	// reader: the connection's rooms. The first in a field (raw mode's
	// only one, and the only one of most protocol-mode connections and
	// event streams), the others in a map made when a second comes: an
	// idle connection should not pay for a map.
	first  *room
	rooms  map[string]*room
	tokens float64 // reader: rate-limit bucket
	refill int64   // reader: when tokens was last refilled, monotonic nanoseconds (see sinceStart)

	lastSeen atomic.Int64 // unix nanoseconds of the peer's last sign of life
	lastApp  atomic.Int64 // the last message either way, heartbeats aside (WithIdleTimeout)

	dropped atomic.Uint64 // frames a drop policy discarded

	// The close, and the rest of the writer's state; guarded by mu.
	code    protocol.CloseCode
	reason  string
	flush   bool
	abort   bool     // close without a close frame (set with closing)
	pinging bool     // a raw-mode ping waits for its pong
	pingAt  int64    // when that ping was queued, unix nanoseconds
	rest    []*frame // frames a pool writer took but left to the connection's own writer
	// beatAt and beatIdx are the connection's next heartbeat and its place
	// in the Handler's heartbeats (-1: none), guarded by the heartbeats' mu.
	beatAt  int64
	beatIdx int32
}

// processStart and sinceStart are a monotonic clock in an int64: the
// nanoseconds since the process started (8 bytes where a time.Time takes
// 24).
var processStart = time.Now()

func sinceStart() int64 { return int64(time.Since(processStart)) }

func newConn(h *Handler, cl Client) *conn {
	c := &conn{
		h: h, client: cl, mode: cl.Mode,
		tokens:  float64(h.cfg.rateBurst),
		refill:  sinceStart(),
		beatIdx: -1,
	}
	c.lastSeen.Store(time.Now().UnixNano())
	c.lastApp.Store(time.Now().UnixNano())
	return c
}

// attach gives the connection its WebSocket, once the upgrade succeeded.
func (c *conn) attach(ws *websocket.Conn, sock *socket, br *bufio.Reader, bw *bufio.Writer) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ws, c.sock, c.br, c.bw = ws, sock, br, bw
	sock.owner = c
}

// start serves a registered connection: its heartbeat, a writer for what
// was queued before (a welcome, a raw client's history), and its reader
// goroutine, which register counted in h.live.
func (c *conn) start() {
	c.startHeartbeat()
	c.wakeWriter()
	go c.serveRead(false)
}

// serveRead is the connection's reader goroutine: it reads (after a wake-up
// from the poller when woken) until the connection parks, and then ends
// with the connection's count in h.live handed to the poller, which starts
// serveRead again on input or close; or until the connection closes, and
// then ends it (end) and gives the count back.
func (c *conn) serveRead(woken bool) {
	if c.readLoop(woken) {
		return // parked
	}
	c.end()
	c.h.live.Done()
}

// abandon undoes an admission that did not become a served connection:
// it leaves the room a raw client joined and gives the slot back.
func (c *conn) abandon() {
	c.leaveAll()
	c.mu.Lock()
	c.cancelLocked()
	c.mu.Unlock()
	c.h.release(c.client.UserID)
}

// enqueue queues f without blocking, under its room's slow-consumer
// policy (see queue.push), and makes sure a writer will write it. A frame
// that overflows the queue under SlowConsumerDisconnect closes the
// connection as a slow consumer. It reports whether f was queued.
func (c *conn) enqueue(f *frame) bool {
	return c.enqueueFor(f, nil)
}

// enqueueFor is enqueue for a publish that may write f itself: when w has
// room and no writer has the connection, the connection joins w (its
// caller then writes it, see inlineWrites) instead of the pool's queue.
func (c *conn) enqueueFor(f *frame, w *inlineWrites) bool {
	if f.to&(1<<c.mode) == 0 {
		return false // not for this mode: raw mode and SSE carry no protocol envelopes
	}
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return false
	}
	out := c.q.push(f, c.h.cfg.queue, c)
	if out == queued && !w.claimLocked(c) {
		c.startWriterLocked()
	}
	c.mu.Unlock()
	if out == overflow {
		c.closeSlow(f.room, "slow consumer", false)
	}
	return out == queued
}

// countDrop counts a frame of room r that a drop policy discarded.
func (c *conn) countDrop(r *room) {
	c.dropped.Add(1)
	c.h.stats.dropped.Add(1)
	if r != nil {
		r.dropped.Add(1)
	}
}

// closeSlow closes the connection as a slow consumer and counts it. With
// abort, the socket is closed without a close frame: one whose write timed
// out is full, and a close handshake would only wait for it.
func (c *conn) closeSlow(r *room, reason string, abort bool) {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return
	}
	depth, bytes := c.q.len(), c.q.size()
	c.abort = abort
	c.beginCloseLocked(protocol.CloseSlowConsumer, reason, false)
	c.mu.Unlock()
	c.h.stats.slowConsumers.Add(1)
	roomName := ""
	if r != nil {
		r.slowConsumers.Add(1)
		roomName = r.name
	}
	c.h.log.Warn("pubsub: slow consumer disconnected", "reason", reason,
		"conn_id", c.client.ID, "user_id", c.client.UserID, "room", roomName,
		"queued_messages", depth, "queued_bytes", bytes)
}

func (c *conn) stats() ConnStats {
	msgs, bytes, lag := c.queueState()
	return ConnStats{Client: c.client, QueueMessages: msgs, QueueBytes: bytes, Lag: lag, Dropped: c.dropped.Load()}
}

// queueState is the connection's queue depth and the age of its oldest
// queued message.
func (c *conn) queueState() (msgs, bytes int, lag time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.q.len(), c.q.size(), c.q.lag(time.Now())
}

// beginClose starts closing the connection with code and reason. With
// flush, what is queued is written first. Only the first call counts; it
// reports whether this call was it.
func (c *conn) beginClose(code protocol.CloseCode, reason string, flush bool) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.beginCloseLocked(code, reason, flush)
}

func (c *conn) beginCloseLocked(code protocol.CloseCode, reason string, flush bool) bool {
	if c.closing {
		return false
	}
	c.closing, c.code, c.reason, c.flush = true, code, truncateReason(reason), flush
	c.h.beats.cancel(c)
	c.cancelLocked()
	if c.sock != nil {
		// A parked connection gets its reader back, which reads the peer's
		// side of the close (or the closed socket) and ends the connection;
		// and its read buffer, before the writer can start coder's close
		// handshake, which reads too.
		c.h.poll.unpark(c)
	}
	c.startWriterLocked() // it sends the close; a running writer will see closing
	return true
}

// closeLost records why a connection that is ending without a close of
// ours ended (the peer's close frame, a message too big, a heartbeat
// timeout found by a failed ping): it begins the close, or corrects one
// begun as lost (1006); a close of ours already begun keeps its code.
func (c *conn) closeLost(code protocol.CloseCode, reason string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closeLostLocked(code, reason)
}

func (c *conn) closeLostLocked(code protocol.CloseCode, reason string) {
	c.beginCloseLocked(protocol.CloseAbnormal, "", false)
	if c.code == protocol.CloseAbnormal {
		c.code, c.reason = code, truncateReason(reason)
	}
}

// roomReset closes the connection with 4006 after what it has queued: a
// room it joined lost messages it cannot be sent (see KindReset).
func (c *conn) roomReset() {
	c.beginClose(protocol.CloseRoomReset, "room stream reset; reconnect and recover", true)
}

// closeStatus is the code and reason the connection closed with.
func (c *conn) closeStatus() (protocol.CloseCode, string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.code, c.reason
}

// startHeartbeat schedules the first heartbeat once the connection is
// served.
func (c *conn) startHeartbeat() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.closing {
		c.h.beats.schedule(c, c.h.cfg.heartbeat)
	}
}

// pingFrame is the heartbeat envelope, shared by every connection.
var pingFrame = newControlFrame(pingEnvelope)

// heartbeat runs on the Handler's heartbeats goroutine every interval
// (heartbeat.go): it checks the peer's liveness, asks for a sign of life
// and schedules the next. While it runs it counts in c.wg, unless closing
// began (then it does nothing, and schedules nothing).
func (c *conn) heartbeat() {
	cfg := &c.h.cfg
	silent := time.Since(time.Unix(0, c.lastSeen.Load()))
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing {
		return
	}
	c.wg.Add(1)
	defer c.wg.Done()
	c.h.beats.schedule(c, cfg.heartbeat)
	if cfg.idleTimeout > 0 && time.Since(time.Unix(0, c.lastApp.Load())) > cfg.idleTimeout {
		c.beginCloseLocked(protocol.CloseIdleTimeout, "idle timeout", false)
		return
	}
	if c.mode == ModeSSE {
		// A comment keeps proxies from timing the stream out; a peer that
		// is gone shows as a write that fails or times out.
		if c.q.pushIfRoom(ssePingFrame, c.h.cfg.queue) {
			c.startWriterLocked()
		}
		return
	}
	if c.mode == ModeProtocol {
		if silent > cfg.heartbeat+cfg.heartbeatWait {
			c.beginCloseLocked(protocol.CloseHeartbeatTimeout, "heartbeat timeout", false)
			return
		}
		if c.q.pushIfRoom(pingFrame, c.h.cfg.queue) {
			c.startWriterLocked()
		}
		return
	}
	// Raw mode: a WebSocket ping after a silent interval, queued like any
	// frame, and the timer's run heartbeatWait later (runs in between
	// check the idle timeout as usual) checks that a sign of life (its
	// pong, or anything else) came since. Pings go out only after a silent
	// interval, so a healthy client's pongs can be nearly two intervals
	// apart. The Handler writes the ping itself, rather than
	// coder/websocket's Ping: a pong then needs no reader waiting inside
	// coder/websocket for it, and a parked connection reads it and parks
	// again (conn.takeControl).
	now := time.Now().UnixNano()
	if c.pinging {
		if c.lastSeen.Load() < c.pingAt {
			if left := time.Duration(c.pingAt + int64(cfg.heartbeatWait) - now); left > 0 {
				c.h.beats.schedule(c, min(cfg.heartbeat, left)) // the ping's time is not up
				return
			}
			c.beginCloseLocked(protocol.CloseHeartbeatTimeout, "heartbeat timeout", false)
			return
		}
		c.pinging = false
	}
	if silent >= cfg.heartbeat && c.q.pushIfRoom(rawPingFrame, c.h.cfg.queue) {
		c.pinging, c.pingAt = true, now
		c.startWriterLocked()
		c.h.beats.schedule(c, min(cfg.heartbeat, cfg.heartbeatWait))
	}
}

// rawPingFrame is raw mode's heartbeat, a WebSocket ping with no payload,
// shared by every connection.
var rawPingFrame = func() *frame {
	f := &frame{size: 2, to: toRaw}
	f.rawWire = []byte{0x80 | opPing, 0}
	f.rawOnce.Do(func() {})
	return f
}()

// kill ends the connection at once. Closing the TCP connection under the
// WebSocket also cuts short a close handshake in progress (a writer waiting
// for a peer that never answers), which CloseNow alone cannot.
func (c *conn) kill() {
	if c.sock != nil {
		_ = c.sock.Close()
	}
	if c.ws != nil {
		_ = c.ws.CloseNow()
	}
}

// end ends the connection once its reader has: it waits for the writer,
// then leaves every room and reports the disconnect.
func (c *conn) end() {
	c.beginClose(protocol.CloseAbnormal, "connection lost", false) // no-op when already closing
	c.wg.Wait()
	c.leaveAll()
	c.h.unregister(c)
	c.h.release(c.client.UserID)
	h := c.h
	code, reason := c.closeStatus()
	h.stats.countClosed(code)
	h.log.Debug("pubsub: disconnected", "conn_id", c.client.ID, "user_id", c.client.UserID, "code", code, "reason", reason)
	if h.cfg.onDisconnect != nil {
		h.callHook("on_disconnect", c.client, func() error {
			h.cfg.onDisconnect(DisconnectEvent{Client: c.client, Code: code, Reason: reason})
			return nil
		})
	}
}

// truncateReason keeps a close reason within the 123 bytes a close frame
// allows, cutting at a rune boundary.
func truncateReason(s string) string {
	const max = 123
	if len(s) <= max {
		return s
	}
	s = s[:max]
	for len(s) > 0 && !utf8.ValidString(s) {
		s = s[:len(s)-1]
	}
	return s
}

// context is the connection's context: it ends when the connection begins
// closing, or the Handler closes. Hooks and broker calls made for the
// connection get it.
func (c *conn) context() context.Context { return connContext{c} }

// connContext is a connection's context.Context. The context behind it
// (context.WithCancel of the Handler's) is made only when something needs
// one: a Done channel, or a context derived from this one (which asks for
// Done). Most connections never need one (a raw client that only listens;
// the built-in broker's calls), and a connection should not keep one for
// its whole life for nothing (about 120 bytes: the context, its cancel
// func, its entry among the Handler's context's children). Err and Value
// answer without making it, as it would. Its methods may be called from
// any goroutine.
type connContext struct{ c *conn }

func (x connContext) Deadline() (time.Time, bool) { return x.c.h.ctx.Deadline() }

func (x connContext) Done() <-chan struct{} {
	c := x.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ctx == nil {
		c.ctx, c.cancel = context.WithCancel(c.h.ctx)
		if c.closing {
			c.cancel()
		}
	}
	return c.ctx.Done()
}

func (x connContext) Err() error {
	c := x.c
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.ctx != nil:
		return c.ctx.Err()
	case c.closing:
		return context.Canceled
	}
	return c.h.ctx.Err()
}

// Value answers from the context behind, once made: context.WithCancel
// finds its parent's cancelation that way, with no goroutine of its own.
func (x connContext) Value(key any) any {
	c := x.c
	c.mu.Lock()
	ctx := c.ctx
	c.mu.Unlock()
	if ctx == nil {
		ctx = c.h.ctx
	}
	return ctx.Value(key)
}

func (x connContext) String() string { return "pubsub connection context" }

// cancelLocked ends the connection's context, if one was made.
func (c *conn) cancelLocked() {
	if c.cancel != nil {
		c.cancel()
	}
}
