package pubsubtest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"testing"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub/internal/wire"
	"github.com/roomcast/pubsub/protocol"
)

// Fields is a client envelope, as a map: {"type": "subscribe", "room": "chat"}.
type Fields = map[string]any

// Envelope is any server envelope of protocol mode, decoded loosely (see
// protocol.Envelope: the fields its type does not use are zero, pointers
// nil when absent). Raw holds its exact bytes.
type Envelope struct {
	protocol.Envelope
	Raw []byte `json:"-"`
}

// Member is one member of a presence reply.
type Member = protocol.Member

// Payload is the bytes the envelope's payload field carries (data, text
// or binary), or nil when it has none.
func (e Envelope) Payload() []byte {
	p, _, err := wire.DecodePayload(e.Data, e.Text, e.Binary)
	if err != nil {
		return nil
	}
	return p
}

func (e Envelope) String() string { return string(e.Raw) }

// Conn is a protocol-mode client (subprotocol roomcast.v1) that speaks in
// envelopes. It keeps envelopes that arrive while it waits for a reply, so
// the next read returns them in order; and it checks, as it reads, that
// each room's messages follow one another (see AllowGaps).
type Conn struct {
	// Welcome is the server's first envelope.
	Welcome Envelope

	t         testing.TB
	ws        *websocket.Conn
	nextID    int
	pending   []Envelope
	allowGaps bool
	last      map[string]position // each room's last message, for the gap check
}

type position struct {
	epoch string
	seq   uint64
}

// Dial connects to url (ws://…) in protocol mode and reads the welcome;
// it fails the test when the upgrade is refused or the server does not
// select roomcast.v1.
func Dial(t testing.TB, url string, opts ...DialOption) *Conn {
	t.Helper()
	cfg := dialOptions(opts)
	if cfg.subprotocols == nil {
		cfg.subprotocols = []string{protocol.Subprotocol}
	}
	ws, status, err := dial(t, url, cfg)
	if err != nil {
		t.Fatalf("dial %s: %v (HTTP %d)", url, err, status)
	}
	if ws.Subprotocol() != protocol.Subprotocol {
		t.Fatalf("dial %s: the server selected subprotocol %q, want %q", url, ws.Subprotocol(), protocol.Subprotocol)
	}
	c := &Conn{t: t, ws: ws, allowGaps: cfg.allowGaps, last: make(map[string]position)}
	if c.Welcome = c.Next(); c.Welcome.Type != "welcome" {
		t.Fatalf("first envelope %s, want welcome", c.Welcome.Raw)
	}
	return c
}

// Send sends v: a string or []byte as it is, anything else as JSON.
func (c *Conn) Send(v any) {
	c.t.Helper()
	var b []byte
	switch v := v.(type) {
	case string:
		b = []byte(v)
	case []byte:
		b = v
	default:
		var err error
		if b, err = json.Marshal(v); err != nil {
			c.t.Fatal(err)
		}
	}
	c.write(websocket.MessageText, b)
}

// SendBinary sends b in a binary frame, which protocol mode forbids.
func (c *Conn) SendBinary(b []byte) {
	c.t.Helper()
	c.write(websocket.MessageBinary, b)
}

