package client_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/roomcast/pubsub/protocol"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/client"
	"github.com/roomcast/pubsub/internal/leaktest"
)

// TestMain fails the run when goroutines outlive the tests: every client's
// manager, readers and subscription goroutines, every handler and test
// server must have ended.
func TestMain(m *testing.M) {
	os.Exit(leaktest.After(m.Run()))
}

// quietLogger keeps test output to failures; ROOMCAST_TEST_LOG=1 shows logs.
func quietLogger() *slog.Logger {
	if os.Getenv("ROOMCAST_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// testServer runs pubsub Handlers behind an httptest server whose handler
// can be swapped, whose upgrades can be refused, and whose TCP connections
// can be cut from the server side.
type testServer struct {
	t      *testing.T
	srv    *httptest.Server
	h      atomic.Pointer[pubsub.Handler]
	refuse atomic.Int32 // an HTTP status to answer upgrades with; 0 serves them

	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	handlers []*pubsub.Handler
}

func newHandler(opts ...pubsub.Option) *pubsub.Handler {
	return pubsub.NewHandler(append([]pubsub.Option{pubsub.WithLogger(quietLogger())}, opts...)...)
}

// startServer serves a new Handler built from opts. Cleanup closes every
// Handler it served, then the server.
func startServer(t *testing.T, opts ...pubsub.Option) *testServer {
	t.Helper()
	ts := &testServer{t: t, conns: make(map[net.Conn]struct{})}
	ts.use(newHandler(opts...))
	ts.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if st := ts.refuse.Load(); st != 0 {
			http.Error(w, "refused by the test", int(st))
			return
		}
		ts.h.Load().ServeHTTP(w, r)
	}))
	ts.srv.Config.ConnState = func(c net.Conn, st http.ConnState) {
		ts.mu.Lock()
		defer ts.mu.Unlock()
		switch st {
		case http.StateNew:
			ts.conns[c] = struct{}{}
		case http.StateClosed:
			delete(ts.conns, c)
		}
	}
	ts.srv.Start()
	t.Cleanup(func() {
		ts.mu.Lock()
		hs := ts.handlers
		ts.mu.Unlock()
		for _, h := range hs {
			h.Close()
		}
		ts.srv.Close()
	})
	return ts
}

func (ts *testServer) use(h *pubsub.Handler) {
	ts.mu.Lock()
	ts.handlers = append(ts.handlers, h)
	ts.mu.Unlock()
	ts.h.Store(h)
}

// handler is the Handler serving now.
func (ts *testServer) handler() *pubsub.Handler { return ts.h.Load() }

func (ts *testServer) url() string { return "ws" + strings.TrimPrefix(ts.srv.URL, "http") + "/ws" }

// cut closes every TCP connection from the server side, without a close
// frame: the clients see 1006.
func (ts *testServer) cut() {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	for c := range ts.conns {
		c.Close()
		delete(ts.conns, c)
	}
}

// swap serves new connections with h and shuts the old Handler down: its
// clients get 1001.
func (ts *testServer) swap(h *pubsub.Handler) {
	old := ts.h.Load()
	ts.use(h)
	if err := old.Shutdown(testCtx(ts.t)); err != nil {
		ts.t.Fatal(err)
	}
}

// dialClient dials with a quiet logger and fast reconnection; cleanup
// closes the client.
func dialClient(t *testing.T, url string, opts ...client.Option) *client.Client {
	t.Helper()
	base := []client.Option{client.WithLogger(quietLogger()), client.WithReconnect(5*time.Millisecond, 50*time.Millisecond)}
	c, err := client.Dial(testCtx(t), url, append(base, opts...)...)
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// collector gathers values from callbacks; one test goroutine reads them
// in order.
type collector[T any] struct {
	mu    sync.Mutex
	items []T
	read  int
	added chan struct{} // capacity 1
}

func newCollector[T any]() *collector[T] {
	return &collector[T]{added: make(chan struct{}, 1)}
}

func (c *collector[T]) add(v T) {
	c.mu.Lock()
	c.items = append(c.items, v)
	c.mu.Unlock()
	select {
	case c.added <- struct{}{}:
	default:
	}
}

// next waits for the next value.
func (c *collector[T]) next(t *testing.T, what string) T {
	t.Helper()
	return c.waitFor(t, what, func(T) bool { return true })
}

// waitFor skips values until one satisfies ok, and returns it.
func (c *collector[T]) waitFor(t *testing.T, what string, ok func(T) bool) T {
	t.Helper()
	ctx := testCtx(t)
	for {
		c.mu.Lock()
		for c.read < len(c.items) {
			v := c.items[c.read]
			c.read++
			if ok(v) {
				c.mu.Unlock()
				return v
			}
		}
		c.mu.Unlock()
		select {
		case <-c.added:
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s; got %v", what, c.all())
		}
	}
}

// pending reports how many values have not been read.
func (c *collector[T]) pending() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.items) - c.read
}

func (c *collector[T]) all() []T {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]T(nil), c.items...)
}

type stateChange struct {
	state client.State
	err   error
}

func (s stateChange) String() string { return fmt.Sprintf("%v(%v)", s.state, s.err) }

func stateCollector() (*collector[stateChange], client.Option) {
	c := newCollector[stateChange]()
	return c, client.WithOnState(func(st client.State, err error) { c.add(stateChange{st, err}) })
}

// closeCode matches a state change caused by a close with code.
func closeCode(code protocol.CloseCode) func(stateChange) bool {
	return func(s stateChange) bool {
		var ce *client.CloseError
		return errors.As(s.err, &ce) && ce.Code == code
	}
}

func isState(st client.State) func(stateChange) bool {
	return func(s stateChange) bool { return s.state == st }
}

func msgString(m client.Message) string {
	return fmt.Sprintf("%s#%d:%s", m.Room, m.Seq, m.Data)
}

// wantCode checks that err is an *Error with code.
func wantCode(t *testing.T, err error, code protocol.ErrorCode) {
	t.Helper()
	var e *client.Error
	if !errors.As(err, &e) || e.Code != code {
		t.Fatalf("got error %v, want an *Error coded %q", err, code)
	}
}

