package pubsub_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/roomcast/pubsub/protocol"

	"github.com/coder/websocket"
	"github.com/google/uuid"
	"github.com/roomcast/pubsub"
)

// Protocol mode (subprotocol roomcast.v1), end to end: welcome, requests
// and their acks, every error code, payload kinds, ordering, protocol
// violations and heartbeats. Helpers specific to this file start with
// "proto".

// protoAlive proves the connection still serves requests after an error:
// a ping is answered with a pong, and nothing comes before it.
func protoAlive(t *testing.T, p *protoClient) {
	t.Helper()
	p.send(`{"type":"ping"}`)
	if e := p.read(); e.Type != "pong" {
		t.Fatalf("ping answered with %s, want pong", e.raw)
	}
}

// protoPayload returns the payload field of a message or direct envelope
// ("data", "text" or "binary") and its bytes. The envelope must be valid
// UTF-8 JSON with exactly one payload field.
func protoPayload(t *testing.T, e envelope) (string, []byte) {
	t.Helper()
	if !utf8.Valid(e.raw) || !json.Valid(e.raw) {
		t.Fatalf("envelope %q is not valid UTF-8 JSON", e.raw)
	}
	n, field := 0, ""
	var p []byte
	if e.Data != nil {
		n, field, p = n+1, "data", e.Data
	}
	if e.Text != nil {
		n, field, p = n+1, "text", []byte(*e.Text)
	}
	if e.Binary != nil {
		b, err := base64.StdEncoding.DecodeString(*e.Binary)
		if err != nil {
			t.Fatalf("envelope %s: binary is not std base64: %v", e.raw, err)
		}
		n, field, p = n+1, "binary", b
	}
	if n != 1 {
		t.Fatalf("envelope %s has %d payload fields, want 1", e.raw, n)
	}
	return field, p
}

// protoWaitPing reads until the server's next heartbeat ping, keeping the
// other envelopes for p.read. Tests use it as a clock that needs no sleep.
func protoWaitPing(t *testing.T, p *protoClient) {
	t.Helper()
	for {
		_, b := readFrame(t, p.c)
		var e envelope
		if err := json.Unmarshal(b, &e); err != nil {
			t.Fatalf("server sent invalid JSON %q: %v", b, err)
		}
		if e.Type == "ping" {
			return
		}
		e.raw = b
		p.pending = append(p.pending, e)
	}
}

// protoPipeline sends every request (each with a fresh id) before reading
// any reply, and returns the replies in request order.
func protoPipeline(t *testing.T, p *protoClient, reqs ...map[string]any) []envelope {
	t.Helper()
	ids := make([]string, len(reqs))
	for i, r := range reqs {
		p.nextID++
		ids[i] = fmt.Sprint("r", p.nextID)
		r["id"] = ids[i]
		p.send(r)
	}
	got := make(map[string]envelope)
	for len(got) < len(reqs) {
		e := p.readWire()
		if (e.Type == "ack" || e.Type == "error") && slices.Contains(ids, e.ID) {
			got[e.ID] = e
			continue
		}
		p.pending = append(p.pending, e)
	}
	out := make([]envelope, len(reqs))
	for i, id := range ids {
		out[i] = got[id]
	}
	return out
}

// protoDialHeader dials in protocol mode with extra request headers.
func protoDialHeader(t *testing.T, url string, header http.Header) *websocket.Conn {
	t.Helper()
	c, resp, err := websocket.Dial(testCtx(t), url, &websocket.DialOptions{
		HTTPHeader: header, Subprotocols: []string{protocol.Subprotocol},
	})
	if err != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		t.Fatalf("dial %s: %v (HTTP %d)", url, err, status)
	}
	c.SetReadLimit(-1)
	t.Cleanup(func() { c.CloseNow() })
	return c
}

// protoWelcome is the welcome envelope with every field.
type protoWelcome struct {
	Type            string `json:"type"`
	Protocol        string `json:"protocol"`
	ConnID          string `json:"conn_id"`
	UserID          string `json:"user_id"`
	HeartbeatMS     int64  `json:"heartbeat_ms"`
	TimeoutMS       int64  `json:"timeout_ms"`
	MaxMessageBytes int64  `json:"max_message_bytes"`
	MaxRooms        int    `json:"max_rooms"`
}

// ---- Welcome ----

func TestProtocolWelcomeIsFirstFrameAndReflectsOptions(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		opts []pubsub.Option
		want protoWelcome
	}{
		{
			name: "defaults",
			want: protoWelcome{
				HeartbeatMS: 25_000, TimeoutMS: 10_000,
				MaxMessageBytes: 64 << 10, MaxRooms: 100,
			},
		},
		{
			name: "options",
			opts: []pubsub.Option{
				pubsub.WithHeartbeat(7*time.Second, 3*time.Second), pubsub.WithMaxMessageBytes(4096), pubsub.WithMaxRooms(7),
			},
			want: protoWelcome{HeartbeatMS: 7000, TimeoutMS: 3000, MaxMessageBytes: 4096, MaxRooms: 7},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			// The connect hook sends a direct message at once: the welcome
			// must still be the first frame.
			var hp atomic.Pointer[pubsub.Handler]
			connected := make(chan pubsub.Client, 1)
			opts := append([]pubsub.Option{
				pubsub.WithAuthenticate(func(r *http.Request) (pubsub.Identity, error) {
					return pubsub.Identity{UserID: r.Header.Get("X-User")}, nil
				}),
				pubsub.WithOnConnect(func(ev pubsub.ConnectEvent) {
					connected <- ev.Client
					_ = hp.Load().PublishToConn(context.Background(), ev.Client.ID, []byte(`"early"`))
				}),
			}, tt.opts...)
			h, srv := newServer(t, opts...)
			hp.Store(h)

			c := protoDialHeader(t, wsURL(srv, "/ws"), http.Header{"X-User": {"alice"}})
			typ, b := readFrame(t, c)
			if typ != websocket.MessageText {
				t.Fatalf("first frame is %v, want text", typ)
			}
			var w protoWelcome
			if err := json.Unmarshal(b, &w); err != nil {
				t.Fatalf("first frame %q: %v", b, err)
			}
			cl := <-connected
			want := tt.want
			want.Type, want.Protocol, want.ConnID, want.UserID = "welcome", "roomcast.v1", cl.ID, "alice"
			if w != want {
				t.Fatalf("welcome %s\n got %+v\nwant %+v", b, w, want)
			}
			if _, err := uuid.Parse(w.ConnID); err != nil {
				t.Fatalf("conn_id %q is not a UUID: %v", w.ConnID, err)
			}
			typ, b = readFrame(t, c)
			if typ != websocket.MessageText || string(b) != `{"type":"direct","data":"early"}` {
				t.Fatalf("second frame %v %s, want the connect hook's direct message", typ, b)
			}
		})
	}
}

