package pubsub_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/roomcast/pubsub/protocol"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub"
)

// This file tests the server-side API end to end: Publish and the direct
// publishes, Connections, Disconnect, Stats, the lifecycle hooks, slow
// consumers, Middleware, Shutdown and Close, and the Broker seam. Helpers
// of this file start with "api" so they cannot collide with other files.

// apiHooks records every OnConnect and OnDisconnect call of a Handler.
type apiHooks struct {
	mu          sync.Mutex
	connects    []pubsub.Client
	disconnects []pubsub.DisconnectEvent
}

func (r *apiHooks) options() []pubsub.Option {
	return []pubsub.Option{
		pubsub.WithOnConnect(func(e pubsub.ConnectEvent) {
			r.mu.Lock()
			r.connects = append(r.connects, e.Client)
			r.mu.Unlock()
		}),
		pubsub.WithOnDisconnect(func(e pubsub.DisconnectEvent) {
			r.mu.Lock()
			r.disconnects = append(r.disconnects, e)
			r.mu.Unlock()
		}),
	}
}

func (r *apiHooks) snapshot() ([]pubsub.Client, []pubsub.DisconnectEvent) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.connects), slices.Clone(r.disconnects)
}

// waitConnect waits for the n-th OnConnect call (1-based) and returns its
// Client. Dial one client at a time to know whose it is.
func (r *apiHooks) waitConnect(t *testing.T, n int) pubsub.Client {
	t.Helper()
	var cl pubsub.Client
	waitFor(t, fmt.Sprintf("OnConnect call #%d", n), func() bool {
		cs, _ := r.snapshot()
		if len(cs) < n {
			return false
		}
		cl = cs[n-1]
		return true
	})
	return cl
}

// disconnected reports whether OnDisconnect ran for the connection id.
func (r *apiHooks) disconnected(id string) (pubsub.DisconnectEvent, bool) {
	_, ds := r.snapshot()
	for _, d := range ds {
		if d.Client.ID == id {
			return d, true
		}
	}
	return pubsub.DisconnectEvent{}, false
}

// waitDisconnect waits for OnDisconnect of the connection id.
func (r *apiHooks) waitDisconnect(t *testing.T, id string) pubsub.DisconnectEvent {
	t.Helper()
	var ev pubsub.DisconnectEvent
	waitFor(t, "OnDisconnect of "+id, func() bool {
		var ok bool
		ev, ok = r.disconnected(id)
		return ok
	})
	return ev
}

// apiUserFromQuery authenticates a client as the "user" query parameter.
func apiUserFromQuery(r *http.Request) (pubsub.Identity, error) {
	return pubsub.Identity{UserID: r.URL.Query().Get("user")}, nil
}

// apiWaitStats waits until the Handler's Stats equal want exactly.
func apiWaitStats(t *testing.T, h *pubsub.Handler, want pubsub.Stats) {
	t.Helper()
	var got pubsub.Stats
	ctx := testCtx(t)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if got = h.Stats(); got == want {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("Stats:\n got %+v\nwant %+v", got, want)
		case <-tick.C:
		}
	}
}

// apiReadDirect reads the next envelope and expects a direct message.
func apiReadDirect(t *testing.T, p *protoClient) envelope {
	t.Helper()
	e := p.read()
	if e.Type != "direct" {
		t.Fatalf("got %s, want a direct message", e.raw)
	}
	if e.Room != "" || e.Seq != 0 || e.Epoch != "" {
		t.Fatalf("direct message %s carries room fields", e.raw)
	}
	return e
}

// apiCloseCode returns the close code of err, or -1 when err is not a close.
func apiCloseCode(err error) protocol.CloseCode {
	var ce websocket.CloseError
	if errors.As(err, &ce) {
		return protocol.CloseCode(ce.Code)
	}
	return -1
}

// ---------------------------------------------------------------- Publish

func TestPublishRejectsInvalidRoomWithErrInvalidRoom(t *testing.T) {
	t.Parallel()
	h, _ := newServer(t)
	ctx := testCtx(t)
	for _, room := range []string{"", "has space", "bad#char", strings.Repeat("r", 128+1)} {
		err := h.Publish(ctx, room, []byte("x"))
		if !errors.Is(err, pubsub.ErrInvalidRoom) {
			t.Errorf("Publish(%q) = %v, want ErrInvalidRoom", room, err)
		}
	}
	if s := h.Stats(); s.Published != 0 {
		t.Errorf("Stats().Published = %d after refused publishes, want 0", s.Published)
	}
}

func TestPublishRejectsPayloadOverQueueByteBoundWithErrTooLarge(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithQueueLimits(8, 100))
	c := dial(t, wsURL(srv, "/ws?room=big"))
	ctx := testCtx(t)

	err := h.Publish(ctx, "big", bytes.Repeat([]byte("x"), 101))
	if !errors.Is(err, pubsub.ErrTooLarge) {
		t.Fatalf("Publish of 101 bytes with a 100-byte queue bound = %v, want ErrTooLarge", err)
	}
	// Exactly the bound is accepted and delivered.
	fits := strings.Repeat("y", 100)
	if err := h.Publish(ctx, "big", []byte(fits)); err != nil {
		t.Fatalf("Publish of exactly the byte bound: %v", err)
	}
	readText(t, c, fits)
	if s := h.Stats(); s.Published != 1 {
		t.Errorf("Stats().Published = %d, want 1 (the refused publish does not count)", s.Published)
	}
}

func TestPublishReturnsErrClosedAfterClose(t *testing.T) {
	t.Parallel()
	h, _ := newServer(t)
	if err := h.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := h.Publish(testCtx(t), "room", []byte("x")); !errors.Is(err, pubsub.ErrClosed) {
		t.Fatalf("Publish after Close = %v, want ErrClosed", err)
	}
}

func TestPublishReturnsErrClosedAfterShutdown(t *testing.T) {
	t.Parallel()
	h, _ := newServer(t)
	if err := h.Shutdown(testCtx(t)); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := h.Publish(testCtx(t), "room", []byte("x")); !errors.Is(err, pubsub.ErrClosed) {
		t.Fatalf("Publish after Shutdown = %v, want ErrClosed", err)
	}
}

// apiHoldBroker is a memory broker that holds each delivery until release,
// as a networked broker delivers after Publish has returned.
type apiHoldBroker struct {
	pubsub.Broker
	deliver func(pubsub.Message)

	mu   sync.Mutex
	held []pubsub.Message
}

func (b *apiHoldBroker) Bind(deliver func(pubsub.Message)) {
	b.deliver = deliver
	b.Broker.Bind(func(m pubsub.Message) {
		b.mu.Lock()
		b.held = append(b.held, m)
		b.mu.Unlock()
	})
}

func (b *apiHoldBroker) release() {
	b.mu.Lock()
	held := b.held
	b.held = nil
	b.mu.Unlock()
	for _, m := range held {
		b.deliver(m)
	}
}

func TestPublishCopiesTheCallersData(t *testing.T) {
	t.Parallel()
	t.Run("delivered after Publish returned", func(t *testing.T) {
		t.Parallel()
		b := &apiHoldBroker{Broker: pubsub.NewMemoryBroker()}
		h, srv := newServer(t, pubsub.WithBroker(b))
		c := dial(t, wsURL(srv, "/ws?room=copy"))
		data := []byte("original")
		if err := h.Publish(testCtx(t), "copy", data); err != nil {
			t.Fatal(err)
		}
		copy(data, "MUTATED!")
		b.release()
		readText(t, c, "original")
	})
	t.Run("buffer reused at once", func(t *testing.T) {
		t.Parallel()
		h, srv := newServer(t)
		c := dial(t, wsURL(srv, "/ws?room=copy"))
		ctx := testCtx(t)
		buf := make([]byte, 8)
		const n = 50
		for i := range n {
			copy(buf, fmt.Sprintf("msg-%04d", i))
			if err := h.Publish(ctx, "copy", buf); err != nil {
				t.Fatal(err)
			}
		}
		copy(buf, "MUTATED!")
		for i := range n {
			readText(t, c, fmt.Sprintf("msg-%04d", i))
		}
	})
}

func TestPublishToRoomWithoutSubscribersIsNilErrorNoOp(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t)
	ctx := testCtx(t)
	if err := h.Publish(ctx, "empty", []byte(`"lost"`)); err != nil {
		t.Fatalf("Publish to a room without subscribers = %v, want nil", err)
	}
	if s := h.Stats(); s.Rooms != 0 {
		t.Fatalf("Stats().Rooms = %d after publishing to an empty room, want 0", s.Rooms)
	}
	// A later subscriber gets only what is published after it joined, and
	// the room's sequence starts at 1: the earlier publish left nothing.
	p := dialProto(t, wsURL(srv, "/ws"))
	p.subscribe("empty")
	if err := h.Publish(ctx, "empty", []byte(`"kept"`)); err != nil {
		t.Fatal(err)
	}
	e := p.readMessage("empty")
	if string(e.Data) != `"kept"` || e.Seq != 1 {
		t.Fatalf("first message %s, want data \"kept\" with seq 1", e.raw)
	}
}

// ---------------------------------------------------- direct publishes