func publish(t *testing.T, h *pubsub.Handler, room, data string) {
	t.Helper()
	if err := h.Publish(testCtx(t), room, []byte(data)); err != nil {
		t.Fatal(err)
	}
}

// --- requests ---

func TestSubscribeThenPublishDeliversTheMessageWithItsPosition(t *testing.T) {
	t.Parallel()
	ts := startServer(t, pubsub.WithClientPublish(true))
	c := dialClient(t, ts.url())
	ctx := testCtx(t)
	msgs := newCollector[client.Message]()
	sub, err := c.Subscribe(ctx, "chat", msgs.add)
	if err != nil {
		t.Fatal(err)
	}
	if sub.Room() != "chat" {
		t.Fatalf("Room() = %q", sub.Room())
	}
	if ep, seq := sub.Position(); ep == "" || seq != 0 {
		t.Fatalf("position after subscribing to an empty room = (%q, %d), want (epoch, 0)", ep, seq)
	}
	before := time.Now().Add(-time.Second)
	if _, err := c.Publish(ctx, "chat", []byte(`{"text": "hi"}`)); err != nil {
		t.Fatalf("publish: %v", err)
	}
	m := msgs.next(t, "the message")
	if m.Room != "chat" || m.Seq != 1 || m.Kind != client.KindJSON || string(m.Data) != `{"text": "hi"}` ||
		m.Epoch == "" || m.ID == "" || m.Time.Before(before) || m.Time.After(time.Now().Add(time.Second)) {
		t.Fatalf("got %+v", m)
	}
	if ep, seq := sub.Position(); ep != m.Epoch || seq != 1 {
		t.Fatalf("position = (%q, %d), want (%q, 1)", ep, seq, m.Epoch)
	}
	if c.ConnID() == "" || c.State() != client.StateConnected {
		t.Fatalf("conn id %q, state %v", c.ConnID(), c.State())
	}
}

func TestRequestsRefusedByTheServerReturnItsErrorCode(t *testing.T) {
	t.Parallel()
	ts := startServer(t, pubsub.WithMaxRooms(1), pubsub.WithRoomOptions(func(room string, o *pubsub.RoomOptions) {
		if room == "quiet" {
			o.Presence = pubsub.PresenceOff
		}
	}))
	c := dialClient(t, ts.url())
	ctx := testCtx(t)
	nop := func(client.Message) {}

	_, err := c.Subscribe(ctx, "bad room", nop)
	wantCode(t, err, protocol.CodeInvalidRoom)
	_, err = c.Publish(ctx, "chat", []byte("hi"))
	wantCode(t, err, protocol.CodeForbidden) // clients may not publish on this server
	err = c.Send(ctx, "", []byte("hi"))
	wantCode(t, err, protocol.CodeNotSupported) // no message handler
	_, err = c.Subscribe(ctx, "big", nop, client.Info(json.RawMessage(`{"pad":"`+strings.Repeat("x", 2000)+`"}`)))
	wantCode(t, err, protocol.CodeBadRequest)

	sub, err := c.Subscribe(ctx, "quiet", nop)
	if err != nil {
		t.Fatal(err)
	}
	_, err = sub.Presence(ctx)
	wantCode(t, err, protocol.CodeNotSupported)
	_, err = c.Subscribe(ctx, "second", nop)
	wantCode(t, err, protocol.CodeTooManyRooms)

	// A refused subscribe leaves nothing behind: the room can be tried
	// again, and is refused again rather than "already subscribed".
	_, err = c.Subscribe(ctx, "bad room", nop)
	wantCode(t, err, protocol.CodeInvalidRoom)
	if e := (*client.Error)(nil); !errors.As(err, &e) || e.Message == "" {
		t.Fatalf("error %v has no message", err)
	}
}

