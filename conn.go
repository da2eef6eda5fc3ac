package pubsub

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"
)

// frame is one outbound message, built once and shared by every queue it
// is put in. Its protocol-mode envelope is encoded at most once, by the
// first writer that needs it.
type frame struct {
	payload []byte // the raw-mode bytes; nil for protocol-only frames
	kind    payloadKind
	size    int // what the frame counts against a queue's byte bound
	data    bool

	encode func() []byte
	once   sync.Once
	env    []byte
}

func newRoomFrame(m Message) *frame {
	kind := classify(m.Data)
	return &frame{
		payload: m.Data, kind: kind, size: len(m.Data), data: true,
		encode: func() []byte { return encodeMessage(m, kind) },
	}
}

func newDirectFrame(p []byte) *frame {
	kind := classify(p)
	return &frame{
		payload: p, kind: kind, size: len(p), data: true,
		encode: func() []byte { return encodeDirect(p, kind) },
	}
}

// newControlFrame is a protocol-mode reply (welcome, ack, error, ping, pong).
func newControlFrame(env []byte) *frame {
	f := &frame{env: env, size: len(env)}
	f.once.Do(func() {})
	return f
}

func (f *frame) envelope() []byte {
	f.once.Do(func() { f.env = f.encode() })
	return f.env
}

// closeAbnormal marks a connection that ended without a close handshake of
// ours to send: the peer closed it, or the socket failed.
const closeAbnormal = 1006

// conn is one WebSocket connection. The goroutine running ServeHTTP owns
// its reader loop and the fields marked "reader"; the writer goroutine,
// started with wg.Go, owns every socket write.
type conn struct {
	h      *Handler
	ws     *websocket.Conn
	client Client
	proto  bool
	ctx    context.Context // ends when the connection is closing
	cancel context.CancelFunc

	rooms   map[string]*room // reader
	rawRoom string           // reader
	tokens  float64          // reader: rate-limit bucket
	refill  time.Time        // reader

	lastSeen atomic.Int64 // unix nanoseconds of the peer's last sign of life

	mu      sync.Mutex
	queue   []*frame
	spare   []*frame
	qbytes  int
	closing bool
	code    int
	reason  string
	flush   bool
	wake    chan struct{} // capacity 1: the queue has something
	done    chan struct{} // closed when closing begins

	wg sync.WaitGroup // the writer
}

func newConn(h *Handler, cl Client) *conn {
	ctx, cancel := context.WithCancel(h.ctx)
	c := &conn{
		h: h, client: cl, proto: cl.Mode == ModeProtocol,
		ctx: ctx, cancel: cancel,
		rooms:  make(map[string]*room),
		tokens: float64(h.cfg.rateBurst),
		refill: time.Now(),
		wake:   make(chan struct{}, 1),
		done:   make(chan struct{}),
	}
	c.lastSeen.Store(time.Now().UnixNano())
	return c
}

// enqueue adds f to the outbound queue without blocking. A queue that
// would pass its bounds closes the connection as a slow consumer. It
// reports whether f was queued.
func (c *conn) enqueue(f *frame) bool {
	if !c.proto && !f.data {
		return false // raw mode carries payloads only
	}
	cfg := &c.h.cfg
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return false
	}
	if len(c.queue) >= cfg.queueMessages || c.qbytes+f.size > cfg.queueBytes {
		depth, bytes := len(c.queue), c.qbytes
		c.beginCloseLocked(CloseSlowConsumer, "slow consumer", false)
		c.mu.Unlock()
		c.h.stats.slowConsumers.Add(1)
		c.h.log.Warn("pubsub: slow consumer disconnected",
			"conn_id", c.client.ID, "user_id", c.client.UserID,
			"queued_messages", depth, "queued_bytes", bytes)
		return false
	}
	c.queue = append(c.queue, f)
	c.qbytes += f.size
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
	return true
}

// beginClose starts closing the connection with code and reason. With
// flush, what is queued is written first. Only the first call counts; it
// reports whether this call was it.
func (c *conn) beginClose(code int, reason string, flush bool) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.beginCloseLocked(code, reason, flush)
}

