package pubsub

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub/protocol"
)

// readLoop reads client messages until the connection closes (it returns
// false) or parks (true: the poller owns the connection until input
// arrives, see waitInput). woken says the poller just found input.
func (c *conn) readLoop(woken bool) (parked bool) {
	if c.sse != nil {
		return c.watchSSE(woken)
	}
	for ; ; woken = false {
		// No deadline and no context: liveness is the heartbeat's job, a
		// read context that ended would close the socket under a flushing
		// writer, and a context costs a callback per read. Close and an
		// expired Shutdown end the read with kill.
		if c.waitInput(woken) {
			return true
		}
		typ, data, err := c.ws.Read(context.Background())
		if err != nil {
			c.readFailed(err)
			return false
		}
		c.lastSeen.Store(time.Now().UnixNano())
		if typ == websocket.MessageBinary && c.mode == ModeProtocol {
			c.beginClose(protocol.CloseUnsupportedData, "protocol mode accepts text frames only", false)
			return false
		}
		if typ == websocket.MessageText && !utf8.Valid(data) {
			c.beginClose(protocol.CloseInvalidPayload, "text frame is not valid UTF-8", false)
			return false
		}
		var ok bool
		if c.mode == ModeProtocol {
			ok = c.handleEnvelope(data) // counts MessagesIn, heartbeats aside
		} else {
			c.h.stats.messagesIn.Add(1)
			c.lastApp.Store(time.Now().UnixNano())
			ok = c.handleRaw(data, typ == websocket.MessageBinary)
		}
		if !ok {
			return false
		}
	}
}

// waitInput runs before each read. When the next read would wait on the
// network (no byte is buffered, in coder/websocket's reader or carried over
// from the handshake or a wake-up), it parks the connection with the
// Handler's poller and reports true: the reader goroutine then ends, and
// the poller starts a new one (woken) on input or close. Where it cannot
// park (not Linux, a socket that is not the standard library's, a busy
// socket lock) it waits for readability here, a few calls deep (see
// socket.waitReadable), and reports false, as it does when input is there.
//
// woken: the poller found the socket readable. What arrived is read
// without waiting (socket.fill), and pongs at the head of it are taken
// (takeControl), so an idle raw connection answering its heartbeat parks
// again at once; anything else, the end of the stream or an error is left
// for the read that follows.
//
// Only the reader goroutine reads the socket and the buffers, until the
// connection closes: then coder's close handshake reads too, so all this
// is done under mu and only before closing begins (beginClose takes mu),
// and after it the reader goes straight to coder's Read, which orders the
// two. Parking under mu is what makes a close never miss a parked
// connection: beginClose, under mu, takes it back from the poller.
func (c *conn) waitInput(woken bool) (isParked bool) {
	for {
		c.mu.Lock()
		if c.closing {
			c.mu.Unlock()
			return false
		}
		pending := woken && c.sock.fill()
		woken = false
		if c.sse == nil {
			c.takeControl()
		}
		if pending || c.br.Buffered() > 0 || len(c.sock.pre) > 0 {
			c.mu.Unlock()
			return false
		}
		res := notHere
		if parkable {
			res = c.h.poll.park(c)
		}
		c.mu.Unlock()
		switch res {
		case parked:
			return true
		case lockBusy:
			// A write holds the socket (a pool writer's, for a moment, or
			// a connection's own, within WithWriteTimeout): wait for it
			// without holding mu, then look again.
			c.sock.mu.Lock()
			c.sock.mu.Unlock()
			continue
		}
		c.sock.waitReadable()
		return false
	}
}