func TestSubscribingTwiceToOneRoomFails(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	c := dialClient(t, ts.url())
	ctx := testCtx(t)
	if _, err := c.Subscribe(ctx, "r", func(client.Message) {}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Subscribe(ctx, "r", func(client.Message) {}); !errors.Is(err, client.ErrAlreadySubscribed) {
		t.Fatalf("second subscribe: %v, want ErrAlreadySubscribed", err)
	}
}

func TestUnsubscribeStopsDeliveryAndFreesTheRoom(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	c := dialClient(t, ts.url())
	ctx := testCtx(t)
	a, b := newCollector[client.Message](), newCollector[client.Message]()
	subA, err := c.Subscribe(ctx, "a", a.add)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Subscribe(ctx, "b", b.add); err != nil {
		t.Fatal(err)
	}
	if err := subA.Unsubscribe(ctx); err != nil {
		t.Fatal(err)
	}
	if err := subA.Unsubscribe(ctx); err != nil {
		t.Fatalf("second Unsubscribe: %v", err)
	}
	h := ts.handler()
	publish(t, h, "a", "after unsubscribe")
	publish(t, h, "b", "marker")
	// One connection gets its rooms' messages in publish order: once b's
	// marker is here, a's message would have been too.
	b.next(t, "the marker")
	if n := a.pending(); n != 0 {
		t.Fatalf("%d messages of an unsubscribed room were delivered: %v", n, a.all())
	}
	a2 := newCollector[client.Message]()
	if _, err := c.Subscribe(ctx, "a", a2.add); err != nil {
		t.Fatalf("subscribe again after Unsubscribe: %v", err)
	}
	publish(t, h, "a", "again")
	if m := a2.next(t, "a message after resubscribing"); string(m.Data) != "again" {
		t.Fatalf("got %s", msgString(m))
	}
}

func TestPublishLargerThanTheServerAcceptsFailsWithoutDisconnecting(t *testing.T) {
	t.Parallel()
	ts := startServer(t, pubsub.WithClientPublish(true), pubsub.WithMaxMessageBytes(256))
	states, onState := stateCollector()
	c := dialClient(t, ts.url(), onState)
	ctx := testCtx(t)
	connID := c.ConnID()
	_, err := c.Publish(ctx, "r", []byte(strings.Repeat("x", 300)))
	if !errors.Is(err, client.ErrTooLarge) {
		t.Fatalf("publish of 300 bytes: %v, want ErrTooLarge", err)
	}
	if _, err := c.Publish(ctx, "r", []byte("small")); err != nil {
		t.Fatalf("small publish after: %v", err)
	}
	if c.ConnID() != connID {
		t.Fatal("the connection was replaced")
	}
	for _, s := range states.all() {
		if s.state != client.StateConnected {
			t.Fatalf("state changed: %v", states.all())
		}
	}
}

// --- payloads and ordering ---

func TestPayloadsKeepTheirBytesAndArriveWithTheServersKind(t *testing.T) {
	t.Parallel()
	ts := startServer(t, pubsub.WithClientPublish(true))
	c := dialClient(t, ts.url())
	ctx := testCtx(t)
	msgs := newCollector[client.Message]()
	if _, err := c.Subscribe(ctx, "kinds", msgs.add); err != nil {
		t.Fatal(err)
	}
	// A raw-mode client in the same room sees the bytes the server stored.
	raw, _, err := websocket.Dial(ctx, ts.url()+"?room=kinds", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.CloseNow()
	waitForSubscribers(t, ts.handler(), "kinds", 2)

	cases := []struct {
		name     string
		data     string
		kind     client.Kind
		received string // what a protocol client gets, when not data itself
	}{
		{"json object", `{"a": [1, 2], "b": "x"}`, client.KindJSON, ""},
		{"json number", `42`, client.KindJSON, ""},
		{"json null", `null`, client.KindJSON, ""},
		{"text", "hello", client.KindText, ""},
		{"text with escapes", "line\n\"quoted\"\t\\ \x01 <&> \u2028", client.KindText, ""},
		{"unicode", "héllo ✓", client.KindText, ""},
		{"empty", "", client.KindText, ""},
		// JSON with surrounding whitespace travels as text, both ways, so
		// every receiver gets exactly the bytes, spaces included.
		{"padded json", " {\"a\":1} ", client.KindText, ""},
		{"binary", "\x00\x01\xfe\xff", client.KindBinary, ""},
	}
	for _, tc := range cases {
		if _, err := c.Publish(ctx, "kinds", []byte(tc.data)); err != nil {
			t.Fatalf("%s: publish: %v", tc.name, err)
		}
		m := msgs.next(t, tc.name)
		want := tc.data
		if tc.received != "" {
			want = tc.received
		}
		if m.Kind != tc.kind || string(m.Data) != want {
			t.Errorf("%s: got %v %q, want %v %q", tc.name, m.Kind, m.Data, tc.kind, want)
		}
		typ, b, err := raw.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		wantType := websocket.MessageText
		if tc.kind == client.KindBinary {
			wantType = websocket.MessageBinary
		}
		if typ != wantType || string(b) != tc.data {
			t.Errorf("%s: the server stored %v %q, want %v %q", tc.name, typ, b, wantType, tc.data)
		}
	}
}

// waitForSubscribers waits until room has n subscribers on h.
func waitForSubscribers(t *testing.T, h *pubsub.Handler, room string, n int) {
	t.Helper()
	ctx := testCtx(t)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for len(h.Connections(room)) != n {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %d subscribers of %q", n, room)
		case <-tick.C:
		}
	}
}

func TestMessagesOfARoomArriveInSeqOrder(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	c := dialClient(t, ts.url())
	ctx := testCtx(t)
	msgs := newCollector[client.Message]()
	sub, err := c.Subscribe(ctx, "feed", msgs.add)
	if err != nil {
		t.Fatal(err)
	}
	const n = 300
	h := ts.handler()
	for i := 1; i <= n; i++ {
		publish(t, h, "feed", fmt.Sprint(i))
	}
	for i := 1; i <= n; i++ {
		m := msgs.next(t, fmt.Sprint("message ", i))
		if m.Seq != uint64(i) || string(m.Data) != fmt.Sprint(i) {
			t.Fatalf("message %d: got %s", i, msgString(m))
		}
	}
	if _, seq := sub.Position(); seq != n {
		t.Fatalf("position seq %d, want %d", seq, n)
	}
}

// --- presence and direct messages ---

func TestPresenceEventsAndListShowOtherMembers(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	ctx := testCtx(t)
	ann, bob := dialClient(t, ts.url()), dialClient(t, ts.url())
	events := newCollector[client.Event]()
	annSub, err := ann.Subscribe(ctx, "lobby", func(client.Message) {},
		client.OnPresence(events.add), client.Info(json.RawMessage(`{"name":"Ann"}`)))
	if err != nil {
		t.Fatal(err)
	}
	bobSub, err := bob.Subscribe(ctx, "lobby", func(client.Message) {}, client.Info(json.RawMessage(`{"name":"Bob"}`)))
	if err != nil {
		t.Fatal(err)
	}
	join := events.waitFor(t, "Bob's join", func(e client.Event) bool { return e.ConnID == bob.ConnID() })
	if join.Type != client.EventJoin || join.Room != "lobby" || string(join.Info) != `{"name":"Bob"}` {
		t.Fatalf("got %+v", join)
	}

	p, err := annSub.Presence(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if p.Count != 2 || p.Connections != 2 || len(p.Members) != 2 {
		t.Fatalf("presence %+v, want 2 members with 1 connection each", p)
	}
	infos := map[string]string{}
	for _, m := range p.Members {
		if len(m.Conns) != 1 {
			t.Fatalf("member %+v", m)
		}
		infos[m.Conns[0]] = string(m.Info)
	}
	if infos[ann.ConnID()] != `{"name":"Ann"}` || infos[bob.ConnID()] != `{"name":"Bob"}` {
		t.Fatalf("members %+v", p.Members)
	}

	if err := bobSub.Unsubscribe(ctx); err != nil {
		t.Fatal(err)
	}
	leave := events.next(t, "Bob's leave")
	if leave.Type != client.EventLeave || leave.ConnID != bob.ConnID() {
		t.Fatalf("got %+v, want Bob's leave", leave)
	}
}

func TestDirectMessagesAndSendReachTheirHandlers(t *testing.T) {
	t.Parallel()
	ts := startServer(t, pubsub.WithOnMessage(func(ctx context.Context, m *pubsub.ClientMessage) error {
		if string(m.Data) == "bad" {
			return errors.New("refused")
		}
		return m.Reply([]byte("echo:" + m.Room + ":" + string(m.Data)))
	}))
	direct := newCollector[client.Message]()
	c := dialClient(t, ts.url(), client.WithOnDirect(direct.add))
	ctx := testCtx(t)

	if err := c.Send(ctx, "lobby", []byte("hi")); err != nil {
		t.Fatalf("send: %v", err)
	}
	if m := direct.next(t, "the reply"); string(m.Data) != "echo:lobby:hi" || m.Kind != client.KindText || m.Room != "" {
		t.Fatalf("got %+v", m)
	}
	wantCode(t, c.Send(ctx, "", []byte("bad")), protocol.CodeRejected)

	if err := ts.handler().PublishToConn(ctx, c.ConnID(), []byte(`{"n":1}`)); err != nil {
		t.Fatal(err)
	}
	if m := direct.next(t, "the direct message"); string(m.Data) != `{"n":1}` || m.Kind != client.KindJSON {
		t.Fatalf("got %+v", m)
	}
}

func TestDialSendsHeadersAndReportsRefusals(t *testing.T) {
	t.Parallel()
	ts := startServer(t, pubsub.WithAuthenticate(func(r *http.Request) (pubsub.Identity, error) {
		if r.Header.Get("Authorization") != "Bearer ann" {
			return pubsub.Identity{}, pubsub.ErrUnauthorized
		}
		return pubsub.Identity{UserID: "ann"}, nil
	}))
	c := dialClient(t, ts.url(), client.WithHeader(http.Header{"Authorization": {"Bearer ann"}}))
	if c.UserID() != "ann" {
		t.Fatalf("user id %q", c.UserID())
	}
	_, err := client.Dial(testCtx(t), ts.url(), client.WithLogger(quietLogger()))
	var de *client.DialError
	if !errors.As(err, &de) || de.StatusCode != http.StatusUnauthorized {
		t.Fatalf("dial without credentials: %v, want a *DialError with 401", err)
	}

	// A WebSocket server that does not speak roomcast.v1.
	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		ws.CloseNow()
	}))
	defer plain.Close()
	_, err = client.Dial(testCtx(t), "ws"+strings.TrimPrefix(plain.URL, "http"), client.WithLogger(quietLogger()))
	if !errors.As(err, &de) || de.StatusCode != 0 {
		t.Fatalf("dial of a server without the subprotocol: %v, want a *DialError", err)
	}
}

