package pubsub_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// The Handler's public API, end to end: Publish and the direct publishes,
// Connections, History, Disconnect, Stats, and the lifecycle (Shutdown,
// Close, NewHandler). Each behaviour of a connection has a file of its own
// (upgrade_test.go, protocol_test.go, raw_test.go, queue_test.go...), named
// after doc.go's map of the source files.

// TestMain fails the run when goroutines outlive the tests: every
// connection's reader and writer, every handler and every test server must
// have ended.
func TestMain(m *testing.M) { pubsubtest.Main(m) }

// quietHandler is a Handler with the kit's quiet logger, for a test that
// serves it itself (pubsubtest.Serve, ServeOn); pubsubtest.Start makes one
// the same way.
func quietHandler(opts ...pubsub.Option) *pubsub.Handler {
	return pubsub.NewHandler(append([]pubsub.Option{pubsub.WithLogger(pubsubtest.Logger())}, opts...)...)
}

// readToEnd reads c, a *pubsubtest.Conn or *pubsubtest.RawConn, until its
// connection ends, however it ends (Close sends no close frame), and
// returns the error it ended with. It does not fail the test, so it may
// run on a goroutine of its own.
func readToEnd(c any) error {
	for {
		var err error
		switch c := c.(type) {
		case *pubsubtest.Conn:
			_, err = c.TryNext()
		case *pubsubtest.RawConn:
			_, _, err = c.TryRead()
		default:
			panic(fmt.Sprintf("readToEnd of a %T", c))
		}
		if err != nil {
			return err
		}
	}
}

// ended is readToEnd on the test's goroutine: it fails the test when the
// connection does not end within the kit's Timeout.
func ended(t *testing.T, c any) {
	t.Helper()
	if err := readToEnd(c); errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("the connection did not end: %v", err)
	}
}

// expectDirect reads the next envelope and expects a direct message.
func expectDirect(t *testing.T, p *pubsubtest.Conn) pubsubtest.Envelope {
	t.Helper()
	e := p.Next()
	if e.Type != "direct" {
		t.Fatalf("got %s, want a direct message", e)
	}
	if e.Room != "" || e.Seq != 0 || e.Epoch != "" {
		t.Fatalf("direct message %s carries room fields", e)
	}
	return e
}

// expectDirectText reads the next envelope and expects a direct message
// with text want.
func expectDirectText(t *testing.T, p *pubsubtest.Conn, want string) {
	t.Helper()
	if e := expectDirect(t, p); e.Text == nil || *e.Text != want {
		t.Fatalf("got %s, want a direct message with text %q", e, want)
	}
}

// ---------------------------------------------------------------- Publish

func TestPublishRejectsInvalidRoomWithErrInvalidRoom(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	ctx := pubsubtest.Context(t)
	for _, room := range []string{"", "has space", "bad#char", strings.Repeat("r", 128+1)} {
		err := srv.Handler.Publish(ctx, room, []byte("x"))
		if !errors.Is(err, pubsub.ErrInvalidRoom) {
			t.Errorf("Publish(%q) = %v, want ErrInvalidRoom", room, err)
		}
	}
	if s := srv.Stats(); s.Published != 0 {
		t.Errorf("Stats().Published = %d after refused publishes, want 0", s.Published)
	}
}

func TestPublishRejectsPayloadOverQueueByteBoundWithErrTooLarge(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithQueueLimits(8, 100))
	c := srv.DialRaw("/ws?room=big")

	err := srv.Handler.Publish(pubsubtest.Context(t), "big", bytes.Repeat([]byte("x"), 101))
	if !errors.Is(err, pubsub.ErrTooLarge) {
		t.Fatalf("Publish of 101 bytes with a 100-byte queue bound = %v, want ErrTooLarge", err)
	}
	// Exactly the bound is accepted and delivered.
	fits := strings.Repeat("y", 100)
	srv.Publish("big", []byte(fits))
	c.ExpectText(fits)
	if s := srv.Stats(); s.Published != 1 {
		t.Errorf("Stats().Published = %d, want 1 (the refused publish does not count)", s.Published)
	}
}

func TestPublishReturnsErrClosedAfterClose(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	if err := srv.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := srv.Handler.Publish(pubsubtest.Context(t), "room", []byte("x")); !errors.Is(err, pubsub.ErrClosed) {
		t.Fatalf("Publish after Close = %v, want ErrClosed", err)
	}
}

func TestPublishReturnsErrClosedAfterShutdown(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	if err := srv.Shutdown(pubsubtest.Context(t)); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := srv.Handler.Publish(pubsubtest.Context(t), "room", []byte("x")); !errors.Is(err, pubsub.ErrClosed) {
		t.Fatalf("Publish after Shutdown = %v, want ErrClosed", err)
	}
}