func TestProtocolWelcomeConnIDIsDistinctUUIDPerConnection(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t)
	seen := make(map[string]bool)
	for range 5 {
		p := dialProto(t, wsURL(srv, "/ws"))
		if _, err := uuid.Parse(p.welcome.ConnID); err != nil {
			t.Fatalf("conn_id %q is not a UUID: %v", p.welcome.ConnID, err)
		}
		if seen[p.welcome.ConnID] {
			t.Fatalf("conn_id %q given to two connections", p.welcome.ConnID)
		}
		seen[p.welcome.ConnID] = true
		if p.welcome.UserID != "" {
			t.Fatalf("anonymous connection has user_id %q", p.welcome.UserID)
		}
	}
}

// ---- Requests and acks ----

func TestProtocolRequestWithIDIsAcked(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		setup func(p *protoClient)
		req   map[string]any
	}{
		{name: "subscribe", req: map[string]any{"type": "subscribe", "room": "a"}},
		{name: "unsubscribe", setup: func(p *protoClient) { p.subscribe("a") }, req: map[string]any{"type": "unsubscribe", "room": "a"}},
		{name: "publish", req: map[string]any{"type": "publish", "room": "a", "text": "x"}},
		{name: "send", req: map[string]any{"type": "send", "text": "x"}},
		{name: "send with room", req: map[string]any{"type": "send", "room": "a", "data": 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, srv := newServer(t, pubsub.WithClientPublish(true),
				pubsub.WithOnMessage(func(context.Context, *pubsub.ClientMessage) error { return nil }))
			p := dialProto(t, wsURL(srv, "/ws"))
			if tt.setup != nil {
				tt.setup(p)
			}
			e := p.request(tt.req)
			if e.Type != "ack" || !json.Valid(e.raw) {
				t.Fatalf("got %s, want an ack", e.raw)
			}
		})
	}
}

// TestProtocolRequestWithoutIDGetsNoReply: a request without an id takes
// effect but is not answered, so the next reply belongs to the next request.
func TestProtocolRequestWithoutIDGetsNoReply(t *testing.T) {
	t.Parallel()
	type env struct {
		h     *pubsub.Handler
		p     *protoClient // sends the request
		other *protoClient // subscribed to "quiet"
		sent  chan string  // what the message hook got
	}
	tests := []struct {
		name   string
		setup  func(t *testing.T, e env)
		req    string
		effect func(t *testing.T, e env)
	}{
		{
			name: "subscribe",
			req:  `{"type":"subscribe","room":"quiet"}`,
			effect: func(t *testing.T, e env) {
				if err := e.h.Publish(testCtx(t), "quiet", []byte("x")); err != nil {
					t.Fatal(err)
				}
				e.p.readMessage("quiet")
			},
		},
		{
			name:  "unsubscribe",
			setup: func(t *testing.T, e env) { e.p.subscribe("quiet") },
			req:   `{"type":"unsubscribe","room":"quiet"}`,
			effect: func(t *testing.T, e env) {
				for _, cl := range e.h.Connections("quiet") {
					if cl.ID == e.p.welcome.ConnID {
						t.Fatal("still subscribed after unsubscribe")
					}
				}
			},
		},
		{
			name: "publish",
			req:  `{"type":"publish","room":"quiet","text":"hello"}`,
			effect: func(t *testing.T, e env) {
				if m := e.other.readMessage("quiet"); m.Text == nil || *m.Text != "hello" {
					t.Fatalf("got %s, want text hello", m.raw)
				}
			},
		},
		{
			name: "send",
			req:  `{"type":"send","text":"hello"}`,
			effect: func(t *testing.T, e env) {
				select {
				case got := <-e.sent:
					if got != "hello" {
						t.Fatalf("hook got %q", got)
					}
				case <-testCtx(t).Done():
					t.Fatal("the message hook was not called")
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			sent := make(chan string, 1)
			h, srv := newServer(t, pubsub.WithClientPublish(true),
				pubsub.WithOnMessage(func(_ context.Context, m *pubsub.ClientMessage) error {
					sent <- string(m.Data)
					return nil
				}))
			e := env{h: h, p: dialProto(t, wsURL(srv, "/ws")), other: dialProto(t, wsURL(srv, "/ws")), sent: sent}
			e.other.subscribe("quiet")
			if tt.setup != nil {
				tt.setup(t, e)
			}
			e.p.send(tt.req)
			e.p.send(`{"type":"subscribe","room":"follow","id":"follow-up"}`)
			if got := e.p.read(); got.Type != "ack" || got.ID != "follow-up" {
				t.Fatalf("first reply %s, want the ack of the follow-up request", got.raw)
			}
			tt.effect(t, e)
		})
	}
}

func TestProtocolUnsubscribeStopsDelivery(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t)
	p := dialProto(t, wsURL(srv, "/ws"))
	p.subscribe("left")
	p.subscribe("kept")
	p.mustAck(map[string]any{"type": "unsubscribe", "room": "left"})
	ctx := testCtx(t)
	// Publish returns once the message is queued for every subscriber, so
	// a message of "left" would arrive before the one of "kept".
	if err := h.Publish(ctx, "left", []byte(`"gone"`)); err != nil {
		t.Fatal(err)
	}
	if err := h.Publish(ctx, "kept", []byte(`"here"`)); err != nil {
		t.Fatal(err)
	}
	if m := p.readMessage("kept"); string(m.Data) != `"here"` {
		t.Fatalf("got %s", m.raw)
	}
	p.mustError(map[string]any{"type": "unsubscribe", "room": "left"}, protocol.CodeNotSubscribed)
}