// --- reconnection and recovery ---

func TestReconnectRecoversMessagesPublishedWhileDisconnectedExactlyOnce(t *testing.T) {
	t.Parallel()
	ts := startServer(t, pubsub.WithHistory(100, time.Minute))
	states, onState := stateCollector()
	c := dialClient(t, ts.url(), onState)
	ctx := testCtx(t)
	type delivery struct {
		msg *client.Message
		rec *client.Recovery
	}
	log := newCollector[delivery]()
	sub, err := c.Subscribe(ctx, "news", func(m client.Message) { log.add(delivery{msg: &m}) },
		client.OnRecover(func(r client.Recovery) { log.add(delivery{rec: &r}) }))
	if err != nil {
		t.Fatal(err)
	}
	h := ts.handler()
	for i := 1; i <= 3; i++ {
		publish(t, h, "news", fmt.Sprint(i))
	}
	for i := 1; i <= 3; i++ {
		log.next(t, "a live message")
	}
	firstConn := c.ConnID()

	ts.refuse.Store(http.StatusServiceUnavailable) // keep it away while we publish
	ts.cut()
	states.waitFor(t, "the connection loss", closeCode(1006))
	states.waitFor(t, "a refused reconnection", func(s stateChange) bool {
		var de *client.DialError
		return errors.As(s.err, &de) && de.StatusCode == http.StatusServiceUnavailable
	})
	for i := 4; i <= 8; i++ {
		publish(t, h, "news", fmt.Sprint(i))
	}
	ts.refuse.Store(0)

	d := log.next(t, "the recovery")
	if d.rec == nil || !d.rec.Recovered || d.rec.Missed != 5 || d.rec.Reason != "" || d.rec.Err != nil || d.rec.Room != "news" {
		t.Fatalf("got %+v, want a recovery of 5 messages first", d)
	}
	states.waitFor(t, "reconnected", isState(client.StateConnected))
	if c.ConnID() == firstConn {
		t.Fatal("ConnID did not change with the connection")
	}
	publish(t, h, "news", "9")
	for i := 4; i <= 9; i++ {
		d := log.next(t, fmt.Sprint("message ", i))
		if d.msg == nil || d.msg.Seq != uint64(i) || string(d.msg.Data) != fmt.Sprint(i) {
			t.Fatalf("delivery %d: got %+v", i, d)
		}
	}
	if _, seq := sub.Position(); seq != 9 {
		t.Fatalf("position %d, want 9", seq)
	}
}

func TestRecoveryIsRefusedWithEpochChangedAfterTheServerLostTheRoom(t *testing.T) {
	t.Parallel()
	ts := startServer(t, pubsub.WithHistory(100, time.Minute))
	states, onState := stateCollector()
	c := dialClient(t, ts.url(), onState)
	ctx := testCtx(t)
	msgs, recs := newCollector[client.Message](), newCollector[client.Recovery]()
	if _, err := c.Subscribe(ctx, "room", msgs.add, client.OnRecover(recs.add)); err != nil {
		t.Fatal(err)
	}
	publish(t, ts.handler(), "room", "old")
	old := msgs.next(t, "the first message")

	restarted := newHandler(pubsub.WithHistory(100, time.Minute)) // a fresh broker: new epochs
	ts.swap(restarted)
	states.waitFor(t, "going away", closeCode(1001))
	r := recs.next(t, "the recovery")
	if r.Recovered || r.Reason != protocol.ReasonEpochChanged || r.Missed != 0 || r.Err != nil || r.Epoch == old.Epoch {
		t.Fatalf("got %+v, want recovery refused with epoch_changed and a new epoch", r)
	}
	publish(t, restarted, "room", "new")
	if m := msgs.next(t, "a message of the new epoch"); m.Epoch != r.Epoch || m.Seq != 1 || string(m.Data) != "new" {
		t.Fatalf("got %+v", m)
	}
}

