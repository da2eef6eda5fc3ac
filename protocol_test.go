package pubsub_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// Protocol mode (subprotocol roomcast.v1), end to end: the welcome,
// requests and their acks, every error code, the frames protocol mode
// cannot take. Its heartbeats are in heartbeat_test.go, its rate limit in
// ratelimit_test.go, payloads in payload_test.go, a room's order in
// room_test.go.

// expectPong reads the next envelope and expects exactly a pong.
func expectPong(t *testing.T, p *pubsubtest.Conn) {
	t.Helper()
	if e := p.Next(); string(e.Raw) != `{"type":"pong"}` {
		t.Fatalf("got %s, want {\"type\":\"pong\"}", e)
	}
}

// alive proves the connection still serves requests after an error: a
// ping is answered with a pong, and nothing comes before it.
func alive(t *testing.T, p *pubsubtest.Conn) {
	t.Helper()
	p.Send(`{"type":"ping"}`)
	expectPong(t, p)
}

// ---- Welcome ----

func TestProtocolWelcomeIsFirstFrameAndReflectsOptions(t *testing.T) {
	t.Parallel()
	// welcome is the welcome envelope's every field.
	type welcome struct {
		Type, Protocol, ConnID, UserID string
		HeartbeatMS, TimeoutMS         int64
		MaxMessageBytes                int64
		MaxRooms                       int
	}
	tests := []struct {
		name string
		opts []pubsub.Option
		want welcome
	}{
		{
			name: "defaults",
			want: welcome{
				HeartbeatMS: 25_000, TimeoutMS: 10_000,
				MaxMessageBytes: 64 << 10, MaxRooms: 100,
			},
		},
		{
			name: "options",
			opts: []pubsub.Option{
				pubsub.WithHeartbeat(7*time.Second, 3*time.Second), pubsub.WithMaxMessageBytes(4096), pubsub.WithMaxRooms(7),
			},
			want: welcome{HeartbeatMS: 7000, TimeoutMS: 3000, MaxMessageBytes: 4096, MaxRooms: 7},
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
				headerAuth(),
				pubsub.WithOnConnect(func(ev pubsub.ConnectEvent) {
					connected <- ev.Client
					_ = hp.Load().PublishToConn(context.Background(), ev.Client.ID, []byte(`"early"`))
				}),
			}, tt.opts...)
			srv := pubsubtest.Start(t, opts...)
			hp.Store(srv.Handler)

			p := srv.Dial("/ws", asUser("alice")) // fails unless the first envelope is the welcome
			w := p.Welcome
			got := welcome{w.Type, w.Protocol, w.ConnID, w.UserID, w.HeartbeatMS, w.TimeoutMS, w.MaxMessageBytes, w.MaxRooms}
			cl := pubsubtest.Receive(t, connected, "the connect hook")
			want := tt.want
			want.Type, want.Protocol, want.ConnID, want.UserID = "welcome", "roomcast.v1", cl.ID, "alice"
			if got != want {
				t.Fatalf("welcome %s\n got %+v\nwant %+v", w, got, want)
			}
			if _, err := uuid.Parse(w.ConnID); err != nil {
				t.Fatalf("conn_id %q is not a UUID: %v", w.ConnID, err)
			}
			if e := p.Next(); string(e.Raw) != `{"type":"direct","data":"early"}` {
				t.Fatalf("second frame %s, want the connect hook's direct message", e)
			}
		})
	}
}

func TestProtocolWelcomeConnIDIsDistinctUUIDPerConnection(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	seen := make(map[string]bool)
	for range 5 {
		p := srv.Dial("/ws")
		if _, err := uuid.Parse(p.Welcome.ConnID); err != nil {
			t.Fatalf("conn_id %q is not a UUID: %v", p.Welcome.ConnID, err)
		}
		if seen[p.Welcome.ConnID] {
			t.Fatalf("conn_id %q given to two connections", p.Welcome.ConnID)
		}
		seen[p.Welcome.ConnID] = true
		if p.Welcome.UserID != "" {
			t.Fatalf("anonymous connection has user_id %q", p.Welcome.UserID)
		}
	}
}

// ---- Requests and acks ----

func TestProtocolRequestWithIDIsAcked(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		setup func(p *pubsubtest.Conn)
		req   pubsubtest.Fields
	}{
		{name: "subscribe", req: pubsubtest.Fields{"type": "subscribe", "room": "a"}},
		{name: "unsubscribe", setup: func(p *pubsubtest.Conn) { p.Subscribe("a") }, req: pubsubtest.Fields{"type": "unsubscribe", "room": "a"}},
		{name: "publish", req: pubsubtest.Fields{"type": "publish", "room": "a", "text": "x"}},
		{name: "send", req: pubsubtest.Fields{"type": "send", "text": "x"}},
		{name: "send with room", req: pubsubtest.Fields{"type": "send", "room": "a", "data": 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			srv := pubsubtest.Start(t, pubsub.WithClientPublish(true),
				pubsub.WithOnMessage(func(context.Context, *pubsub.ClientMessage) error { return nil }))
			p := srv.Dial("/ws")
			if tt.setup != nil {
				tt.setup(p)
			}
			e := p.Request(tt.req)
			if e.Type != "ack" || !json.Valid(e.Raw) {
				t.Fatalf("got %s, want an ack", e)
			}
		})
	}
}

