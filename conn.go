package pubsub

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/roomcast/pubsub/protocol"

	"github.com/coder/websocket"
)

// conn is one WebSocket connection. Its reader goroutine (run, owned by the
// Handler) owns the fields marked "reader". Its queue is written by one
// writer at a time, the Handler's writer pool or a goroutine of its own
// (see writer.go), and only while something is queued. Heartbeats are a
// timer, not a goroutine. An idle connection therefore costs one goroutine.
type conn struct {
	h      *Handler
	ws     *websocket.Conn // set once, before the writer may start
	sock   *socket         // the hijacked connection under ws
	br     *bufio.Reader   // ws's reader over sock
	client Client
	proto  bool
	ctx    context.Context // ends when the connection is closing
	cancel context.CancelFunc

	rooms  map[string]*room // reader: protocol mode's rooms, made on first use
	raw    *room            // reader: raw mode's one room
	tokens float64          // reader: rate-limit bucket
	refill time.Time        // reader

	lastSeen atomic.Int64 // unix nanoseconds of the peer's last sign of life
	lastApp  atomic.Int64 // the last message either way, heartbeats aside (WithIdleTimeout)

	mu      sync.Mutex
	q       queue         // the outbound queue
	dropped atomic.Uint64 // frames a drop policy discarded
	closing bool
	code    protocol.CloseCode
	reason  string
	flush   bool
	abort   bool        // close without a close frame (set with closing)
	pinging bool        // a raw-mode ping waits for its pong
	writer  writerState // who writes the queue, if anyone
	rest    []*frame    // frames a pool writer took but left to the connection's own writer
	beat    *time.Timer // the heartbeat; nil until the connection is served

	wg sync.WaitGroup // the writer (pooled or own) and raw-mode pings; no Add once closing
}

func newConn(h *Handler, cl Client) *conn {
	ctx, cancel := context.WithCancel(h.ctx)
	c := &conn{
		h: h, client: cl, proto: cl.Mode == ModeProtocol,
		ctx: ctx, cancel: cancel,
		tokens: float64(h.cfg.rateBurst),
		refill: time.Now(),
	}
	c.lastSeen.Store(time.Now().UnixNano())
	c.lastApp.Store(time.Now().UnixNano())
	return c
}

// enqueue queues f without blocking, under its room's slow-consumer
// policy (see queue.push), and makes sure a writer will write it. A frame
// that overflows the queue under SlowConsumerDisconnect closes the
// connection as a slow consumer. It reports whether f was queued.
func (c *conn) enqueue(f *frame) bool {
	if !c.proto && f.control {
		return false // raw mode carries payloads only
	}
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return false
	}
	out := c.q.push(f, c.h.cfg.queue, c)
	if out == queued {
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
	if c.beat != nil {
		c.beat.Stop()
	}
	c.cancel()
	c.startWriterLocked() // it sends the close; a running writer will see closing
	return true
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

// startHeartbeat arms the heartbeat timer once the connection is served.
func (c *conn) startHeartbeat() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.closing {
		c.beat = time.AfterFunc(c.h.cfg.heartbeat, c.heartbeat)
	}
}

// pingFrame is the heartbeat envelope, shared by every connection.
var pingFrame = newControlFrame(pingEnvelope)

// heartbeat runs on the timer's goroutine every interval: it checks the
// peer's liveness and asks for a sign of life.
func (c *conn) heartbeat() {
	cfg := &c.h.cfg
	silent := time.Since(time.Unix(0, c.lastSeen.Load()))
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing {
		return
	}
	c.beat.Reset(cfg.heartbeat)
	if cfg.idleTimeout > 0 && time.Since(time.Unix(0, c.lastApp.Load())) > cfg.idleTimeout {
		c.beginCloseLocked(protocol.CloseIdleTimeout, "idle timeout", false)
		return
	}
	if c.proto {
		if silent > cfg.heartbeat+cfg.heartbeatWait {
			c.beginCloseLocked(protocol.CloseHeartbeatTimeout, "heartbeat timeout", false)
			return
		}
		if c.q.pushIfRoom(pingFrame, c.h.cfg.queue) {
			c.startWriterLocked()
		}
		return
	}
	// Raw mode: the ping is the liveness check, not a deadline on silent.
	// Pings go out only after a silent interval, so a healthy client's
	// pongs can be nearly two intervals apart.
	if silent >= cfg.heartbeat && !c.pinging {
		c.pinging = true
		c.wg.Go(c.ping) // not closing, so the reader has not begun to wait
	}
}