func TestSlowHandlerMakesTheClientReconnectAndRecoverInsteadOfDropping(t *testing.T) {
	t.Parallel()
	ts := startServer(t, pubsub.WithHistory(100, time.Minute))
	states, onState := stateCollector()
	c := dialClient(t, ts.url(), onState, client.WithBufferSize(2))
	release := make(chan struct{})
	var releaseOnce sync.Once
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) }) // before the client's Close
	ctx := testCtx(t)
	log := newCollector[string]()
	_, err := c.Subscribe(ctx, "fast", func(m client.Message) {
		if m.Seq == 1 {
			<-release
		}
		log.add(fmt.Sprint("msg ", m.Seq))
	}, client.OnRecover(func(r client.Recovery) {
		log.add(fmt.Sprintf("recovered=%v missed=%d", r.Recovered, r.Missed))
	}))
	if err != nil {
		t.Fatal(err)
	}
	const n = 10
	for i := 1; i <= n; i++ {
		publish(t, ts.handler(), "fast", fmt.Sprint(i))
	}
	states.waitFor(t, "the overflow", func(s stateChange) bool { return errors.Is(s.err, client.ErrSlowHandler) })
	releaseOnce.Do(func() { close(release) })

	// Every message exactly once, in order, with the recovery where the
	// buffer overflowed.
	got := 0
	for got < n {
		e := log.next(t, fmt.Sprint("message ", got+1))
		if e == fmt.Sprint("msg ", got+1) {
			got++
			continue
		}
		if want := fmt.Sprintf("recovered=true missed=%d", n-got); e != want {
			t.Fatalf("after %d messages got %q, want message %d or %q", got, e, got+1, want)
		}
	}
	if !strings.Contains(fmt.Sprint(log.all()), "recovered=true") {
		t.Fatalf("no recovery: %v", log.all())
	}
}

func TestResubscribingManyRoomsRetriesWhenRateLimited(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	states, onState := stateCollector()
	c := dialClient(t, ts.url(), onState)
	ctx := testCtx(t)
	recs := newCollector[client.Recovery]()
	const rooms = 5
	for i := range rooms {
		if _, err := c.Subscribe(ctx, fmt.Sprint("room", i), func(client.Message) {}, client.OnRecover(recs.add)); err != nil {
			t.Fatal(err)
		}
	}
	// The next server allows 2 requests at once, then one per 50ms.
	ts.swap(newHandler(pubsub.WithRateLimit(20, 2)))
	states.waitFor(t, "going away", closeCode(1001))
	states.waitFor(t, "every room restored", isState(client.StateConnected))
	seen := map[string]bool{}
	for range rooms {
		r := recs.next(t, "a recovery")
		if r.Err != nil {
			t.Fatalf("room %s was not restored: %v", r.Room, r.Err)
		}
		seen[r.Room] = true
	}
	if len(seen) != rooms {
		t.Fatalf("recovered %v", seen)
	}
}

func TestSubscriptionTheServerNoLongerAllowsEndsWithAnError(t *testing.T) {
	t.Parallel()
	var deny atomic.Bool
	ts := startServer(t, pubsub.WithAuthorize(func(ctx context.Context, c pubsub.Client, a pubsub.Action, room string) error {
		if deny.Load() {
			return pubsub.ErrForbidden
		}
		return nil
	}))
	states, onState := stateCollector()
	c := dialClient(t, ts.url(), onState)
	ctx := testCtx(t)
	recs := newCollector[client.Recovery]()
	if _, err := c.Subscribe(ctx, "vip", func(client.Message) {}, client.OnRecover(recs.add)); err != nil {
		t.Fatal(err)
	}
	deny.Store(true)
	ts.cut()
	r := recs.next(t, "the failed recovery")
	if r.Room != "vip" || r.Recovered {
		t.Fatalf("got %+v", r)
	}
	wantCode(t, r.Err, protocol.CodeForbidden)
	states.waitFor(t, "reconnected", isState(client.StateConnected))
	// The subscription is gone: subscribing again is a fresh request.
	_, err := c.Subscribe(ctx, "vip", func(client.Message) {})
	wantCode(t, err, protocol.CodeForbidden)
}

func TestWithoutReconnectTheClientStopsWhenTheConnectionEnds(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	c := dialClient(t, ts.url(), client.WithoutReconnect())
	ts.cut()
	select {
	case <-c.Done():
	case <-testCtx(t).Done():
		t.Fatal("the client did not stop")
	}
	var ce *client.CloseError
	if !errors.As(c.Err(), &ce) || ce.Code != 1006 {
		t.Fatalf("Err() = %v, want a *CloseError with 1006", c.Err())
	}
}

func TestDisconnectByTheServerStopsTheClientForGood(t *testing.T) {
	t.Parallel()
	var connects atomic.Int32
	ts := startServer(t, pubsub.WithOnConnect(func(pubsub.ConnectEvent) { connects.Add(1) }))
	states, onState := stateCollector()
	c := dialClient(t, ts.url(), onState)
	ctx := testCtx(t)
	msgs := newCollector[client.Message]()
	if _, err := c.Subscribe(ctx, "r", msgs.add); err != nil {
		t.Fatal(err)
	}
	if err := ts.handler().Disconnect(c.ConnID(), "kicked"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.Done():
	case <-ctx.Done():
		t.Fatal("the client did not stop")
	}
	var ce *client.CloseError
	if !errors.As(c.Err(), &ce) || ce.Code != 4003 || ce.Reason != "kicked" {
		t.Fatalf("Err() = %v, want 4003 kicked", c.Err())
	}
	last := states.waitFor(t, "closed", isState(client.StateClosed))
	if !errors.As(last.err, &ce) || ce.Code != 4003 {
		t.Fatalf("closed with %v", last.err)
	}
	// Done means the manager has ended: no reconnection can follow.
	if n := connects.Load(); n != 1 {
		t.Fatalf("%d connections, want 1", n)
	}
	if c.State() != client.StateClosed {
		t.Fatalf("state %v", c.State())
	}
	if _, err := c.Publish(ctx, "r", []byte("x")); !errors.Is(err, client.ErrClosed) {
		t.Fatalf("publish after the end: %v, want ErrClosed", err)
	}
	if _, err := c.Subscribe(ctx, "other", msgs.add); !errors.Is(err, client.ErrClosed) {
		t.Fatalf("subscribe after the end: %v, want ErrClosed", err)
	}
}

