package pubsub_test

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"slices"
	"sync"
	"testing"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// Raw mode, end to end: any WebSocket client with no library. A raw client
// names one room (or none), gets the room's payloads verbatim, and what it
// sends is published to its room, refused, or handed to the message hook.
// How it is let in is upgrade_test.go; how payloads are framed,
// payload_test.go.

// expectMembers checks how many clients room holds; a raw client joins its
// room before the upgrade answers, so this holds right after a dial.
func expectMembers(t *testing.T, srv *pubsubtest.Server, room string, want int) {
	t.Helper()
	if got := len(srv.Connections(room)); got != want {
		t.Fatalf("room %q has %d connections, want %d", room, got, want)
	}
}

// ---- Room selection ----

func TestRawRoomSelection(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		opts     []pubsub.Option
		patterns []string // nil: pubsubtest.Start's "/ws" and "/ws/"
		path     string
		room     string
		notRooms []string // rooms the client must not have joined
	}{
		{name: "query parameter", path: "/ws?room=lobby", room: "lobby"},
		{name: "path below the default mount", path: "/ws/lobby", room: "lobby"},
		{name: "nested path below the mount", path: "/ws/team/general", room: "team/general", notRooms: []string{"team", "general"}},
		{
			name: "path below a custom WithPath", opts: []pubsub.Option{pubsub.WithPath("/live")},
			patterns: []string{"/live/"}, path: "/live/lobby", room: "lobby", notRooms: []string{"live/lobby"},
		},
		{
			name: "Go 1.22 mux wildcard {room...}", patterns: []string{"/rooms/{room...}"},
			path: "/rooms/team/a", room: "team/a", notRooms: []string{"rooms/team/a"},
		},
		{
			name: "Go 1.22 mux wildcard {room}", patterns: []string{"/r/{room}/feed"},
			path: "/r/orders:42/feed", room: "orders:42", notRooms: []string{"r/orders:42/feed"},
		},
		{name: "query wins over the path", path: "/ws/pathroom?room=queryroom", room: "queryroom", notRooms: []string{"pathroom"}},
		{
			name: "query wins over a mux wildcard", patterns: []string{"/rooms/{room...}"},
			path: "/rooms/pathroom?room=queryroom", room: "queryroom", notRooms: []string{"pathroom"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var srv *pubsubtest.Server
			if tt.patterns == nil {
				srv = pubsubtest.Start(t, tt.opts...)
			} else {
				h := quietHandler(tt.opts...)
				mux := http.NewServeMux()
				for _, p := range tt.patterns {
					mux.Handle(p, h)
				}
				srv = pubsubtest.Serve(t, h, mux)
			}
			c := srv.DialRaw(tt.path)
			expectMembers(t, srv, tt.room, 1)
			for _, other := range tt.notRooms {
				expectMembers(t, srv, other, 0)
				srv.Publish(other, []byte("wrong room "+other))
			}
			srv.Publish(tt.room, []byte("hello "+tt.room))
			c.ExpectText("hello " + tt.room)
		})
	}
}

func TestRawWithoutRoomGetsDirectMessagesAndMayNotPublish(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		path string
		opts []pubsub.Option
	}{
		{"/ws, defaults", "/ws", nil},
		{"/ws/, defaults", "/ws/", nil},
		// Client publishing on: only the missing room can refuse the frame.
		{"/ws, client publishing allowed", "/ws", []pubsub.Option{pubsub.WithClientPublish(true)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var hooks hookLog
			srv := pubsubtest.Start(t, hooks.options(tt.opts...)...)
			c := srv.DialRaw(tt.path)
			id := hooks.connected(t, 1).ID
			if n := srv.Stats().Rooms; n != 0 {
				t.Fatalf("Stats().Rooms = %d with one roomless client, want 0", n)
			}
			if err := srv.PublishToConn(pubsubtest.Context(t), id, []byte("just for you")); err != nil {
				t.Fatalf("PublishToConn: %v", err)
			}
			c.ExpectText("just for you")

			c.Send("anyone there?")
			c.ExpectClose(protocol.ClosePolicyViolation)
			if n := srv.Stats().Published; n != 0 {
				t.Fatalf("Stats().Published = %d, want 0", n)
			}
		})
	}
}

