package pubsub

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
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
	m       Message // room messages and presence events; Data is the raw-mode payload
	room    *room   // the room whose policy applies; nil for direct and control frames
	kind    payloadKind
	size    int       // what the frame counts against a queue's byte bound
	at      time.Time // when it was published, for lag
	data    bool      // carries a payload (room or direct message)
	control bool      // a protocol-mode reply or event: never sent in raw mode

	encode func() []byte
	once   sync.Once
	env    []byte
}

func newRoomFrame(m Message, r *room) *frame {
	if m.Kind != KindMessage {
		return &frame{m: m, room: r, size: 64, at: m.Time, control: true,
			encode: func() []byte { return encodePresenceEvent(m) }}
	}
	kind := classify(m.Data)
	return &frame{
		m: m, room: r, kind: kind, size: len(m.Data), at: m.Time, data: true,
		encode: func() []byte { return encodeMessage(m, kind) },
	}
}

func newDirectFrame(p []byte) *frame {
	kind := classify(p)
	return &frame{
		m: Message{Data: p}, kind: kind, size: len(p), at: time.Now(), data: true,
		encode: func() []byte { return encodeDirect(p, kind) },
	}
}

// newControlFrame is a protocol-mode reply (welcome, ack, error, ping, pong).
func newControlFrame(env []byte) *frame {
	f := &frame{env: env, size: len(env), control: true}
	f.once.Do(func() {})
	return f
}

func (f *frame) envelope() []byte {
	f.once.Do(func() { f.env = f.encode() })
	return f.env
}

// policy is the slow-consumer policy that applies to f.
func (f *frame) policy() SlowConsumerPolicy {
	if f.room == nil || !f.data {
		return Disconnect
	}
	return f.room.opts.SlowConsumer
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
	queue   []*frame // may hold nils: frames a drop policy removed
	spare   []*frame
	qlen    int           // frames in queue, nils aside
	qbytes  int           // their bytes
	latest  map[*room]int // KeepLatest rooms: index of the room's frame in queue
	dropped atomic.Uint64 // frames a drop policy discarded
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

// enqueue adds f to the outbound queue without blocking, applying f's
// room's slow-consumer policy when the queue is full. It reports whether f
// was queued.
func (c *conn) enqueue(f *frame) bool {
	if !c.proto && f.control {
		return false // raw mode carries payloads only
	}
	cfg := &c.h.cfg
	policy := f.policy()
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return false
	}
	if policy == KeepLatest {
		if i, ok := c.latest[f.room]; ok {
			old := c.queue[i]
			c.queue[i] = f
			c.qbytes += f.size - old.size
			c.mu.Unlock()
			c.countDrop(f.room)
			c.wakeWriter()
			return true
		}
	}
	for c.qlen >= cfg.queueMessages || c.qbytes+f.size > cfg.queueBytes {
		if policy == Disconnect {
			c.mu.Unlock()
			c.slowConsumer(f.room)
			return false
		}
		if !c.dropOldestLocked() {
			// Nothing queued may be dropped: f itself is the oldest of its
			// room's messages that can go.
			c.mu.Unlock()
			c.countDrop(f.room)
			return false
		}
		c.countDrop(f.room)
	}
	c.queue = append(c.queue, f)
	c.qlen++
	c.qbytes += f.size
	if policy == KeepLatest {
		if c.latest == nil {
			c.latest = make(map[*room]int)
		}
		c.latest[f.room] = len(c.queue) - 1
	}
	c.mu.Unlock()
	c.wakeWriter()
	return true
}

func (c *conn) wakeWriter() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// dropOldestLocked removes the oldest queued frame whose room allows drops.
// It leaves a nil in its place (so KeepLatest indexes stay valid) and
// compacts the queue when nils pile up.
func (c *conn) dropOldestLocked() bool {
	for i, f := range c.queue {
		if f == nil || f.policy() == Disconnect {
			continue
		}
		c.queue[i] = nil
		c.qlen--
		c.qbytes -= f.size
		if f.policy() == KeepLatest {
			delete(c.latest, f.room)
		}
		if len(c.queue) > 2*c.h.cfg.queueMessages {
			c.compactLocked()
		}
		return true
	}
	return false
}

func (c *conn) compactLocked() {
	kept := c.queue[:0]
	for _, f := range c.queue {
		if f != nil {
			kept = append(kept, f)
		}
	}
	clear(c.queue[len(kept):])
	c.queue = kept
	clear(c.latest)
	for i, f := range c.queue {
		if f.policy() == KeepLatest {
			c.latest[f.room] = i
		}
	}
}

// countDrop counts a frame of room r that a drop policy discarded.
func (c *conn) countDrop(r *room) {
	c.dropped.Add(1)
	c.h.stats.dropped.Add(1)
	if r != nil {
		r.dropped.Add(1)
	}
}

// slowConsumer closes the connection as a slow consumer, counting it
// against room r (nil for a direct or control message).
func (c *conn) slowConsumer(r *room) {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return
	}
	depth, bytes := c.qlen, c.qbytes
	c.beginCloseLocked(CloseSlowConsumer, "slow consumer", false)
	c.mu.Unlock()
	c.h.stats.slowConsumers.Add(1)
	roomName := ""
	if r != nil {
		r.slowConsumers.Add(1)
		roomName = r.name
	}
	c.h.log.Warn("pubsub: slow consumer disconnected",
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
	for _, f := range c.queue {
		if f != nil && !f.at.IsZero() {
			lag = time.Since(f.at)
			break
		}
	}
	return c.qlen, c.qbytes, lag
}