func TestPublishCopiesTheCallersData(t *testing.T) {
	t.Parallel()
	t.Run("delivered after Publish returned", func(t *testing.T) {
		t.Parallel()
		// The broker holds each delivery until release, as a networked
		// broker delivers after Publish has returned.
		b := newTestBroker()
		b.hold.Store(true)
		srv := pubsubtest.Start(t, pubsub.WithBroker(b))
		c := srv.DialRaw("/ws?room=copy")
		data := []byte("original")
		srv.Publish("copy", data)
		copy(data, "MUTATED!")
		b.release()
		c.ExpectText("original")
	})
	t.Run("buffer reused at once", func(t *testing.T) {
		t.Parallel()
		srv := pubsubtest.Start(t)
		c := srv.DialRaw("/ws?room=copy")
		buf := make([]byte, 8)
		const n = 50
		for i := range n {
			copy(buf, fmt.Sprintf("msg-%04d", i))
			srv.Publish("copy", buf)
		}
		copy(buf, "MUTATED!")
		for i := range n {
			c.ExpectText(fmt.Sprintf("msg-%04d", i))
		}
	})
}

func TestPublishToRoomWithoutSubscribersIsNilErrorNoOp(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	if err := srv.Handler.Publish(pubsubtest.Context(t), "empty", []byte(`"lost"`)); err != nil {
		t.Fatalf("Publish to a room without subscribers = %v, want nil", err)
	}
	if s := srv.Stats(); s.Rooms != 0 {
		t.Fatalf("Stats().Rooms = %d after publishing to an empty room, want 0", s.Rooms)
	}
	// A later subscriber gets only what is published after it joined, and
	// the room's sequence starts at 1: the earlier publish left nothing.
	p := srv.Dial("/ws")
	p.Subscribe("empty")
	srv.Publish("empty", []byte(`"kept"`))
	e := p.NextMessage("empty")
	if string(e.Data) != `"kept"` || e.Seq != 1 {
		t.Fatalf("first message %s, want data \"kept\" with seq 1", e)
	}
}

// ---------------------------------------------------- direct publishes

func TestPublishToConnSendsDirectEnvelopeToProtocolClient(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	p := srv.Dial("/ws")
	other := srv.Dial("/ws")
	ctx := pubsubtest.Context(t)
	id := p.Welcome.ConnID

	if err := srv.PublishToConn(ctx, id, []byte(`{"a":1}`)); err != nil {
		t.Fatal(err)
	}
	if e := expectDirect(t, p); string(e.Data) != `{"a":1}` {
		t.Fatalf("JSON direct message %s, want data {\"a\":1}", e)
	}
	if err := srv.PublishToConn(ctx, id, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	expectDirectText(t, p, "hello")
	if err := srv.PublishToConn(ctx, id, []byte{0xff, 0x00}); err != nil {
		t.Fatal(err)
	}
	if e := expectDirect(t, p); e.Binary == nil || *e.Binary != "/wA=" {
		t.Fatalf("binary direct message %s, want binary \"/wA=\"", e)
	}
	// Only the addressed connection got anything: the other's first
	// envelope is the marker sent to it afterwards.
	if err := srv.PublishToConn(ctx, other.Welcome.ConnID, []byte("marker")); err != nil {
		t.Fatal(err)
	}
	expectDirectText(t, other, "marker")
}

func TestPublishToConnSendsVerbatimFramesToRawClient(t *testing.T) {
	t.Parallel()
	var hooks hookLog
	srv := pubsubtest.Start(t, hooks.options()...)
	c := srv.DialRaw("/ws") // no room: direct messages only
	id := hooks.connected(t, 1).ID
	ctx := pubsubtest.Context(t)

	if err := srv.PublishToConn(ctx, id, []byte(`{"a":1}`)); err != nil {
		t.Fatal(err)
	}
	c.ExpectText(`{"a":1}`)
	if err := srv.PublishToConn(ctx, id, []byte{0xff, 0x00}); err != nil {
		t.Fatal(err)
	}
	c.ExpectBinary([]byte{0xff, 0x00})
}

func TestPublishToConnUnknownIDReturnsErrConnNotFound(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	p := srv.Dial("/ws")
	ctx := pubsubtest.Context(t)
	for _, id := range []string{"", "no-such-connection"} {
		if err := srv.PublishToConn(ctx, id, []byte("x")); !errors.Is(err, pubsub.ErrConnNotFound) {
			t.Errorf("PublishToConn(%q) = %v, want ErrConnNotFound", id, err)
		}
	}
	// A connection that has gone is unknown too.
	id := p.Welcome.ConnID
	p.Close(protocol.CloseNormal, "")
	pubsubtest.WaitFor(t, "the closed connection to be forgotten", func() bool {
		return errors.Is(srv.PublishToConn(ctx, id, []byte("x")), pubsub.ErrConnNotFound)
	})
}

func TestPublishToUserReachesEveryConnectionOfThatUserOnly(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, headerAuth())
	tab1 := srv.Dial("/ws", asUser("alice"))
	tab2 := srv.DialRaw("/ws", asUser("alice")) // raw, no room
	bob := srv.Dial("/ws", asUser("bob"))
	anon := srv.Dial("/ws")
	pubsubtest.WaitFor(t, "four connections", func() bool { return srv.Stats().Connections == 4 })
	ctx := pubsubtest.Context(t)

	if err := srv.PublishToUser(ctx, "alice", []byte(`{"n":1}`)); err != nil {
		t.Fatal(err)
	}
	if e := expectDirect(t, tab1); string(e.Data) != `{"n":1}` {
		t.Fatalf("alice's protocol tab got %s", e)
	}
	tab2.ExpectText(`{"n":1}`)

	for _, p := range []*pubsubtest.Conn{bob, anon} {
		if err := srv.PublishToConn(ctx, p.Welcome.ConnID, []byte("marker")); err != nil {
			t.Fatal(err)
		}
		expectDirectText(t, p, "marker") // a connection of another user got nothing before it
	}
}