func TestRawWithDefaultRoomJoinsAClientThatNamesNone(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithDefaultRoom("lobby"), pubsub.WithClientPublish(true))
	// A tutorial's `wscat -c ws://host/ws`: no query, nothing below the path.
	a := srv.DialRaw("/ws")
	b := srv.DialRaw("/ws/")
	expectMembers(t, srv, "lobby", 2)
	a.Send("hi from a")
	b.ExpectText("hi from a")
	a.ExpectText("hi from a") // the sender gets its own line too

	// A client that names a room still gets that room, not the default.
	c := srv.DialRaw("/ws?room=other")
	d := srv.DialRaw("/ws/elsewhere")
	expectMembers(t, srv, "lobby", 2)
	expectMembers(t, srv, "other", 1)
	expectMembers(t, srv, "elsewhere", 1)
	srv.Publish("lobby", []byte("lobby only"))
	srv.Publish("other", []byte("other only"))
	srv.Publish("elsewhere", []byte("elsewhere only"))
	c.ExpectText("other only")
	b.ExpectText("lobby only")
	d.ExpectText("elsewhere only") // and nothing of the lobby before it

	// Protocol clients join rooms by asking; the default is raw mode's only.
	p := srv.Dial("/ws")
	srv.Publish("lobby", []byte("not for protocol clients"))
	b.ExpectText("not for protocol clients")
	p.Subscribe("p-room")
	expectMembers(t, srv, "lobby", 2)
}

// ---- Chat ----

func TestRawClientsChatInTheirRoomOnly(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithClientPublish(true))
	alice := srv.DialRaw("/ws?room=chat")
	bob := srv.DialRaw("/ws/chat")
	outsider := srv.DialRaw("/ws?room=other")

	alice.Send("hi bob")
	alice.ExpectText("hi bob") // the sender gets its own message too
	bob.ExpectText("hi bob")
	bob.Send("hi alice")
	bob.ExpectText("hi alice")
	alice.ExpectText("hi alice")

	// Both chat messages were fanned out before bob read them; had the
	// outsider been sent one, it would be read before this.
	srv.Publish("other", []byte("other room only"))
	outsider.ExpectText("other room only")
	// A client's publish is counted once its fan-out returned, which may be
	// after the subscribers read it.
	pubsubtest.WaitFor(t, "three publishes counted", func() bool { return srv.Stats().Published == 3 })
}

// ---- Client publishing policy ----

func TestRawClientPublishPolicy(t *testing.T) {
	t.Parallel()
	allowAll := func(context.Context, pubsub.Client, pubsub.Action, string) error { return nil }
	denyPublish := func(_ context.Context, _ pubsub.Client, a pubsub.Action, _ string) error {
		if a == pubsub.ActionPublish {
			return pubsub.ErrForbidden
		}
		return nil
	}
	panicOnPublish := func(_ context.Context, _ pubsub.Client, a pubsub.Action, _ string) error {
		if a == pubsub.ActionPublish {
			panic("authorize bug")
		}
		return nil
	}
	tests := []struct {
		name       string
		opts       []pubsub.Option
		published  bool
		closeCode  protocol.CloseCode
		hookPanics uint64
	}{
		{name: "default refuses with 1008", closeCode: protocol.ClosePolicyViolation},
		{name: "WithClientPublish(false) refuses with 1008", opts: []pubsub.Option{pubsub.WithClientPublish(false)}, closeCode: protocol.ClosePolicyViolation},
		{name: "WithClientPublish(true) allows", opts: []pubsub.Option{pubsub.WithClientPublish(true)}, published: true},
		{
			name: "authorize allowing overrides WithClientPublish(false)",
			opts: []pubsub.Option{pubsub.WithClientPublish(false), pubsub.WithAuthorize(allowAll)}, published: true,
		},
		{
			name: "authorize allowing overrides the default",
			opts: []pubsub.Option{pubsub.WithAuthorize(allowAll)}, published: true,
		},
		{
			name: "authorize denying overrides WithClientPublish(true)",
			opts: []pubsub.Option{pubsub.WithClientPublish(true), pubsub.WithAuthorize(denyPublish)}, closeCode: protocol.ClosePolicyViolation,
		},
		{
			name: "authorize panicking closes with 1011",
			opts: []pubsub.Option{pubsub.WithClientPublish(true), pubsub.WithAuthorize(panicOnPublish)}, closeCode: protocol.CloseInternalError, hookPanics: 1,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			srv := pubsubtest.Start(t, tt.opts...)
			sender := srv.DialRaw("/ws?room=policy")
			listener := srv.DialRaw("/ws?room=policy")

			sender.Send("from sender")
			if tt.published {
				listener.ExpectText("from sender")
				sender.ExpectText("from sender")
			} else {
				sender.ExpectClose(tt.closeCode)
				// The refused frame reached no one, and the listener is still served.
				srv.Publish("policy", []byte("marker"))
				listener.ExpectText("marker")
			}
			if got := srv.Stats().HookPanics; got != tt.hookPanics {
				t.Fatalf("Stats().HookPanics = %d, want %d", got, tt.hookPanics)
			}
		})
	}
}

type rawAuthzCall struct {
	action pubsub.Action
	room   string
}