func (c *conn) beginCloseLocked(code int, reason string, flush bool) bool {
	if c.closing {
		return false
	}
	c.closing, c.code, c.reason, c.flush = true, code, truncateReason(reason), flush
	close(c.done)
	c.cancel()
	return true
}

// closeStatus is the code and reason the connection closed with.
func (c *conn) closeStatus() (int, string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.code, c.reason
}

// take removes and returns everything queued.
func (c *conn) take() []*frame {
	c.mu.Lock()
	defer c.mu.Unlock()
	batch := c.queue
	c.queue, c.spare = c.spare[:0], nil
	c.qbytes = 0
	return batch
}

// recycle hands a written batch's backing array back for the next take.
func (c *conn) recycle(batch []*frame) {
	clear(batch)
	c.mu.Lock()
	if c.spare == nil && cap(batch) <= 2*c.h.cfg.queueMessages {
		c.spare = batch[:0]
	}
	c.mu.Unlock()
}

// writeLoop owns the socket's writes until the connection closes.
func (c *conn) writeLoop() {
	tick := time.NewTicker(c.h.cfg.heartbeat)
	defer tick.Stop()
	for {
		select {
		case <-c.done:
			c.finish()
			return
		case <-c.wake:
			if err := c.writeBatch(c.take()); err != nil {
				c.beginClose(closeAbnormal, "write failed", false)
				c.finish()
				return
			}
		case <-tick.C:
			c.heartbeat()
		}
	}
}

// writeBatch writes queued frames, giving the whole batch WithWriteTimeout.
func (c *conn) writeBatch(batch []*frame) error {
	if len(batch) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.h.cfg.writeTimeout)
	defer cancel()
	var err error
	n := 0
	for _, f := range batch {
		if c.proto {
			err = c.ws.Write(ctx, websocket.MessageText, f.envelope())
		} else {
			typ := websocket.MessageText
			if f.kind == kindBinary {
				typ = websocket.MessageBinary
			}
			err = c.ws.Write(ctx, typ, f.payload)
		}
		if err != nil {
			break
		}
		if f.data {
			n++
		}
	}
	c.h.stats.messagesOut.Add(uint64(n))
	c.recycle(batch)
	return err
}

// heartbeat checks the peer's liveness and asks for a sign of life.
func (c *conn) heartbeat() {
	cfg := &c.h.cfg
	silent := time.Since(time.Unix(0, c.lastSeen.Load()))
	if silent > cfg.heartbeat+cfg.heartbeatWait {
		c.beginClose(CloseHeartbeatTimeout, "heartbeat timeout", false)
		return
	}
	if c.proto {
		ctx, cancel := context.WithTimeout(context.Background(), cfg.writeTimeout)
		defer cancel()
		if err := c.ws.Write(ctx, websocket.MessageText, pingEnvelope); err != nil {
			c.beginClose(closeAbnormal, "write failed", false)
		}
		return
	}
	if silent < cfg.heartbeat {
		return // a raw client that spoke recently needs no ping
	}
	ctx, cancel := context.WithTimeout(context.Background(), cfg.heartbeatWait)
	defer cancel()
	if err := c.ws.Ping(ctx); err != nil {
		c.beginClose(CloseHeartbeatTimeout, "heartbeat timeout", false)
		return
	}
	c.lastSeen.Store(time.Now().UnixNano())
}

// finish sends the close frame (after the queue, when flushing) and closes
// the socket. It runs on the writer goroutine.
func (c *conn) finish() {
	c.mu.Lock()
	code, reason, flush := c.code, c.reason, c.flush
	c.mu.Unlock()
	if flush {
		if err := c.writeBatch(c.take()); err != nil {
			_ = c.ws.CloseNow()
			return
		}
	}
	if code == closeAbnormal {
		_ = c.ws.CloseNow()
		return
	}
	// Close writes the close frame and waits a bounded time for the peer's.
	_ = c.ws.Close(websocket.StatusCode(code), reason)
}