func TestProtocolSubscribeIsIdempotent(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithMaxRooms(1))
	p := dialProto(t, wsURL(srv, "/ws"))
	p.subscribe("once")
	p.subscribe("once") // acked, and does not count against WithMaxRooms(1)
	if n := len(h.Connections("once")); n != 1 {
		t.Fatalf("room lists the connection %d times", n)
	}
	ctx := testCtx(t)
	for _, d := range []string{"1", "2"} {
		if err := h.Publish(ctx, "once", []byte(d)); err != nil {
			t.Fatal(err)
		}
	}
	// Delivered once each: a duplicate of "1" would come before "2".
	for i, d := range []string{"1", "2"} {
		if m := p.readMessage("once"); string(m.Data) != d || m.Seq != uint64(i+1) {
			t.Fatalf("got %s, want data %s seq %d", m.raw, d, i+1)
		}
	}
	// One unsubscribe undoes both subscribes.
	p.mustAck(map[string]any{"type": "unsubscribe", "room": "once"})
	p.mustError(map[string]any{"type": "unsubscribe", "room": "once"}, protocol.CodeNotSubscribed)
}

func TestProtocolManyRoomsMultiplexedOnOneConnection(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t)
	rooms := []string{"r0", "r1", "r2", "r3", "r4"}
	all := dialProto(t, wsURL(srv, "/ws"))
	some := dialProto(t, wsURL(srv, "/ws"))
	for _, r := range rooms {
		all.subscribe(r)
	}
	some.subscribe("r1")
	some.subscribe("r3")
	ctx := testCtx(t)
	const rounds = 3
	for n := range rounds {
		for _, r := range rooms {
			if err := h.Publish(ctx, r, fmt.Appendf(nil, `{"room":%q,"n":%d}`, r, n)); err != nil {
				t.Fatal(err)
			}
		}
	}
	check := func(p *protoClient, room string, n int) {
		t.Helper()
		m := p.readMessage(room)
		if want := fmt.Sprintf(`{"room":%q,"n":%d}`, room, n); string(m.Data) != want || m.Seq != uint64(n+1) {
			t.Fatalf("got %s, want data %s seq %d", m.raw, want, n+1)
		}
	}
	for n := range rounds {
		for _, r := range rooms {
			check(all, r, n)
			if r == "r1" || r == "r3" {
				check(some, r, n)
			}
		}
	}
	// Nothing of the other rooms reached "some": its next message is this.
	if err := h.Publish(ctx, "r3", []byte(`{"room":"r3","n":3}`)); err != nil {
		t.Fatal(err)
	}
	check(some, "r3", 3)
}

func TestProtocolSendReachesMessageHookWithPayloadAndReply(t *testing.T) {
	t.Parallel()
	type got struct {
		client pubsub.Client
		room   string
		data   string
		binary bool
	}
	calls := make(chan got, 4)
	_, srv := newServer(t, pubsub.WithOnMessage(func(_ context.Context, m *pubsub.ClientMessage) error {
		calls <- got{m.Client, m.Room, string(m.Data), m.Binary}
		return m.Reply(append([]byte("re:"), m.Data...))
	}))
	p := dialProto(t, wsURL(srv, "/ws"))
	tests := []struct {
		req  map[string]any
		room string
		data string
	}{
		{map[string]any{"type": "send", "data": map[string]int{"a": 1}}, "", `{"a":1}`},
		{map[string]any{"type": "send", "room": "ctx", "text": "héllo"}, "ctx", "héllo"},
		{map[string]any{"type": "send", "binary": base64.StdEncoding.EncodeToString([]byte{0xff, 0})}, "", "\xff\x00"},
	}
	for _, tt := range tests {
		p.mustAck(tt.req)
		c := <-calls
		if c.room != tt.room || c.data != tt.data || c.binary || c.client.ID != p.welcome.ConnID || c.client.Mode != pubsub.ModeProtocol {
			t.Fatalf("hook got %+v, want room %q data %q from %s in protocol mode", c, tt.room, tt.data, p.welcome.ConnID)
		}
		e := p.read()
		if e.Type != "direct" {
			t.Fatalf("got %s, want the hook's direct reply", e.raw)
		}
		if _, b := protoPayload(t, e); string(b) != "re:"+tt.data {
			t.Fatalf("reply %q, want %q", b, "re:"+tt.data)
		}
	}
}

func TestProtocolUnknownFieldsAreIgnored(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t, pubsub.WithClientPublish(true),
		pubsub.WithOnMessage(func(context.Context, *pubsub.ClientMessage) error { return nil }))
	p := dialProto(t, wsURL(srv, "/ws"))
	extra := `"v":2,"future":{"nested":[1,null,"x"]},"flag":true`
	for _, req := range []string{
		`{"type":"subscribe","room":"fwd","id":"a1",` + extra + `}`,
		`{"type":"publish","room":"fwd","text":"t","id":"a2",` + extra + `}`,
		`{"type":"send","data":1,"id":"a3",` + extra + `}`,
		`{"type":"unsubscribe","room":"fwd","id":"a4",` + extra + `}`,
	} {
		var id struct{ ID string }
		if err := json.Unmarshal([]byte(req), &id); err != nil {
			t.Fatal(err)
		}
		p.send(req)
		e := p.read()
		for e.Type == "message" { // the publish's own message may come first
			e = p.read()
		}
		if e.Type != "ack" || e.ID != id.ID {
			t.Fatalf("%s: got %s, want ack %s", req, e.raw, id.ID)
		}
	}
	p.send(`{"type":"ping",` + extra + `}`)
	readText(t, p.c, `{"type":"pong"}`)
}

// ---- Error codes ----

// protoFailingBroker fails Subscribe for room "broken" and Publish for room
// "broken-publish"; everything else goes to the memory broker.
type protoFailingBroker struct{ pubsub.Broker }

var _ pubsub.Broker = protoFailingBroker{}

func (b protoFailingBroker) Subscribe(ctx context.Context, room string) error {
	if room == "broken" {
		return errors.New("broker down: secret-broker-detail")
	}
	return b.Broker.Subscribe(ctx, room)
}