func TestPublishToConnSendsDirectEnvelopeToProtocolClient(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t)
	p := dialProto(t, wsURL(srv, "/ws"))
	other := dialProto(t, wsURL(srv, "/ws"))
	ctx := testCtx(t)
	id := p.welcome.ConnID

	if err := h.PublishToConn(ctx, id, []byte(`{"a":1}`)); err != nil {
		t.Fatal(err)
	}
	if e := apiReadDirect(t, p); string(e.Data) != `{"a":1}` {
		t.Fatalf("JSON direct message %s, want data {\"a\":1}", e.raw)
	}
	if err := h.PublishToConn(ctx, id, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	if e := apiReadDirect(t, p); e.Text == nil || *e.Text != "hello" {
		t.Fatalf("text direct message %s, want text \"hello\"", e.raw)
	}
	if err := h.PublishToConn(ctx, id, []byte{0xff, 0x00}); err != nil {
		t.Fatal(err)
	}
	if e := apiReadDirect(t, p); e.Binary == nil || *e.Binary != "/wA=" {
		t.Fatalf("binary direct message %s, want binary \"/wA=\"", e.raw)
	}
	// Only the addressed connection got anything: the other's first
	// envelope is the marker sent to it afterwards.
	if err := h.PublishToConn(ctx, other.welcome.ConnID, []byte("marker")); err != nil {
		t.Fatal(err)
	}
	if e := apiReadDirect(t, other); e.Text == nil || *e.Text != "marker" {
		t.Fatalf("other connection got %s, want only its own marker", e.raw)
	}
}

func TestPublishToConnSendsVerbatimFramesToRawClient(t *testing.T) {
	t.Parallel()
	var hooks apiHooks
	h, srv := newServer(t, hooks.options()...)
	c := dial(t, wsURL(srv, "/ws")) // no room: direct messages only
	id := hooks.waitConnect(t, 1).ID
	ctx := testCtx(t)

	if err := h.PublishToConn(ctx, id, []byte(`{"a":1}`)); err != nil {
		t.Fatal(err)
	}
	readText(t, c, `{"a":1}`)
	if err := h.PublishToConn(ctx, id, []byte{0xff, 0x00}); err != nil {
		t.Fatal(err)
	}
	if typ, b := readFrame(t, c); typ != websocket.MessageBinary || !bytes.Equal(b, []byte{0xff, 0x00}) {
		t.Fatalf("got %v %x, want binary ff00", typ, b)
	}
}

func TestPublishToConnUnknownIDReturnsErrConnNotFound(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t)
	p := dialProto(t, wsURL(srv, "/ws"))
	ctx := testCtx(t)
	for _, id := range []string{"", "no-such-connection"} {
		if err := h.PublishToConn(ctx, id, []byte("x")); !errors.Is(err, pubsub.ErrConnNotFound) {
			t.Errorf("PublishToConn(%q) = %v, want ErrConnNotFound", id, err)
		}
	}
	// A connection that has gone is unknown too.
	id := p.welcome.ConnID
	p.c.Close(websocket.StatusNormalClosure, "")
	waitFor(t, "the closed connection to be forgotten", func() bool {
		return errors.Is(h.PublishToConn(ctx, id, []byte("x")), pubsub.ErrConnNotFound)
	})
}

func TestPublishToUserReachesEveryConnectionOfThatUserOnly(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithAuthenticate(apiUserFromQuery))
	tab1 := dialProto(t, wsURL(srv, "/ws?user=alice"))
	tab2 := dial(t, wsURL(srv, "/ws?user=alice")) // raw, no room
	bob := dialProto(t, wsURL(srv, "/ws?user=bob"))
	anon := dialProto(t, wsURL(srv, "/ws"))
	waitFor(t, "four connections", func() bool { return h.Stats().Connections == 4 })
	ctx := testCtx(t)

	if err := h.PublishToUser(ctx, "alice", []byte(`{"n":1}`)); err != nil {
		t.Fatal(err)
	}
	if e := apiReadDirect(t, tab1); string(e.Data) != `{"n":1}` {
		t.Fatalf("alice's protocol tab got %s", e.raw)
	}
	readText(t, tab2, `{"n":1}`)

	for _, p := range []*protoClient{bob, anon} {
		if err := h.PublishToConn(ctx, p.welcome.ConnID, []byte("marker")); err != nil {
			t.Fatal(err)
		}
		if e := apiReadDirect(t, p); e.Text == nil || *e.Text != "marker" {
			t.Fatalf("a connection of another user got %s before its marker", e.raw)
		}
	}
}

func TestPublishToUserUnknownUserReturnsErrConnNotFound(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithAuthenticate(apiUserFromQuery))
	dialProto(t, wsURL(srv, "/ws")) // anonymous: not a user
	ctx := testCtx(t)
	for _, user := range []string{"nobody", ""} {
		if err := h.PublishToUser(ctx, user, []byte("x")); !errors.Is(err, pubsub.ErrConnNotFound) {
			t.Errorf("PublishToUser(%q) = %v, want ErrConnNotFound", user, err)
		}
	}
}

// ---------------------------------------------------------- Connections

func TestConnectionsListsExactlyTheRoomSubscribers(t *testing.T) {
	t.Parallel()
	var hooks apiHooks
	h, srv := newServer(t, append(hooks.options(), pubsub.WithAuthenticate(apiUserFromQuery))...)
	alice := dialProto(t, wsURL(srv, "/ws?user=alice"))
	bob := dialProto(t, wsURL(srv, "/ws?user=bob"))
	anon := dialProto(t, wsURL(srv, "/ws"))
	alice.subscribe("lobby")
	bob.subscribe("lobby")
	anon.subscribe("other")
	raw := dial(t, wsURL(srv, "/ws/lobby?user=carol"))
	carol := hooks.waitConnect(t, 4)

	type member struct {
		ID, UserID string
		Mode       pubsub.Mode
	}
	check := func(room string, want ...member) {
		t.Helper()
		key := func(m member) string { return m.ID }
		slices.SortFunc(want, func(a, b member) int { return strings.Compare(key(a), key(b)) })
		var got []member
		waitFor(t, "the members of "+room, func() bool {
			got = got[:0]
			for _, c := range h.Connections(room) {
				if c.RemoteAddr == "" {
					t.Errorf("Connections(%q): client %s has no RemoteAddr", room, c.ID)
				}
				got = append(got, member{c.ID, c.UserID, c.Mode})
			}
			slices.SortFunc(got, func(a, b member) int { return strings.Compare(key(a), key(b)) })
			return slices.Equal(got, want)
		})
	}
	a := member{alice.welcome.ConnID, "alice", pubsub.ModeProtocol}
	b := member{bob.welcome.ConnID, "bob", pubsub.ModeProtocol}
	n := member{anon.welcome.ConnID, "", pubsub.ModeProtocol}
	c := member{carol.ID, "carol", pubsub.ModeRaw}

	check("lobby", a, b, c)
	check("other", n)
	check("nobody-here")

	alice.mustAck(map[string]any{"type": "unsubscribe", "room": "lobby"})
	check("lobby", b, c)
	bob.c.Close(websocket.StatusNormalClosure, "")
	check("lobby", c)
	raw.Close(websocket.StatusNormalClosure, "")
	check("lobby")
	check("other", n)
}

// ----------------------------------------------------------- Disconnect

func TestDisconnectClosesConnectionWith4003AndReason(t *testing.T) {
	t.Parallel()
	var hooks apiHooks
	h, srv := newServer(t, hooks.options()...)
	p := dialProto(t, wsURL(srv, "/ws"))
	id := p.welcome.ConnID
	if err := h.Disconnect(id, "kicked by admin"); err != nil {
		t.Fatalf("Disconnect: %v", err)
	}
	// The connection is no longer open: a second call finds nothing to close.
	if err := h.Disconnect(id, "again"); !errors.Is(err, pubsub.ErrConnNotFound) {
		t.Fatalf("second Disconnect = %v, want ErrConnNotFound", err)
	}
	if reason := expectClose(t, p.c, protocol.CloseDisconnected); reason != "kicked by admin" {
		t.Fatalf("close reason %q, want %q", reason, "kicked by admin")
	}
	ev := hooks.waitDisconnect(t, id)
	if ev.Code != protocol.CloseDisconnected || ev.Reason != "kicked by admin" {
		t.Fatalf("OnDisconnect code %d reason %q, want 4003 %q", ev.Code, ev.Reason, "kicked by admin")
	}
	if err := h.Disconnect(id, "again"); !errors.Is(err, pubsub.ErrConnNotFound) {
		t.Fatalf("Disconnect of a closed connection = %v, want ErrConnNotFound", err)
	}
}

func TestDisconnectUnknownIDReturnsErrConnNotFound(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t)
	p := dialProto(t, wsURL(srv, "/ws"))
	for _, id := range []string{"", "no-such-connection"} {
		if err := h.Disconnect(id, "x"); !errors.Is(err, pubsub.ErrConnNotFound) {
			t.Errorf("Disconnect(%q) = %v, want ErrConnNotFound", id, err)
		}
	}
	// The existing connection was not touched.
	p.subscribe("still-open")
}