// ping sends a WebSocket ping to a raw client and waits for its pong. Its
// context is its own: coder/websocket closes the socket when a write's
// context ends mid-frame, so one that closing cancels (c.ctx) could cut a
// close handshake short.
func (c *conn) ping() {
	ctx, cancel := context.WithTimeout(context.Background(), c.h.cfg.heartbeatWait)
	defer cancel()
	err := c.ws.Ping(ctx)
	c.mu.Lock()
	c.pinging = false
	if err != nil {
		// A ping that could not even be written (the peer reads nothing)
		// made coder/websocket close the socket, and the reader may have
		// recorded that as lost (1006) first: the timeout is the cause.
		if !c.closing {
			c.beginCloseLocked(protocol.CloseHeartbeatTimeout, "heartbeat timeout", false)
		} else if c.code == protocol.CloseAbnormal {
			c.code, c.reason = protocol.CloseHeartbeatTimeout, "heartbeat timeout"
		}
		c.mu.Unlock()
		return
	}
	c.mu.Unlock()
	c.lastSeen.Store(time.Now().UnixNano())
}

// kill ends the connection at once. Closing the TCP connection under the
// WebSocket also cuts short a close handshake in progress (a writer waiting
// for a peer that never answers), which CloseNow alone cannot.
func (c *conn) kill() {
	if c.sock != nil {
		_ = c.sock.Close()
	}
	_ = c.ws.CloseNow()
}

// run serves the connection on its own goroutine, which the Handler owns:
// it reads until the connection closes, waits for the writer, then leaves
// every room and reports the disconnect.
func (c *conn) run() {
	c.readLoop()
	c.beginClose(protocol.CloseAbnormal, "connection lost", false) // no-op when already closing
	c.wg.Wait()
	c.leaveAll()
	c.h.unregister(c)
	c.h.release(c.client.UserID)
	h := c.h
	code, reason := c.closeStatus()
	h.log.Debug("pubsub: disconnected", "conn_id", c.client.ID, "user_id", c.client.UserID, "code", code, "reason", reason)
	if h.cfg.onDisconnect != nil {
		h.callHook("on_disconnect", c.client, func() error {
			h.cfg.onDisconnect(DisconnectEvent{Client: c.client, Code: code, Reason: reason})
			return nil
		})
	}
}

// readLoop reads client messages until the connection closes.
func (c *conn) readLoop() {
	for {
		// No deadline and no context: liveness is the heartbeat's job, a
		// read context that ended would close the socket under a flushing
		// writer, and a context costs a callback per read. Close and an
		// expired Shutdown end the read with kill.
		if c.idleRead() {
			c.sock.waitReadable()
		}
		typ, data, err := c.ws.Read(context.Background())
		if err != nil {
			c.readFailed(err)
			return
		}
		c.lastSeen.Store(time.Now().UnixNano())
		if typ == websocket.MessageBinary && c.proto {
			c.beginClose(protocol.CloseUnsupportedData, "protocol mode accepts text frames only", false)
			return
		}
		if typ == websocket.MessageText && !utf8.Valid(data) {
			c.beginClose(protocol.CloseInvalidPayload, "text frame is not valid UTF-8", false)
			return
		}
		var ok bool
		if c.proto {
			ok = c.handleEnvelope(data) // counts MessagesIn, heartbeats aside
		} else {
			c.h.stats.messagesIn.Add(1)
			c.lastApp.Store(time.Now().UnixNano())
			ok = c.handleRaw(data, typ == websocket.MessageBinary)
		}
		if !ok {
			return
		}
	}
}

