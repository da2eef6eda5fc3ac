package pubsub_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/roomcast/pubsub/protocol"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub"
)

// Helpers of this file carry a "raw" prefix so they cannot collide with
// helpers other test files add to package pubsub_test.

// rawServer mounts h at each of patterns on a fresh ServeMux, for tests that
// need routes other than newServer's "/ws" and "/ws/". Cleanup closes the
// handler first, then the server, like newServer.
func rawServer(t *testing.T, patterns []string, opts ...pubsub.Option) (*pubsub.Handler, *httptest.Server) {
	t.Helper()
	h := pubsub.NewHandler(append([]pubsub.Option{pubsub.WithLogger(quietLogger())}, opts...)...)
	mux := http.NewServeMux()
	for _, p := range patterns {
		mux.Handle(p, h)
	}
	srv := httptest.NewServer(mux)
	t.Cleanup(func() {
		h.Close()
		srv.Close()
	})
	return h, srv
}

// rawDial dials with opts (headers, ping callbacks) and fails the test on
// error. The connection is closed at cleanup.
func rawDial(t *testing.T, url string, opts *websocket.DialOptions) *websocket.Conn {
	t.Helper()
	c, resp, err := websocket.Dial(testCtx(t), url, opts)
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

// rawHeader builds a header from key, value pairs.
func rawHeader(kv ...string) http.Header {
	h := http.Header{}
	for i := 0; i+1 < len(kv); i += 2 {
		h.Add(kv[i], kv[i+1])
	}
	return h
}

// rawRecv waits for one value on ch, bounded by the test's timeout.
func rawRecv[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-testCtx(t).Done():
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

// rawNotify sends v on ch without blocking, for hooks that report to a test.
func rawNotify[T any](ch chan<- T, v T) {
	select {
	case ch <- v:
	default:
	}
}

// rawOnConnect reports every connected client on the returned channel.
func rawOnConnect() (pubsub.Option, <-chan pubsub.Client) {
	ch := make(chan pubsub.Client, 16)
	return pubsub.WithOnConnect(func(e pubsub.ConnectEvent) { rawNotify(ch, e.Client) }), ch
}

// rawOnDisconnect reports every disconnect on the returned channel.
func rawOnDisconnect() (pubsub.Option, <-chan pubsub.DisconnectEvent) {
	ch := make(chan pubsub.DisconnectEvent, 16)
	return pubsub.WithOnDisconnect(func(e pubsub.DisconnectEvent) { rawNotify(ch, e) }), ch
}

func rawWrite(t *testing.T, c *websocket.Conn, typ websocket.MessageType, data []byte) {
	t.Helper()
	if err := c.Write(testCtx(t), typ, data); err != nil {
		t.Fatalf("write %v %q: %v", typ, data, err)
	}
}

func rawWriteText(t *testing.T, c *websocket.Conn, s string) {
	t.Helper()
	rawWrite(t, c, websocket.MessageText, []byte(s))
}

// rawReadBinary reads one frame and expects it to be binary equal to want.
func rawReadBinary(t *testing.T, c *websocket.Conn, want []byte) {
	t.Helper()
	typ, b := readFrame(t, c)
	if typ != websocket.MessageBinary || !bytes.Equal(b, want) {
		t.Fatalf("read %v %x, want binary %x", typ, b, want)
	}
}

func rawPublish(t *testing.T, h *pubsub.Handler, room, data string) {
	t.Helper()
	if err := h.Publish(testCtx(t), room, []byte(data)); err != nil {
		t.Fatalf("Publish(%q, %q): %v", room, data, err)
	}
}

// rawInRoom checks, right after a dial, which clients the room holds: a
// raw client joins its room before the upgrade answers.
func rawInRoom(t *testing.T, h *pubsub.Handler, room string, want int) {
	t.Helper()
	if got := len(h.Connections(room)); got != want {
		t.Fatalf("room %q has %d connections, want %d", room, got, want)
	}
}

// rawFrame is one result of a background read.
type rawFrame struct {
	typ  websocket.MessageType
	data []byte
	err  error
}

// rawReadLoop keeps a Read pending on c (so the client answers pings) and
// hands every frame, then the error that ended reading, to the returned
// channel. Cleanup stops it.
func rawReadLoop(t *testing.T, c *websocket.Conn) <-chan rawFrame {
	out := make(chan rawFrame)
	done := make(chan struct{})
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		for {
			typ, b, err := c.Read(context.Background())
			select {
			case out <- rawFrame{typ, b, err}:
			case <-done:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() {
		close(done)
		c.CloseNow()
		<-exited
	})
	return out
}

// rawNextText takes the next frame of a rawReadLoop and expects text want.
func rawNextText(t *testing.T, frames <-chan rawFrame, want string) {
	t.Helper()
	f := rawRecv(t, frames, "a frame")
	if f.err != nil {
		t.Fatalf("read: %v, want text %q", f.err, want)
	}
	if f.typ != websocket.MessageText || string(f.data) != want {
		t.Fatalf("read %v %q, want text %q", f.typ, f.data, want)
	}
}

// rawRefused checks how many upgrades the handler has refused.
func rawRefused(t *testing.T, h *pubsub.Handler, want uint64) {
	t.Helper()
	if got := h.Stats().Refused; got != want {
		t.Fatalf("Stats().Refused = %d, want %d", got, want)
	}
}

// ---- Room selection ----

func TestRawRoomSelection(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		opts     []pubsub.Option
		patterns []string // nil: newServer's "/ws" and "/ws/"
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
			var h *pubsub.Handler
			var srv *httptest.Server
			if tt.patterns == nil {
				h, srv = newServer(t, tt.opts...)
			} else {
				h, srv = rawServer(t, tt.patterns, tt.opts...)
			}
			c := dial(t, wsURL(srv, tt.path))
			rawInRoom(t, h, tt.room, 1)
			for _, other := range tt.notRooms {
				rawInRoom(t, h, other, 0)
				rawPublish(t, h, other, "wrong room "+other)
			}
			rawPublish(t, h, tt.room, "hello "+tt.room)
			readText(t, c, "hello "+tt.room)
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
			onConnect, connected := rawOnConnect()
			h, srv := newServer(t, append(tt.opts, onConnect)...)
			c := dial(t, wsURL(srv, tt.path))
			id := rawRecv(t, connected, "the connect hook").ID
			if n := h.Stats().Rooms; n != 0 {
				t.Fatalf("Stats().Rooms = %d with one roomless client, want 0", n)
			}
			if err := h.PublishToConn(testCtx(t), id, []byte("just for you")); err != nil {
				t.Fatalf("PublishToConn: %v", err)
			}
			readText(t, c, "just for you")

			rawWriteText(t, c, "anyone there?")
			expectClose(t, c, protocol.ClosePolicyViolation)
			if n := h.Stats().Published; n != 0 {
				t.Fatalf("Stats().Published = %d, want 0", n)
			}
		})
	}
}