// readLoop reads client messages until the connection closes. It runs on
// the goroutine that called ServeHTTP.
func (c *conn) readLoop() {
	for {
		// No deadline here: liveness is the heartbeat's job, and a read
		// context that ended would close the socket under a flushing writer.
		// The Handler's context ends only when Close (or a Shutdown whose
		// ctx ended) must end every socket at once, even one whose writer
		// is waiting for a close handshake, which CloseNow cannot cut short.
		typ, data, err := c.ws.Read(c.h.ctx)
		if err != nil {
			c.readFailed(err)
			return
		}
		c.lastSeen.Store(time.Now().UnixNano())
		if typ == websocket.MessageBinary && c.proto {
			c.beginClose(CloseUnsupportedData, "protocol mode accepts text frames only", false)
			return
		}
		if typ == websocket.MessageText && !utf8.Valid(data) {
			c.beginClose(CloseInvalidPayload, "text frame is not valid UTF-8", false)
			return
		}
		var ok bool
		if c.proto {
			ok = c.handleEnvelope(data) // counts MessagesIn, heartbeats aside
		} else {
			c.h.stats.messagesIn.Add(1)
			ok = c.handleRaw(data, typ == websocket.MessageBinary)
		}
		if !ok {
			return
		}
	}
}

// readFailed records why reading ended: the peer's close frame, an
// oversized message, or a dead socket.
func (c *conn) readFailed(err error) {
	var ce websocket.CloseError
	switch {
	case errors.As(err, &ce):
		c.beginClose(closeAbnormal, "", false)
		c.mu.Lock()
		if c.code == closeAbnormal {
			c.code, c.reason = int(ce.Code), ce.Reason // the peer's own words
		}
		c.mu.Unlock()
	case errors.Is(err, websocket.ErrMessageTooBig):
		// The library already sent 1009; record it.
		c.beginClose(closeAbnormal, "", false)
		c.mu.Lock()
		if c.code == closeAbnormal {
			c.code, c.reason = CloseMessageTooBig, "message too big"
		}
		c.mu.Unlock()
	default:
		c.beginClose(closeAbnormal, "connection lost", false)
	}
}

// allow takes a token from the connection's rate-limit bucket.
func (c *conn) allow() bool {
	cfg := &c.h.cfg
	now := time.Now()
	c.tokens += now.Sub(c.refill).Seconds() * cfg.rateLimit
	c.refill = now
	if max := float64(cfg.rateBurst); c.tokens > max {
		c.tokens = max
	}
	if c.tokens < 1 {
		c.h.stats.rateLimited.Add(1)
		return false
	}
	c.tokens--
	return true
}

// handleRaw handles one raw-mode frame: to the message hook when set,
// otherwise published to the connection's room. It reports whether the
// connection stays open.
func (c *conn) handleRaw(data []byte, binary bool) bool {
	if !c.allow() {
		c.beginClose(CloseRateLimited, "rate limit exceeded", false)
		return false
	}
	if c.h.cfg.onMessage != nil {
		m := &ClientMessage{Client: c.client, Room: c.rawRoom, Data: data, Binary: binary, c: c}
		switch err := c.h.callOnMessage(c.ctx, m); {
		case errors.Is(err, errHookPanicked):
			c.beginClose(CloseInternalError, "internal error", false)
			return false
		case err != nil:
			c.beginClose(ClosePolicyViolation, "message rejected", false)
			return false
		}
		return true
	}
	if c.rawRoom == "" {
		c.beginClose(ClosePolicyViolation, "no room to publish to", false)
		return false
	}
	if perr := c.authorizePublish(c.rawRoom); perr != nil {
		if perr.code == CodeInternal {
			c.beginClose(CloseInternalError, "internal error", false)
		} else {
			c.beginClose(ClosePolicyViolation, "publish not allowed", false)
		}
		return false
	}
	if perr := c.h.publishFromClient(c.ctx, c.rawRoom, data); perr != nil {
		c.beginClose(CloseTryAgainLater, "publish failed, try again later", false)
		return false
	}
	return true
}