func (c *Conn) write(typ websocket.MessageType, b []byte) {
	c.t.Helper()
	ctx, cancel := readCtx(c.t)
	defer cancel()
	if err := c.ws.Write(ctx, typ, b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// Next returns the next envelope (one kept while waiting for a reply
// first), skipping the server's heartbeat pings.
func (c *Conn) Next() Envelope {
	c.t.Helper()
	if len(c.pending) > 0 {
		e := c.pending[0]
		c.pending = c.pending[1:]
		return e
	}
	return c.readWire(false)
}

// Ping waits for the server's next heartbeat ping; envelopes that arrive
// first are kept for Next.
func (c *Conn) Ping() {
	c.t.Helper()
	for {
		e := c.readWire(true)
		if e.Type == "ping" {
			return
		}
		c.pending = append(c.pending, e)
	}
}

// TryNext is Next that does not fail the test: it returns the next
// envelope, or the error that ended the connection (see CloseOf) or the
// read (nothing within Timeout, a frame that is not an envelope). A test
// may call it on a goroutine of its own, while no other goroutine uses the
// client.
func (c *Conn) TryNext() (Envelope, error) {
	if len(c.pending) > 0 {
		e := c.pending[0]
		c.pending = c.pending[1:]
		return e, nil
	}
	return c.tryReadWire(false)
}

// Buffered is the number of envelopes kept for Next: those that arrived
// while the client waited for a reply or a ping.
func (c *Conn) Buffered() int { return len(c.pending) }

// readWire reads the next envelope off the connection; pings only when
// asked.
func (c *Conn) readWire(pings bool) Envelope {
	c.t.Helper()
	e, err := c.tryReadWire(pings)
	if err != nil {
		c.t.Fatal(err)
	}
	return e
}

func (c *Conn) tryReadWire(pings bool) (Envelope, error) {
	for {
		ctx, cancel := readCtx(c.t)
		typ, b, err := c.ws.Read(ctx)
		cancel()
		if err != nil {
			return Envelope{}, fmt.Errorf("read: %w", err)
		}
		if typ != websocket.MessageText {
			return Envelope{}, fmt.Errorf("protocol mode sent a binary frame: %q", b)
		}
		var e Envelope
		if err := json.NewDecoder(bytes.NewReader(b)).Decode(&e); err != nil {
			return Envelope{}, fmt.Errorf("the server sent invalid JSON %q: %v", b, err)
		}
		e.Raw = b
		if e.Type == "ping" && !pings {
			continue
		}
		c.follow(e)
		return e, nil
	}
}

// follow checks that a room's messages follow one another: after a
// subscribe's ack anything may come first, then each message must be the
// next seq of the same epoch.
func (c *Conn) follow(e Envelope) {
	c.t.Helper()
	switch {
	case e.Type == "ack" && e.Room != "":
		delete(c.last, e.Room) // a subscription starts; replay and live follow on from here
	case e.Type == "message":
		last, ok := c.last[e.Room]
		switch {
		case !ok:
		case e.Epoch == last.epoch && e.Seq <= last.seq:
			c.t.Errorf("room %s: message %s/%d after %s/%d: delivered twice or out of order", e.Room, e.Epoch, e.Seq, last.epoch, last.seq)
		case !c.allowGaps && (e.Epoch != last.epoch || e.Seq != last.seq+1):
			c.t.Errorf("room %s: message %s/%d after %s/%d on one subscription: a hole the server did not close the connection for",
				e.Room, e.Epoch, e.Seq, last.epoch, last.seq)
		}
		c.last[e.Room] = position{e.Epoch, e.Seq}
	}
}

// Request sends fields with a fresh "id" (unless they have one) and
// returns the reply with that id: an ack, an error, a pong or a presence
// reply. Envelopes that arrive first (a publish's own message may precede
// its ack) are kept for Next.
func (c *Conn) Request(fields Fields) Envelope {
	c.t.Helper()
	id, ok := fields["id"].(string)
	if !ok {
		c.nextID++
		id = fmt.Sprint("r", c.nextID)
		fields["id"] = id
	}
	c.Send(fields)
	return c.Reply(id)
}

// Reply waits for the reply with id to a request sent with Send;
// envelopes that arrive first are kept for Next. Replies come in the order
// of their requests, so a test may send several requests, then wait for
// each reply.
func (c *Conn) Reply(id string) Envelope {
	c.t.Helper()
	for i, e := range c.pending {
		if e.ID == id && e.Type != "message" {
			c.pending = append(c.pending[:i:i], c.pending[i+1:]...)
			return e
		}
	}
	for {
		e := c.readWire(false)
		if e.ID == id && e.Type != "message" {
			return e
		}
		c.pending = append(c.pending, e)
	}
}

// Ack sends a request and expects an ack, which it returns.
func (c *Conn) Ack(fields Fields) Envelope {
	c.t.Helper()
	e := c.Request(fields)
	if e.Type != "ack" {
		c.t.Fatalf("request %v: got %s, want an ack", fields, e.Raw)
	}
	return e
}

// Error sends a request and expects an error with code, which it returns.
func (c *Conn) Error(fields Fields, code protocol.ErrorCode) Envelope {
	c.t.Helper()
	e := c.Request(fields)
	if e.Type != "error" || e.Code != code {
		c.t.Fatalf("request %v: got %s, want error %q", fields, e.Raw, code)
	}
	return e
}

// Subscribe subscribes to room and returns the ack.
func (c *Conn) Subscribe(room string) Envelope {
	c.t.Helper()
	return c.SubscribeWith(Fields{"room": room})
}

// SubscribeWith subscribes with fields ("room" and any of "since",
// "history", "presence", "info") and returns the ack, checking that
// nothing of the room arrived before it.
func (c *Conn) SubscribeWith(fields Fields) Envelope {
	c.t.Helper()
	fields["type"] = "subscribe"
	before := len(c.pending)
	e := c.Ack(fields)
	for _, x := range c.pending[before:] {
		if x.Room == fields["room"] {
			c.t.Fatalf("subscribe %v: %s arrived before the ack", fields, x.Raw)
		}
	}
	return e
}

// Publish publishes text into room as a client and expects the ack.
func (c *Conn) Publish(room, text string) Envelope {
	c.t.Helper()
	return c.Ack(Fields{"type": "publish", "room": room, "text": text})
}

// NextMessage reads the next envelope and expects a message of room.
func (c *Conn) NextMessage(room string) Envelope {
	c.t.Helper()
	e := c.Next()
	if e.Type != "message" || e.Room != room {
		c.t.Fatalf("got %s, want a message of room %q", e.Raw, room)
	}
	return e
}

// Messages reads n messages of room, skipping presence events, and fails
// on anything else.
func (c *Conn) Messages(room string, n int) []Envelope {
	c.t.Helper()
	var out []Envelope
	for len(out) < n {
		switch e := c.Next(); {
		case e.Type == "join" || e.Type == "leave":
		case e.Type == "message" && e.Room == room:
			out = append(out, e)
		default:
			c.t.Fatalf("got %s, want a message of room %s", e.Raw, room)
		}
	}
	return out
}

// Await reads until an envelope matches and returns it; the ones before it
// are dropped.
func (c *Conn) Await(what string, match func(Envelope) bool) Envelope {
	c.t.Helper()
	for {
		if e := c.Next(); match(e) {
			return e
		}
	}
}

// ExpectClose reads past any envelopes until the connection closes,
// expects the close code, and returns the reason.
func (c *Conn) ExpectClose(code protocol.CloseCode) string {
	c.t.Helper()
	c.pending = nil
	return expectClose(c.t, c.ws, code, false)
}

// ExpectCloseNext expects the connection to close with code before any
// other envelope (heartbeat pings aside).
func (c *Conn) ExpectCloseNext(code protocol.CloseCode) string {
	c.t.Helper()
	if len(c.pending) > 0 {
		c.t.Fatalf("got %s, want the connection closed with %s first", c.pending[0].Raw, code)
	}
	return expectClose(c.t, c.ws, code, true)
}

// Close closes the connection with code and reason, and waits (a bounded
// time) for the server's close frame.
func (c *Conn) Close(code protocol.CloseCode, reason string) {
	_ = c.ws.Close(websocket.StatusCode(code), reason)
}

// CloseNow closes the connection at once, with no close frame.
func (c *Conn) CloseNow() { _ = c.ws.CloseNow() }