// ---- Chat ----

func TestRawClientsChatInTheirRoomOnly(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithClientPublish(true))
	alice := dial(t, wsURL(srv, "/ws?room=chat"))
	bob := dial(t, wsURL(srv, "/ws/chat"))
	outsider := dial(t, wsURL(srv, "/ws?room=other"))

	rawWriteText(t, alice, "hi bob")
	readText(t, alice, "hi bob") // the sender gets its own message too
	readText(t, bob, "hi bob")
	rawWriteText(t, bob, "hi alice")
	readText(t, bob, "hi alice")
	readText(t, alice, "hi alice")

	// Both chat messages were fanned out before bob read them; had the
	// outsider been sent one, it would be read before this.
	rawPublish(t, h, "other", "other room only")
	readText(t, outsider, "other room only")
	// A client's publish is counted once its fan-out returned, which may be
	// after the subscribers read it.
	waitFor(t, "three publishes counted", func() bool { return h.Stats().Published == 3 })
}

func TestRawBinaryFramesArePublishedVerbatimAsBinary(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t, pubsub.WithClientPublish(true))
	alice := dial(t, wsURL(srv, "/ws?room=files"))
	bob := dial(t, wsURL(srv, "/ws?room=files"))

	blob := []byte{0xff, 0x00, 0xfe, 0x80, 'x', 0xc3} // not UTF-8
	rawWrite(t, alice, websocket.MessageBinary, blob)
	rawReadBinary(t, bob, blob)
	rawReadBinary(t, alice, blob)

	// The frame type follows the payload, not the sender's frame: UTF-8
	// bytes sent in a binary frame reach raw clients as text.
	rawWrite(t, alice, websocket.MessageBinary, []byte("plain"))
	readText(t, bob, "plain")
}