// handleEnvelope handles one protocol-mode envelope. It reports whether
// the connection stays open.
func (c *conn) handleEnvelope(data []byte) bool {
	in, perr := decodeInbound(data)
	if perr == nil {
		switch in.Type {
		case "ping":
			return c.reply(newControlFrame(pongEnvelope))
		case "pong":
			return true
		}
	}
	c.h.stats.messagesIn.Add(1) // a data message: heartbeats are not counted
	if perr == nil {
		if !c.allow() {
			perr = &protoError{CodeRateLimited, "rate limit exceeded; the message was dropped"}
		} else {
			perr = c.dispatch(&in)
		}
	}
	if perr != nil {
		c.h.log.Debug("pubsub: client request refused", "conn_id", c.client.ID,
			"user_id", c.client.UserID, "room", in.Room, "err", perr)
		return c.reply(newControlFrame(encodeError(in.ID, perr)))
	}
	if in.ID == "" {
		return true
	}
	return c.reply(newControlFrame(encodeAck(in.ID)))
}

// reply queues a protocol reply; a queue too full for it means the
// connection is already closing as a slow consumer.
func (c *conn) reply(f *frame) bool {
	return c.enqueue(f)
}

func (c *conn) dispatch(in *inbound) *protoError {
	h := c.h
	switch in.Type {
	case "subscribe":
		if err := h.cfg.roomValidator(in.Room); err != nil {
			return &protoError{CodeInvalidRoom, err.Error()}
		}
		if _, ok := c.rooms[in.Room]; ok {
			return nil // already subscribed: idempotent
		}
		if len(c.rooms) >= h.cfg.maxRooms {
			return &protoError{CodeTooManyRooms, "this connection is in the maximum number of rooms"}
		}
		if perr := c.authorize(ActionSubscribe, in.Room); perr != nil {
			return perr
		}
		r, err := h.rooms.join(c.ctx, in.Room, c)
		if err != nil {
			h.brokerFailed("subscribe", in.Room, err)
			return &protoError{CodeUnavailable, "could not subscribe; try again later"}
		}
		c.rooms[in.Room] = r
		return nil
	case "unsubscribe":
		r, ok := c.rooms[in.Room]
		if !ok {
			return &protoError{CodeNotJoined, "this connection is not subscribed to that room"}
		}
		delete(c.rooms, in.Room)
		h.rooms.leave(r, c)
		return nil
	case "publish":
		if err := h.cfg.roomValidator(in.Room); err != nil {
			return &protoError{CodeInvalidRoom, err.Error()}
		}
		if perr := c.authorizePublish(in.Room); perr != nil {
			return perr
		}
		return h.publishFromClient(c.ctx, in.Room, in.payload)
	case "send":
		if h.cfg.onMessage == nil {
			return &protoError{CodeNotSupported, "this server does not handle messages sent to it"}
		}
		if in.Room != "" {
			if err := h.cfg.roomValidator(in.Room); err != nil {
				return &protoError{CodeInvalidRoom, err.Error()}
			}
		}
		m := &ClientMessage{Client: c.client, Room: in.Room, Data: in.payload, c: c}
		switch err := h.callOnMessage(c.ctx, m); {
		case errors.Is(err, errHookPanicked):
			return &protoError{CodeInternal, "internal error"}
		case err != nil:
			return &protoError{CodeRejected, "the server rejected the message"}
		}
		return nil
	}
	return &protoError{CodeUnknownType, "unknown type"} // unreachable: decodeInbound checked
}

// authorize asks the authorize hook, when set, about action in room.
func (c *conn) authorize(a Action, room string) *protoError {
	if c.h.cfg.authorize == nil {
		return nil
	}
	switch err := c.h.callAuthorize(c.ctx, c.client, a, room); {
	case errors.Is(err, errHookPanicked):
		return &protoError{CodeInternal, "internal error"}
	case err != nil:
		return &protoError{CodeForbidden, "not allowed to " + string(a) + " in this room"}
	}
	return nil
}

// authorizePublish applies the publish policy: the authorize hook when
// set, otherwise WithClientPublish.
func (c *conn) authorizePublish(room string) *protoError {
	if c.h.cfg.authorize == nil && !c.h.cfg.clientPublish {
		return &protoError{CodeForbidden, "clients may not publish on this server"}
	}
	return c.authorize(ActionPublish, room)
}

// leaveAll leaves every room; it runs once the reader has ended.
func (c *conn) leaveAll() {
	for name, r := range c.rooms {
		delete(c.rooms, name)
		c.h.rooms.leave(r, c)
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