// TestProtocolRequestWithoutIDGetsNoReply: a request without an id takes
// effect but is not answered, so the next reply belongs to the next request.
func TestProtocolRequestWithoutIDGetsNoReply(t *testing.T) {
	t.Parallel()
	type env struct {
		srv   *pubsubtest.Server
		p     *pubsubtest.Conn // sends the request
		other *pubsubtest.Conn // subscribed to "quiet"
		sent  chan string      // what the message hook got
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
				e.srv.Publish("quiet", []byte("x"))
				e.p.NextMessage("quiet")
			},
		},
		{
			name:  "unsubscribe",
			setup: func(t *testing.T, e env) { e.p.Subscribe("quiet") },
			req:   `{"type":"unsubscribe","room":"quiet"}`,
			effect: func(t *testing.T, e env) {
				for _, cl := range e.srv.Connections("quiet") {
					if cl.ID == e.p.Welcome.ConnID {
						t.Fatal("still subscribed after unsubscribe")
					}
				}
			},
		},
		{
			name: "publish",
			req:  `{"type":"publish","room":"quiet","text":"hello"}`,
			effect: func(t *testing.T, e env) {
				if m := e.other.NextMessage("quiet"); m.Text == nil || *m.Text != "hello" {
					t.Fatalf("got %s, want text hello", m)
				}
			},
		},
		{
			name: "send",
			req:  `{"type":"send","text":"hello"}`,
			effect: func(t *testing.T, e env) {
				if got := pubsubtest.Receive(t, e.sent, "the message hook"); got != "hello" {
					t.Fatalf("hook got %q", got)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			sent := make(chan string, 1)
			srv := pubsubtest.Start(t, pubsub.WithClientPublish(true),
				pubsub.WithOnMessage(func(_ context.Context, m *pubsub.ClientMessage) error {
					sent <- string(m.Data)
					return nil
				}))
			e := env{srv: srv, p: srv.Dial("/ws"), other: srv.Dial("/ws"), sent: sent}
			e.other.Subscribe("quiet")
			if tt.setup != nil {
				tt.setup(t, e)
			}
			e.p.Send(tt.req)
			e.p.Send(`{"type":"subscribe","room":"follow","id":"follow-up"}`)
			if got := e.p.Next(); got.Type != "ack" || got.ID != "follow-up" {
				t.Fatalf("first reply %s, want the ack of the follow-up request", got)
			}
			tt.effect(t, e)
		})
	}
}

func TestProtocolUnsubscribeStopsDelivery(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	p := srv.Dial("/ws")
	p.Subscribe("left")
	p.Subscribe("kept")
	p.Ack(pubsubtest.Fields{"type": "unsubscribe", "room": "left"})
	// Publish returns once the message is queued for every subscriber, so
	// a message of "left" would arrive before the one of "kept".
	srv.Publish("left", []byte(`"gone"`))
	srv.Publish("kept", []byte(`"here"`))
	if m := p.NextMessage("kept"); string(m.Data) != `"here"` {
		t.Fatalf("got %s", m)
	}
	p.Error(pubsubtest.Fields{"type": "unsubscribe", "room": "left"}, protocol.CodeNotSubscribed)
}

func TestProtocolSubscribeIsIdempotent(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithMaxRooms(1))
	p := srv.Dial("/ws")
	p.Subscribe("once")
	p.Subscribe("once") // acked, and does not count against WithMaxRooms(1)
	if n := len(srv.Connections("once")); n != 1 {
		t.Fatalf("room lists the connection %d times", n)
	}
	for _, d := range []string{"1", "2"} {
		srv.Publish("once", []byte(d))
	}
	// Delivered once each: a duplicate of "1" would come before "2".
	for i, d := range []string{"1", "2"} {
		if m := p.NextMessage("once"); string(m.Data) != d || m.Seq != uint64(i+1) {
			t.Fatalf("got %s, want data %s seq %d", m, d, i+1)
		}
	}
	// One unsubscribe undoes both subscribes.
	p.Ack(pubsubtest.Fields{"type": "unsubscribe", "room": "once"})
	p.Error(pubsubtest.Fields{"type": "unsubscribe", "room": "once"}, protocol.CodeNotSubscribed)
}