// idleRead reports whether the next read would wait on the network: no
// byte is buffered, in coder/websocket's reader or carried over from the
// handshake. Only the reader goroutine reads them, until the connection
// closes: then coder's close handshake reads too, so the check is made
// under mu and only before closing begins (beginClose takes mu), and
// after it the reader goes straight to coder's Read, which orders the two.
func (c *conn) idleRead() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.closing && c.br.Buffered() == 0 && len(c.sock.pre) == 0
}

// readFailed records why reading ended: the peer's close frame, an
// oversized message, or a dead socket.
func (c *conn) readFailed(err error) {
	var ce websocket.CloseError
	switch {
	case errors.As(err, &ce):
		c.beginClose(protocol.CloseAbnormal, "", false)
		c.mu.Lock()
		if c.code == protocol.CloseAbnormal {
			c.code, c.reason = protocol.CloseCode(ce.Code), ce.Reason // the peer's own words
		}
		c.mu.Unlock()
	case errors.Is(err, websocket.ErrMessageTooBig):
		// The library already sent 1009; record it.
		c.beginClose(protocol.CloseAbnormal, "", false)
		c.mu.Lock()
		if c.code == protocol.CloseAbnormal {
			c.code, c.reason = protocol.CloseMessageTooBig, "message too big"
		}
		c.mu.Unlock()
	default:
		c.beginClose(protocol.CloseAbnormal, "connection lost", false)
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
		c.beginClose(protocol.CloseRateLimited, "rate limit exceeded", false)
		return false
	}
	if c.h.cfg.onMessage != nil {
		m := &ClientMessage{Client: c.client, Room: c.rawRoomName(), Data: data, Binary: binary, c: c}
		switch err := c.h.callOnMessage(c.ctx, m); {
		case errors.Is(err, errHookPanicked):
			c.beginClose(protocol.CloseInternalError, "internal error", false)
			return false
		case err != nil:
			c.beginClose(protocol.ClosePolicyViolation, "message rejected", false)
			return false
		}
		return true
	}
	room := c.rawRoomName()
	if room == "" {
		c.beginClose(protocol.ClosePolicyViolation, "no room to publish to", false)
		return false
	}
	if perr := c.authorizePublish(room); perr != nil {
		if perr.code == protocol.CodeInternal {
			c.beginClose(protocol.CloseInternalError, "internal error", false)
		} else {
			c.beginClose(protocol.ClosePolicyViolation, "publish not allowed", false)
		}
		return false
	}
	if perr := c.h.publishFromClient(c.ctx, room, data); perr != nil {
		c.beginClose(protocol.CloseTryAgainLater, "publish failed, try again later", false)
		return false
	}
	return true
}