func TestPublishToUserUnknownUserReturnsErrConnNotFound(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, headerAuth())
	srv.Dial("/ws") // anonymous: not a user
	ctx := pubsubtest.Context(t)
	for _, user := range []string{"nobody", ""} {
		if err := srv.PublishToUser(ctx, user, []byte("x")); !errors.Is(err, pubsub.ErrConnNotFound) {
			t.Errorf("PublishToUser(%q) = %v, want ErrConnNotFound", user, err)
		}
	}
}

// ---------------------------------------------------------- Connections

func TestConnectionsListsExactlyTheRoomSubscribers(t *testing.T) {
	t.Parallel()
	var hooks hookLog
	srv := pubsubtest.Start(t, hooks.options(headerAuth())...)
	alice := srv.Dial("/ws", asUser("alice"))
	bob := srv.Dial("/ws", asUser("bob"))
	anon := srv.Dial("/ws")
	alice.Subscribe("lobby")
	bob.Subscribe("lobby")
	anon.Subscribe("other")
	raw := srv.DialRaw("/ws/lobby", asUser("carol"))
	carol := hooks.connected(t, 4)

	type member struct {
		ID, UserID string
		Mode       pubsub.Mode
	}
	byID := func(a, b member) int { return strings.Compare(a.ID, b.ID) }
	check := func(room string, want ...member) {
		t.Helper()
		slices.SortFunc(want, byID)
		var got []member
		pubsubtest.WaitFor(t, "the members of "+room, func() bool {
			got = got[:0]
			for _, c := range srv.Connections(room) {
				if c.RemoteAddr == "" {
					t.Errorf("Connections(%q): client %s has no RemoteAddr", room, c.ID)
				}
				got = append(got, member{c.ID, c.UserID, c.Mode})
			}
			slices.SortFunc(got, byID)
			return slices.Equal(got, want)
		})
	}
	a := member{alice.Welcome.ConnID, "alice", pubsub.ModeProtocol}
	b := member{bob.Welcome.ConnID, "bob", pubsub.ModeProtocol}
	n := member{anon.Welcome.ConnID, "", pubsub.ModeProtocol}
	c := member{carol.ID, "carol", pubsub.ModeRaw}

	check("lobby", a, b, c)
	check("other", n)
	check("nobody-here")

	alice.Ack(pubsubtest.Fields{"type": "unsubscribe", "room": "lobby"})
	check("lobby", b, c)
	bob.Close(protocol.CloseNormal, "")
	check("lobby", c)
	raw.Close(protocol.CloseNormal, "")
	check("lobby")
	check("other", n)
}

// -------------------------------------------------------------- History

func TestHistoryReturnsTheNewestKeptMessagesOldestFirst(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithHistory(5, time.Minute))
	ctx := pubsubtest.Context(t)
	const room = "hist"
	publishNumbered(srv, room, 1, 8)

	for _, tt := range []struct {
		limit int
		want  []uint64
	}{
		{3, []uint64{6, 7, 8}},
		{5, []uint64{4, 5, 6, 7, 8}},
		{100, []uint64{4, 5, 6, 7, 8}}, // bounded by the room's size
		{0, nil},
	} {
		ms, err := srv.History(ctx, room, tt.limit)
		if err != nil {
			t.Fatalf("History(%d): %v", tt.limit, err)
		}
		var got []uint64
		ids := map[string]bool{}
		for _, m := range ms {
			got = append(got, m.Seq)
			if string(m.Data) != fmt.Sprintf(`{"n":%d}`, m.Seq) || m.Room != room || m.Epoch == "" || m.Epoch != ms[0].Epoch ||
				m.ID == "" || ids[m.ID] || m.Time.IsZero() || m.Kind != pubsub.KindMessage {
				t.Fatalf("History(%d): message %+v: want its payload, room, the room's epoch, a unique id and a time", tt.limit, m)
			}
			ids[m.ID] = true
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("History(%d) = seqs %v, want %v", tt.limit, got, tt.want)
		}
	}
	if _, err := srv.History(ctx, "bad room", 5); !errors.Is(err, pubsub.ErrInvalidRoom) {
		t.Errorf("History of an invalid room: %v, want ErrInvalidRoom", err)
	}
}

// ----------------------------------------------------------- Disconnect