// takeControl takes the whole ping and pong frames at the head of what is
// buffered (coder/websocket's reader, or else what the handshake or a
// wake-up left) and counts them as signs of life; it answers each ping
// with its pong, queued like any frame. It runs between messages, where
// coder/websocket's reader is at a frame boundary, so a frame there is a
// frame of its own; a ping or a pong must be exactly that (FIN, no
// reserved bits, masked as a client's frames are, a control frame's at
// most 125 bytes of payload), and anything else, a partial one too, or a
// ping whose pong does not fit in the queue, is left to coder/websocket,
// which answers it or fails the connection as before. So an idle
// connection whose client pings it (Python's websockets does, every 20 s
// by default) or answers raw mode's heartbeat parks again at once, where a
// ping read by coder/websocket would have kept its reader waiting inside
// coder/websocket for the next message. Caller holds mu, not closing.
func (c *conn) takeControl() {
	took := false
	for {
		fromBuf := c.br.Buffered() > 0
		b := c.sock.pre
		if fromBuf {
			b, _ = c.br.Peek(c.br.Buffered()) // what is buffered: no read
		}
		size, op, ok := controlSize(b)
		if !ok || (op == opPing && !c.answerPingLocked(b[:size])) {
			break
		}
		if fromBuf {
			_, _ = c.br.Discard(size)
		} else if c.sock.pre = c.sock.pre[size:]; len(c.sock.pre) == 0 {
			c.sock.pre = nil
		}
		took = true
	}
	if took {
		c.lastSeen.Store(time.Now().UnixNano())
	}
}

// answerPingLocked queues the pong to the client's ping frame p (whole and
// masked: see controlSize), with the ping's payload as RFC 6455 (5.5.3)
// asks, and reports whether it fit in the queue. Caller holds mu.
func (c *conn) answerPingLocked(p []byte) bool {
	mask, masked := p[2:6], p[6:]
	payload := make([]byte, len(masked))
	for i, b := range masked {
		payload[i] = b ^ mask[i%4]
	}
	if !c.q.pushIfRoom(newPongFrame(payload), c.h.cfg.queue) {
		return false
	}
	c.startWriterLocked()
	return true
}

// controlSize is the length and the opcode of the whole client ping or
// pong frame b starts with, if it does (see takeControl).
func controlSize(b []byte) (size int, op byte, ok bool) {
	if len(b) < 2 || (b[0] != 0x80|opPong && b[0] != 0x80|opPing) || b[1]&0x80 == 0 {
		return 0, 0, false
	}
	n := int(b[1] & 0x7f)
	if n > 125 || len(b) < 2+4+n {
		return 0, 0, false
	}
	return 2 + 4 + n, b[0] & 0x0f, true
}

// readFailed records why reading ended: the peer's close frame, an
// oversized message, or a dead socket.
func (c *conn) readFailed(err error) {
	var ce websocket.CloseError
	switch {
	case errors.As(err, &ce):
		c.closeLost(protocol.CloseCode(ce.Code), ce.Reason) // the peer's own words
	case errors.Is(err, websocket.ErrMessageTooBig):
		c.closeLost(protocol.CloseMessageTooBig, "message too big") // the library already sent 1009
	default:
		c.beginClose(protocol.CloseAbnormal, "connection lost", false)
	}
}

// allow takes a token from the connection's rate-limit bucket.
func (c *conn) allow() bool {
	cfg := &c.h.cfg
	now := sinceStart()
	c.tokens += time.Duration(now-c.refill).Seconds() * cfg.rateLimit
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
		if v := verdictOf(c.h.callOnMessage(c.context(), m)); v != allowed {
			c.beginClose(v.closeCode(), v.reason("message rejected"), false)
			return false
		}
		return true
	}
	room := c.rawRoomName()
	if room == "" {
		c.beginClose(protocol.ClosePolicyViolation, "no room to publish to", false)
		return false
	}
	if v := c.authorizePublish(room); v != allowed {
		c.beginClose(v.closeCode(), v.reason("publish not allowed"), false)
		return false
	}
	if _, perr := c.h.publishFromClient(c.context(), c.client, room, data, ""); perr != nil {
		c.beginClose(protocol.CloseTryAgainLater, "publish failed, try again later", false)
		return false
	}
	return true
}