func TestRawServerPublishArrivesAsTextOrBinaryByContent(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t)
	c := dial(t, wsURL(srv, "/ws?room=feed"))
	tests := []struct {
		name string
		data []byte
		typ  websocket.MessageType
	}{
		{"plain text", []byte("héllo ✓"), websocket.MessageText},
		{"JSON", []byte(`{"price":42}`), websocket.MessageText},
		{"not UTF-8", []byte{0xc3, 0x28, 0x00, 0xff}, websocket.MessageBinary},
	}
	for _, tt := range tests {
		if err := h.Publish(testCtx(t), "feed", tt.data); err != nil {
			t.Fatalf("%s: Publish: %v", tt.name, err)
		}
		typ, b := readFrame(t, c)
		if typ != tt.typ || !bytes.Equal(b, tt.data) {
			t.Fatalf("%s: read %v %q, want %v %q", tt.name, typ, b, tt.typ, tt.data)
		}
	}
}

// ---- Client publishing policy ----

type rawAuthzCall struct {
	action pubsub.Action
	room   string
}

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
			h, srv := newServer(t, tt.opts...)
			sender := dial(t, wsURL(srv, "/ws?room=policy"))
			listener := dial(t, wsURL(srv, "/ws?room=policy"))

			rawWriteText(t, sender, "from sender")
			if tt.published {
				readText(t, listener, "from sender")
				readText(t, sender, "from sender")
			} else {
				expectClose(t, sender, tt.closeCode)
				// The refused frame reached no one, and the listener is still served.
				rawPublish(t, h, "policy", "marker")
				readText(t, listener, "marker")
			}
			if got := h.Stats().HookPanics; got != tt.hookPanics {
				t.Fatalf("Stats().HookPanics = %d, want %d", got, tt.hookPanics)
			}
		})
	}
}

func TestRawAuthorizeIsAskedAboutSubscribeThenEachPublish(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	var calls []rawAuthzCall
	var ids []string
	onConnect, connected := rawOnConnect()
	_, srv := newServer(t, onConnect, pubsub.WithAuthorize(func(_ context.Context, c pubsub.Client, a pubsub.Action, room string) error {
		mu.Lock()
		defer mu.Unlock()
		calls = append(calls, rawAuthzCall{a, room})
		ids = append(ids, c.ID)
		return nil
	}))
	c := dial(t, wsURL(srv, "/ws/audit"))
	id := rawRecv(t, connected, "the connect hook").ID
	rawWriteText(t, c, "one")
	readText(t, c, "one")
	rawWriteText(t, c, "two")
	readText(t, c, "two")

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

func TestRawAuthorizeDenyingSubscribeRefusesUpgradeWith403(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithAuthorize(func(_ context.Context, _ pubsub.Client, a pubsub.Action, room string) error {
		if a == pubsub.ActionSubscribe && room == "vault" {
			return pubsub.ErrForbidden
		}
		return nil
	}))
	dialStatus(t, wsURL(srv, "/ws?room=vault"), nil, http.StatusForbidden)
	dialStatus(t, wsURL(srv, "/ws/vault"), nil, http.StatusForbidden)
	rawRefused(t, h, 2)
	rawInRoom(t, h, "vault", 0)

	c := dial(t, wsURL(srv, "/ws?room=lobby"))
	rawPublish(t, h, "lobby", "welcome")
	readText(t, c, "welcome")
}