func TestDisconnectTruncatesLongReasonToAValidClose(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t)
	for _, tc := range []struct {
		name, reason, want string
	}{
		{"123 bytes kept", strings.Repeat("a", 123), strings.Repeat("a", 123)},
		{"200 bytes cut to 123", strings.Repeat("b", 200), strings.Repeat("b", 123)},
		// 61 two-byte runes make 122 bytes; the 62nd would straddle byte 123.
		{"cut at a rune boundary", strings.Repeat("é", 100), strings.Repeat("é", 61)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := dialProto(t, wsURL(srv, "/ws"))
			if err := h.Disconnect(p.welcome.ConnID, tc.reason); err != nil {
				t.Fatal(err)
			}
			got := expectClose(t, p.c, protocol.CloseDisconnected)
			if got != tc.want || !utf8.ValidString(got) {
				t.Fatalf("close reason %q (%d bytes), want %q (%d bytes)", got, len(got), tc.want, len(tc.want))
			}
		})
	}
}

func TestDisconnectUserClosesEveryConnectionOfTheUserAndCountsThem(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithAuthenticate(apiUserFromQuery))
	tab1 := dialProto(t, wsURL(srv, "/ws?user=alice"))
	tab2 := dial(t, wsURL(srv, "/ws?room=lobby&user=alice"))
	bob := dialProto(t, wsURL(srv, "/ws?user=bob"))
	waitFor(t, "three connections", func() bool { return h.Stats().Connections == 3 })

	if n := h.DisconnectUser("nobody", "x"); n != 0 {
		t.Fatalf("DisconnectUser of an unknown user = %d, want 0", n)
	}
	if n := h.DisconnectUser("alice", "account locked"); n != 2 {
		t.Fatalf("DisconnectUser(alice) = %d, want 2", n)
	}
	if n := h.DisconnectUser("alice", "again"); n != 0 {
		t.Fatalf("second DisconnectUser(alice) = %d, want 0: both were already closing", n)
	}
	for _, c := range []*websocket.Conn{tab1.c, tab2} {
		if reason := expectClose(t, c, protocol.CloseDisconnected); reason != "account locked" {
			t.Fatalf("close reason %q, want %q", reason, "account locked")
		}
	}
	// Bob is still connected and served.
	ctx := testCtx(t)
	if err := h.PublishToUser(ctx, "bob", []byte("still here")); err != nil {
		t.Fatal(err)
	}
	if e := apiReadDirect(t, bob); e.Text == nil || *e.Text != "still here" {
		t.Fatalf("bob got %s", e.raw)
	}
	waitFor(t, "alice to be gone", func() bool {
		return errors.Is(h.PublishToUser(ctx, "alice", []byte("x")), pubsub.ErrConnNotFound)
	})
	if n := h.DisconnectUser("alice", "x"); n != 0 {
		t.Fatalf("DisconnectUser(alice) after her connections closed = %d, want 0", n)
	}
}

// ---------------------------------------------------------------- Stats

func TestStatsCountExactlyInAControlledScenario(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithClientPublish(true))
	ctx := testCtx(t)
	apiWaitStats(t, h, pubsub.Stats{})

	// Refused: a plain GET (426), a foreign subprotocol (400), a foreign
	// origin (403).
	resp, err := http.Get(srv.URL + "/ws")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUpgradeRequired {
		t.Fatalf("plain GET: HTTP %d, want 426", resp.StatusCode)
	}
	dialStatus(t, wsURL(srv, "/ws"), nil, http.StatusBadRequest, "chat")
	dialStatus(t, wsURL(srv, "/ws"), http.Header{"Origin": {"http://evil.example"}}, http.StatusForbidden)
	want := pubsub.Stats{Refused: 3}
	apiWaitStats(t, h, want)

	a := dialProto(t, wsURL(srv, "/ws"))
	b := dialProto(t, wsURL(srv, "/ws"))
	raw := dial(t, wsURL(srv, "/ws?room=r1"))
	want.Connections, want.Rooms, want.Accepted = 3, 1, 3 // the raw client is in r1
	apiWaitStats(t, h, want)

	a.subscribe("r1")
	b.subscribe("r2")
	want.Rooms, want.MessagesIn = 2, 2
	apiWaitStats(t, h, want)

	// A heartbeat is not a data message.
	a.send(`{"type":"ping"}`)
	if e := a.read(); e.Type != "pong" {
		t.Fatalf("ping answered with %s, want pong", e.raw)
	}
	apiWaitStats(t, h, want)

	// A server publish into r1 is written to a and raw.
	if err := h.Publish(ctx, "r1", []byte("m1")); err != nil {
		t.Fatal(err)
	}
	a.readMessage("r1")
	readText(t, raw, "m1")
	want.Published, want.MessagesOut = 1, 2
	apiWaitStats(t, h, want)

	// A protocol publish into r2 reaches b; the ack is not a data message.
	a.mustAck(map[string]any{"type": "publish", "room": "r2", "text": "m2"})
	b.readMessage("r2")
	want.MessagesIn, want.Published, want.MessagesOut = 3, 2, 3
	apiWaitStats(t, h, want)

	// A raw frame is published into r1, and raw gets its own message too.
	if err := raw.Write(ctx, websocket.MessageText, []byte("m3")); err != nil {
		t.Fatal(err)
	}
	a.readMessage("r1")
	readText(t, raw, "m3")
	want.MessagesIn, want.Published, want.MessagesOut = 4, 3, 5
	apiWaitStats(t, h, want)

	// A direct message is written but not published.
	if err := h.PublishToConn(ctx, b.welcome.ConnID, []byte("d")); err != nil {
		t.Fatal(err)
	}
	apiReadDirect(t, b)
	want.MessagesOut = 6
	apiWaitStats(t, h, want)

	// Failed publishes are not counted as published.
	if err := h.Publish(ctx, "bad room", []byte("x")); err == nil {
		t.Fatal("Publish to an invalid room succeeded")
	}
	a.mustError(map[string]any{"type": "publish", "room": "bad room", "text": "x"}, protocol.CodeInvalidRoom)
	want.MessagesIn = 5
	apiWaitStats(t, h, want)

	// b leaves: one connection fewer, and r2 has no subscriber left.
	b.c.Close(websocket.StatusNormalClosure, "")
	want.Connections, want.Rooms = 2, 1
	apiWaitStats(t, h, want)

	// Shutting down refuses upgrades, and ends every connection and room.
	h.Close()
	dialStatus(t, wsURL(srv, "/ws"), nil, http.StatusServiceUnavailable)
	want.Connections, want.Rooms, want.Refused = 0, 0, 4
	apiWaitStats(t, h, want)
}

// ---------------------------------------------------------------- hooks

func TestOnConnectAndOnDisconnectRunOncePerConnectionWithItsClient(t *testing.T) {
	t.Parallel()
	var hooks apiHooks
	h, srv := newServer(t, append(hooks.options(), pubsub.WithAuthenticate(apiUserFromQuery))...)

	p := dialProto(t, wsURL(srv, "/ws?user=alice"))
	pc := hooks.waitConnect(t, 1)
	raw := dial(t, wsURL(srv, "/ws?room=lobby&user=bob"))
	rc := hooks.waitConnect(t, 2)
	anon := dialProto(t, wsURL(srv, "/ws"))
	ac := hooks.waitConnect(t, 3)

	if pc.ID != p.welcome.ConnID || pc.UserID != "alice" || pc.Mode != pubsub.ModeProtocol || pc.RemoteAddr == "" {
		t.Errorf("OnConnect client %+v, want id %s, user alice, protocol mode, a RemoteAddr", pc, p.welcome.ConnID)
	}
	if rc.ID == "" || rc.UserID != "bob" || rc.Mode != pubsub.ModeRaw || rc.RemoteAddr == "" {
		t.Errorf("OnConnect client %+v, want user bob, raw mode, a RemoteAddr", rc)
	}
	if ac.ID != anon.welcome.ConnID || ac.UserID != "" || ac.Mode != pubsub.ModeProtocol {
		t.Errorf("OnConnect client %+v, want id %s, anonymous, protocol mode", ac, anon.welcome.ConnID)
	}

	p.c.Close(websocket.StatusNormalClosure, "bye")
	raw.CloseNow()
	hooks.waitDisconnect(t, pc.ID)
	hooks.waitDisconnect(t, rc.ID)
	// Close waits for every ServeHTTP call, so every hook has run by then.
	h.Close()
	apiReadUntilEnd(t, anon.c)

	connects, disconnects := hooks.snapshot()
	for _, cl := range []pubsub.Client{pc, rc, ac} {
		nc, nd := 0, 0
		for _, c := range connects {
			if c.ID == cl.ID {
				nc++
			}
		}
		for _, d := range disconnects {
			if d.Client.ID == cl.ID {
				nd++
				if !reflect.DeepEqual(d.Client, cl) {
					t.Errorf("OnDisconnect client %+v, want %+v as in OnConnect", d.Client, cl)
				}
			}
		}
		if nc != 1 || nd != 1 {
			t.Errorf("connection %s: OnConnect ran %d times, OnDisconnect %d times; want once each", cl.ID, nc, nd)
		}
	}
	if len(connects) != 3 || len(disconnects) != 3 {
		t.Errorf("%d OnConnect and %d OnDisconnect calls, want 3 each", len(connects), len(disconnects))
	}
}

// apiReadUntilEnd reads until the connection ends, however it ends.
func apiReadUntilEnd(t *testing.T, c *websocket.Conn) error {
	t.Helper()
	ctx := testCtx(t)
	for {
		if _, _, err := c.Read(ctx); err != nil {
			if ctx.Err() != nil {
				t.Fatalf("the connection did not end: %v", err)
			}
			return err
		}
	}
}