// handleEnvelope handles one protocol-mode envelope and answers it: with
// the reply dispatch queued, an error, or an ack when the request has an
// id. It reports whether the connection stays open.
func (c *conn) handleEnvelope(data []byte) bool {
	in, perr := decodeInbound(data)
	if perr != nil || (in.Type != "ping" && in.Type != "pong") {
		c.h.stats.messagesIn.Add(1) // a data message: heartbeats are not counted
		c.lastApp.Store(time.Now().UnixNano())
	}
	replied := false
	switch {
	case perr == nil && in.Type == "pong":
		return true // the answer to our ping; liveness was noted on read
	case !c.allow():
		// Every envelope but pong counts, malformed ones included, so a
		// flood of garbage is throttled like any other.
		perr = &protoError{protocol.CodeRateLimited, "rate limit exceeded; the message was dropped"}
	case perr == nil && in.Type == "ping":
		c.enqueue(newControlFrame(encodePong(in.ID)))
		replied = true
	case perr == nil:
		replied, perr = c.dispatch(&in)
	}
	switch {
	case perr != nil:
		c.h.log.Debug("pubsub: client request refused", "conn_id", c.client.ID,
			"user_id", c.client.UserID, "room", in.Room, "err", perr)
		c.enqueue(newControlFrame(encodeError(in.ID, perr)))
	case !replied && in.ID.set:
		c.enqueue(newControlFrame(encodeAck(in.ID)))
	}
	// A reply that did not fit closed the connection as a slow consumer.
	return !c.isClosing()
}

// dispatch handles one request. It reports replied when it queued the
// reply itself (a subscribe's ack goes ahead of the room's messages; a
// presence request is answered by a presence envelope); otherwise
// handleEnvelope answers: perr, or an ack when the request has an id.
func (c *conn) dispatch(in *inbound) (replied bool, perr *protoError) {
	switch in.Type {
	case "subscribe":
		return c.reqSubscribe(in)
	case "presence":
		return c.reqPresence(in)
	case "unsubscribe":
		return c.reqUnsubscribe(in)
	case "publish":
		return c.reqPublish(in)
	case "send":
		return c.reqSend(in)
	}
	return false, &protoError{protocol.CodeUnknownType, "unknown type"} // unreachable: decodeInbound checked
}

// reqSubscribe joins a room (or, already in it, acks where the subscription stands).
func (c *conn) reqSubscribe(in *inbound) (replied bool, perr *protoError) {
	h := c.h
	if perr := h.checkRoom(in.Room); perr != nil {
		return false, perr
	}
	if r, ok := c.roomOf(in.Room); ok {
		// Already subscribed: nothing changes, and the ack says where
		// the subscription stands.
		if in.ID.set {
			h.rooms.ackPosition(r, c, func(epoch string, seq uint64) *frame {
				return newControlFrame(encodeSubscribed(in.ID, subscribed{room: in.Room, epoch: epoch, top: seq, presence: r.opts.Presence}))
			})
		}
		return in.ID.set, nil
	}
	if c.roomCount() >= h.cfg.maxRooms {
		return false, &protoError{protocol.CodeTooManyRooms, "this connection is in the maximum number of rooms"}
	}
	if len(in.Info) > h.cfg.maxInfo {
		return false, badRequest(`"info" is larger than ` + strconv.Itoa(h.cfg.maxInfo) + " bytes")
	}
	if v := c.authorize(ActionSubscribe, in.Room); v != allowed {
		return false, v.protoError(protocol.CodeForbidden, "not allowed to subscribe in this room")
	}
	if _, err := c.subscribe(in.Room, in.Since, in.History, in.Presence, in.Info, ackWith(in.ID)); err != nil {
		h.brokerFailed("subscribe", in.Room, err)
		return false, &protoError{protocol.CodeUnavailable, "could not subscribe; try again later"}
	}
	return in.ID.set, nil
}