func TestRawAuthorizePanicRefusesUpgradeWith500AndServerKeepsServing(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithAuthorize(func(_ context.Context, _ pubsub.Client, _ pubsub.Action, room string) error {
		if room == "boom" {
			panic("authorize bug")
		}
		return nil
	}))
	dialStatus(t, wsURL(srv, "/ws?room=boom"), nil, http.StatusInternalServerError)
	if got := h.Stats().HookPanics; got != 1 {
		t.Fatalf("Stats().HookPanics = %d, want 1", got)
	}
	rawRefused(t, h, 1)

	c := dial(t, wsURL(srv, "/ws?room=fine"))
	rawPublish(t, h, "fine", "still serving")
	readText(t, c, "still serving")
}

// ---- WithOnMessage ----

func rawEchoHook(_ context.Context, m *pubsub.ClientMessage) error {
	return m.Reply([]byte("Server received: " + string(m.Data)))
}

func TestRawOnMessageEchoServerRepliesAndDoesNotPublish(t *testing.T) {
	t.Parallel()
	// WithClientPublish(true) too: only the hook keeps frames out of the room.
	h, srv := newServer(t, pubsub.WithOnMessage(rawEchoHook), pubsub.WithClientPublish(true))
	sender := dial(t, wsURL(srv, "/ws?room=echo"))
	listener := dial(t, wsURL(srv, "/ws?room=echo"))

	rawWriteText(t, sender, "one")
	rawWriteText(t, sender, "two")
	// Had "one" been published, the sender would read it before this reply.
	readText(t, sender, "Server received: one")
	readText(t, sender, "Server received: two")

	// The reader handled both frames completely before the second reply.
	rawPublish(t, h, "echo", "marker")
	readText(t, listener, "marker")
	readText(t, sender, "marker")
	if n := h.Stats().Published; n != 1 {
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
			h, srv := newServer(t, pubsub.WithOnMessage(tt.hook))
			bad := dial(t, wsURL(srv, "/ws?room=ops"))
			good := dial(t, wsURL(srv, "/ws?room=ops"))
			rawWriteText(t, bad, "do it")
			expectClose(t, bad, tt.code)
			if got := h.Stats().HookPanics; got != tt.hookPanics {
				t.Fatalf("Stats().HookPanics = %d, want %d", got, tt.hookPanics)
			}
			rawPublish(t, h, "ops", "others still served")
			readText(t, good, "others still served")
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
	onConnect, connected := rawOnConnect()
	_, srv := newServer(t, onConnect,
		pubsub.WithAuthenticate(func(*http.Request) (pubsub.Identity, error) {
			return pubsub.Identity{UserID: "user-42"}, nil
		}),
		pubsub.WithOnMessage(func(_ context.Context, m *pubsub.ClientMessage) error {
			rawNotify(msgs, seen{m.Client, m.Room, bytes.Clone(m.Data), m.Binary})
			return nil
		}))
	c := dial(t, wsURL(srv, "/ws/desk"))
	id := rawRecv(t, connected, "the connect hook").ID

	frames := []struct {
		typ  websocket.MessageType
		data []byte
	}{
		{websocket.MessageText, []byte("typed")},
		{websocket.MessageBinary, []byte("utf-8, but sent as binary")},
		{websocket.MessageBinary, []byte{0xff, 0x01}},
	}
	for _, f := range frames {
		rawWrite(t, c, f.typ, f.data)
		m := rawRecv(t, msgs, "the message hook")
		if m.client.ID != id || m.client.UserID != "user-42" || m.client.Mode != pubsub.ModeRaw || m.client.RemoteAddr == "" {
			t.Fatalf("hook saw client %+v, want id %q, user-42, raw mode, a remote address", m.client, id)
		}
		if m.room != "desk" {
			t.Fatalf("hook saw room %q, want desk", m.room)
		}
		if !bytes.Equal(m.data, f.data) || m.binary != (f.typ == websocket.MessageBinary) {
			t.Fatalf("hook saw %q binary=%v, want %q binary=%v", m.data, m.binary, f.data, f.typ == websocket.MessageBinary)
		}
	}
}

// ---- Rate limit ----

func TestRawRateLimitClosesWith4004(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithClientPublish(true), pubsub.WithRateLimit(1, 3))
	flooder := dial(t, wsURL(srv, "/ws?room=busy"))
	listener := dial(t, wsURL(srv, "/ws?room=busy"))

	for _, m := range []string{"m1", "m2", "m3", "m4"} {
		rawWriteText(t, flooder, m)
	}
	expectClose(t, flooder, protocol.CloseRateLimited)
	// The burst of three went through; the fourth did not.
	readText(t, listener, "m1")
	readText(t, listener, "m2")
	readText(t, listener, "m3")
	rawPublish(t, h, "busy", "marker")
	readText(t, listener, "marker")
	if got := h.Stats().RateLimited; got != 1 {
		t.Fatalf("Stats().RateLimited = %d, want 1", got)
	}
}