func (b protoFailingBroker) Publish(ctx context.Context, room string, data []byte, o pubsub.PublishOptions) (pubsub.PublishResult, error) {
	if room == "broken-publish" {
		return pubsub.PublishResult{}, errors.New("broker down: secret-broker-detail")
	}
	return b.Broker.Publish(ctx, room, data, o)
}

// TestProtocolErrorCodes reaches every error code over the wire, checks the
// request's id is echoed when it could be read, that no internal text
// leaks, and that the connection keeps working after the error.
func TestProtocolErrorCodes(t *testing.T) {
	t.Parallel()
	id65 := strings.Repeat("x", 65)
	denySecret := pubsub.WithAuthorize(func(_ context.Context, _ pubsub.Client, a pubsub.Action, room string) error {
		if room == "secret" {
			return fmt.Errorf("%w: secret-authz-detail", pubsub.ErrForbidden)
		}
		return nil
	})
	rejectAll := pubsub.WithOnMessage(func(context.Context, *pubsub.ClientMessage) error {
		return errors.New("secret-hook-detail")
	})
	panicky := pubsub.WithOnMessage(func(context.Context, *pubsub.ClientMessage) error {
		panic("secret-panic-detail")
	})
	clientPublish := pubsub.WithClientPublish(true)
	tests := []struct {
		name  string
		opts  []pubsub.Option
		setup func(p *protoClient)
		req   string
		code  protocol.ErrorCode
		id    string // the id the error must carry; "" means none
	}{
		{name: "malformed JSON", req: `{"type":"subscribe","room":"a","id":"e1"`, code: protocol.CodeBadRequest},
		{name: "not an object", req: `["subscribe","a"]`, code: protocol.CodeBadRequest},
		{name: "a bare string", req: `"ping"`, code: protocol.CodeBadRequest},
		{name: "room is a number", req: `{"type":"subscribe","room":5,"id":"e1"}`, code: protocol.CodeBadRequest, id: "e1"},
		{name: "id is a number", req: `{"type":"subscribe","room":"a","id":7}`, code: protocol.CodeBadRequest},
		{name: "text is a number", opts: []pubsub.Option{clientPublish}, req: `{"type":"publish","room":"a","text":5,"id":"e1"}`, code: protocol.CodeBadRequest, id: "e1"},
		{name: "missing type", req: `{"room":"a","id":"e1"}`, code: protocol.CodeBadRequest, id: "e1"},
		{name: "subscribe without room", req: `{"type":"subscribe","id":"e1"}`, code: protocol.CodeBadRequest, id: "e1"},
		{name: "unsubscribe without room", req: `{"type":"unsubscribe","id":"e1"}`, code: protocol.CodeBadRequest, id: "e1"},
		{name: "publish without room", opts: []pubsub.Option{clientPublish}, req: `{"type":"publish","text":"x","id":"e1"}`, code: protocol.CodeBadRequest, id: "e1"},
		{name: "publish without payload", opts: []pubsub.Option{clientPublish}, req: `{"type":"publish","room":"a","id":"e1"}`, code: protocol.CodeBadRequest, id: "e1"},
		{name: "publish with two payloads", opts: []pubsub.Option{clientPublish}, req: `{"type":"publish","room":"a","data":1,"text":"1","id":"e1"}`, code: protocol.CodeBadRequest, id: "e1"},
		{name: "send with two payloads", opts: []pubsub.Option{rejectAll}, req: `{"type":"send","text":"1","binary":"MQ==","id":"e1"}`, code: protocol.CodeBadRequest, id: "e1"},
		{name: "invalid base64", opts: []pubsub.Option{clientPublish}, req: `{"type":"publish","room":"a","binary":"not base64!","id":"e1"}`, code: protocol.CodeBadRequest, id: "e1"},
		{name: "id over 64 bytes", req: `{"type":"subscribe","room":"a","id":"` + id65 + `"}`, code: protocol.CodeBadRequest},
		{
			name: "payload over the queue bound",
			opts: []pubsub.Option{clientPublish, pubsub.WithQueueLimits(64, 1024)},
			req:  `{"type":"publish","room":"a","text":"` + strings.Repeat("x", 1025) + `","id":"e1"}`,
			code: protocol.CodeBadRequest, id: "e1",
		},
		{name: "unknown type", req: `{"type":"frobnicate","id":"e1"}`, code: protocol.CodeUnknownType, id: "e1"},
		{name: "server-only type", req: `{"type":"ack","id":"e1"}`, code: protocol.CodeUnknownType, id: "e1"},
		{name: "room with a bad character", req: `{"type":"subscribe","room":"a b","id":"e1"}`, code: protocol.CodeInvalidRoom, id: "e1"},
		{name: "room with non-ASCII", req: `{"type":"subscribe","room":"café","id":"e1"}`, code: protocol.CodeInvalidRoom, id: "e1"},
		{name: "room too long", req: `{"type":"subscribe","room":"` + strings.Repeat("r", 128+1) + `","id":"e1"}`, code: protocol.CodeInvalidRoom, id: "e1"},
		{name: "publish to a bad room", opts: []pubsub.Option{clientPublish}, req: `{"type":"publish","room":"a*","text":"x","id":"e1"}`, code: protocol.CodeInvalidRoom, id: "e1"},
		{name: "send to a bad room", opts: []pubsub.Option{rejectAll}, req: `{"type":"send","room":"a*","text":"x","id":"e1"}`, code: protocol.CodeInvalidRoom, id: "e1"},
		{name: "publish under the default policy", req: `{"type":"publish","room":"a","text":"x","id":"e1"}`, code: protocol.CodeForbidden, id: "e1"},
		{name: "authorize denies subscribe", opts: []pubsub.Option{denySecret}, req: `{"type":"subscribe","room":"secret","id":"e1"}`, code: protocol.CodeForbidden, id: "e1"},
		{name: "authorize denies publish despite client publish", opts: []pubsub.Option{clientPublish, denySecret}, req: `{"type":"publish","room":"secret","text":"x","id":"e1"}`, code: protocol.CodeForbidden, id: "e1"},
		{
			name:  "one room more than WithMaxRooms",
			opts:  []pubsub.Option{pubsub.WithMaxRooms(2)},
			setup: func(p *protoClient) { p.subscribe("a"); p.subscribe("b") },
			req:   `{"type":"subscribe","room":"c","id":"e1"}`, code: protocol.CodeTooManyRooms, id: "e1",
		},
		{name: "unsubscribe a room not joined", req: `{"type":"unsubscribe","room":"a","id":"e1"}`, code: protocol.CodeNotSubscribed, id: "e1"},
		{name: "send without a message hook", req: `{"type":"send","text":"x","id":"e1"}`, code: protocol.CodeNotSupported, id: "e1"},
		{name: "message hook returns an error", opts: []pubsub.Option{rejectAll}, req: `{"type":"send","text":"x","id":"e1"}`, code: protocol.CodeRejected, id: "e1"},
		{name: "message hook panics", opts: []pubsub.Option{panicky}, req: `{"type":"send","text":"x","id":"e1"}`, code: protocol.CodeInternal, id: "e1"},
		{
			name: "broker fails subscribe",
			opts: []pubsub.Option{pubsub.WithBroker(protoFailingBroker{pubsub.NewMemoryBroker()})},
			req:  `{"type":"subscribe","room":"broken","id":"e1"}`, code: protocol.CodeUnavailable, id: "e1",
		},
		{
			name: "broker fails publish",
			opts: []pubsub.Option{clientPublish, pubsub.WithBroker(protoFailingBroker{pubsub.NewMemoryBroker()})},
			req:  `{"type":"publish","room":"broken-publish","text":"x","id":"e1"}`, code: protocol.CodeUnavailable, id: "e1",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, srv := newServer(t, tt.opts...)
			p := dialProto(t, wsURL(srv, "/ws"))
			if tt.setup != nil {
				tt.setup(p)
			}
			p.send(tt.req)
			e := p.read()
			if e.Type != "error" || e.Code != tt.code || e.ID != tt.id || e.Message == "" {
				t.Fatalf("got %s, want error %q with id %q and a message", e.raw, tt.code, tt.id)
			}
			if strings.Contains(string(e.raw), "secret-") {
				t.Fatalf("error %s leaks internal text", e.raw)
			}
			protoAlive(t, p)
		})
	}
}