// fakeServer is a hand-written protocol server, for behaviour the real one
// does not show on demand: every accepted connection gets welcome, then
// serve(n, ws), n counting connections from 1.
type fakeServer struct {
	srv   *httptest.Server
	wg    sync.WaitGroup
	count atomic.Int32
	conns *collector[int]
}

func startFake(t *testing.T, welcome string, serve func(n int, ws *websocket.Conn)) *fakeServer {
	t.Helper()
	f := &fakeServer{conns: newCollector[int]()}
	f.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.wg.Add(1)
		defer f.wg.Done()
		ws, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{protocol.Subprotocol}})
		if err != nil {
			return
		}
		defer ws.CloseNow()
		n := int(f.count.Add(1))
		if err := ws.Write(context.Background(), websocket.MessageText, []byte(welcome)); err != nil {
			return
		}
		f.conns.add(n)
		serve(n, ws)
	}))
	// Runs after the client's cleanup (registered later), which ends the
	// connections the handlers are reading.
	t.Cleanup(func() {
		f.wg.Wait()
		f.srv.Close()
	})
	return f
}

func (f *fakeServer) url() string { return "ws" + strings.TrimPrefix(f.srv.URL, "http") }

// drain reads until the client goes away.
func drain(ws *websocket.Conn) {
	for {
		if _, _, err := ws.Read(context.Background()); err != nil {
			return
		}
	}
}

const quietWelcome = `{"type":"welcome","protocol":"roomcast.v1","conn_id":"fake","heartbeat_ms":0,"timeout_ms":0,"max_message_bytes":65536,"max_rooms":100}`

func TestCloseCodesDecideWhetherTheClientReconnects(t *testing.T) {
	t.Parallel()
	cases := []struct {
		code      protocol.CloseCode
		reconnect bool
	}{
		{1001, true}, {1006, true}, {1011, true}, {1013, true}, {4001, true}, {4002, true}, {4006, true},
		{1003, false}, {1007, false}, {1008, false}, {4003, false}, {4005, false},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprint(tc.code), func(t *testing.T) {
			t.Parallel()
			f := startFake(t, quietWelcome, func(n int, ws *websocket.Conn) {
				if n > 1 {
					drain(ws)
					return
				}
				if tc.code == 1006 {
					ws.CloseNow()
					return
				}
				ws.Close(websocket.StatusCode(tc.code), "bye")
			})
			states, onState := stateCollector()
			c := dialClient(t, f.url(), onState)
			if !tc.reconnect {
				select {
				case <-c.Done():
				case <-testCtx(t).Done():
					t.Fatal("the client did not stop")
				}
				var ce *client.CloseError
				if !errors.As(c.Err(), &ce) || ce.Code != tc.code || ce.Reason != "bye" {
					t.Fatalf("Err() = %v, want %d bye", c.Err(), tc.code)
				}
				if n := f.count.Load(); n != 1 {
					t.Fatalf("%d connections after %d, want 1", n, tc.code)
				}
				return
			}
			states.waitFor(t, "the close", func(s stateChange) bool {
				return s.state == client.StateReconnecting && closeCode(tc.code)(s)
			})
			f.conns.waitFor(t, "a second connection", func(n int) bool { return n == 2 })
			states.waitFor(t, "reconnected", isState(client.StateConnected))
		})
	}
}

func TestASilentServerIsDetectedByTheHeartbeatAndReplaced(t *testing.T) {
	t.Parallel()
	welcome := `{"type":"welcome","protocol":"roomcast.v1","conn_id":"fake","heartbeat_ms":20,"timeout_ms":20}`
	f := startFake(t, welcome, func(n int, ws *websocket.Conn) { drain(ws) }) // sends nothing more
	states, onState := stateCollector()
	dialClient(t, f.url(), onState)
	states.waitFor(t, "the heartbeat timeout", func(s stateChange) bool {
		return s.state == client.StateReconnecting && errors.Is(s.err, client.ErrHeartbeatTimeout)
	})
	f.conns.waitFor(t, "a new connection", func(n int) bool { return n == 2 })
}

func TestServerPingsAreAnsweredAndKeepTheConnectionAlive(t *testing.T) {
	t.Parallel()
	// A dead connection would be declared after 300ms; the server pings
	// every 20ms and counts the pongs well past that.
	welcome := `{"type":"welcome","protocol":"roomcast.v1","conn_id":"fake","heartbeat_ms":100,"timeout_ms":200}`
	pongs := newCollector[int]()
	f := startFake(t, welcome, func(n int, ws *websocket.Conn) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var wg sync.WaitGroup
		defer wg.Wait()
		wg.Go(func() {
			defer cancel()
			for {
				_, b, err := ws.Read(ctx)
				if err != nil {
					return
				}
				if string(b) == `{"type":"pong"}` {
					pongs.add(n)
				}
			}
		})
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				if ws.Write(ctx, websocket.MessageText, []byte(`{"type":"ping"}`)) != nil {
					return
				}
			}
		}
	})
	states, onState := stateCollector()
	dialClient(t, f.url(), onState)
	for i := range 25 {
		if n := pongs.next(t, fmt.Sprint("pong ", i)); n != 1 {
			t.Fatalf("pong on connection %d: the first one was dropped", n)
		}
	}
	for _, s := range states.all() {
		if s.state != client.StateConnected {
			t.Fatalf("state changes %v, want only connected", states.all())
		}
	}
}

// --- closing ---