// ---- Room validation ----

func TestRawInvalidRoomRefusesUpgradeWith400(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("a", 128+1)
	tests := []struct {
		name string
		path string
	}{
		{"empty room query", "/ws?room="},
		{"space", "/ws?room=bad%20room"},
		{"angle bracket", "/ws?room=a%3Cb"},
		{"non-ASCII", "/ws?room=caf%C3%A9"},
		{"over 128 bytes", "/ws?room=" + long},
		{"space in the path", "/ws/bad%20room"},
		{"over 128 bytes in the path", "/ws/" + long},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			h, srv := newServer(t)
			dialStatus(t, wsURL(srv, tt.path), nil, http.StatusBadRequest)
			rawRefused(t, h, 1)
			if n := h.Stats().Rooms; n != 0 {
				t.Fatalf("Stats().Rooms = %d after a refused upgrade, want 0", n)
			}
		})
	}
	t.Run("exactly 128 bytes is accepted", func(t *testing.T) {
		t.Parallel()
		h, srv := newServer(t)
		room := strings.Repeat("a", 128)
		c := dial(t, wsURL(srv, "/ws?room="+room))
		rawPublish(t, h, room, "fits")
		readText(t, c, "fits")
	})
}

func TestRawCustomRoomValidator(t *testing.T) {
	t.Parallel()
	validator := pubsub.WithRoomValidator(func(room string) error {
		if !strings.HasPrefix(room, "team-") {
			return errors.New("rooms start with team-")
		}
		return nil
	})
	h, srv := newServer(t, validator)
	// The default would refuse this name, and accept "lobby".
	dialStatus(t, wsURL(srv, "/ws?room=lobby"), nil, http.StatusBadRequest)
	c := dial(t, wsURL(srv, "/ws?room=team-caf%C3%A9"))
	rawPublish(t, h, "team-café", "accepted")
	readText(t, c, "accepted")
	rawRefused(t, h, 1)
}

// ---- Authentication ----

// rawTokenAuth reads a token from the Authorization header, a "session"
// cookie or the "token" query parameter.
// calls, when not nil, counts the hook's calls.
func rawTokenAuth(calls *atomic.Int64) func(*http.Request) (pubsub.Identity, error) {
	return func(r *http.Request) (pubsub.Identity, error) {
		if calls != nil {
			calls.Add(1)
		}
		tok, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if ck, err := r.Cookie("session"); tok == "" && err == nil {
			tok = ck.Value
		}
		if tok == "" {
			tok = r.URL.Query().Get("token")
		}
		switch tok {
		case "":
			return pubsub.Identity{}, pubsub.ErrUnauthorized
		case "alice-token":
			return pubsub.Identity{UserID: "alice"}, nil
		case "banned":
			return pubsub.Identity{}, pubsub.ErrForbidden
		case "suspended":
			return pubsub.Identity{}, fmt.Errorf("account suspended: %w", pubsub.ErrForbidden)
		case "buggy":
			panic("authenticate bug")
		default:
			return pubsub.Identity{}, errors.New("unknown token")
		}
	}
}