func TestProtocolIDOfExactly64BytesIsEchoed(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t)
	p := dialProto(t, wsURL(srv, "/ws"))
	id := strings.Repeat("x", 64)
	p.send(`{"type":"subscribe","room":"a","id":"` + id + `"}`)
	if e := p.read(); e.Type != "ack" || e.ID != id {
		t.Fatalf("got %s, want ack with the 64-byte id", e.raw)
	}
}

func TestProtocolTooManyRoomsFreesUpAfterUnsubscribe(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t, pubsub.WithMaxRooms(2))
	p := dialProto(t, wsURL(srv, "/ws"))
	p.subscribe("a")
	p.subscribe("b")
	p.mustError(map[string]any{"type": "subscribe", "room": "c"}, protocol.CodeTooManyRooms)
	p.mustAck(map[string]any{"type": "unsubscribe", "room": "a"})
	p.subscribe("c")
}

// TestProtocolRateLimitDropsMessageThenRecovers: past the burst a request
// is answered rate_limited and dropped (never published); once the bucket
// refills, requests go through again.
func TestProtocolRateLimitDropsMessageThenRecovers(t *testing.T) {
	t.Parallel()
	// 2 tokens a second: the burst of 3 must be spent within half a second,
	// which pipelining makes safe; heartbeat pings are the retry clock.
	h, srv := newServer(t, pubsub.WithClientPublish(true), pubsub.WithRateLimit(2, 3),
		pubsub.WithHeartbeat(20*time.Millisecond, 5*time.Second))
	p := dialProto(t, wsURL(srv, "/ws"))
	replies := protoPipeline(t, p,
		map[string]any{"type": "subscribe", "room": "flood"},
		map[string]any{"type": "publish", "room": "flood", "text": "a"},
		map[string]any{"type": "publish", "room": "flood", "text": "b"},
		map[string]any{"type": "publish", "room": "flood", "text": "dropped"},
	)
	for i, e := range replies[:3] {
		if e.Type != "ack" {
			t.Fatalf("request %d within the burst: got %s, want ack", i, e.raw)
		}
	}
	if e := replies[3]; e.Type != "error" || e.Code != protocol.CodeRateLimited || e.ID == "" {
		t.Fatalf("request past the burst: got %s, want rate_limited with its id", e.raw)
	}
	if h.Stats().RateLimited == 0 {
		t.Fatal("Stats().RateLimited did not count the refusal")
	}
	recovered := false
	for range 500 { // ~10s of pings at most; a token takes 500ms
		protoWaitPing(t, p)
		e := p.request(map[string]any{"type": "publish", "room": "flood", "text": "c"})
		if e.Type == "ack" {
			recovered = true
			break
		}
		if e.Code != protocol.CodeRateLimited {
			t.Fatalf("got %s while waiting for the bucket to refill", e.raw)
		}
	}
	if !recovered {
		t.Fatal("the rate limit never let a request through again")
	}
	// The dropped publish never reached the room: seq has no gap.
	for i, want := range []string{"a", "b", "c"} {
		m := p.readMessage("flood")
		if m.Text == nil || *m.Text != want || m.Seq != uint64(i+1) {
			t.Fatalf("got %s, want text %q seq %d", m.raw, want, i+1)
		}
	}
}

// TestProtocolHookPanicIsInternalAndServerKeepsWorking: a panicking hook
// costs its request only; the connection, other connections and the
// server stay up, and Stats counts the panics.
func TestProtocolHookPanicIsInternalAndServerKeepsWorking(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t,
		pubsub.WithAuthorize(func(_ context.Context, _ pubsub.Client, _ pubsub.Action, room string) error {
			if room == "boom" {
				panic("authorize bug")
			}
			return nil
		}),
		pubsub.WithOnMessage(func(_ context.Context, m *pubsub.ClientMessage) error {
			if string(m.Data) == "boom" {
				panic("on_message bug")
			}
			return nil
		}))
	p := dialProto(t, wsURL(srv, "/ws"))
	bystander := dialProto(t, wsURL(srv, "/ws"))
	bystander.subscribe("calm")
	before := h.Stats().HookPanics

	p.mustError(map[string]any{"type": "send", "text": "boom"}, protocol.CodeInternal)
	p.mustError(map[string]any{"type": "subscribe", "room": "boom"}, protocol.CodeInternal)
	p.mustError(map[string]any{"type": "publish", "room": "boom", "text": "x"}, protocol.CodeInternal)
	if got := h.Stats().HookPanics - before; got != 3 {
		t.Fatalf("Stats().HookPanics grew by %d, want 3", got)
	}

	p.mustAck(map[string]any{"type": "send", "text": "fine"})
	p.subscribe("calm")
	p.mustAck(map[string]any{"type": "publish", "room": "calm", "text": "still up"})
	for _, c := range []*protoClient{p, bystander} {
		if m := c.readMessage("calm"); m.Text == nil || *m.Text != "still up" {
			t.Fatalf("got %s", m.raw)
		}
	}
	dialProto(t, wsURL(srv, "/ws")).subscribe("calm") // new connections still work
}