func TestCloseStopsTheClientAndLaterCallsFail(t *testing.T) {
	t.Parallel()
	closed := newCollector[pubsub.DisconnectEvent]()
	ts := startServer(t, pubsub.WithOnDisconnect(closed.add))
	states, onState := stateCollector()
	direct := newCollector[client.Message]()
	c := dialClient(t, ts.url(), onState, client.WithOnDirect(direct.add))
	ctx := testCtx(t)
	sub, err := c.Subscribe(ctx, "r", func(client.Message) {})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.Done():
	default:
		t.Fatal("Done is open after Close")
	}
	if !errors.Is(c.Err(), client.ErrClosed) || c.State() != client.StateClosed {
		t.Fatalf("Err %v, state %v", c.Err(), c.State())
	}
	if s := states.waitFor(t, "closed", isState(client.StateClosed)); s.err != nil {
		t.Fatalf("closed with %v, want nil after Close", s.err)
	}
	if _, err := c.Publish(ctx, "r", []byte("x")); !errors.Is(err, client.ErrClosed) {
		t.Fatalf("publish: %v", err)
	}
	if _, err := c.Subscribe(ctx, "s", func(client.Message) {}); !errors.Is(err, client.ErrClosed) {
		t.Fatalf("subscribe: %v", err)
	}
	if _, err := sub.Presence(ctx); !errors.Is(err, client.ErrClosed) {
		t.Fatalf("presence: %v", err)
	}
	if err := sub.Unsubscribe(ctx); err != nil {
		t.Fatalf("unsubscribe after Close: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	// The server saw a normal closure from the client.
	if e := closed.next(t, "the server's disconnect"); e.Code != 1000 {
		t.Fatalf("server saw close code %d, want 1000", e.Code)
	}
}

func TestCloseWaitsForHandlerCallsUnderWay(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	c := dialClient(t, ts.url())
	ctx := testCtx(t)
	entered, release := make(chan struct{}), make(chan struct{})
	if _, err := c.Subscribe(ctx, "r", func(client.Message) { close(entered); <-release }); err != nil {
		t.Fatal(err)
	}
	publish(t, ts.handler(), "r", "x")
	select {
	case <-entered:
	case <-ctx.Done():
		t.Fatal("no handler call")
	}
	closeReturned := make(chan struct{})
	go func() {
		c.Close()
		close(closeReturned)
	}()
	select {
	case <-c.Done(): // the manager has ended; only the handler's goroutine may remain
	case <-ctx.Done():
		t.Fatal("the client did not stop")
	}
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !closeBlockedInWait(t.Name()) {
		select {
		case <-closeReturned:
			t.Fatal("Close returned while a handler call was under way")
		case <-ctx.Done():
			t.Fatal("timed out waiting for Close to wait")
		case <-tick.C:
		}
	}
	close(release)
	select {
	case <-closeReturned:
	case <-ctx.Done():
		t.Fatal("Close did not return after the handler did")
	}
}

// closeBlockedInWait reports whether a goroutine started by the test named
// test is blocked in a WaitGroup inside Client.Close.
func closeBlockedInWait(test string) bool {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	fn := strings.ReplaceAll(test, "/", ".")
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "client.(*Client).Close") && strings.Contains(g, "sync.(*WaitGroup).Wait") &&
			strings.Contains(g, fn) {
			return true
		}
	}
	return false
}

// --- more behaviour ---

func TestHistoryReplaysTheLastMessagesBeforeLiveOnes(t *testing.T) {
	t.Parallel()
	ts := startServer(t, pubsub.WithHistory(100, time.Minute))
	h := ts.handler()
	for i := 1; i <= 5; i++ {
		publish(t, h, "h", fmt.Sprint(i))
	}
	c := dialClient(t, ts.url())
	ctx := testCtx(t)
	msgs := newCollector[client.Message]()
	sub, err := c.Subscribe(ctx, "h", msgs.add, client.History(3))
	if err != nil {
		t.Fatal(err)
	}
	publish(t, h, "h", "6")
	for i := 3; i <= 6; i++ {
		if m := msgs.next(t, fmt.Sprint("message ", i)); m.Seq != uint64(i) || string(m.Data) != fmt.Sprint(i) {
			t.Fatalf("got %s, want seq %d", msgString(m), i)
		}
	}
	if _, seq := sub.Position(); seq != 6 {
		t.Fatalf("position %d, want 6", seq)
	}
}