func TestDisconnectClosesConnectionWith4003AndReason(t *testing.T) {
	t.Parallel()
	var hooks hookLog
	srv := pubsubtest.Start(t, hooks.options()...)
	p := srv.Dial("/ws")
	id := p.Welcome.ConnID
	if err := srv.Disconnect(id, "kicked by admin"); err != nil {
		t.Fatalf("Disconnect: %v", err)
	}
	// The connection is no longer open: a second call finds nothing to close.
	if err := srv.Disconnect(id, "again"); !errors.Is(err, pubsub.ErrConnNotFound) {
		t.Fatalf("second Disconnect = %v, want ErrConnNotFound", err)
	}
	if reason := p.ExpectClose(protocol.CloseDisconnected); reason != "kicked by admin" {
		t.Fatalf("close reason %q, want %q", reason, "kicked by admin")
	}
	if ev := hooks.disconnectedWith(t, id, protocol.CloseDisconnected); ev.Reason != "kicked by admin" {
		t.Fatalf("OnDisconnect code %d reason %q, want 4003 %q", ev.Code, ev.Reason, "kicked by admin")
	}
	if err := srv.Disconnect(id, "again"); !errors.Is(err, pubsub.ErrConnNotFound) {
		t.Fatalf("Disconnect of a closed connection = %v, want ErrConnNotFound", err)
	}
}

func TestDisconnectUnknownIDReturnsErrConnNotFound(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	p := srv.Dial("/ws")
	for _, id := range []string{"", "no-such-connection"} {
		if err := srv.Disconnect(id, "x"); !errors.Is(err, pubsub.ErrConnNotFound) {
			t.Errorf("Disconnect(%q) = %v, want ErrConnNotFound", id, err)
		}
	}
	// The existing connection was not touched.
	p.Subscribe("still-open")
}

func TestDisconnectTruncatesLongReasonToAValidClose(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
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
			p := pubsubtest.Dial(t, srv.WS("/ws"))
			if err := srv.Disconnect(p.Welcome.ConnID, tc.reason); err != nil {
				t.Fatal(err)
			}
			got := p.ExpectClose(protocol.CloseDisconnected)
			if got != tc.want || !utf8.ValidString(got) {
				t.Fatalf("close reason %q (%d bytes), want %q (%d bytes)", got, len(got), tc.want, len(tc.want))
			}
		})
	}
}

func TestDisconnectUserClosesEveryConnectionOfTheUserAndCountsThem(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, headerAuth())
	tab1 := srv.Dial("/ws", asUser("alice"))
	tab2 := srv.DialRaw("/ws?room=lobby", asUser("alice"))
	bob := srv.Dial("/ws", asUser("bob"))
	pubsubtest.WaitFor(t, "three connections", func() bool { return srv.Stats().Connections == 3 })

	if n := srv.DisconnectUser("nobody", "x"); n != 0 {
		t.Fatalf("DisconnectUser of an unknown user = %d, want 0", n)
	}
	if n := srv.DisconnectUser("alice", "account locked"); n != 2 {
		t.Fatalf("DisconnectUser(alice) = %d, want 2", n)
	}
	if n := srv.DisconnectUser("alice", "again"); n != 0 {
		t.Fatalf("second DisconnectUser(alice) = %d, want 0: both were already closing", n)
	}
	for _, reason := range []string{tab1.ExpectClose(protocol.CloseDisconnected), tab2.ExpectClose(protocol.CloseDisconnected)} {
		if reason != "account locked" {
			t.Fatalf("close reason %q, want %q", reason, "account locked")
		}
	}
	// Bob is still connected and served.
	ctx := pubsubtest.Context(t)
	if err := srv.PublishToUser(ctx, "bob", []byte("still here")); err != nil {
		t.Fatal(err)
	}
	expectDirectText(t, bob, "still here")
	pubsubtest.WaitFor(t, "alice to be gone", func() bool {
		return errors.Is(srv.PublishToUser(ctx, "alice", []byte("x")), pubsub.ErrConnNotFound)
	})
	if n := srv.DisconnectUser("alice", "x"); n != 0 {
		t.Fatalf("DisconnectUser(alice) after her connections closed = %d, want 0", n)
	}
}

// ---------------------------------------------------------------- Stats

// waitStats waits until the Handler's Stats equal want exactly.
func waitStats(t *testing.T, srv *pubsubtest.Server, want pubsub.Stats) {
	t.Helper()
	var got pubsub.Stats
	defer func() {
		if t.Failed() {
			t.Logf("Stats:\n got %+v\nwant %+v", got, want)
		}
	}()
	pubsubtest.WaitFor(t, "the Stats", func() bool {
		got = srv.Stats()
		return got == want
	})
}