// handleEnvelope handles one protocol-mode envelope. It reports whether
// the connection stays open.
func (c *conn) handleEnvelope(data []byte) bool {
	in, perr := decodeInbound(data)
	if perr != nil || (in.Type != "ping" && in.Type != "pong") {
		c.h.stats.messagesIn.Add(1) // a data message: heartbeats are not counted
		c.lastApp.Store(time.Now().UnixNano())
	}
	switch {
	case perr == nil && in.Type == "pong":
		return true // the answer to our ping; liveness was noted on read
	case !c.allow():
		// Every envelope but pong counts, malformed ones included, so a
		// flood of garbage is throttled like any other.
		perr = &protoError{protocol.CodeRateLimited, "rate limit exceeded; the message was dropped"}
	case perr == nil && in.Type == "ping":
		return c.reply(newControlFrame(encodePong(in.ID)))
	case perr == nil:
		perr = c.dispatch(&in)
	}
	if perr == errAcked {
		return !c.isClosing() // the handler already replied
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
			return &protoError{protocol.CodeInvalidRoom, err.Error()}
		}
		if _, ok := c.rooms[in.Room]; ok {
			return nil // already subscribed: idempotent
		}
		if len(c.rooms) >= h.cfg.maxRooms {
			return &protoError{protocol.CodeTooManyRooms, "this connection is in the maximum number of rooms"}
		}
		if len(in.Info) > h.cfg.maxInfo {
			return badRequest(`"info" is larger than ` + strconv.Itoa(h.cfg.maxInfo) + " bytes")
		}
		if perr := c.authorize(ActionSubscribe, in.Room); perr != nil {
			return perr
		}
		if _, err := c.subscribe(in.Room, in.Since, in.History, in.Presence, in.Info, in.ID); err != nil {
			h.brokerFailed("subscribe", in.Room, err)
			return &protoError{protocol.CodeUnavailable, "could not subscribe; try again later"}
		}
		return errAcked // subscribe queued the ack, ahead of the room's messages
	case "presence":
		r, ok := c.rooms[in.Room]
		if !ok {
			return &protoError{protocol.CodeNotSubscribed, "subscribe to the room to see its presence"}
		}
		if r.opts.Presence == PresenceOff {
			return &protoError{protocol.CodeNotSupported, "this room does not track presence"}
		}
		p, err := h.cfg.broker.Presence(c.ctx, in.Room, r.opts.Presence == PresenceCounts)
		if err != nil {
			h.brokerFailed("presence", in.Room, err)
			return &protoError{protocol.CodeUnavailable, "could not read presence; try again later"}
		}
		c.reply(newControlFrame(encodePresence(in.ID, in.Room, p)))
		return errAcked
	case "unsubscribe":
		r, ok := c.rooms[in.Room]
		if !ok {
			return &protoError{protocol.CodeNotSubscribed, "this connection is not subscribed to that room"}
		}
		c.forget(in.Room)
		h.rooms.leave(r, c)
		return nil
	case "publish":
		if err := h.cfg.roomValidator(in.Room); err != nil {
			return &protoError{protocol.CodeInvalidRoom, err.Error()}
		}
		if perr := c.authorizePublish(in.Room); perr != nil {
			return perr
		}
		return h.publishFromClient(c.ctx, in.Room, in.payload)
	case "send":
		if h.cfg.onMessage == nil {
			return &protoError{protocol.CodeNotSupported, "this server does not handle messages sent to it"}
		}
		if in.Room != "" {
			if err := h.cfg.roomValidator(in.Room); err != nil {
				return &protoError{protocol.CodeInvalidRoom, err.Error()}
			}
		}
		m := &ClientMessage{Client: c.client, Room: in.Room, Data: in.payload, c: c}
		switch err := h.callOnMessage(c.ctx, m); {
		case errors.Is(err, errHookPanicked):
			return &protoError{protocol.CodeInternal, "internal error"}
		case err != nil:
			return &protoError{protocol.CodeRejected, "the server rejected the message"}
		}
		return nil
	}
	return &protoError{protocol.CodeUnknownType, "unknown type"} // unreachable: decodeInbound checked
}

// errAcked tells handleEnvelope that dispatch queued its own reply.
var errAcked = &protoError{"", ""}

func (c *conn) isClosing() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closing
}