// reqPresence answers with the room's members (or counts).
func (c *conn) reqPresence(in *inbound) (replied bool, perr *protoError) {
	h := c.h
	if perr := h.checkRoom(in.Room); perr != nil {
		return false, perr
	}
	r, ok := c.roomOf(in.Room)
	if !ok {
		return false, &protoError{protocol.CodeNotSubscribed, "subscribe to the room to see its presence"}
	}
	if r.opts.Presence == PresenceOff {
		return false, &protoError{protocol.CodeNotSupported, "this room does not track presence"}
	}
	p, err := h.cfg.broker.Presence(c.context(), in.Room, r.opts.Presence == PresenceCounts)
	if err != nil {
		h.brokerFailed("presence", in.Room, err)
		return false, &protoError{protocol.CodeUnavailable, "could not read presence; try again later"}
	}
	c.enqueue(newControlFrame(encodePresence(in.ID, in.Room, p)))
	return true, nil
}

// reqUnsubscribe leaves a room.
func (c *conn) reqUnsubscribe(in *inbound) (replied bool, perr *protoError) {
	h := c.h
	if perr := h.checkRoom(in.Room); perr != nil {
		return false, perr
	}
	r, ok := c.roomOf(in.Room)
	if !ok {
		return false, &protoError{protocol.CodeNotSubscribed, "this connection is not subscribed to that room"}
	}
	c.forget(in.Room)
	h.rooms.leave(r, c)
	return false, nil
}

// reqPublish publishes a client's message, acked with its position when it has an id.
func (c *conn) reqPublish(in *inbound) (replied bool, perr *protoError) {
	h := c.h
	if perr := h.checkRoom(in.Room); perr != nil {
		return false, perr
	}
	if v := c.authorizePublish(in.Room); v != allowed {
		return false, v.protoError(protocol.CodeForbidden, c.publishDenied())
	}
	key := ""
	if in.Key != nil {
		key = *in.Key
	}
	res, perr := h.publishFromClient(c.context(), c.client, in.Room, in.payload, key)
	if perr != nil || !in.ID.set {
		return false, perr
	}
	c.enqueue(newControlFrame(encodePublished(in.ID, in.Room, res)))
	return true, nil
}

// reqSend hands a message sent to the server to the host's message hook.
func (c *conn) reqSend(in *inbound) (replied bool, perr *protoError) {
	h := c.h
	if h.cfg.onMessage == nil {
		return false, &protoError{protocol.CodeNotSupported, "this server does not handle messages sent to it"}
	}
	if in.RoomIn != nil {
		if perr := h.checkRoom(in.Room); perr != nil {
			return false, perr
		}
	}
	m := &ClientMessage{Client: c.client, Room: in.Room, Data: in.payload, c: c}
	if v := verdictOf(h.callOnMessage(c.context(), m)); v != allowed {
		return false, v.protoError(protocol.CodeRejected, "the server rejected the message")
	}
	return false, nil
}

func (c *conn) isClosing() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closing
}