func TestStatsCountExactlyInAControlledScenario(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithClientPublish(true))
	ctx := pubsubtest.Context(t)
	waitStats(t, srv, pubsub.Stats{})

	// Refused: a plain GET (426), a foreign subprotocol (400), a foreign
	// origin (403).
	if resp, _ := plainRequest(t, srv, http.MethodGet, "/ws", nil, ""); resp.StatusCode != http.StatusUpgradeRequired {
		t.Fatalf("plain GET: HTTP %d, want 426", resp.StatusCode)
	}
	srv.Refused("/ws", http.StatusBadRequest, pubsubtest.Subprotocols("chat"))
	srv.Refused("/ws", http.StatusForbidden, pubsubtest.Origin("http://evil.example"))
	want := pubsub.Stats{Refused: 3}
	waitStats(t, srv, want)

	a := srv.Dial("/ws")
	b := srv.Dial("/ws")
	raw := srv.DialRaw("/ws?room=r1")
	want.Connections, want.Rooms, want.Accepted = 3, 1, 3 // the raw client is in r1
	waitStats(t, srv, want)

	a.Subscribe("r1")
	b.Subscribe("r2")
	want.Rooms, want.MessagesIn = 2, 2
	waitStats(t, srv, want)

	// A heartbeat is not a data message.
	a.Send(`{"type":"ping"}`)
	if e := a.Next(); e.Type != "pong" {
		t.Fatalf("ping answered with %s, want pong", e)
	}
	waitStats(t, srv, want)

	// A server publish into r1 is written to a and raw.
	srv.Publish("r1", []byte("m1"))
	a.NextMessage("r1")
	raw.ExpectText("m1")
	want.Published, want.MessagesOut = 1, 2
	waitStats(t, srv, want)

	// A protocol publish into r2 reaches b; the ack is not a data message.
	a.Publish("r2", "m2")
	b.NextMessage("r2")
	want.MessagesIn, want.Published, want.MessagesOut = 3, 2, 3
	waitStats(t, srv, want)

	// A raw frame is published into r1, and raw gets its own message too.
	raw.Send("m3")
	a.NextMessage("r1")
	raw.ExpectText("m3")
	want.MessagesIn, want.Published, want.MessagesOut = 4, 3, 5
	waitStats(t, srv, want)

	// A direct message is written but not published.
	if err := srv.PublishToConn(ctx, b.Welcome.ConnID, []byte("d")); err != nil {
		t.Fatal(err)
	}
	expectDirect(t, b)
	want.MessagesOut = 6
	waitStats(t, srv, want)

	// Failed publishes are not counted as published.
	if err := srv.Handler.Publish(ctx, "bad room", []byte("x")); err == nil {
		t.Fatal("Publish to an invalid room succeeded")
	}
	a.Error(pubsubtest.Fields{"type": "publish", "room": "bad room", "text": "x"}, protocol.CodeInvalidRoom)
	want.MessagesIn = 5
	waitStats(t, srv, want)

	// b leaves: one connection fewer, and r2 has no subscriber left.
	b.Close(protocol.CloseNormal, "")
	want.Connections, want.Rooms = 2, 1
	waitStats(t, srv, want)

	// Shutting down refuses upgrades, and ends every connection and room.
	srv.Close()
	srv.Refused("/ws", http.StatusServiceUnavailable)
	want.Connections, want.Rooms, want.Refused = 0, 0, 4
	waitStats(t, srv, want)
}

func TestStatsShowAStuckSubscriberFirstWithItsQueueAndLag(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithQueueLimits(16, 4<<20), pubsub.WithSlowConsumerPolicy(pubsub.SlowConsumerDropOldest))
	const room = "stats"
	stuck := srv.Dial("/ws")
	stuck.Subscribe(room)
	reader := srv.Dial("/ws")
	reader.Subscribe(room)
	payload := bigText("s", 16<<10)
	// The reader reads each message before the next is published; the
	// stuck one reads nothing until its queue has turned over.
	publishUntil(t, srv, room, 20_000, func(int) []byte { return payload }, func() bool {
		reader.NextMessage(room)
		st, err := srv.ConnStats(stuck.Welcome.ConnID)
		return err == nil && st.Dropped >= 16
	})
	rs := srv.RoomStats(room)
	if rs.Subscribers != 2 || len(rs.Connections) != 2 {
		t.Fatalf("RoomStats: %d subscribers, %d connections; want 2", rs.Subscribers, len(rs.Connections))
	}
	first, second := rs.Connections[0], rs.Connections[1]
	if first.Client.ID != stuck.Welcome.ConnID || second.Client.ID != reader.Welcome.ConnID {
		t.Fatalf("RoomStats order: %s then %s, want the stuck one (%s) first", first.Client.ID, second.Client.ID, stuck.Welcome.ConnID)
	}
	if first.QueueMessages == 0 || first.QueueBytes < first.QueueMessages*len(payload) || first.Lag <= 0 || first.Dropped < 16 {
		t.Fatalf("stuck subscriber stats %+v: want queued messages and bytes, lag > 0, drops", first)
	}
	if second.QueueMessages != 0 || second.QueueBytes != 0 || second.Lag != 0 || second.Dropped != 0 {
		t.Fatalf("reader stats %+v: want an empty queue, no lag, no drops", second)
	}
	cs, err := srv.ConnStats(stuck.Welcome.ConnID)
	if err != nil || cs.Client.ID != stuck.Welcome.ConnID || cs.QueueMessages == 0 || cs.Lag <= 0 {
		t.Fatalf("ConnStats(stuck) = %+v, %v; want its queue and lag", cs, err)
	}
	if _, err := srv.ConnStats("no-such-connection"); !errors.Is(err, pubsub.ErrConnNotFound) {
		t.Fatalf("ConnStats of an unknown id: %v, want ErrConnNotFound", err)
	}
}