func TestRawAuthentication(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		path       string
		header     http.Header
		status     int // 0: upgraded as alice
		hookPanics uint64
	}{
		{name: "bearer header", path: "/ws?room=lobby", header: rawHeader("Authorization", "Bearer alice-token")},
		{name: "session cookie", path: "/ws?room=lobby", header: rawHeader("Cookie", "session=alice-token")},
		{name: "query token", path: "/ws?room=lobby&token=alice-token"},
		{name: "no room, query token", path: "/ws?token=alice-token"},
		{name: "missing token is 401", path: "/ws?room=lobby", status: http.StatusUnauthorized},
		{name: "unknown token is 401", path: "/ws?room=lobby&token=forged", status: http.StatusUnauthorized},
		{name: "ErrForbidden is 403", path: "/ws?room=lobby&token=banned", status: http.StatusForbidden},
		{name: "error wrapping ErrForbidden is 403", path: "/ws?room=lobby&token=suspended", status: http.StatusForbidden},
		{name: "panic is 500", path: "/ws?room=lobby&token=buggy", status: http.StatusInternalServerError, hookPanics: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			authzUsers := make(chan string, 4)
			onConnect, connected := rawOnConnect()
			h, srv := newServer(t, onConnect, pubsub.WithAuthenticate(rawTokenAuth(nil)),
				pubsub.WithAuthorize(func(_ context.Context, c pubsub.Client, _ pubsub.Action, _ string) error {
					rawNotify(authzUsers, c.UserID)
					return nil
				}))
			if tt.status != 0 {
				dialStatus(t, wsURL(srv, tt.path), tt.header, tt.status)
				rawRefused(t, h, 1)
				if got := h.Stats().HookPanics; got != tt.hookPanics {
					t.Fatalf("Stats().HookPanics = %d, want %d", got, tt.hookPanics)
				}
				if len(authzUsers) != 0 {
					t.Fatal("authorize was consulted for an unauthenticated client")
				}
				// A refused client never breaks the next one.
				dial(t, wsURL(srv, "/ws?token=alice-token"))
				return
			}
			c := rawDial(t, wsURL(srv, tt.path), &websocket.DialOptions{HTTPHeader: tt.header})
			if cl := rawRecv(t, connected, "the connect hook"); cl.UserID != "alice" {
				t.Fatalf("connect hook saw UserID %q, want alice", cl.UserID)
			}
			if strings.Contains(tt.path, "room=") {
				if u := rawRecv(t, authzUsers, "the authorize hook"); u != "alice" {
					t.Fatalf("authorize hook saw UserID %q, want alice", u)
				}
			}
			if err := h.PublishToUser(testCtx(t), "alice", []byte("hi alice")); err != nil {
				t.Fatalf("PublishToUser: %v", err)
			}
			readText(t, c, "hi alice")
			rawRefused(t, h, 0)
		})
	}
}

// ---- Origin ----