func TestProtocolManyRoomsMultiplexedOnOneConnection(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	rooms := []string{"r0", "r1", "r2", "r3", "r4"}
	all := srv.Dial("/ws")
	some := srv.Dial("/ws")
	for _, r := range rooms {
		all.Subscribe(r)
	}
	some.Subscribe("r1")
	some.Subscribe("r3")
	const rounds = 3
	for n := range rounds {
		for _, r := range rooms {
			srv.Publish(r, fmt.Appendf(nil, `{"room":%q,"n":%d}`, r, n))
		}
	}
	check := func(p *pubsubtest.Conn, room string, n int) {
		t.Helper()
		m := p.NextMessage(room)
		if want := fmt.Sprintf(`{"room":%q,"n":%d}`, room, n); string(m.Data) != want || m.Seq != uint64(n+1) {
			t.Fatalf("got %s, want data %s seq %d", m, want, n+1)
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
	srv.Publish("r3", []byte(`{"room":"r3","n":3}`))
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
	srv := pubsubtest.Start(t, pubsub.WithOnMessage(func(_ context.Context, m *pubsub.ClientMessage) error {
		calls <- got{m.Client, m.Room, string(m.Data), m.Binary}
		return m.Reply(append([]byte("re:"), m.Data...))
	}))
	p := srv.Dial("/ws")
	tests := []struct {
		req  pubsubtest.Fields
		room string
		data string
	}{
		{pubsubtest.Fields{"type": "send", "data": map[string]int{"a": 1}}, "", `{"a":1}`},
		{pubsubtest.Fields{"type": "send", "room": "ctx", "text": "héllo"}, "ctx", "héllo"},
		{pubsubtest.Fields{"type": "send", "binary": base64.StdEncoding.EncodeToString([]byte{0xff, 0})}, "", "\xff\x00"},
	}
	for _, tt := range tests {
		p.Ack(tt.req)
		c := <-calls
		if c.room != tt.room || c.data != tt.data || c.binary || c.client.ID != p.Welcome.ConnID || c.client.Mode != pubsub.ModeProtocol {
			t.Fatalf("hook got %+v, want room %q data %q from %s in protocol mode", c, tt.room, tt.data, p.Welcome.ConnID)
		}
		e := p.Next()
		if e.Type != "direct" {
			t.Fatalf("got %s, want the hook's direct reply", e)
		}
		if _, b := payloadOf(t, e); string(b) != "re:"+tt.data {
			t.Fatalf("reply %q, want %q", b, "re:"+tt.data)
		}
	}
}

func TestProtocolUnknownFieldsAreIgnored(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithClientPublish(true),
		pubsub.WithOnMessage(func(context.Context, *pubsub.ClientMessage) error { return nil }))
	p := srv.Dial("/ws")
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
		p.Send(req)
		e := p.Next()
		for e.Type == "message" { // the publish's own message may come first
			e = p.Next()
		}
		if e.Type != "ack" || e.ID != id.ID {
			t.Fatalf("%s: got %s, want ack %s", req, e, id.ID)
		}
	}
	p.Send(`{"type":"ping",` + extra + `}`)
	expectPong(t, p)
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
		setup func(p *pubsubtest.Conn)
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
			setup: func(p *pubsubtest.Conn) { p.Subscribe("a"); p.Subscribe("b") },
			req:   `{"type":"subscribe","room":"c","id":"e1"}`, code: protocol.CodeTooManyRooms, id: "e1",
		},
		{name: "unsubscribe a room not joined", req: `{"type":"unsubscribe","room":"a","id":"e1"}`, code: protocol.CodeNotSubscribed, id: "e1"},
		{name: "send without a message hook", req: `{"type":"send","text":"x","id":"e1"}`, code: protocol.CodeNotSupported, id: "e1"},
		{name: "message hook returns an error", opts: []pubsub.Option{rejectAll}, req: `{"type":"send","text":"x","id":"e1"}`, code: protocol.CodeRejected, id: "e1"},
		{name: "message hook panics", opts: []pubsub.Option{panicky}, req: `{"type":"send","text":"x","id":"e1"}`, code: protocol.CodeInternal, id: "e1"},
		{
			name: "broker fails subscribe",
			opts: []pubsub.Option{pubsub.WithBroker(failingBroker(true, false))},
			req:  `{"type":"subscribe","room":"broken","id":"e1"}`, code: protocol.CodeUnavailable, id: "e1",
		},
		{
			name: "broker fails publish",
			opts: []pubsub.Option{clientPublish, pubsub.WithBroker(failingBroker(false, true))},
			req:  `{"type":"publish","room":"broken-publish","text":"x","id":"e1"}`, code: protocol.CodeUnavailable, id: "e1",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			srv := pubsubtest.Start(t, tt.opts...)
			p := srv.Dial("/ws")
			if tt.setup != nil {
				tt.setup(p)
			}
			p.Send(tt.req)
			e := p.Next()
			if e.Type != "error" || e.Code != tt.code || e.ID != tt.id || e.Message == "" {
				t.Fatalf("got %s, want error %q with id %q and a message", e, tt.code, tt.id)
			}
			if strings.Contains(string(e.Raw), "secret-") {
				t.Fatalf("error %s leaks internal text", e)
			}
			alive(t, p)
		})
	}
}