func TestSlowDirectHandlerIsReportedNotSilentlyDropped(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	release := make(chan struct{})
	var releaseOnce sync.Once
	states, onState := stateCollector()
	direct := newCollector[string]()
	c := dialClient(t, ts.url(), onState, client.WithBufferSize(1), client.WithOnDirect(func(m client.Message) {
		if string(m.Data) == "1" {
			<-release
		}
		direct.add(string(m.Data))
	}))
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) }) // before the client's Close
	ctx := testCtx(t)
	first := c.ConnID()
	for i := 1; i <= 4; i++ {
		if err := ts.handler().PublishToConn(ctx, first, []byte(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	states.waitFor(t, "the overflow", func(s stateChange) bool {
		return s.state == client.StateReconnecting && errors.Is(s.err, client.ErrSlowHandler)
	})
	releaseOnce.Do(func() { close(release) })
	states.waitFor(t, "reconnected", isState(client.StateConnected))
	if c.ConnID() == first {
		t.Fatal("the connection was not replaced")
	}
	if got := direct.next(t, "the first direct message"); got != "1" {
		t.Fatalf("got %q", got)
	}
}

func TestHandlersMayCallTheClient(t *testing.T) {
	t.Parallel()
	ts := startServer(t, pubsub.WithClientPublish(true))
	c := dialClient(t, ts.url())
	ctx := testCtx(t)
	out, errs := newCollector[client.Message](), newCollector[error]()
	if _, err := c.Subscribe(ctx, "out", out.add); err != nil {
		t.Fatal(err)
	}
	subs := make(chan *client.Subscription, 1)
	in, err := c.Subscribe(ctx, "in", func(m client.Message) {
		_, err := c.Publish(ctx, "out", m.Data) // waits for an ack from within a handler
		errs.add(err)
		errs.add((<-subs).Unsubscribe(ctx))
	})
	if err != nil {
		t.Fatal(err)
	}
	subs <- in
	publish(t, ts.handler(), "in", "ping")
	for i := range 2 {
		if err := errs.next(t, "a call's result"); err != nil {
			t.Fatalf("call %d from the handler: %v", i, err)
		}
	}
	if m := out.next(t, "the forwarded message"); string(m.Data) != "ping" {
		t.Fatalf("got %s", msgString(m))
	}
}

func TestUnsubscribeWhileDisconnectedIsNotUndoneByTheReconnection(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	states, onState := stateCollector()
	c := dialClient(t, ts.url(), onState)
	ctx := testCtx(t)
	if _, err := c.Subscribe(ctx, "keep", func(client.Message) {}); err != nil {
		t.Fatal(err)
	}
	drop, err := c.Subscribe(ctx, "drop", func(client.Message) {})
	if err != nil {
		t.Fatal(err)
	}
	ts.refuse.Store(http.StatusServiceUnavailable)
	ts.cut()
	states.waitFor(t, "the connection loss", closeCode(1006))
	if err := drop.Unsubscribe(ctx); err != nil {
		t.Fatalf("unsubscribe while disconnected: %v", err)
	}
	ts.refuse.Store(0)
	states.waitFor(t, "reconnected", isState(client.StateConnected)) // every subscription restored
	h := ts.handler()
	waitForSubscribers(t, h, "keep", 1)
	waitForSubscribers(t, h, "drop", 0) // the old connection's, once the server noticed the cut
}

func TestSubscribeAbandonedByItsContextIsUndoneOnTheServer(t *testing.T) {
	t.Parallel()
	entered, release := make(chan struct{}), make(chan struct{})
	var releaseOnce sync.Once
	var blocked atomic.Bool
	ts := startServer(t, pubsub.WithAuthorize(func(ctx context.Context, c pubsub.Client, a pubsub.Action, room string) error {
		if a == pubsub.ActionSubscribe && blocked.CompareAndSwap(false, true) {
			close(entered)
			<-release // the server holds the first subscribe
		}
		return nil
	}))
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) }) // before the server's Close
	states, onState := stateCollector()
	c := dialClient(t, ts.url(), onState)
	ctx := testCtx(t)

	subCtx, cancel := context.WithCancel(ctx)
	errc := make(chan error, 1)
	go func() {
		_, err := c.Subscribe(subCtx, "room", func(client.Message) { t.Error("the abandoned subscription got a message") })
		errc <- err
	}()
	<-entered
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("abandoned subscribe: %v, want context.Canceled", err)
	}
	releaseOnce.Do(func() { close(release) }) // the server now subscribes; the client must undo it

	msgs := newCollector[client.Message]()
	if _, err := c.Subscribe(ctx, "room", msgs.add); err != nil {
		t.Fatalf("subscribe after the abandoned one: %v", err)
	}
	publish(t, ts.handler(), "room", "x")
	if m := msgs.next(t, "the message"); string(m.Data) != "x" {
		t.Fatalf("got %s", msgString(m))
	}
	waitForSubscribers(t, ts.handler(), "room", 1)
	for _, s := range states.all() {
		if s.state != client.StateConnected {
			t.Fatalf("state changes %v: the client lost track of the server's subscriptions", states.all())
		}
	}
}

func TestProtocolViolationsByTheServerCauseAReconnection(t *testing.T) {
	t.Parallel()
	f := startFake(t, quietWelcome, func(n int, ws *websocket.Conn) {
		ctx := context.Background()
		switch n {
		case 1:
			ws.Write(ctx, websocket.MessageBinary, []byte{1, 2, 3})
		case 2:
			ws.Write(ctx, websocket.MessageText, []byte("not json"))
		case 3:
			ws.Write(ctx, websocket.MessageText, []byte(`{"type":"message","room":"r","epoch":"e","seq":1}`)) // no payload
		case 4:
			// Acknowledge a subscribe without a position, as if the room
			// had been subscribed already.
			_, b, err := ws.Read(ctx)
			if err != nil {
				return
			}
			var req struct{ ID string }
			json.Unmarshal(b, &req)
			ws.Write(ctx, websocket.MessageText, []byte(`{"type":"ack","id":"`+req.ID+`"}`))
		}
		drain(ws)
	})
	states, onState := stateCollector()
	c := dialClient(t, f.url(), onState)
	for range 3 {
		states.waitFor(t, "a protocol violation", func(s stateChange) bool { return errors.Is(s.err, client.ErrProtocol) })
	}
	// The next Connected after the third violation is the fourth connection's.
	states.waitFor(t, "the fourth connection", isState(client.StateConnected))
	if n := f.count.Load(); n != 4 {
		t.Fatalf("connected to connection %d, want 4", n)
	}
	if _, err := c.Subscribe(testCtx(t), "r", func(client.Message) {}); !errors.Is(err, client.ErrDisconnected) {
		t.Fatalf("subscribe acknowledged without a position: %v, want ErrDisconnected", err)
	}
	states.waitFor(t, "the violation", func(s stateChange) bool { return errors.Is(s.err, client.ErrProtocol) })
	f.conns.waitFor(t, "a fifth connection", func(n int) bool { return n == 5 })
}

func TestDialPanicsOnOptionsOutOfRange(t *testing.T) {
	t.Parallel()
	for _, o := range []client.Option{
		client.WithReconnect(0, time.Second),
		client.WithReconnect(2*time.Second, time.Second),
		client.WithBufferSize(0),
		client.WithDialTimeout(0),
		client.WithReadLimit(0),
	} {
		func() {
			defer func() {
				if r := recover(); !strings.HasPrefix(fmt.Sprint(r), "client: ") {
					t.Errorf("recovered %v, want a client: panic", r)
				}
			}()
			client.Dial(testCtx(t), "ws://127.0.0.1:1", o)
		}()
	}
}

func TestReadLimitAndHTTPClientOptionsApply(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	var upgrades atomic.Int32
	hc := &http.Client{Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		upgrades.Add(1)
		return http.DefaultTransport.RoundTrip(r)
	})}
	states, onState := stateCollector()
	c := dialClient(t, ts.url(), onState, client.WithHTTPClient(hc), client.WithReadLimit(300)) // the welcome fits, not the message below
	if upgrades.Load() != 1 {
		t.Fatalf("%d upgrades through the HTTP client, want 1", upgrades.Load())
	}
	if _, err := c.Subscribe(testCtx(t), "big", func(client.Message) { t.Error("a message over the read limit was delivered") }); err != nil {
		t.Fatal(err)
	}
	publish(t, ts.handler(), "big", strings.Repeat("x", 600))
	states.waitFor(t, "the oversized message to end the connection", closeCode(1006))
	states.waitFor(t, "reconnected", isState(client.StateConnected))
	if upgrades.Load() != 2 {
		t.Fatalf("%d upgrades through the HTTP client, want 2", upgrades.Load())
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