func TestRawOriginCheck(t *testing.T) {
	t.Parallel()
	const self = "{self}" // replaced by the test server's own origin
	patterns := pubsub.WithOriginPatterns("*.example.com")
	scheme := pubsub.WithOriginPatterns("https://trusted.io")
	tests := []struct {
		name    string
		opts    []pubsub.Option
		origin  string
		allowed bool
	}{
		{name: "no Origin header", allowed: true},
		{name: "same origin", origin: self, allowed: true},
		{name: "foreign origin", origin: "https://evil.com"},
		{name: "same host, other port", origin: "http://127.0.0.1:1"},
		{name: "opaque origin null", origin: "null"},
		{name: "pattern matches a subdomain", opts: []pubsub.Option{patterns}, origin: "https://app.example.com", allowed: true},
		{name: "pattern is case-insensitive", opts: []pubsub.Option{patterns}, origin: "https://APP.Example.com", allowed: true},
		{name: "pattern rejects another site", opts: []pubsub.Option{patterns}, origin: "https://evil.com"},
		{name: "pattern rejects a suffix trick", opts: []pubsub.Option{patterns}, origin: "https://app.example.com.evil.com"},
		{name: "pattern still allows same origin", opts: []pubsub.Option{patterns}, origin: self, allowed: true},
		{name: "scheme pattern allows its scheme", opts: []pubsub.Option{scheme}, origin: "https://trusted.io", allowed: true},
		{name: "scheme pattern rejects another scheme", opts: []pubsub.Option{scheme}, origin: "http://trusted.io"},
		{name: "insecure skip allows any origin", opts: []pubsub.Option{pubsub.WithInsecureSkipOriginCheck()}, origin: "https://evil.com", allowed: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			h, srv := newServer(t, tt.opts...)
			origin := strings.ReplaceAll(tt.origin, self, srv.URL)
			var header http.Header
			if origin != "" {
				header = rawHeader("Origin", origin)
			}
			url := wsURL(srv, "/ws?room=lobby")
			if !tt.allowed {
				dialStatus(t, url, header, http.StatusForbidden)
				rawRefused(t, h, 1)
				return
			}
			c := rawDial(t, url, &websocket.DialOptions{HTTPHeader: header})
			rawPublish(t, h, "lobby", "allowed")
			readText(t, c, "allowed")
		})
	}
}

func TestRawOriginIsCheckedBeforeAuthentication(t *testing.T) {
	t.Parallel()
	var calls atomic.Int64
	h, srv := newServer(t, pubsub.WithAuthenticate(rawTokenAuth(&calls)))
	url := wsURL(srv, "/ws?room=lobby")
	dialStatus(t, url, rawHeader("Origin", "https://evil.com", "Authorization", "Bearer alice-token"), http.StatusForbidden)
	if n := calls.Load(); n != 0 {
		t.Fatalf("authenticate ran %d times for a foreign origin, want 0", n)
	}
	// The same request from our own origin does reach the hook.
	rawDial(t, url, &websocket.DialOptions{HTTPHeader: rawHeader("Origin", srv.URL, "Authorization", "Bearer alice-token")})
	if n := calls.Load(); n != 1 {
		t.Fatalf("authenticate ran %d times for an allowed origin, want 1", n)
	}
	rawRefused(t, h, 1)
}

// ---- Handshake ----

func TestRawNonWebSocketRequestGets426(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		method string
		header http.Header
	}{
		{name: "plain GET", method: http.MethodGet},
		{name: "plain POST", method: http.MethodPost},
		{name: "POST with upgrade headers", method: http.MethodPost, header: rawHeader("Connection", "Upgrade", "Upgrade", "websocket")},
		{name: "Upgrade without Connection", method: http.MethodGet, header: rawHeader("Upgrade", "websocket")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			h, srv := newServer(t)
			req, err := http.NewRequestWithContext(testCtx(t), tt.method, srv.URL+"/ws?room=lobby", strings.NewReader("body"))
			if err != nil {
				t.Fatal(err)
			}
			for k, v := range tt.header {
				req.Header[k] = v
			}
			resp, err := srv.Client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusUpgradeRequired {
				t.Fatalf("HTTP %d, want 426", resp.StatusCode)
			}
			if got := resp.Header.Get("Upgrade"); !strings.EqualFold(got, "websocket") {
				t.Fatalf("Upgrade header %q, want websocket", got)
			}
			rawRefused(t, h, 1)
			rawInRoom(t, h, "lobby", 0)
		})
	}
}