func TestRoomsListsTheRoomsWithSubscribersOnThisNodeSorted(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	if got := srv.Rooms(); len(got) != 0 {
		t.Fatalf("Rooms() = %q with no client, want none", got)
	}
	p := srv.Dial("/ws")
	p.Subscribe("zebra")
	p.Subscribe("alpha")
	raw := srv.DialRaw("/ws/middle")
	srv.Listen("/ws?room=events&room=alpha")
	srv.Publish("no-subscribers", []byte("x")) // publishing makes no room here
	want := []string{"alpha", "events", "middle", "zebra"}
	pubsubtest.WaitFor(t, fmt.Sprintf("Rooms() = %q", want), func() bool { return slices.Equal(srv.Rooms(), want) })

	p.Ack(pubsubtest.Fields{"type": "unsubscribe", "room": "zebra"})
	raw.Close(protocol.CloseNormal, "")
	want = []string{"alpha", "events"}
	pubsubtest.WaitFor(t, fmt.Sprintf("Rooms() = %q", want), func() bool { return slices.Equal(srv.Rooms(), want) })
}

func TestClosedCountsEndedConnectionsByCloseCode(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	if got := srv.Closed(); len(got) != 0 {
		t.Fatalf("Closed() = %v before any connection ended, want empty", got)
	}
	srv.Dial("/ws").Close(protocol.CloseNormal, "bye") // 1000
	kicked := srv.Dial("/ws")
	if err := srv.Disconnect(kicked.Welcome.ConnID, "kicked"); err != nil { // 4003
		t.Fatal(err)
	}
	kicked.ExpectClose(protocol.CloseDisconnected)
	roomless := srv.DialRaw("/ws")
	roomless.Send("nowhere to publish") // 1008
	roomless.ExpectClose(protocol.ClosePolicyViolation)
	srv.DialRaw("/ws/r").CloseNow() // gone without a close frame: 1006

	want := map[protocol.CloseCode]uint64{
		protocol.CloseNormal:          1,
		protocol.CloseDisconnected:    1,
		protocol.ClosePolicyViolation: 1,
		protocol.CloseAbnormal:        1,
	}
	var got map[protocol.CloseCode]uint64
	pubsubtest.WaitFor(t, fmt.Sprintf("Closed() = %v", want), func() bool {
		got = srv.Closed()
		return maps.Equal(got, want)
	})
	got[protocol.CloseNormal] = 99 // a snapshot: the caller's copy
	if n := srv.Closed()[protocol.CloseNormal]; n != 1 {
		t.Fatalf("changing Closed()'s map changed the Handler's count to %d", n)
	}
}

// ------------------------------------------------------ Shutdown, Close

// atOnce runs f and fails the test unless it returns within 4 seconds.
// It tells "at once" from "after a close handshake timed out": against a
// client that does not read, coder/websocket's Close waits 5 seconds for
// the peer's close frame. Normal runs take milliseconds.
func atOnce(t *testing.T, what string, f func()) {
	t.Helper()
	deadline := time.NewTimer(4 * time.Second)
	defer deadline.Stop()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-deadline.C:
		t.Errorf("%s waited for a close handshake instead of ending every connection at once", what)
		<-done
		t.FailNow()
	}
}

// shutdownBegun waits until Shutdown, run on another goroutine, has begun.
func shutdownBegun(t *testing.T, srv *pubsubtest.Server) {
	t.Helper()
	ctx := pubsubtest.Context(t)
	pubsubtest.WaitFor(t, "Shutdown to begin", func() bool {
		return errors.Is(srv.Handler.Publish(ctx, "no-subscribers", nil), pubsub.ErrClosed)
	})
}

func TestShutdownDeliversQueuedMessagesBeforeGoingAway(t *testing.T) {
	t.Parallel()
	var hooks hookLog
	srv := pubsubtest.Start(t, hooks.options(pubsub.WithQueueLimits(10000, 64<<20))...)
	c := srv.DialRaw("/ws?room=news") // reads only once Shutdown began
	id := hooks.connected(t, 1).ID
	ctx := pubsubtest.Context(t)

	// About 6 MB: more than the socket buffers hold, so while the client
	// does not read, most of it is still in the connection's queue.
	const n = 1500
	filler := strings.Repeat("q", 4<<10)
	for i := range n {
		srv.Publish("news", fmt.Appendf(nil, "%05d:%s", i, filler))
	}
	done := make(chan error, 1)
	go func() { done <- srv.Shutdown(ctx) }()
	shutdownBegun(t, srv)

	for i := range n {
		if binary, b := c.Read(); binary || !strings.HasPrefix(string(b), fmt.Sprintf("%05d:", i)) {
			t.Fatalf("message %.8q, want #%d", b, i)
		}
	}
	c.ExpectClose(protocol.CloseGoingAway)
	if err := pubsubtest.Receive(t, done, "Shutdown to return"); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if ev, _ := hooks.ended(id); ev.Code != protocol.CloseGoingAway {
		t.Fatalf("OnDisconnect code %d, want 1001", ev.Code)
	}
}