func TestOnDisconnectReportsTheCloseCode(t *testing.T) {
	t.Parallel()
	var hooks apiHooks
	h, srv := newServer(t, hooks.options()...)

	t.Run("client closes with 1000", func(t *testing.T) {
		p := dialProto(t, wsURL(srv, "/ws"))
		p.c.Close(websocket.StatusNormalClosure, "done here")
		ev := hooks.waitDisconnect(t, p.welcome.ConnID)
		if ev.Code != protocol.CloseNormal || ev.Reason != "done here" {
			t.Fatalf("OnDisconnect code %d reason %q, want 1000 %q", ev.Code, ev.Reason, "done here")
		}
	})
	t.Run("client closes with its own code", func(t *testing.T) {
		p := dialProto(t, wsURL(srv, "/ws"))
		p.c.Close(4321, "app code")
		ev := hooks.waitDisconnect(t, p.welcome.ConnID)
		if ev.Code != 4321 || ev.Reason != "app code" {
			t.Fatalf("OnDisconnect code %d reason %q, want 4321 %q", ev.Code, ev.Reason, "app code")
		}
	})
	t.Run("connection lost without a close", func(t *testing.T) {
		p := dialProto(t, wsURL(srv, "/ws"))
		p.c.CloseNow()
		if ev := hooks.waitDisconnect(t, p.welcome.ConnID); ev.Code != 1006 {
			t.Fatalf("OnDisconnect code %d, want 1006", ev.Code)
		}
	})
	t.Run("Disconnect", func(t *testing.T) {
		p := dialProto(t, wsURL(srv, "/ws"))
		if err := h.Disconnect(p.welcome.ConnID, "bye"); err != nil {
			t.Fatal(err)
		}
		expectClose(t, p.c, protocol.CloseDisconnected)
		if ev := hooks.waitDisconnect(t, p.welcome.ConnID); ev.Code != protocol.CloseDisconnected || ev.Reason != "bye" {
			t.Fatalf("OnDisconnect code %d reason %q, want 4003 \"bye\"", ev.Code, ev.Reason)
		}
	})
	// Shutdown's 1001 and the slow consumer's 4002 are checked with those
	// features below.
}

func TestPanickingConnectHooksDoNotCrashTheServer(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t,
		pubsub.WithOnConnect(func(pubsub.ConnectEvent) { panic("on connect") }),
		pubsub.WithOnDisconnect(func(pubsub.DisconnectEvent) { panic("on disconnect") }),
	)
	ctx := testCtx(t)
	for i := range 2 {
		p := dialProto(t, wsURL(srv, "/ws"))
		p.subscribe("r")
		if err := h.Publish(ctx, "r", []byte(`"hi"`)); err != nil {
			t.Fatal(err)
		}
		p.readMessage("r")
		p.c.Close(websocket.StatusNormalClosure, "")
		waitFor(t, "the hooks to have panicked", func() bool {
			s := h.Stats()
			return s.HookPanics == uint64(2*(i+1)) && s.Connections == 0
		})
	}
}

// ------------------------------------------------------- slow consumers

func TestSlowConsumerIsDisconnectedWhileOthersGetEveryMessageInOrder(t *testing.T) {
	t.Parallel()
	var hooks apiHooks
	const (
		queueMessages = 16
		burst         = 8 // below the bound: a subscriber that keeps up never passes it
		maxMessages   = 10000
	)
	// The byte bound is above all that is ever published: only the message
	// bound can disconnect the slow consumer.
	h, srv := newServer(t, append(hooks.options(),
		pubsub.WithQueueLimits(queueMessages, 64<<20),
		pubsub.WithWriteTimeout(250*time.Millisecond))...)
	slowConn := dial(t, wsURL(srv, "/ws?room=feed")) // does not read until it is gone
	slow := hooks.waitConnect(t, 1)
	healthy := dial(t, wsURL(srv, "/ws?room=feed"))
	hooks.waitConnect(t, 2)
	ctx := testCtx(t)
	filler := strings.Repeat("f", 4<<10)

	// The publisher runs on its own goroutine, so that a Publish that
	// blocked would fail the test at its timeout instead of hanging it. It
	// publishes in bursts, each read by the healthy subscriber before the
	// next, until the slow consumer is gone and a few bursts more.
	published := make(chan int)
	read := make(chan struct{})
	pubErr := make(chan error, 1)
	go func() {
		defer close(published)
		pubErr <- func() error {
			after := -1
			for n := 0; n < maxMessages; {
				for range burst {
					if err := h.Publish(ctx, "feed", fmt.Appendf(nil, "%06d:%s", n, filler)); err != nil {
						return fmt.Errorf("Publish #%d: %w", n, err)
					}
					n++
				}
				select {
				case published <- n:
				case <-ctx.Done():
					return ctx.Err()
				}
				select {
				case <-read:
				case <-ctx.Done():
					return ctx.Err()
				}
				switch {
				case after < 0 && h.Stats().SlowConsumers > 0:
					after = 4
				case after == 0:
					return nil
				case after > 0:
					after--
				}
			}
			return fmt.Errorf("no slow consumer after %d messages", maxMessages)
		}()
	}()

	next := 0
	for {
		var total int
		var ok bool
		select {
		case total, ok = <-published:
		case <-ctx.Done():
			t.Fatalf("Publish did not return within the test's timeout (%d messages read)", next)
		}
		if !ok {
			break
		}
		for ; next < total; next++ {
			typ, b, err := healthy.Read(ctx)
			if err != nil {
				t.Fatalf("healthy subscriber: read #%d: %v", next, err)
			}
			if want := fmt.Sprintf("%06d:", next); typ != websocket.MessageText || !strings.HasPrefix(string(b), want) {
				t.Fatalf("healthy subscriber: message %.10q, want #%d", b, next)
			}
		}
		select {
		case read <- struct{}{}:
		case <-ctx.Done():
			t.Fatal("the publisher did not take the read signal")
		}
	}
	if err := <-pubErr; err != nil {
		t.Fatal(err)
	}

	// Reading now lets a close handshake the server began finish at once.
	apiReadUntilEnd(t, slowConn)
	ev := hooks.waitDisconnect(t, slow.ID)
	if ev.Code != protocol.CloseSlowConsumer {
		t.Fatalf("slow consumer closed with %d %q, want 4002", ev.Code, ev.Reason)
	}
	if n := h.Stats().SlowConsumers; n != 1 {
		t.Fatalf("Stats().SlowConsumers = %d, want 1", n)
	}
	if cs := h.Connections("feed"); len(cs) != 1 || cs[0].ID == slow.ID {
		t.Fatalf("room members after the slow consumer left: %+v, want only the healthy one", cs)
	}
}

func TestSlowConsumerByteBoundAloneDisconnects(t *testing.T) {
	t.Parallel()
	var hooks apiHooks
	const maxMessages = 200
	h, srv := newServer(t, append(hooks.options(),
		pubsub.WithQueueLimits(maxMessages, 64<<10),
		pubsub.WithWriteTimeout(250*time.Millisecond))...)
	slowConn := dial(t, wsURL(srv, "/ws?room=big")) // does not read until it is gone
	slow := hooks.waitConnect(t, 1)
	ctx := testCtx(t)

	// One message fits the byte bound, two do not. At most maxMessages
	// are published, so the message bound can never be passed: only the
	// byte bound can disconnect the consumer.
	msg := bytes.Repeat([]byte("z"), 48<<10)
	for i := 0; i < maxMessages && h.Stats().SlowConsumers == 0; i++ {
		if err := h.Publish(ctx, "big", msg); err != nil {
			t.Fatalf("Publish #%d: %v", i, err)
		}
	}
	if h.Stats().SlowConsumers == 0 {
		t.Fatalf("%d messages of 48 KiB published with a 64 KiB byte bound, and no slow consumer was counted", maxMessages)
	}
	// Reading now lets a close handshake the server began finish at once.
	apiReadUntilEnd(t, slowConn)
	ev := hooks.waitDisconnect(t, slow.ID)
	if ev.Code != protocol.CloseSlowConsumer {
		t.Fatalf("slow consumer closed with %d %q, want 4002", ev.Code, ev.Reason)
	}
	if n := h.Stats().SlowConsumers; n != 1 {
		t.Fatalf("Stats().SlowConsumers = %d, want 1", n)
	}
}

// ----------------------------------------------------------- Middleware

// apiMiddlewareServer serves an app wrapped in h.Middleware. The app
// answers /hello with whether FromContext gave it h, publishes the body of
// POST /publish/{room} through FromContext, and marks every other answer
// with the header X-App.
func apiMiddlewareServer(t *testing.T, opts ...pubsub.Option) (*pubsub.Handler, *httptest.Server) {
	t.Helper()
	h := pubsub.NewHandler(append([]pubsub.Option{pubsub.WithLogger(quietLogger())}, opts...)...)
	app := http.NewServeMux()
	app.HandleFunc("GET /hello", func(w http.ResponseWriter, r *http.Request) {
		if pubsub.FromContext(r.Context()) != h {
			http.Error(w, "FromContext did not return the handler", http.StatusInternalServerError)
			return
		}
		io.WriteString(w, "handler in context")
	})
	app.HandleFunc("POST /publish/{room}", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err == nil {
			err = pubsub.FromContext(r.Context()).Publish(r.Context(), r.PathValue("room"), body)
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	app.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-App", "next")
		http.NotFound(w, r)
	})
	srv := httptest.NewServer(h.Middleware(app))
	t.Cleanup(func() {
		h.Close()
		srv.Close()
	})
	return h, srv
}