// subscribe joins room for this connection and queues, in this order, the
// frame first builds from the outcome (a protocol ack, an SSE reset
// event; none when first is nil), the messages the client asked to catch
// up on (since its position, or the room's last history messages), then
// the live messages. It is shared by protocol subscribes, raw-mode joins
// and SSE streams, and returns the outcome: the room's position and what
// was replayed.
func (c *conn) subscribe(room string, since *position, history int, presence bool, info json.RawMessage, first func(subscribed) *frame) (subscribed, error) {
	h := c.h
	if len(c.client.Info) > 0 {
		info = c.client.Info // the server's word wins
	}
	// Protocol and SSE subscriptions always learn their position; raw ones
	// only when they replay history.
	catchUp := c.mode != ModeRaw || history > 0
	s := &sub{
		presence:  presence && c.mode == ModeProtocol,
		member:    Member{ConnID: c.client.ID, UserID: c.client.UserID, Info: info},
		buffering: catchUp,
	}
	r, err := h.rooms.join(c.context(), room, c, s)
	if err != nil {
		return subscribed{}, err
	}
	c.keep(room, r)
	out := subscribed{room: room, presence: r.opts.Presence}
	if !catchUp {
		return out, nil
	}
	// A catch-up never exceeds what the queue can hold beside the ack: more
	// would close the connection as a slow consumer before it could read
	// any of it.
	capacity := min(r.opts.HistorySize, h.cfg.maxReplay())
	q := HistoryQuery{}
	switch {
	case since != nil:
		q = HistoryQuery{Since: *since.Seq, Limit: max(capacity, 1)}
	case history > 0:
		q = HistoryQuery{Limit: min(history, capacity), Latest: true}
	}
	res, err := h.cfg.broker.History(c.context(), room, q)
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
	queued := make([]*frame, 0, len(msgs)+1)
	if first != nil {
		if f := first(out); f != nil {
			queued = append(queued, f)
		}
	}
	for _, m := range msgs {
		f := newRoomFrame(m, r)
		f.replay = true // the ack announced exactly these
		queued = append(queued, f)
	}
	h.rooms.catchUp(r, c, queued, res.Epoch, res.Top)
	return out, nil
}

// ackWith builds a subscribe's ack, ahead of its replay, when the request
// had an id.
func ackWith(id requestID) func(subscribed) *frame {
	if !id.set {
		return nil
	}
	return func(out subscribed) *frame { return newControlFrame(encodeSubscribed(id, out)) }
}

// authorize asks the authorize hook, when set, about action in room.
func (c *conn) authorize(a Action, room string) verdict {
	if c.h.cfg.authorize == nil {
		return allowed
	}
	return verdictOf(c.h.callAuthorize(c.context(), c.client, a, room))
}

// authorizePublish applies the publish policy: the authorize hook when
// set, otherwise WithClientPublish.
func (c *conn) authorizePublish(room string) verdict {
	if c.h.cfg.authorize == nil && !c.h.cfg.clientPublish {
		return denied
	}
	return c.authorize(ActionPublish, room)
}

// publishDenied says why a publish was denied, for the client.
func (c *conn) publishDenied() string {
	if c.h.cfg.authorize == nil {
		return "clients may not publish on this server"
	}
	return "not allowed to publish in this room"
}

// rawRoomName is a raw connection's room, "" when it joined none (its
// messages go to the message hook).
func (c *conn) rawRoomName() string {
	if c.first == nil {
		return ""
	}
	return c.first.name
}

// roomOf finds a room the connection is in.
func (c *conn) roomOf(name string) (*room, bool) {
	if c.first != nil && c.first.name == name {
		return c.first, true
	}
	r, ok := c.rooms[name]
	return r, ok
}

// roomCount is how many rooms the connection is in.
func (c *conn) roomCount() int {
	n := len(c.rooms)
	if c.first != nil {
		n++
	}
	return n
}

// keep records a room the connection joined: the first in a field (a raw
// connection has at most one), the others in a map made when a second
// comes (see conn.first).
func (c *conn) keep(name string, r *room) {
	if c.first == nil || c.first.name == name {
		c.first = r
		return
	}
	if c.rooms == nil {
		c.rooms = make(map[string]*room, 1)
	}
	c.rooms[name] = r
}

func (c *conn) forget(name string) {
	if c.first != nil && c.first.name == name {
		c.first = nil
		return
	}
	delete(c.rooms, name)
	if len(c.rooms) == 0 {
		c.rooms = nil
	}
}

// leaveAll leaves every room; it runs once the reader has ended.
func (c *conn) leaveAll() {
	if r := c.first; r != nil {
		c.first = nil
		c.h.rooms.leave(r, c)
	}
	for name, r := range c.rooms {
		delete(c.rooms, name)
		c.h.rooms.leave(r, c)
	}
}