// ---- Payload kinds ----

// TestProtocolClientPublishPayloadKinds: what a protocol client publishes
// reaches protocol clients in the field its bytes classify as, with the
// exact bytes, and raw clients as the verbatim frame.
func TestProtocolClientPublishPayloadKinds(t *testing.T) {
	t.Parallel()
	// str is a JSON string literal; b64 is one holding base64.
	str := func(s string) string { b, _ := json.Marshal(s); return string(b) }
	b64 := func(b string) string { return str(base64.StdEncoding.EncodeToString([]byte(b))) }
	tests := []struct {
		name  string
		field string // the publish envelope's payload field
		value string // its JSON value, sent as written
		want  string // the payload bytes every subscriber gets
		kind  string // the field a protocol subscriber gets it in
	}{
		{"data object", "data", `{"a":[1,{"b":null}],"c":"é"}`, `{"a":[1,{"b":null}],"c":"é"}`, "data"},
		{"data object with inner spaces", "data", `{ "a" : 1 }`, `{ "a" : 1 }`, "data"},
		{"data number", "data", `-12.5e3`, `-12.5e3`, "data"},
		{"data string", "data", `"say \"hi\" \u00e9"`, `"say \"hi\" \u00e9"`, "data"},
		{"data null", "data", `null`, `null`, "data"},
		{"text", "text", `"hello, world"`, "hello, world", "text"},
		{"text with escapes and separators", "text", `"h\u00e9llo\n\"✓\"\u2028\ud83d\ude00"`, "héllo\n\"✓\"\u2028😀", "text"},
		{"empty text", "text", `""`, "", "text"},
		// Documented: the server classifies bytes, so text that is valid
		// JSON arrives as data.
		{"text that is JSON arrives as data", "text", `"42"`, "42", "data"},
		{"text that is a JSON object arrives as data", "text", str(`{"x":1}`), `{"x":1}`, "data"},
		{"binary", "binary", b64("\xff\x00\xfe\x80"), "\xff\x00\xfe\x80", "binary"},
		{"binary with a NUL and invalid UTF-8", "binary", b64("a\x00\xc3"), "a\x00\xc3", "binary"},
		{"binary that is UTF-8 arrives as text", "binary", b64("hi ✓"), "hi ✓", "text"},
		{"binary that is JSON arrives as data", "binary", b64(`[1,2]`), `[1,2]`, "data"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, srv := newServer(t, pubsub.WithClientPublish(true))
			pub := dialProto(t, wsURL(srv, "/ws"))
			sub := dialProto(t, wsURL(srv, "/ws"))
			sub.subscribe("kinds")
			raw := dial(t, wsURL(srv, "/ws/kinds"))
			// A raw client joins its room before the upgrade completes.
			pub.subscribe("kinds")
			pub.send(`{"type":"publish","room":"kinds","id":"k1",` + str(tt.field) + `:` + tt.value + `}`)
			for { // the publisher's own message may precede the ack
				e := pub.readWire()
				if e.Type == "ack" && e.ID == "k1" {
					break
				}
				if e.Type != "message" {
					t.Fatalf("got %s, want the ack", e.raw)
				}
				pub.pending = append(pub.pending, e)
			}

			for _, p := range []*protoClient{sub, pub} {
				m := p.readMessage("kinds")
				kind, b := protoPayload(t, m)
				if kind != tt.kind || string(b) != tt.want {
					t.Fatalf("protocol client got %s %q (%s), want %s %q", kind, b, m.raw, tt.kind, tt.want)
				}
				if m.Epoch == "" || m.Seq != 1 {
					t.Fatalf("message %s: want an epoch and seq 1", m.raw)
				}
			}
			typ, b := readFrame(t, raw)
			wantTyp := websocket.MessageText
			if tt.kind == "binary" {
				wantTyp = websocket.MessageBinary
			}
			if typ != wantTyp || string(b) != tt.want {
				t.Fatalf("raw client got %v %q, want %v %q", typ, b, wantTyp, tt.want)
			}
		})
	}
}

// serverPayloads are what the backend may publish: JSON, other UTF-8
// text, and bytes that are not UTF-8 (even ones encoding/json accepts).
var serverPayloads = []struct {
	name string
	data string
	kind string
}{
	{"JSON object", `{"order":42,"items":["a","b"]}`, "data"},
	{"JSON string", `"shipped"`, "data"},
	{"JSON number", `3.14`, "data"},
	{"non-JSON text", "order shipped ✓", "text"},
	{"text with control characters", "a\x00b\x1fc", "text"},
	{"empty", "", "text"},
	{"non-UTF-8 bytes", "\x89PNG\r\n\x1a\n\x00\xff", "binary"},
	{"JSON syntax with invalid UTF-8", "\"\xff\"", "binary"},
}

func TestServerPublishPayloadKinds(t *testing.T) {
	t.Parallel()
	for _, tt := range serverPayloads {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			h, srv := newServer(t)
			p := dialProto(t, wsURL(srv, "/ws"))
			p.subscribe("kinds")
			raw := dial(t, wsURL(srv, "/ws/kinds")) // joined before the upgrade completed
			if err := h.Publish(testCtx(t), "kinds", []byte(tt.data)); err != nil {
				t.Fatal(err)
			}
			m := p.readMessage("kinds")
			if kind, b := protoPayload(t, m); kind != tt.kind || string(b) != tt.data {
				t.Fatalf("protocol client got %s %q (%s), want %s %q", kind, b, m.raw, tt.kind, tt.data)
			}
			typ, b := readFrame(t, raw)
			wantTyp := websocket.MessageText
			if tt.kind == "binary" {
				wantTyp = websocket.MessageBinary
			}
			if typ != wantTyp || string(b) != tt.data {
				t.Fatalf("raw client got %v %q, want %v %q", typ, b, wantTyp, tt.data)
			}
			if typ == websocket.MessageText && !utf8.Valid(b) {
				t.Fatalf("raw client got a text frame that is not UTF-8: %q", b)
			}
		})
	}
}