// subscribe joins room for this connection and queues, in this order, the
// ack (when id is set), the messages the client asked to catch up on
// (since its position, or the room's last history messages), then the
// live messages. It is shared by protocol subscribes and raw-mode joins.
func (c *conn) subscribe(room string, since *position, history int, presence bool, info json.RawMessage, id string) (subscribed, error) {
	h := c.h
	if len(c.client.Info) > 0 {
		info = c.client.Info // the server's word wins
	}
	catchUp := c.proto || history > 0
	s := &sub{
		presence:  presence && c.proto,
		member:    Member{ConnID: c.client.ID, UserID: c.client.UserID, Info: info},
		buffering: catchUp,
	}
	r, err := h.rooms.join(c.ctx, room, c, s)
	if err != nil {
		return subscribed{}, err
	}
	c.keep(room, r)
	out := subscribed{room: room, presence: r.opts.Presence}
	if !catchUp {
		return out, nil
	}
	// A catch-up never exceeds what the queue can hold: more would close
	// the connection as a slow consumer before it could read any of it.
	capacity := min(r.opts.HistorySize, h.cfg.queue.messages-1)
	q := HistoryQuery{}
	switch {
	case since != nil:
		q = HistoryQuery{Since: *since.Seq, Limit: max(capacity, 1)}
	case history > 0:
		q = HistoryQuery{Limit: min(history, capacity), Latest: true}
	}
	res, err := h.cfg.broker.History(c.ctx, room, q)
	if err != nil {
		c.forget(room)
		h.rooms.leave(r, c)
		return subscribed{}, err
	}
	out.epoch, out.top = res.Epoch, res.Top
	msgs := res.Messages
	if since != nil {
		out.recovery = true
		switch {
		case since.Epoch != res.Epoch:
			out.reason, msgs = protocol.ReasonEpochChanged, nil
		case *since.Seq > res.Top:
			out.reason, msgs = protocol.ReasonUnknownPosition, nil
		case *since.Seq < res.Top && (len(msgs) == 0 || msgs[0].Seq != *since.Seq+1):
			out.reason, msgs = protocol.ReasonHistoryTooShort, nil
		case *since.Seq < res.Top && msgs[len(msgs)-1].Seq != res.Top:
			out.reason, msgs = protocol.ReasonTooManyMissed, nil
		default:
			out.recovered = true
		}
	}
	out.missed = len(msgs)
	first := make([]*frame, 0, len(msgs)+1)
	if id != "" {
		first = append(first, newControlFrame(encodeSubscribed(id, out)))
	}
	for _, m := range msgs {
		f := newRoomFrame(m, r)
		f.replay = true // the ack announced exactly these
		first = append(first, f)
	}
	h.rooms.catchUp(r, c, first, res.Epoch, res.Top)
	return out, nil
}

// authorize asks the authorize hook, when set, about action in room.
func (c *conn) authorize(a Action, room string) *protoError {
	if c.h.cfg.authorize == nil {
		return nil
	}
	switch err := c.h.callAuthorize(c.ctx, c.client, a, room); {
	case errors.Is(err, errHookPanicked):
		return &protoError{protocol.CodeInternal, "internal error"}
	case err != nil:
		return &protoError{protocol.CodeForbidden, "not allowed to " + string(a) + " in this room"}
	}
	return nil
}

// authorizePublish applies the publish policy: the authorize hook when
// set, otherwise WithClientPublish.
func (c *conn) authorizePublish(room string) *protoError {
	if c.h.cfg.authorize == nil && !c.h.cfg.clientPublish {
		return &protoError{protocol.CodeForbidden, "clients may not publish on this server"}
	}
	return c.authorize(ActionPublish, room)
}

// rawRoomName is a raw connection's room, "" when it joined none (its
// messages go to the message hook).
func (c *conn) rawRoomName() string {
	if c.raw == nil {
		return ""
	}
	return c.raw.name
}

// keep records a room the connection joined. A raw connection has at most
// one, in a field: an idle connection should not pay for a map.
func (c *conn) keep(name string, r *room) {
	if !c.proto {
		c.raw = r
		return
	}
	if c.rooms == nil {
		c.rooms = make(map[string]*room, 1)
	}
	c.rooms[name] = r
}

func (c *conn) forget(name string) {
	if !c.proto {
		c.raw = nil
		return
	}
	delete(c.rooms, name)
}

// leaveAll leaves every room; it runs once the reader has ended.
func (c *conn) leaveAll() {
	if r := c.raw; r != nil {
		c.raw = nil
		c.h.rooms.leave(r, c)
	}
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