// apiGet answers a plain GET with its status and whether the app served it.
func apiGet(t *testing.T, url string) (status int, body string, byApp bool) {
	t.Helper()
	req, err := http.NewRequestWithContext(testCtx(t), http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header.Get("X-App") == "next"
}

func TestMiddlewarePassesOtherRequestsToNextWithTheHandlerInContext(t *testing.T) {
	t.Parallel()
	_, srv := apiMiddlewareServer(t)
	if status, body, _ := apiGet(t, srv.URL+"/hello"); status != http.StatusOK || body != "handler in context" {
		t.Fatalf("GET /hello: HTTP %d %q", status, body)
	}
	if status, _, byApp := apiGet(t, srv.URL+"/elsewhere"); status != http.StatusNotFound || !byApp {
		t.Fatalf("GET /elsewhere: HTTP %d, served by the app: %v; want the app's 404", status, byApp)
	}
}

func TestFromContextIsNilWithoutMiddleware(t *testing.T) {
	t.Parallel()
	type key struct{}
	for _, ctx := range []context.Context{
		context.Background(),
		context.WithValue(context.Background(), key{}, "value"),
		httptest.NewRequest(http.MethodGet, "/", nil).Context(),
	} {
		if h := pubsub.FromContext(ctx); h != nil {
			t.Fatalf("FromContext(%v) = %p, want nil", ctx, h)
		}
	}
}

func TestMiddlewareHTTPHandlerPublishReachesWebSocketSubscriber(t *testing.T) {
	t.Parallel()
	_, srv := apiMiddlewareServer(t)
	p := dialProto(t, wsURL(srv, "/ws"))
	p.subscribe("news")
	req, err := http.NewRequestWithContext(testCtx(t), http.MethodPost, srv.URL+"/publish/news",
		strings.NewReader(`{"headline":"hi"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("POST /publish/news: HTTP %d, want 204", resp.StatusCode)
	}
	if e := p.readMessage("news"); string(e.Data) != `{"headline":"hi"}` {
		t.Fatalf("subscriber got %s", e.raw)
	}
}

func TestMiddlewareServesWebSocketsAtWithPathAndBelow(t *testing.T) {
	t.Parallel()
	h, srv := apiMiddlewareServer(t, pubsub.WithPath("/live"))
	p := dialProto(t, wsURL(srv, "/live"))
	p.subscribe("sports")
	raw := dial(t, wsURL(srv, "/live/sports")) // the room is the path below /live
	if err := h.Publish(testCtx(t), "sports", []byte(`"goal"`)); err != nil {
		t.Fatal(err)
	}
	p.readMessage("sports")
	readText(t, raw, `"goal"`)

	for _, tc := range []struct {
		path   string
		status int
		byApp  bool
	}{
		{"/live", http.StatusUpgradeRequired, false}, // the WebSocket endpoint, asked plainly
		{"/live/sports", http.StatusUpgradeRequired, false},
		{"/livestream", http.StatusNotFound, true}, // a prefix, not a path below /live
		{"/ws", http.StatusNotFound, true},         // the default path is not served
	} {
		if status, _, byApp := apiGet(t, srv.URL+tc.path); status != tc.status || byApp != tc.byApp {
			t.Errorf("GET %s: HTTP %d, served by the app: %v; want HTTP %d, by the app: %v",
				tc.path, status, byApp, tc.status, tc.byApp)
		}
	}
}

// ------------------------------------------------------ Shutdown, Close

// apiAtOnce runs f and fails the test unless it returns within 4 seconds.
// It tells "at once" from "after a close handshake timed out": against a
// client that does not read, coder/websocket's Close waits 5 seconds for
// the peer's close frame. Normal runs take milliseconds.
func apiAtOnce(t *testing.T, what string, f func()) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second)
	defer cancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-ctx.Done():
		t.Errorf("%s waited for a close handshake instead of ending every connection at once", what)
		<-done
		t.FailNow()
	}
}

func TestShutdownDeliversQueuedMessagesBeforeGoingAway(t *testing.T) {
	t.Parallel()
	var hooks apiHooks
	h, srv := newServer(t, append(hooks.options(), pubsub.WithQueueLimits(10000, 64<<20))...)
	c := dial(t, wsURL(srv, "/ws?room=news")) // reads only once Shutdown began
	id := hooks.waitConnect(t, 1).ID
	ctx := testCtx(t)

	// About 6 MB: more than the socket buffers hold, so while the client
	// does not read, most of it is still in the connection's queue.
	const n = 1500
	filler := strings.Repeat("q", 4<<10)
	for i := range n {
		if err := h.Publish(ctx, "news", fmt.Appendf(nil, "%05d:%s", i, filler)); err != nil {
			t.Fatal(err)
		}
	}
	done := make(chan error, 1)
	go func() { done <- h.Shutdown(ctx) }()
	waitFor(t, "Shutdown to begin", func() bool {
		return errors.Is(h.Publish(ctx, "no-subscribers", nil), pubsub.ErrClosed)
	})

	for i := range n {
		typ, b, err := c.Read(ctx)
		if err != nil {
			t.Fatalf("read #%d: %v", i, err)
		}
		if want := fmt.Sprintf("%05d:", i); typ != websocket.MessageText || !strings.HasPrefix(string(b), want) {
			t.Fatalf("message %.8q, want #%d", b, i)
		}
	}
	expectClose(t, c, protocol.CloseGoingAway)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("Shutdown did not return")
	}
	if ev, _ := hooks.disconnected(id); ev.Code != protocol.CloseGoingAway {
		t.Fatalf("OnDisconnect code %d, want 1001", ev.Code)
	}
}

func TestShutdownRefusesNewUpgradesWith503(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t)
	c := dial(t, wsURL(srv, "/ws?room=r")) // reads only later, so Shutdown waits for it
	waitFor(t, "one connection", func() bool { return h.Stats().Connections == 1 })
	ctx := testCtx(t)
	done := make(chan error, 1)
	go func() { done <- h.Shutdown(ctx) }()
	waitFor(t, "Shutdown to begin", func() bool {
		return errors.Is(h.Publish(ctx, "no-subscribers", nil), pubsub.ErrClosed)
	})

	// During Shutdown.
	dialStatus(t, wsURL(srv, "/ws?room=r"), nil, http.StatusServiceUnavailable)
	dialStatus(t, wsURL(srv, "/ws"), nil, http.StatusServiceUnavailable, protocol.Subprotocol)
	expectClose(t, c, protocol.CloseGoingAway)
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	// After it.
	dialStatus(t, wsURL(srv, "/ws?room=r"), nil, http.StatusServiceUnavailable)
	if n := h.Stats().Refused; n != 3 {
		t.Fatalf("Stats().Refused = %d, want 3", n)
	}
}

func TestShutdownReturnsOnlyAfterEveryServeHTTPCallEnded(t *testing.T) {
	t.Parallel()
	var hooks apiHooks
	h, srv := newServer(t, hooks.options()...)
	var conns []*websocket.Conn
	for range 3 {
		conns = append(conns, dialProto(t, wsURL(srv, "/ws")).c)
	}
	for range 2 {
		conns = append(conns, dial(t, wsURL(srv, "/ws?room=r")))
	}
	waitFor(t, "five connections", func() bool { return h.Stats().Connections == 5 })
	ctx := testCtx(t)
	codes := make(chan protocol.CloseCode, len(conns))
	for _, c := range conns {
		go func() {
			for {
				if _, _, err := c.Read(ctx); err != nil {
					codes <- apiCloseCode(err)
					return
				}
			}
		}()
	}

	if err := h.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	// No waiting from here on: every ServeHTTP call, and so every
	// OnDisconnect, has ended.
	if s := h.Stats(); s.Connections != 0 || s.Rooms != 0 {
		t.Fatalf("after Shutdown: %d connections, %d rooms; want none", s.Connections, s.Rooms)
	}
	_, ds := hooks.snapshot()
	if len(ds) != len(conns) {
		t.Fatalf("after Shutdown: %d OnDisconnect calls, want %d", len(ds), len(conns))
	}
	for _, d := range ds {
		if d.Code != protocol.CloseGoingAway {
			t.Errorf("OnDisconnect code %d for %s, want 1001", d.Code, d.Client.ID)
		}
	}
	for range conns {
		if code := <-codes; code != protocol.CloseGoingAway {
			t.Errorf("a client saw close code %d, want 1001", code)
		}
	}
}

func TestShutdownWithExpiredContextReturnsItsErrorAndEndsEveryConnection(t *testing.T) {
	t.Parallel()
	var hooks apiHooks
	h, srv := newServer(t, hooks.options()...)
	raw := dial(t, wsURL(srv, "/ws?room=r")) // never reads: no close handshake
	p := dialProto(t, wsURL(srv, "/ws"))     // reads nothing after the welcome
	waitFor(t, "two connections", func() bool { return h.Stats().Connections == 2 })

	expired, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	var err error
	apiAtOnce(t, "Shutdown with an expired context", func() { err = h.Shutdown(expired) })
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown with an expired context = %v, want context.DeadlineExceeded", err)
	}
	if n := h.Stats().Connections; n != 0 {
		t.Fatalf("after Shutdown: %d connections, want 0", n)
	}
	if _, ds := hooks.snapshot(); len(ds) != 2 {
		t.Fatalf("after Shutdown: %d OnDisconnect calls, want 2", len(ds))
	}
	apiReadUntilEnd(t, raw)
	apiReadUntilEnd(t, p.c)
}

func TestShutdownTwiceAndCloseAfterShutdownAreSafeAndCloseTheBrokerOnce(t *testing.T) {
	t.Parallel()
	b := newAPIBroker()
	h, srv := newServer(t, pubsub.WithBroker(b))
	p := dialProto(t, wsURL(srv, "/ws"))
	p.subscribe("r")
	ctx := testCtx(t)
	done := make(chan error, 1)
	go func() { done <- h.Shutdown(ctx) }()
	expectClose(t, p.c, protocol.CloseGoingAway)
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := h.Shutdown(ctx); err != nil {
		t.Fatalf("second Shutdown: %v", err)
	}
	if err := h.Close(); err != nil {
		t.Fatalf("Close after Shutdown: %v", err)
	}
	if n := b.closes.Load(); n != 1 {
		t.Fatalf("Broker.Close called %d times, want once", n)
	}
	// The broker is closed last, after the node left its rooms.
	if ev := b.eventLog(); !slices.Equal(ev, []string{"subscribe r", "unsubscribe r", "close"}) {
		t.Fatalf("broker calls %q, want subscribe, unsubscribe, close", ev)
	}
}

func TestCloseEndsEveryConnectionAtOnce(t *testing.T) {
	t.Parallel()
	var hooks apiHooks
	b := newAPIBroker()
	h, srv := newServer(t, append(hooks.options(), pubsub.WithBroker(b))...)
	raw := dial(t, wsURL(srv, "/ws?room=r")) // neither client reads:
	p := dialProto(t, wsURL(srv, "/ws"))     // Close waits for no handshake
	p.subscribe("s")
	waitFor(t, "two connections", func() bool { return h.Stats().Connections == 2 })

	var err error
	apiAtOnce(t, "Close", func() { err = h.Close() })
	if err != nil {
		t.Fatalf("Close: %v", err)
	}
	if s := h.Stats(); s.Connections != 0 || s.Rooms != 0 {
		t.Fatalf("after Close: %d connections, %d rooms; want none", s.Connections, s.Rooms)
	}
	_, ds := hooks.snapshot()
	if len(ds) != 2 {
		t.Fatalf("after Close: %d OnDisconnect calls, want 2", len(ds))
	}
	for _, d := range ds {
		if d.Code != protocol.CloseGoingAway {
			t.Errorf("OnDisconnect code %d, want 1001", d.Code)
		}
	}
	apiReadUntilEnd(t, raw)
	apiReadUntilEnd(t, p.c)
	if n := b.closes.Load(); n != 1 {
		t.Fatalf("Broker.Close called %d times, want once", n)
	}
	dialStatus(t, wsURL(srv, "/ws"), nil, http.StatusServiceUnavailable)
	if err := h.Shutdown(testCtx(t)); err != nil {
		t.Fatalf("Shutdown after Close: %v", err)
	}
	if n := b.closes.Load(); n != 1 {
		t.Fatalf("Broker.Close called %d times after Shutdown, want once", n)
	}
}

// ---------------------------------------------------------- Broker seam

var errAPIBrokerDown = errors.New("test broker down")

// apiBroker wraps the memory broker, records its calls, checks that each
// room's Subscribe and Unsubscribe alternate (Subscribe first) without
// overlapping, and fails Subscribe or Publish on demand.
type apiBroker struct {
	inner         pubsub.Broker
	failSubscribe atomic.Bool
	failPublish   atomic.Bool
	closes        atomic.Int32

	mu         sync.Mutex
	rooms      map[string]*apiBrokerRoom
	events     []string
	violations []string
}

type apiBrokerRoom struct {
	busy, subscribed         bool
	subscribes, unsubscribes int
}

var _ pubsub.Broker = (*apiBroker)(nil)

func newAPIBroker() *apiBroker {
	return &apiBroker{inner: pubsub.NewMemoryBroker(), rooms: make(map[string]*apiBrokerRoom)}
}

func (b *apiBroker) Bind(deliver func(pubsub.Message)) { b.inner.Bind(deliver) }

func (b *apiBroker) Publish(ctx context.Context, room string, data []byte, o pubsub.PublishOptions) (pubsub.PublishResult, error) {
	if b.failPublish.Load() {
		return pubsub.PublishResult{}, errAPIBrokerDown
	}
	return b.inner.Publish(ctx, room, data, o)
}

func (b *apiBroker) History(ctx context.Context, room string, q pubsub.HistoryQuery) (pubsub.HistoryResult, error) {
	return b.inner.History(ctx, room, q)
}

// Join and Leave must come between the room's Subscribe and Unsubscribe.
func (b *apiBroker) Join(ctx context.Context, room string, m pubsub.Member, events bool) error {
	b.checkSubscribed("join", room)
	return b.inner.Join(ctx, room, m, events)
}

func (b *apiBroker) Leave(ctx context.Context, room string, m pubsub.Member, events bool) error {
	b.checkSubscribed("leave", room)
	return b.inner.Leave(ctx, room, m, events)
}

func (b *apiBroker) Presence(ctx context.Context, room string, countsOnly bool) (pubsub.Presence, error) {
	return b.inner.Presence(ctx, room, countsOnly)
}

func (b *apiBroker) checkSubscribed(op, room string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if r := b.room(room); !r.subscribed || r.busy {
		b.violations = append(b.violations, fmt.Sprintf("%s %q outside the room's subscription", op, room))
	}
}

func (b *apiBroker) Subscribe(ctx context.Context, room string) (err error) {
	b.begin("subscribe", room, false)
	defer func() { b.end(room, err == nil) }()
	runtime.Gosched() // widen the window for an overlapping call
	if b.failSubscribe.Load() {
		return errAPIBrokerDown
	}
	return b.inner.Subscribe(ctx, room)
}

func (b *apiBroker) Unsubscribe(ctx context.Context, room string) error {
	b.begin("unsubscribe", room, true)
	defer b.end(room, false)
	runtime.Gosched()
	return b.inner.Unsubscribe(ctx, room)
}

func (b *apiBroker) Close() error {
	b.closes.Add(1)
	b.mu.Lock()
	b.events = append(b.events, "close")
	b.mu.Unlock()
	return b.inner.Close()
}

func (b *apiBroker) room(name string) *apiBrokerRoom {
	r := b.rooms[name]
	if r == nil {
		r = &apiBrokerRoom{}
		b.rooms[name] = r
	}
	return r
}

func (b *apiBroker) begin(op, room string, wantSubscribed bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	r := b.room(room)
	if r.busy {
		b.violations = append(b.violations, fmt.Sprintf("%s %q overlaps another call for the room", op, room))
	}
	if r.subscribed != wantSubscribed {
		b.violations = append(b.violations, fmt.Sprintf("%s %q while subscribed is %v", op, room, r.subscribed))
	}
	r.busy = true
	if op == "subscribe" {
		r.subscribes++
	} else {
		r.unsubscribes++
	}
	b.events = append(b.events, op+" "+room)
}

func (b *apiBroker) end(room string, subscribed bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	r := b.room(room)
	r.busy, r.subscribed = false, subscribed
}

func (b *apiBroker) eventLog() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.events)
}

// counts returns the room's Subscribe and Unsubscribe calls so far, and
// whether the node is subscribed.
func (b *apiBroker) counts(room string) (subscribes, unsubscribes int, subscribed bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	r := b.room(room)
	return r.subscribes, r.unsubscribes, r.subscribed
}

func (b *apiBroker) checkAlternation(t *testing.T) {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, v := range b.violations {
		t.Error(v)
	}
}

// apiChurnConn is a protocol client for goroutines other than the test's:
// it returns errors instead of failing the test.
type apiChurnConn struct {
	c    *websocket.Conn
	next int
}

func apiChurnDial(ctx context.Context, url string) (*apiChurnConn, error) {
	c, _, err := websocket.Dial(ctx, url, &websocket.DialOptions{Subprotocols: []string{protocol.Subprotocol}})
	if err != nil {
		return nil, err
	}
	c.SetReadLimit(-1)
	if _, _, err := c.Read(ctx); err != nil { // the welcome
		c.CloseNow()
		return nil, err
	}
	return &apiChurnConn{c: c}, nil
}

// request sends {"type":typ,"room":room} and waits for its ack.
func (a *apiChurnConn) request(ctx context.Context, typ, room string) error {
	a.next++
	id := fmt.Sprint("c", a.next)
	b, err := json.Marshal(map[string]string{"type": typ, "room": room, "id": id})
	if err != nil {
		return err
	}
	if err := a.c.Write(ctx, websocket.MessageText, b); err != nil {
		return err
	}
	for {
		_, m, err := a.c.Read(ctx)
		if err != nil {
			return fmt.Errorf("%s %s: %w", typ, room, err)
		}
		var e envelope
		if err := json.Unmarshal(m, &e); err != nil {
			return err
		}
		if e.ID != id {
			continue
		}
		if e.Type != "ack" {
			return fmt.Errorf("%s %s: got %s, want ack", typ, room, m)
		}
		return nil
	}
}

func TestBrokerSubscribeAndUnsubscribeAlternatePerRoomUnderChurn(t *testing.T) {
	t.Parallel()
	b := newAPIBroker()
	h, srv := newServer(t, pubsub.WithBroker(b), pubsub.WithRateLimit(1e6, 1_000_000))
	rooms := []string{"churn-a", "churn-b", "churn-c", "churn-d"}
	const workers, lives, rounds = 12, 2, 15
	ctx := testCtx(t)

	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			for life := range lives {
				c, err := apiChurnDial(ctx, wsURL(srv, "/ws"))
				if err != nil {
					errs <- err
					return
				}
				// Few subscribers per room at a time, so that rooms empty
				// and fill again often: each of those is a broker call.
				for r := range rounds {
					room := rooms[(w+r)%len(rooms)]
					for _, op := range []string{"subscribe", "unsubscribe"} {
						if err := c.request(ctx, op, room); err != nil {
							c.c.CloseNow()
							errs <- err
							return
						}
					}
				}
				// End each life in two rooms: the disconnect leaves them.
				for _, room := range []string{rooms[w%len(rooms)], rooms[(w+1)%len(rooms)]} {
					if err := c.request(ctx, "subscribe", room); err != nil {
						c.c.CloseNow()
						errs <- err
						return
					}
				}
				if (w+life)%2 == 0 {
					c.c.CloseNow()
				} else {
					c.c.Close(websocket.StatusNormalClosure, "")
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	// Every subscriber left, so the node must have withdrawn its interest in
	// every room, with as many Unsubscribes as Subscribes.
	waitFor(t, "the node to leave every room", func() bool {
		for _, room := range rooms {
			if subs, unsubs, subscribed := b.counts(room); subscribed || subs != unsubs {
				return false
			}
		}
		return h.Stats().Rooms == 0
	})
	b.checkAlternation(t)
	total := 0
	for _, room := range rooms {
		subs, _, _ := b.counts(room)
		total += subs
	}
	t.Logf("%d Subscribe calls", total)
	if total <= len(rooms) {
		t.Errorf("%d Subscribe calls for %d rooms: no room was emptied and refilled, so the churn did not exercise the seam", total, len(rooms))
	}
}

func TestBrokerInterestIsDroppedWhenTheLastSubscriberLeaves(t *testing.T) {
	t.Parallel()
	b := newAPIBroker()
	h, srv := newServer(t, pubsub.WithBroker(b))
	want := func(subs, unsubs int, subscribed bool) {
		t.Helper()
		waitFor(t, fmt.Sprintf("%d Subscribe and %d Unsubscribe calls, subscribed %v", subs, unsubs, subscribed),
			func() bool {
				s, u, on := b.counts("r")
				return s == subs && u == unsubs && on == subscribed
			})
	}
	p1 := dialProto(t, wsURL(srv, "/ws"))
	p2 := dialProto(t, wsURL(srv, "/ws"))
	p1.subscribe("r")
	want(1, 0, true)
	p2.subscribe("r") // one interest per node, not per subscriber
	raw := dial(t, wsURL(srv, "/ws?room=r"))
	want(1, 0, true)

	p1.mustAck(map[string]any{"type": "unsubscribe", "room": "r"})
	raw.Close(websocket.StatusNormalClosure, "")
	waitFor(t, "one subscriber left", func() bool { return len(h.Connections("r")) == 1 })
	want(1, 0, true)

	p2.c.Close(websocket.StatusNormalClosure, "") // the last one
	want(1, 1, false)
	if n := h.Stats().Rooms; n != 0 {
		t.Fatalf("Stats().Rooms = %d, want 0", n)
	}

	// A new subscriber brings the interest back.
	p3 := dialProto(t, wsURL(srv, "/ws"))
	p3.subscribe("r")
	want(2, 1, true)
	b.checkAlternation(t)
}

func TestBrokerSubscribeFailureIsUnavailableAndTheServerRecovers(t *testing.T) {
	t.Parallel()
	b := newAPIBroker()
	b.failSubscribe.Store(true)
	h, srv := newServer(t, pubsub.WithBroker(b))
	p := dialProto(t, wsURL(srv, "/ws"))

	e := p.mustError(map[string]any{"type": "subscribe", "room": "r"}, protocol.CodeUnavailable)
	if strings.Contains(e.Message, errAPIBrokerDown.Error()) {
		t.Errorf("the client was sent the broker's error text: %s", e.raw)
	}
	dialStatus(t, wsURL(srv, "/ws?room=r"), nil, http.StatusServiceUnavailable)
	if s := h.Stats(); s.Rooms != 0 || len(h.Connections("r")) != 0 || s.Refused != 1 {
		t.Fatalf("after failed subscribes: %+v, members %v; want no room and one refusal", s, h.Connections("r"))
	}

	b.failSubscribe.Store(false)
	p.subscribe("r")
	raw := dial(t, wsURL(srv, "/ws?room=r"))
	if err := h.Publish(testCtx(t), "r", []byte(`"back"`)); err != nil {
		t.Fatal(err)
	}
	p.readMessage("r")
	readText(t, raw, `"back"`)
	if subs, unsubs, _ := b.counts("r"); subs != 3 || unsubs != 0 {
		t.Fatalf("%d Subscribe and %d Unsubscribe calls, want 3 (two failed) and 0", subs, unsubs)
	}
	b.checkAlternation(t)
}

func TestBrokerPublishFailureIsWrappedAndUnavailable(t *testing.T) {
	t.Parallel()
	b := newAPIBroker()
	h, srv := newServer(t, pubsub.WithBroker(b), pubsub.WithClientPublish(true))
	p := dialProto(t, wsURL(srv, "/ws"))
	p.subscribe("r")
	raw := dial(t, wsURL(srv, "/ws?room=r"))
	ctx := testCtx(t)
	b.failPublish.Store(true)

	err := h.Publish(ctx, "r", []byte("x"))
	if !errors.Is(err, errAPIBrokerDown) || !strings.HasPrefix(err.Error(), "pubsub: ") {
		t.Fatalf("Publish with a failing broker = %v, want a \"pubsub: \" error wrapping the broker's", err)
	}
	e := p.mustError(map[string]any{"type": "publish", "room": "r", "text": "x"}, protocol.CodeUnavailable)
	if strings.Contains(e.Message, errAPIBrokerDown.Error()) {
		t.Errorf("the client was sent the broker's error text: %s", e.raw)
	}
	if err := raw.Write(ctx, websocket.MessageText, []byte("x")); err != nil {
		t.Fatal(err)
	}
	expectClose(t, raw, protocol.CloseTryAgainLater)
	if n := h.Stats().Published; n != 0 {
		t.Fatalf("Stats().Published = %d after failed publishes, want 0", n)
	}

	b.failPublish.Store(false)
	if err := h.Publish(ctx, "r", []byte(`"ok"`)); err != nil {
		t.Fatal(err)
	}
	if e := p.readMessage("r"); string(e.Data) != `"ok"` {
		t.Fatalf("got %s", e.raw)
	}
}

func TestMemoryBrokerSeqIncreasesStrictlyFromOnePerRoomUnderConcurrentPublish(t *testing.T) {
	t.Parallel()
	b := pubsub.NewMemoryBroker()
	t.Cleanup(func() { b.Close() })
	rooms := []string{"a", "b", "c"}
	busy := map[string]*atomic.Int32{}
	for _, r := range rooms {
		busy[r] = new(atomic.Int32)
	}
	var overlaps atomic.Int32
	var mu sync.Mutex
	delivered := map[string][]pubsub.Message{}
	b.Bind(func(m pubsub.Message) {
		n := busy[m.Room]
		if n.Add(1) != 1 {
			overlaps.Add(1)
		}
		runtime.Gosched()
		mu.Lock()
		delivered[m.Room] = append(delivered[m.Room], m)
		mu.Unlock()
		n.Add(-1)
	})
	ctx := testCtx(t)
	for _, r := range rooms {
		if err := b.Subscribe(ctx, r); err != nil {
			t.Fatal(err)
		}
	}

	const goroutines, each = 8, 150
	returned := make(chan pubsub.Message, goroutines*each)
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := range each {
				res, err := b.Publish(ctx, rooms[(g+i)%len(rooms)], []byte{byte(i)}, pubsub.PublishOptions{})
				if err != nil {
					t.Error(err)
					return
				}
				returned <- res.Message
			}
		})
	}
	wg.Wait()
	close(returned)

	if n := overlaps.Load(); n != 0 {
		t.Errorf("deliver ran concurrently for one room %d times", n)
	}
	seqs := map[string][]uint64{}
	for m := range returned {
		seqs[m.Room] = append(seqs[m.Room], m.Seq)
	}
	total := 0
	for _, r := range rooms {
		ms := delivered[r]
		total += len(ms)
		for i, m := range ms {
			if m.Seq != uint64(i+1) || m.Epoch == "" || m.Epoch != ms[0].Epoch {
				t.Fatalf("room %s: delivery #%d has seq %d epoch %q, want seq %d in epoch %q",
					r, i, m.Seq, m.Epoch, i+1, ms[0].Epoch)
			}
		}
		got := seqs[r]
		slices.Sort(got)
		for i, s := range got {
			if s != uint64(i+1) {
				t.Fatalf("room %s: Publish returned seqs %v, want 1..%d once each", r, got, len(got))
			}
		}
		if len(got) != len(ms) {
			t.Fatalf("room %s: %d publishes returned, %d delivered", r, len(got), len(ms))
		}
	}
	if total != goroutines*each {
		t.Fatalf("%d messages delivered, want %d", total, goroutines*each)
	}
}

// An idle room that keeps nothing keeps its epoch and sequence for
// IdleRoomGrace (its reclamation after the grace is tested with a fake
// clock in broker_memory_internal_test.go); meanwhile publishes nobody
// listens to are dropped, not numbered.
func TestMemoryBrokerResumesAnEmptyRoomWithinTheGrace(t *testing.T) {
	t.Parallel()
	b := pubsub.NewMemoryBroker()
	var mu sync.Mutex
	var delivered []pubsub.Message
	b.Bind(func(m pubsub.Message) {
		mu.Lock()
		delivered = append(delivered, m)
		mu.Unlock()
	})
	ctx := testCtx(t)
	publish := func(wantSeq uint64) pubsub.Message {
		t.Helper()
		res, err := b.Publish(ctx, "r", []byte("x"), pubsub.PublishOptions{})
		if err != nil || res.Seq != wantSeq || res.Room != "r" {
			t.Fatalf("Publish = %+v, %v; want seq %d", res, err, wantSeq)
		}
		return res.Message
	}
	if err := b.Subscribe(ctx, "r"); err != nil {
		t.Fatal(err)
	}
	m1 := publish(1)
	if m2 := publish(2); m1.Epoch == "" || m2.Epoch != m1.Epoch {
		t.Fatalf("epochs %q then %q, want one non-empty epoch", m1.Epoch, m2.Epoch)
	}

	// Idle: publishes are dropped, not numbered.
	if err := b.Unsubscribe(ctx, "r"); err != nil {
		t.Fatal(err)
	}
	if m, err := b.Publish(ctx, "r", []byte("x"), pubsub.PublishOptions{}); err != nil || m.Seq != 0 || m.Epoch != "" {
		t.Fatalf("Publish to an idle room = %+v, %v; want the zero Message and nil", m, err)
	}
	if err := b.Subscribe(ctx, "r"); err != nil {
		t.Fatal(err)
	}
	if m3 := publish(3); m3.Epoch != m1.Epoch {
		t.Fatalf("the room's epoch is %q after a short idle time, want the same %q", m3.Epoch, m1.Epoch)
	}
	mu.Lock()
	n := len(delivered)
	mu.Unlock()
	if n != 3 {
		t.Fatalf("%d messages delivered, want 3 (the one to the idle room is dropped)", n)
	}

	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Publish(ctx, "r", []byte("x"), pubsub.PublishOptions{}); !errors.Is(err, pubsub.ErrClosed) {
		t.Fatalf("Publish after Close = %v, want ErrClosed", err)
	}
	if err := b.Subscribe(ctx, "r"); !errors.Is(err, pubsub.ErrClosed) {
		t.Fatalf("Subscribe after Close = %v, want ErrClosed", err)
	}
}

func TestRoomBackWithinTheGraceReachesClientsInTheSameEpoch(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t)
	p := dialProto(t, wsURL(srv, "/ws"))
	ctx := testCtx(t)
	p.subscribe("r")
	for range 2 {
		if err := h.Publish(ctx, "r", []byte(`1`)); err != nil {
			t.Fatal(err)
		}
	}
	first := p.readMessage("r")
	if second := p.readMessage("r"); first.Seq != 1 || second.Seq != 2 || second.Epoch != first.Epoch {
		t.Fatalf("messages %s, %s; want seq 1 and 2 in one epoch", first.raw, second.raw)
	}
	p.mustAck(map[string]any{"type": "unsubscribe", "room": "r"}) // idle, within the grace
	p.subscribe("r")
	if err := h.Publish(ctx, "r", []byte(`1`)); err != nil {
		t.Fatal(err)
	}
	if again := p.readMessage("r"); again.Seq != 3 || again.Epoch != first.Epoch {
		t.Fatalf("back in the room: %s; want seq 3 in epoch %q", again.raw, first.Epoch)
	}
}

// apiPanic runs f and returns what it panicked with, as a string.
func apiPanic(f func()) (msg string, panicked bool) {
	defer func() {
		if p := recover(); p != nil {
			msg, panicked = fmt.Sprint(p), true
		}
	}()
	f()
	return "", false
}

func TestMemoryBrokerBindTwicePanics(t *testing.T) {
	t.Parallel()
	b := pubsub.NewMemoryBroker()
	b.Bind(func(pubsub.Message) {})
	msg, panicked := apiPanic(func() { b.Bind(func(pubsub.Message) {}) })
	if !panicked || !strings.HasPrefix(msg, "pubsub: ") {
		t.Fatalf("second Bind: panicked %v with %q, want a \"pubsub: \" panic", panicked, msg)
	}

	// Handing one broker to two Handlers is that mistake.
	shared := pubsub.NewMemoryBroker()
	h := pubsub.NewHandler(pubsub.WithBroker(shared), pubsub.WithLogger(quietLogger()))
	t.Cleanup(func() { h.Close() })
	msg, panicked = apiPanic(func() { pubsub.NewHandler(pubsub.WithBroker(shared)) })
	if !panicked || !strings.HasPrefix(msg, "pubsub: ") {
		t.Fatalf("NewHandler with a bound broker: panicked %v with %q, want a \"pubsub: \" panic", panicked, msg)
	}
}

// ----------------------------------------------------------- NewHandler

func TestNewHandlerPanicsOnEachInvalidOptionValue(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string // the option, which the message must name
		opt  pubsub.Option
	}{
		{`WithPath("ws")`, pubsub.WithPath("ws")},
		{`WithPath("/ws/")`, pubsub.WithPath("/ws/")},
		{`WithPath("/a/../ws")`, pubsub.WithPath("/a/../ws")},
		{"WithMaxMessageBytes(0)", pubsub.WithMaxMessageBytes(0)},
		{"WithMaxMessageBytes(64 MiB + 1)", pubsub.WithMaxMessageBytes(64<<20 + 1)},
		{"WithMaxRooms(0)", pubsub.WithMaxRooms(0)},
		{"WithMaxRooms(1,000,001)", pubsub.WithMaxRooms(1_000_001)},
		{"WithRateLimit(0, 1)", pubsub.WithRateLimit(0, 1)},
		{"WithRateLimit(1, 0)", pubsub.WithRateLimit(1, 0)},
		{"WithWriteTimeout(0)", pubsub.WithWriteTimeout(0)},
		{"WithWriteTimeout(9ms)", pubsub.WithWriteTimeout(9 * time.Millisecond)},
		{"WithHeartbeat(0, 1s)", pubsub.WithHeartbeat(0, time.Second)},
		{"WithHeartbeat(1s, 0)", pubsub.WithHeartbeat(time.Second, 0)},
		{"WithQueueLimits(0, 1)", pubsub.WithQueueLimits(0, 1)},
		{"WithQueueLimits(1, 0)", pubsub.WithQueueLimits(1, 0)},
		{`WithOriginPatterns("[")`, pubsub.WithOriginPatterns("[")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			msg, panicked := apiPanic(func() { pubsub.NewHandler(tc.opt) })
			if !panicked {
				t.Fatal("NewHandler did not panic")
			}
			option, _, _ := strings.Cut(tc.name, "(")
			if !strings.HasPrefix(msg, "pubsub: ") || !strings.Contains(msg, option) {
				t.Fatalf("panic %q, want a message starting \"pubsub: \" that names %s", msg, option)
			}
		})
	}
}

func TestNewHandlerAcceptsTheBoundaryValues(t *testing.T) {
	t.Parallel()
	h := pubsub.NewHandler(
		pubsub.WithLogger(quietLogger()),
		pubsub.WithPath("/"),
		pubsub.WithMaxMessageBytes(1), pubsub.WithMaxMessageBytes(64<<20),
		pubsub.WithMaxRooms(1), pubsub.WithMaxRooms(1_000_000),
		pubsub.WithRateLimit(0.001, 1),
		pubsub.WithWriteTimeout(10*time.Millisecond),
		pubsub.WithHeartbeat(10*time.Millisecond, 10*time.Millisecond),
		pubsub.WithQueueLimits(1, 1),
		pubsub.WithOriginPatterns("*.example.com", "https://app.example.com"),
	)
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
}

// Not parallel: it counts the process's goroutines, so no other test may
// run meanwhile (parallel tests wait until the sequential ones are done).
func TestNewHandlerStartsNoGoroutine(t *testing.T) {
	before := runtime.NumGoroutine()
	h1 := pubsub.NewHandler()
	h2 := pubsub.NewHandler(
		pubsub.WithLogger(quietLogger()),
		pubsub.WithHeartbeat(10*time.Millisecond, 10*time.Millisecond),
		pubsub.WithWriteTimeout(10*time.Millisecond),
		pubsub.WithBroker(pubsub.NewMemoryBroker()),
		pubsub.WithOnConnect(func(pubsub.ConnectEvent) {}),
	)
	after := runtime.NumGoroutine()
	if err := h1.Close(); err != nil {
		t.Fatal(err)
	}
	if err := h2.Close(); err != nil {
		t.Fatal(err)
	}
	if after > before {
		t.Fatalf("%d goroutines before NewHandler, %d after; want no new one", before, after)
	}
}