func TestServerDirectMessagePayloadKinds(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t)
	p := dialProto(t, wsURL(srv, "/ws"))
	for _, tt := range serverPayloads {
		if err := h.PublishToConn(testCtx(t), p.welcome.ConnID, []byte(tt.data)); err != nil {
			t.Fatal(err)
		}
		e := p.read()
		if e.Type != "direct" {
			t.Fatalf("%s: got %s, want a direct message", tt.name, e.raw)
		}
		if kind, b := protoPayload(t, e); kind != tt.kind || string(b) != tt.data {
			t.Fatalf("%s: got %s %q, want %s %q", tt.name, kind, b, tt.kind, tt.data)
		}
	}
}

// ---- Ordering ----

func TestProtocolRoomMessagesCarryEpochAndConsecutiveSeq(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t)
	a := dialProto(t, wsURL(srv, "/ws"))
	b := dialProto(t, wsURL(srv, "/ws"))
	a.subscribe("seq")
	b.subscribe("seq")
	ctx := testCtx(t)
	for i := range 10 {
		if err := h.Publish(ctx, "seq", fmt.Append(nil, i)); err != nil {
			t.Fatal(err)
		}
	}
	var epoch string
	for _, p := range []*protoClient{a, b} {
		for i := range 10 {
			m := p.readMessage("seq")
			if i == 0 && epoch == "" {
				epoch = m.Epoch
			}
			if m.Epoch == "" || m.Epoch != epoch || m.Seq != uint64(i+1) || string(m.Data) != fmt.Sprint(i) {
				t.Fatalf("message %d: %s, want epoch %q seq %d data %d", i, m.raw, epoch, i+1, i)
			}
		}
	}
}

// TestProtocolRoomBackWithinTheGraceResumesItsSequence: a room that keeps
// no history keeps its epoch and sequence for a while after its last
// subscriber leaves (see IdleRoomGrace), so (epoch, seq) goes on where it
// was rather than naming a message twice. (Reclamation after the grace,
// with a new epoch, is tested on the broker with a fake clock.)
func TestProtocolRoomBackWithinTheGraceResumesItsSequence(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t)
	p := dialProto(t, wsURL(srv, "/ws"))
	ctx := testCtx(t)
	life := func() (string, uint64) {
		p.subscribe("life")
		if err := h.Publish(ctx, "life", []byte("1")); err != nil {
			t.Fatal(err)
		}
		m := p.readMessage("life")
		p.mustAck(map[string]any{"type": "unsubscribe", "room": "life"})
		return m.Epoch, m.Seq
	}
	e1, s1 := life()
	e2, s2 := life()
	if e1 == "" || e1 != e2 || s1 != 1 || s2 != 2 {
		t.Fatalf("lives (%q, %d) and (%q, %d): want one epoch, seq 1 then 2", e1, s1, e2, s2)
	}
}

// TestProtocolConcurrentPublishersAllSubscribersSeeSameOrder: with several
// goroutines publishing into one room, every subscriber sees the same
// (seq, payload) sequence, consecutive from 1, with each publisher's
// messages in the order it published them.
func TestProtocolConcurrentPublishersAllSubscribersSeeSameOrder(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t)
	const publishers, each, subscribers = 4, 50, 3
	subs := make([]*protoClient, subscribers)
	for i := range subs {
		subs[i] = dialProto(t, wsURL(srv, "/ws"))
		subs[i].subscribe("race")
	}
	ctx := testCtx(t)
	var wg sync.WaitGroup
	defer wg.Wait() // also when a check below fails
	for p := range publishers {
		wg.Go(func() {
			for n := range each {
				if err := h.Publish(ctx, "race", fmt.Appendf(nil, `{"p":%d,"n":%d}`, p, n)); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	type entry struct {
		seq  uint64
		data string
	}
	var first []entry
	for i, s := range subs {
		got := make([]entry, 0, publishers*each)
		next := make([]int, publishers) // each publisher's next n
		epoch := ""
		for k := range publishers * each {
			m := s.readMessage("race")
			if k == 0 {
				epoch = m.Epoch
			}
			if m.Epoch == "" || m.Epoch != epoch || m.Seq != uint64(k+1) {
				t.Fatalf("subscriber %d, message %d: %s, want epoch %q seq %d", i, k, m.raw, epoch, k+1)
			}
			var d struct{ P, N int }
			if err := json.Unmarshal(m.Data, &d); err != nil {
				t.Fatalf("data %s: %v", m.Data, err)
			}
			if d.N != next[d.P] {
				t.Fatalf("subscriber %d got publisher %d's message %d, want %d", i, d.P, d.N, next[d.P])
			}
			next[d.P]++
			got = append(got, entry{m.Seq, string(m.Data)})
		}
		if i == 0 {
			first = got
		} else if !slices.Equal(got, first) {
			t.Fatalf("subscriber %d saw a different order than subscriber 0", i)
		}
	}
}

// ---- Protocol violations ----

// TestProtocolViolationClosesWithDocumentedCode: frames protocol mode
// cannot take close the connection with their code; other connections
// carry on.
func TestProtocolViolationClosesWithDocumentedCode(t *testing.T) {
	t.Parallel()
	const maxBytes = 64
	tests := []struct {
		name string
		typ  websocket.MessageType
		data []byte
		code protocol.CloseCode
	}{
		{"binary frame", websocket.MessageBinary, []byte(`{"type":"ping"}`), protocol.CloseUnsupportedData},
		{"text frame with invalid UTF-8", websocket.MessageText, []byte("{\"type\":\"ping\",\"x\":\"\xff\"}"), protocol.CloseInvalidPayload},
		{"message over WithMaxMessageBytes", websocket.MessageText, protoPadPing(maxBytes + 1), protocol.CloseMessageTooBig},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			h, srv := newServer(t, pubsub.WithMaxMessageBytes(maxBytes))
			bystander := dialProto(t, wsURL(srv, "/ws"))
			bystander.subscribe("calm")
			p := dialProto(t, wsURL(srv, "/ws"))
			if err := p.c.Write(testCtx(t), tt.typ, tt.data); err != nil {
				t.Fatal(err)
			}
			expectClose(t, p.c, tt.code)
			waitFor(t, "the violating connection to end", func() bool { return h.Stats().Connections == 1 })
			if err := h.Publish(testCtx(t), "calm", []byte(`"unaffected"`)); err != nil {
				t.Fatal(err)
			}
			bystander.readMessage("calm")
			protoAlive(t, bystander)
		})
	}
}

// protoPadPing is a valid ping envelope of exactly n bytes (n >= 26).
func protoPadPing(n int) []byte {
	const head, tail = `{"type":"ping","pad":"`, `"}`
	return []byte(head + strings.Repeat("x", n-len(head)-len(tail)) + tail)
}

func TestProtocolMessageOfExactlyMaxBytesIsAccepted(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t, pubsub.WithMaxMessageBytes(64))
	p := dialProto(t, wsURL(srv, "/ws"))
	p.send(protoPadPing(64))
	readText(t, p.c, `{"type":"pong"}`)
}