func TestShutdownRefusesNewUpgradesWith503(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	c := srv.DialRaw("/ws?room=r") // reads only later, so Shutdown waits for it
	pubsubtest.WaitFor(t, "one connection", func() bool { return srv.Stats().Connections == 1 })
	done := make(chan error, 1)
	go func() { done <- srv.Shutdown(pubsubtest.Context(t)) }()
	shutdownBegun(t, srv)

	// During Shutdown.
	srv.Refused("/ws?room=r", http.StatusServiceUnavailable)
	srv.Refused("/ws", http.StatusServiceUnavailable, pubsubtest.Subprotocols(protocol.Subprotocol))
	c.ExpectClose(protocol.CloseGoingAway)
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	// After it.
	srv.Refused("/ws?room=r", http.StatusServiceUnavailable)
	if n := srv.Stats().Refused; n != 3 {
		t.Fatalf("Stats().Refused = %d, want 3", n)
	}
}

func TestShutdownReturnsOnlyAfterEveryServeHTTPCallEnded(t *testing.T) {
	t.Parallel()
	var hooks hookLog
	srv := pubsubtest.Start(t, hooks.options()...)
	var conns []any
	for range 3 {
		conns = append(conns, srv.Dial("/ws"))
	}
	for range 2 {
		conns = append(conns, srv.DialRaw("/ws?room=r"))
	}
	pubsubtest.WaitFor(t, "five connections", func() bool { return srv.Stats().Connections == 5 })
	codes := make(chan protocol.CloseCode, len(conns))
	for _, c := range conns {
		go func() {
			code, _, _ := pubsubtest.CloseOf(readToEnd(c))
			codes <- code
		}()
	}

	if err := srv.Shutdown(pubsubtest.Context(t)); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	// No waiting from here on: every ServeHTTP call, and so every
	// OnDisconnect, has ended.
	if s := srv.Stats(); s.Connections != 0 || s.Rooms != 0 {
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
	var hooks hookLog
	srv := pubsubtest.Start(t, hooks.options()...)
	raw := srv.DialRaw("/ws?room=r") // never reads: no close handshake
	p := srv.Dial("/ws")             // reads nothing after the welcome
	pubsubtest.WaitFor(t, "two connections", func() bool { return srv.Stats().Connections == 2 })

	expired, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	var err error
	atOnce(t, "Shutdown with an expired context", func() { err = srv.Shutdown(expired) })
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown with an expired context = %v, want context.DeadlineExceeded", err)
	}
	if n := srv.Stats().Connections; n != 0 {
		t.Fatalf("after Shutdown: %d connections, want 0", n)
	}
	if _, ds := hooks.snapshot(); len(ds) != 2 {
		t.Fatalf("after Shutdown: %d OnDisconnect calls, want 2", len(ds))
	}
	ended(t, raw)
	ended(t, p)
}

func TestShutdownTwiceAndCloseAfterShutdownAreSafeAndCloseTheBrokerOnce(t *testing.T) {
	t.Parallel()
	b := newTestBroker()
	srv := pubsubtest.Start(t, pubsub.WithBroker(b))
	p := srv.Dial("/ws")
	p.Subscribe("r")
	ctx := pubsubtest.Context(t)
	done := make(chan error, 1)
	go func() { done <- srv.Shutdown(ctx) }()
	p.ExpectClose(protocol.CloseGoingAway)
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatalf("second Shutdown: %v", err)
	}
	if err := srv.Close(); err != nil {
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

// closeTimes records when each connection's OnDisconnect ran.
type closeTimes struct {
	mu sync.Mutex
	at []time.Time
}

func (c *closeTimes) option() pubsub.Option {
	return pubsub.WithOnDisconnect(func(pubsub.DisconnectEvent) {
		c.mu.Lock()
		c.at = append(c.at, time.Now())
		c.mu.Unlock()
	})
}

// dialReading dials n raw clients into room, each reading on a goroutine
// of its own until its connection ends, so that Shutdown's close
// handshakes complete.
func dialReading(t *testing.T, srv *pubsubtest.Server, room string, n int) {
	t.Helper()
	for range n {
		c := srv.DialRaw("/ws?room=" + room)
		go readToEnd(c)
	}
	pubsubtest.WaitFor(t, fmt.Sprintf("%d connections", n), func() bool { return srv.Stats().Connections == n })
}

func TestShutdownDrainsInSpacedBatches(t *testing.T) {
	t.Parallel()
	const pause = 300 * time.Millisecond
	var closed closeTimes
	srv := pubsubtest.Start(t, pubsub.WithDrain(2, pause), closed.option())
	dialReading(t, srv, "fleet", 6)
	start := time.Now()
	if err := srv.Shutdown(pubsubtest.Context(t)); err != nil {
		t.Fatal(err)
	}
	closed.mu.Lock()
	defer closed.mu.Unlock()
	slices.SortFunc(closed.at, func(a, b time.Time) int { return a.Compare(b) })
	if len(closed.at) != 6 {
		t.Fatalf("%d disconnects, want 6", len(closed.at))
	}
	// Lower bounds only: a loaded machine can delay a batch, never hasten it.
	if d := closed.at[2].Sub(start); d < pause {
		t.Fatalf("the third close came %v after Shutdown, want at least one pause (%v): batches of 2", d, pause)
	}
	if d := closed.at[4].Sub(start); d < 2*pause {
		t.Fatalf("the fifth close came %v after Shutdown, want at least two pauses (%v)", d, 2*pause)
	}
}

func TestShutdownStopsPacingWhenItsContextEnds(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithDrain(1, time.Hour))
	dialReading(t, srv, "fleet", 3)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	done := make(chan struct{})
	go func() { srv.Shutdown(ctx); close(done) }()
	select {
	case <-done:
	case <-pubsubtest.Context(t).Done():
		t.Fatal("Shutdown kept pacing after its context ended")
	}
	if n := srv.Stats().Connections; n != 0 {
		t.Fatalf("%d connections after Shutdown, want 0", n)
	}
}