func TestRawAuthorizeIsAskedAboutSubscribeThenEachPublish(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	var calls []rawAuthzCall
	var ids []string
	var hooks hookLog
	srv := pubsubtest.Start(t, hooks.options(pubsub.WithAuthorize(func(_ context.Context, c pubsub.Client, a pubsub.Action, room string) error {
		mu.Lock()
		defer mu.Unlock()
		calls = append(calls, rawAuthzCall{a, room})
		ids = append(ids, c.ID)
		return nil
	}))...)
	c := srv.DialRaw("/ws/audit")
	id := hooks.connected(t, 1).ID
	c.Send("one")
	c.ExpectText("one")
	c.Send("two")
	c.ExpectText("two")

	mu.Lock()
	defer mu.Unlock()
	want := []rawAuthzCall{{pubsub.ActionSubscribe, "audit"}, {pubsub.ActionPublish, "audit"}, {pubsub.ActionPublish, "audit"}}
	if !slices.Equal(calls, want) {
		t.Fatalf("authorize calls %v, want %v", calls, want)
	}
	for _, got := range ids {
		if got != id {
			t.Fatalf("authorize saw client %q, want the connection's id %q", got, id)
		}
	}
}

// ---- WithOnMessage ----

func rawEchoHook(_ context.Context, m *pubsub.ClientMessage) error {
	return m.Reply([]byte("Server received: " + string(m.Data)))
}

func TestRawOnMessageEchoServerRepliesAndDoesNotPublish(t *testing.T) {
	t.Parallel()
	// WithClientPublish(true) too: only the hook keeps frames out of the room.
	srv := pubsubtest.Start(t, pubsub.WithOnMessage(rawEchoHook), pubsub.WithClientPublish(true))
	sender := srv.DialRaw("/ws?room=echo")
	listener := srv.DialRaw("/ws?room=echo")

	sender.Send("one")
	sender.Send("two")
	// Had "one" been published, the sender would read it before this reply.
	sender.ExpectText("Server received: one")
	sender.ExpectText("Server received: two")

	// The reader handled both frames completely before the second reply.
	srv.Publish("echo", []byte("marker"))
	listener.ExpectText("marker")
	sender.ExpectText("marker")
	if n := srv.Stats().Published; n != 1 {
		t.Fatalf("Stats().Published = %d, want 1 (the marker only)", n)
	}
}

func TestRawOnMessageFailureClosesOnlyThatClient(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		hook       func(context.Context, *pubsub.ClientMessage) error
		code       protocol.CloseCode
		hookPanics uint64
	}{
		{
			name: "error closes with 1008",
			hook: func(context.Context, *pubsub.ClientMessage) error { return errors.New("bad command") },
			code: protocol.ClosePolicyViolation,
		},
		{
			name:       "panic closes with 1011",
			hook:       func(context.Context, *pubsub.ClientMessage) error { panic("on message bug") },
			code:       protocol.CloseInternalError,
			hookPanics: 1,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			srv := pubsubtest.Start(t, pubsub.WithOnMessage(tt.hook))
			bad := srv.DialRaw("/ws?room=ops")
			good := srv.DialRaw("/ws?room=ops")
			bad.Send("do it")
			bad.ExpectClose(tt.code)
			if got := srv.Stats().HookPanics; got != tt.hookPanics {
				t.Fatalf("Stats().HookPanics = %d, want %d", got, tt.hookPanics)
			}
			srv.Publish("ops", []byte("others still served"))
			good.ExpectText("others still served")
		})
	}
}

func TestRawOnMessageSeesClientAndFrame(t *testing.T) {
	t.Parallel()
	type seen struct {
		client pubsub.Client
		room   string
		data   []byte
		binary bool
	}
	msgs := make(chan seen, 4)
	var hooks hookLog
	srv := pubsubtest.Start(t, hooks.options(
		pubsub.WithAuthenticate(func(*http.Request) (pubsub.Identity, error) {
			return pubsub.Identity{UserID: "user-42"}, nil
		}),
		pubsub.WithOnMessage(func(_ context.Context, m *pubsub.ClientMessage) error {
			offer(msgs, seen{m.Client, m.Room, bytes.Clone(m.Data), m.Binary})
			return nil
		}))...)
	c := srv.DialRaw("/ws/desk")
	id := hooks.connected(t, 1).ID

	frames := []struct {
		binary bool
		data   []byte
	}{
		{false, []byte("typed")},
		{true, []byte("utf-8, but sent as binary")},
		{true, []byte{0xff, 0x01}},
	}
	for _, f := range frames {
		if f.binary {
			c.SendBinary(f.data)
		} else {
			c.Send(string(f.data))
		}
		m := pubsubtest.Receive(t, msgs, "the message hook")
		if m.client.ID != id || m.client.UserID != "user-42" || m.client.Mode != pubsub.ModeRaw || m.client.RemoteAddr == "" {
			t.Fatalf("hook saw client %+v, want id %q, user-42, raw mode, a remote address", m.client, id)
		}
		if m.room != "desk" {
			t.Fatalf("hook saw room %q, want desk", m.room)
		}
		if !bytes.Equal(m.data, f.data) || m.binary != f.binary {
			t.Fatalf("hook saw %q binary=%v, want %q binary=%v", m.data, m.binary, f.data, f.binary)
		}
	}
}