// ---- Heartbeats ----

func TestProtocolServerSendsPingEnvelopeEveryInterval(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t, pubsub.WithHeartbeat(20*time.Millisecond, time.Second))
	p := dialProto(t, wsURL(srv, "/ws"))
	for range 3 {
		readText(t, p.c, `{"type":"ping"}`)
		p.send(`{"type":"pong"}`)
	}
}

func TestProtocolClientPingGetsPong(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t)
	p := dialProto(t, wsURL(srv, "/ws"))
	p.send(`{"type":"ping"}`)
	readText(t, p.c, `{"type":"pong"}`)
	// A client pong is not answered: the next frame is the next ping's pong.
	p.send(`{"type":"pong"}`)
	p.send(`{"type":"ping"}`)
	readText(t, p.c, `{"type":"pong"}`)
}

// TestProtocolClientShowingLifeStaysOpen: a client that answers each ping
// (with a pong, or with any other message) outlives many times the
// interval+timeout a silent client gets (see the next test).
func TestProtocolClientShowingLifeStaysOpen(t *testing.T) {
	t.Parallel()
	// The timeout is generous so a loaded machine (a pong late by most of
	// a second) cannot fail a healthy client; 160 pings still span about
	// three times the interval+timeout a silent client lasts.
	const interval, timeout = 20 * time.Millisecond, time.Second
	tests := []struct {
		name   string
		answer string
	}{
		{"pong", `{"type":"pong"}`},
		{"ping of its own", `{"type":"ping"}`},
		{"any request", `{"type":"subscribe","room":"alive"}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			// 50 answers a second: above the default rate limit, which is
			// not what this test is about.
			h, srv := newServer(t, pubsub.WithHeartbeat(interval, timeout), pubsub.WithRateLimit(1000, 1000))
			p := dialProto(t, wsURL(srv, "/ws"))
			// 160 pings take at least 159 intervals: 3.18s, three times
			// the 1.02s a silent client lasts.
			for pings := 0; pings < 160; {
				typ, b := readFrame(t, p.c)
				if typ == websocket.MessageText && string(b) == `{"type":"ping"}` {
					pings++
					p.send(tt.answer)
				}
			}
			p.mustAck(map[string]any{"type": "subscribe", "room": "still-open"})
			if n := h.Stats().Connections; n != 1 {
				t.Fatalf("%d connections, want 1", n)
			}
		})
	}
}

func TestProtocolSilentClientIsClosedWith4001(t *testing.T) {
	t.Parallel()
	disconnected := make(chan pubsub.DisconnectEvent, 1)
	_, srv := newServer(t, pubsub.WithHeartbeat(20*time.Millisecond, 150*time.Millisecond),
		pubsub.WithOnDisconnect(func(ev pubsub.DisconnectEvent) { disconnected <- ev }))
	p := dialProto(t, wsURL(srv, "/ws"))
	// The client reads (pings flow) but never sends.
	readText(t, p.c, `{"type":"ping"}`)
	expectClose(t, p.c, protocol.CloseHeartbeatTimeout)
	select {
	case ev := <-disconnected:
		if ev.Code != protocol.CloseHeartbeatTimeout {
			t.Fatalf("OnDisconnect code %d, want %d", ev.Code, protocol.CloseHeartbeatTimeout)
		}
	case <-testCtx(t).Done():
		t.Fatal("OnDisconnect not called")
	}
}

func TestProtocolPingWithIDIsAnsweredByPongWithTheSameID(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t)
	p := dialProto(t, wsURL(srv, "/ws"))
	if e := p.request(map[string]any{"type": "ping"}); e.Type != "pong" {
		t.Fatalf("ping with id: got %s, want a pong with the id", e.raw)
	}
}

func TestProtocolMalformedEnvelopesCountAgainstTheRateLimit(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t, pubsub.WithRateLimit(0.001, 3))
	p := dialProto(t, wsURL(srv, "/ws"))
	for i := range 3 {
		p.send(`{"id":` + fmt.Sprint(i) + `,`) // not even JSON
		if e := p.read(); e.Type != "error" || e.Code != protocol.CodeBadRequest {
			t.Fatalf("garbage %d: got %s, want bad_request", i, e.raw)
		}
	}
	p.send(`not json either`)
	if e := p.read(); e.Type != "error" || e.Code != protocol.CodeRateLimited {
		t.Fatalf("garbage past the burst: got %s, want rate_limited", e.raw)
	}
	// A pong is never limited: the connection stays open and quiet.
	p.send(`{"type":"pong"}`)
	p.send(`{"type":"ping","id":"x"}`)
	if e := p.read(); e.Type != "error" || e.Code != protocol.CodeRateLimited || e.ID != "x" {
		t.Fatalf("ping past the burst: got %s, want rate_limited for x", e.raw)
	}
}