// A subscribe's room-state fields (since, history, info, presence) are
// checked like the rest of the envelope.
func TestSubscribeRejectsMalformedRoomStateFields(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithHistory(10, time.Minute), pubsub.WithMaxInfoBytes(32))
	p := srv.Dial("/ws")
	for name, fields := range map[string]pubsubtest.Fields{
		"since without seq":      {"since": pubsubtest.Fields{"epoch": "e"}},
		"since without epoch":    {"since": pubsubtest.Fields{"seq": 1}},
		"since with empty epoch": {"since": pubsubtest.Fields{"epoch": "", "seq": 1}},
		"since seq negative":     {"since": pubsubtest.Fields{"epoch": "e", "seq": -1}},
		"since seq a string":     {"since": pubsubtest.Fields{"epoch": "e", "seq": "1"}},
		"since not an object":    {"since": "e:1"},
		"since with history":     {"since": since("e", 1), "history": 5},
		"history negative":       {"history": -1},
		"history too large":      {"history": 100_000 + 1},
		"history not a number":   {"history": "5"},
		"info a string":          {"info": "ann"},
		"info an array":          {"info": []int{1}},
		"info a number":          {"info": 5},
		"info too large":         {"info": map[string]string{"name": strings.Repeat("a", 40)}},
		"presence not a boolean": {"presence": "yes"},
	} {
		fields["type"] = "subscribe"
		fields["room"] = "bad"
		if e := p.Request(fields); e.Type != "error" || e.Code != protocol.CodeBadRequest {
			t.Errorf("%s: got %s, want error %q", name, e, protocol.CodeBadRequest)
		}
	}
	// None of them subscribed, and the connection still works.
	p.Error(pubsubtest.Fields{"type": "presence", "room": "bad"}, protocol.CodeNotSubscribed)
	p.SubscribeWith(pubsubtest.Fields{"room": "good", "info": map[string]string{"name": "ann"}})
	p.SubscribeWith(pubsubtest.Fields{"room": "good2", "info": nil})
}

func TestProtocolIDOfExactly64BytesIsEchoed(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	p := srv.Dial("/ws")
	id := strings.Repeat("x", 64)
	p.Send(`{"type":"subscribe","room":"a","id":"` + id + `"}`)
	if e := p.Next(); e.Type != "ack" || e.ID != id {
		t.Fatalf("got %s, want ack with the 64-byte id", e)
	}
}

func TestProtocolTooManyRoomsFreesUpAfterUnsubscribe(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithMaxRooms(2))
	p := srv.Dial("/ws")
	p.Subscribe("a")
	p.Subscribe("b")
	p.Error(pubsubtest.Fields{"type": "subscribe", "room": "c"}, protocol.CodeTooManyRooms)
	p.Ack(pubsubtest.Fields{"type": "unsubscribe", "room": "a"})
	p.Subscribe("c")
}

// TestProtocolViolationClosesWithDocumentedCode: frames protocol mode
// cannot take close the connection with their code; other connections
// carry on.
func TestProtocolViolationClosesWithDocumentedCode(t *testing.T) {
	t.Parallel()
	const maxBytes = 64
	tests := []struct {
		name   string
		binary bool
		data   []byte
		code   protocol.CloseCode
	}{
		{"binary frame", true, []byte(`{"type":"ping"}`), protocol.CloseUnsupportedData},
		{"text frame with invalid UTF-8", false, []byte("{\"type\":\"ping\",\"x\":\"\xff\"}"), protocol.CloseInvalidPayload},
		{"message over WithMaxMessageBytes", false, protoPadPing(maxBytes + 1), protocol.CloseMessageTooBig},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			srv := pubsubtest.Start(t, pubsub.WithMaxMessageBytes(maxBytes))
			bystander := srv.Dial("/ws")
			bystander.Subscribe("calm")
			p := srv.Dial("/ws")
			if tt.binary {
				p.SendBinary(tt.data)
			} else {
				p.Send(tt.data)
			}
			p.ExpectClose(tt.code)
			pubsubtest.WaitFor(t, "the violating connection to end", func() bool { return srv.Stats().Connections == 1 })
			srv.Publish("calm", []byte(`"unaffected"`))
			bystander.NextMessage("calm")
			alive(t, bystander)
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
	srv := pubsubtest.Start(t, pubsub.WithMaxMessageBytes(64))
	p := srv.Dial("/ws")
	p.Send(protoPadPing(64))
	expectPong(t, p)
}