func TestRawSubprotocolNegotiation(t *testing.T) {
	t.Parallel()
	t.Run("foreign subprotocol only is 400", func(t *testing.T) {
		t.Parallel()
		h, srv := newServer(t)
		dialStatus(t, wsURL(srv, "/ws?room=lobby"), nil, http.StatusBadRequest, "chat.v2")
		rawRefused(t, h, 1)
	})
	t.Run("foreign and ours is protocol mode", func(t *testing.T) {
		t.Parallel()
		_, srv := newServer(t)
		c := dial(t, wsURL(srv, "/ws?room=lobby"), "chat.v2", protocol.Subprotocol)
		if got := c.Subprotocol(); got != protocol.Subprotocol {
			t.Fatalf("negotiated %q, want %q", got, protocol.Subprotocol)
		}
		typ, b := readFrame(t, c)
		if typ != websocket.MessageText || !strings.Contains(string(b), `"type":"welcome"`) {
			t.Fatalf("first frame %v %s, want the welcome envelope", typ, b)
		}
	})
}

// ---- Heartbeats ----

func TestRawHeartbeatKeepsReadingClientConnected(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name              string
		interval, timeout time.Duration
	}{
		// Budgets for a pong of 200ms or more, so a loaded machine cannot
		// fail a healthy client; the shapes are what matter.
		{"interval equal to timeout", 200 * time.Millisecond, 200 * time.Millisecond},
		// The defaults' shape (25s, 10s).
		{"interval longer than timeout", 400 * time.Millisecond, 200 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			onDisconnect, disconnected := rawOnDisconnect()
			h, srv := newServer(t, pubsub.WithHeartbeat(tt.interval, tt.timeout), onDisconnect)

			// The server pings a silent raw client at most once per interval,
			// so wantPings pings mean at least wantPings intervals went by.
			const wantPings = 3
			var pings atomic.Int32
			enough := make(chan struct{})
			c := rawDial(t, wsURL(srv, "/ws?room=hb"), &websocket.DialOptions{
				OnPingReceived: func(context.Context, []byte) bool {
					if pings.Add(1) == wantPings {
						close(enough)
					}
					return true // answer it
				},
			})
			frames := rawReadLoop(t, c)
			select {
			case <-enough:
			case f := <-frames:
				t.Fatalf("after %d pings the connection gave %v %q %v, want it open", pings.Load(), f.typ, f.data, f.err)
			case <-testCtx(t).Done():
				t.Fatalf("timed out after %d pings", pings.Load())
			}
			rawPublish(t, h, "hb", "still here")
			rawNextText(t, frames, "still here")
			select {
			case e := <-disconnected:
				t.Fatalf("disconnected with %d %q, want connected", e.Code, e.Reason)
			default:
			}
		})
	}
}

func TestRawHeartbeatClosesClientThatNeverReadsWith4001(t *testing.T) {
	t.Parallel()
	onConnect, connected := rawOnConnect()
	onDisconnect, disconnected := rawOnDisconnect()
	h, srv := newServer(t, pubsub.WithHeartbeat(50*time.Millisecond, 50*time.Millisecond), onConnect, onDisconnect)

	silent := dial(t, wsURL(srv, "/ws?room=hb")) // never reads, so never answers a ping
	silentID := rawRecv(t, connected, "the connect hook").ID
	live := dial(t, wsURL(srv, "/ws?room=hb"))
	liveFrames := rawReadLoop(t, live)

	// A connection that is closing takes no more messages. The probes queue
	// up unread on the silent client until then.
	waitFor(t, "the server to give up on the silent client", func() bool {
		return errors.Is(h.PublishToConn(testCtx(t), silentID, []byte("probe")), pubsub.ErrConnNotFound)
	})
	// Reading now lets the server's close handshake finish at once.
	expectClose(t, silent, protocol.CloseHeartbeatTimeout)
	e := rawRecv(t, disconnected, "the disconnect hook")
	if e.Client.ID != silentID || e.Code != protocol.CloseHeartbeatTimeout {
		t.Fatalf("disconnect of %s with %d %q, want %s with %d", e.Client.ID, e.Code, e.Reason, silentID, protocol.CloseHeartbeatTimeout)
	}

	// The client that kept reading outlived it and is still served.
	rawPublish(t, h, "hb", "after the timeout")
	rawNextText(t, liveFrames, "after the timeout")
	// The silent client leaves its room after the disconnect hook ran.
	waitFor(t, "the silent client to leave the room", func() bool { return len(h.Connections("hb")) == 1 })
}