func TestCloseEndsEveryConnectionAtOnce(t *testing.T) {
	t.Parallel()
	var hooks hookLog
	b := newTestBroker()
	srv := pubsubtest.Start(t, hooks.options(pubsub.WithBroker(b))...)
	raw := srv.DialRaw("/ws?room=r") // neither client reads:
	p := srv.Dial("/ws")             // Close waits for no handshake
	p.Subscribe("s")
	pubsubtest.WaitFor(t, "two connections", func() bool { return srv.Stats().Connections == 2 })

	var err error
	atOnce(t, "Close", func() { err = srv.Close() })
	if err != nil {
		t.Fatalf("Close: %v", err)
	}
	if s := srv.Stats(); s.Connections != 0 || s.Rooms != 0 {
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
	ended(t, raw)
	ended(t, p)
	if n := b.closes.Load(); n != 1 {
		t.Fatalf("Broker.Close called %d times, want once", n)
	}
	srv.Refused("/ws", http.StatusServiceUnavailable)
	if err := srv.Shutdown(pubsubtest.Context(t)); err != nil {
		t.Fatalf("Shutdown after Close: %v", err)
	}
	if n := b.closes.Load(); n != 1 {
		t.Fatalf("Broker.Close called %d times after Shutdown, want once", n)
	}
}

// Not parallel: it counts the process's goroutines, so no other test may
// run meanwhile (parallel tests wait until the sequential ones are done).
func TestNewHandlerStartsNoGoroutine(t *testing.T) {
	before := runtime.NumGoroutine()
	h1 := pubsub.NewHandler()
	h2 := quietHandler(
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

// A raw connection joins its room before its handshake completes, so
// messages can be queued for it while Shutdown begins mid-upgrade: it is
// flushed before it goes away, like every other connection.
func TestShutdownFlushesAConnectionWhoseUpgradeWasInFlight(t *testing.T) {
	t.Parallel()
	h := pubsub.NewHandler()
	hijacking, release := make(chan struct{}), make(chan struct{})
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.ServeHTTP(&heldHijack{ResponseWriter: w, reached: hijacking, release: release}, r)
	}))
	srv := pubsubtest.ServeOn(t, h, ts)
	ctx := pubsubtest.Context(t)

	type result struct {
		got []string
		err error
	}
	client := make(chan result, 1)
	go func() {
		c, _, err := websocket.Dial(ctx, srv.WS("/ws?room=news"), nil)
		if err != nil {
			client <- result{err: err}
			return
		}
		defer c.CloseNow()
		var got []string
		for {
			_, msg, err := c.Read(ctx)
			if err != nil {
				client <- result{got, err}
				return
			}
			got = append(got, string(msg))
		}
	}()
	pubsubtest.Receive(t, hijacking, "the upgrade to reach its hijack") // in the room by now
	srv.Publish("news", []byte("queued during the upgrade"))
	done := make(chan error, 1)
	go func() { done <- srv.Shutdown(ctx) }()
	shutdownBegun(t, srv)
	close(release)

	r := pubsubtest.Receive(t, client, "the client to end")
	if code := websocket.CloseStatus(r.err); code != websocket.StatusCode(protocol.CloseGoingAway) {
		t.Fatalf("the client ended with %v, want a 1001 close", r.err)
	}
	if !slices.Equal(r.got, []string{"queued during the upgrade"}) {
		t.Fatalf("the client got %q before going away, want the message queued for it", r.got)
	}
	if err := pubsubtest.Receive(t, done, "Shutdown to return"); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

// heldHijack holds the upgrade at its hijack until release is closed,
// closing reached when it gets there.
type heldHijack struct {
	http.ResponseWriter
	reached chan<- struct{}
	release <-chan struct{}
}

func (w *heldHijack) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	close(w.reached)
	<-w.release
	return http.NewResponseController(w.ResponseWriter).Hijack()
}