// beginClose starts closing the connection with code and reason. With
// flush, what is queued is written first. Only the first call counts.
func (c *conn) beginClose(code int, reason string, flush bool) {
	c.mu.Lock()
	c.beginCloseLocked(code, reason, flush)
	c.mu.Unlock()
}

func (c *conn) beginCloseLocked(code int, reason string, flush bool) {
	if c.closing {
		return
	}
	c.closing, c.code, c.reason, c.flush = true, code, truncateReason(reason), flush
	close(c.done)
	c.cancel()
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
	c.qlen, c.qbytes = 0, 0
	clear(c.latest)
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
		if f == nil {
			continue // removed by a drop policy
		}
		if c.proto {
			err = c.ws.Write(ctx, websocket.MessageText, f.envelope())
		} else {
			typ := websocket.MessageText
			if f.kind == kindBinary {
				typ = websocket.MessageBinary
			}
			err = c.ws.Write(ctx, typ, f.m.Data)
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
	if c.proto {
		if silent > cfg.heartbeat+cfg.heartbeatWait {
			c.beginClose(CloseHeartbeatTimeout, "heartbeat timeout", false)
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), cfg.writeTimeout)
		defer cancel()
		if err := c.ws.Write(ctx, websocket.MessageText, pingEnvelope); err != nil {
			c.beginClose(closeAbnormal, "write failed", false)
		}
		return
	}
	// Raw mode: the ping below is the liveness check, not a deadline on
	// silent. Pings go out only after a silent interval, so on this ticker
	// a healthy client's pongs can be nearly two intervals apart.
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
		typ, data, err := c.ws.Read(context.Background())
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
		c.h.stats.messagesIn.Add(1)
		var ok bool
		if c.proto {
			ok = c.handleEnvelope(data)
		} else {
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
	switch {
	case perr == nil && in.Type == "pong":
		return true // the answer to our ping; liveness was noted on read
	case !c.allow():
		// Every envelope but pong counts, malformed ones included, so a
		// flood of garbage is throttled like any other.
		perr = &protoError{CodeRateLimited, "rate limit exceeded; the message was dropped"}
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
			return &protoError{CodeInvalidRoom, err.Error()}
		}
		if _, ok := c.rooms[in.Room]; ok {
			return nil // already subscribed: idempotent
		}
		if len(c.rooms) >= h.cfg.maxRooms {
			return &protoError{CodeTooManyRooms, "this connection is in the maximum number of rooms"}
		}
		if len(in.Info) > h.cfg.maxInfo {
			return badRequest(`"info" is larger than ` + strconv.Itoa(h.cfg.maxInfo) + " bytes")
		}
		if perr := c.authorize(ActionSubscribe, in.Room); perr != nil {
			return perr
		}
		if _, err := c.subscribe(in.Room, in.Since, in.History, in.Presence, in.Info, in.ID); err != nil {
			h.brokerFailed("subscribe", in.Room, err)
			return &protoError{CodeUnavailable, "could not subscribe; try again later"}
		}
		return errAcked // subscribe queued the ack, ahead of the room's messages
	case "presence":
		r, ok := c.rooms[in.Room]
		if !ok {
			return &protoError{CodeNotJoined, "subscribe to the room to see its presence"}
		}
		if r.opts.Presence == PresenceOff {
			return &protoError{CodeNotSupported, "this room does not track presence"}
		}
		p, err := h.cfg.broker.Presence(c.ctx, in.Room, r.opts.Presence == PresenceCounts)
		if err != nil {
			h.brokerFailed("presence", in.Room, err)
			return &protoError{CodeUnavailable, "could not read presence; try again later"}
		}
		c.reply(newControlFrame(encodePresence(in.ID, in.Room, p)))
		return errAcked
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
	c.rooms[room] = r
	out := subscribed{room: room, presence: r.opts.Presence}
	if !catchUp {
		return out, nil
	}
	// A catch-up never exceeds what the queue can hold: more would close
	// the connection as a slow consumer before it could read any of it.
	capacity := min(r.opts.HistorySize, h.cfg.queueMessages-1)
	q := HistoryQuery{}
	switch {
	case since != nil:
		q = HistoryQuery{Since: *since.Seq, Limit: max(capacity, 1)}
	case history > 0:
		q = HistoryQuery{Limit: min(history, capacity), Latest: true}
	}
	res, err := h.cfg.broker.History(c.ctx, room, q)
	if err != nil {
		delete(c.rooms, room)
		h.rooms.leave(r, c)
		return subscribed{}, err
	}
	out.epoch, out.top = res.Epoch, res.Top
	msgs := res.Messages
	if since != nil {
		out.recovery = true
		switch {
		case since.Epoch != res.Epoch:
			out.reason, msgs = ReasonEpochChanged, nil
		case *since.Seq > res.Top:
			out.reason, msgs = ReasonUnknownPosition, nil
		case *since.Seq < res.Top && (len(msgs) == 0 || msgs[0].Seq != *since.Seq+1):
			out.reason, msgs = ReasonHistoryTooShort, nil
		case *since.Seq < res.Top && msgs[len(msgs)-1].Seq != res.Top:
			out.reason, msgs = ReasonTooManyMissed, nil
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
		first = append(first, newRoomFrame(m, r))
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
