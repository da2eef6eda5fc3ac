package pubsub_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// The bad-input matrix: every way a hostile or broken client can misbehave,
// the documented outcome it gets (an HTTP status before the upgrade, an
// error code, or a close code and reason), and proof after every row that
// two bystanders in the same room, one per mode, are still served and that
// a new client can still connect. SECURITY.md lists every row by name.
// Helpers of this file start with "sec". The bystanders, the unfinished
// message and the vanishing client need what the kit's clients do not
// give (reading in the background for as long as the row lasts, a
// fragment, the TCP connection): they are bare clients (churn_test.go).

// secRoom is the room every row's bystanders sit in, and the room attacks
// aim at when they need one.
const secRoom = "lobby"

// secAuth authenticates by the "token" query parameter: no token is 401,
// "banned" is 403, "buggy" panics, any other token is the user of that name.
// Attackers use "mallory", bystanders "bystander".
func secAuth() pubsub.Option {
	return pubsub.WithAuthenticate(func(r *http.Request) (pubsub.Identity, error) {
		switch tok := r.URL.Query().Get("token"); tok {
		case "":
			return pubsub.Identity{}, pubsub.ErrUnauthorized
		case "banned":
			return pubsub.Identity{}, fmt.Errorf("banned user: %w", pubsub.ErrForbidden)
		case "buggy":
			panic("authenticate bug")
		default:
			return pubsub.Identity{UserID: tok}, nil
		}
	})
}

// secAuthorize answers every authorize call of user "mallory" with f; every
// other user may do anything, publishing included.
func secAuthorize(f func(a pubsub.Action) error) pubsub.Option {
	return pubsub.WithAuthorize(func(_ context.Context, c pubsub.Client, a pubsub.Action, _ string) error {
		if c.UserID == "mallory" {
			return f(a)
		}
		return nil
	})
}

// secOnMessage is a message hook for mallory's frames only.
func secOnMessage(f func() error) pubsub.Option {
	return pubsub.WithOnMessage(func(_ context.Context, m *pubsub.ClientMessage) error {
		if m.Client.UserID == "mallory" {
			return f()
		}
		return nil
	})
}

// secServer serves a Handler at /ws and below on an http.Server that
// configure, when set, adjusts before it starts (ReadHeaderTimeout and
// friends).
func secServer(t *testing.T, configure func(*http.Server), opts ...pubsub.Option) *pubsubtest.Server {
	t.Helper()
	h := quietHandler(opts...)
	srv := httptest.NewUnstartedServer(h)
	if configure != nil {
		configure(srv.Config)
	}
	srv.Start()
	return pubsubtest.ServeOn(t, h, srv)
}

// secBystander is a connection in secRoom that reads in the background, as
// a well-behaved client does: it answers the server's heartbeats (protocol
// "ping" envelopes; the WebSocket library answers raw-mode pings while a
// read is pending) and records the payloads it receives.
type secBystander struct {
	name string

	mu     sync.Mutex
	frames int             // payloads received
	got    map[string]bool // the short ones (markers), by their bytes
	err    error           // why reading ended
	wake   chan struct{}   // closed and replaced on every change
}

func secWatch(t *testing.T, name string, cc *bareConn) *secBystander {
	b := &secBystander{name: name, got: make(map[string]bool), wake: make(chan struct{})}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			e, err := cc.read(context.Background())
			if err != nil {
				b.record(nil, err)
				return
			}
			data := e.Raw
			if cc.proto {
				switch {
				case e.Type != "message":
					continue
				case e.Data != nil:
					data = e.Data
				case e.Text != nil:
					data = []byte(*e.Text)
				}
			}
			b.record(data, nil)
		}
	}()
	t.Cleanup(func() {
		cc.c.CloseNow()
		<-done
	})
	return b
}

func (b *secBystander) record(payload []byte, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if err != nil {
		b.err = err
	} else {
		b.frames++
		if len(payload) <= 256 {
			b.got[string(payload)] = true
		}
	}
	close(b.wake)
	b.wake = make(chan struct{})
}

// await waits until cond holds over the bystander's state, failing the
// test if its connection ends first.
func (b *secBystander) await(t *testing.T, what string, cond func() bool) {
	t.Helper()
	ctx := pubsubtest.Context(t)
	for {
		b.mu.Lock()
		ok, err, wake := cond(), b.err, b.wake
		b.mu.Unlock()
		if ok {
			return
		}
		if err != nil {
			t.Fatalf("the %s bystander lost its connection (%v) while waiting for %s", b.name, err, what)
		}
		select {
		case <-wake:
		case <-ctx.Done():
			t.Fatalf("the %s bystander: timed out waiting for %s", b.name, what)
		}
	}
}

func (b *secBystander) count() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.frames
}

// secEnv is one row's world: a server, its hooks and the bystanders.
type secEnv struct {
	srv        *pubsubtest.Server
	hooks      *hookLog
	bare       *bareDialer
	bystanders []*secBystander
	markers    int
}

func newSecEnv(t *testing.T, r *secRow) *secEnv {
	t.Helper()
	s := &secEnv{hooks: &hookLog{}, bare: newBareDialer(t)}
	s.srv = secServer(t, r.http, s.hooks.options(append([]pubsub.Option{secAuth()}, r.opts...)...)...)
	p := s.bare.must(t, s.srv.WS("/ws?token=bystander"), true)
	if err := p.ack(pubsubtest.Context(t), "subscribe", secRoom); err != nil {
		t.Fatal(err)
	}
	raw := s.bare.must(t, s.srv.WS("/ws?room="+secRoom+"&token=bystander"), false)
	s.bystanders = []*secBystander{secWatch(t, "protocol", p), secWatch(t, "raw", raw)}
	pubsubtest.WaitFor(t, "both bystanders in the room", func() bool { return len(s.srv.Connections(secRoom)) == 2 })
	return s
}

// served proves the server still serves others: a publish into the room
// reaches both bystanders, and a new client can connect, subscribe and
// receive.
func (s *secEnv) served(t *testing.T, when string) {
	t.Helper()
	s.markers++
	marker := fmt.Sprintf(`"%s-%d"`, when, s.markers)
	s.srv.Publish(secRoom, []byte(marker))
	for _, b := range s.bystanders {
		b.await(t, when+" marker "+marker, func() bool { return b.got[marker] })
	}
	conns := s.srv.Stats().Connections
	p := s.srv.Dial("/ws?token=bystander")
	defer func() {
		p.CloseNow()
		pubsubtest.WaitFor(t, "the new client to be gone", func() bool { return s.srv.Stats().Connections == conns })
	}()
	p.Subscribe(secRoom)
	fresh := fmt.Sprintf(`"%s-fresh-%d"`, when, s.markers)
	s.srv.Publish(secRoom, []byte(fresh))
	p.Await("the fresh marker", func(e pubsubtest.Envelope) bool { return e.Type == "message" && string(e.Data) == fresh })
}

// secFrame is one WebSocket message an attacker sends.
type secFrame struct {
	binary bool
	data   string
}

func secText(s string) secFrame   { return secFrame{false, s} }
func secBinary(s string) secFrame { return secFrame{true, s} }

// secRequest is an HTTP request to the endpoint.
type secRequest struct {
	websocket    bool // a WebSocket dial (coder/websocket) rather than a plain request
	method       string
	path         string
	header       http.Header
	subprotocols []string
	byLibrary    bool // refused by the WebSocket library's handshake check, not counted in Stats().Refused
}

// secRow is one row of the matrix.
type secRow struct {
	name string
	opts []pubsub.Option    // beside secAuth and the hook recorders
	http func(*http.Server) // configures the http.Server before it starts

	// The attack: an HTTP request, frames sent by a client in mode at path
	// (default: mallory in secRoom), or a custom attack that checks its
	// own outcome.
	request *secRequest
	mode    pubsub.Mode
	path    string
	frames  []secFrame
	attack  func(t *testing.T, s *secEnv, r *secRow)

	// The documented outcome.
	status int                // the upgrade is refused with this HTTP status
	code   protocol.ErrorCode // protocol mode: the error code; the connection stays open
	id     string             // ... and the id the error carries ("": none could be read)
	ack    bool               // protocol mode: acked, with id
	close  protocol.CloseCode // the connection is closed with this code
	reason string             // ... and a reason containing this
	want   string             // the outcome in words, for rows none of the above says

	after func(t *testing.T, s *secEnv) // further checks of the row's outcome
}

func (r *secRow) outcome() string {
	switch {
	case r.want != "":
		return r.want
	case r.status != 0:
		return fmt.Sprintf("HTTP %d", r.status)
	case r.ack:
		return "ack"
	case r.code != "":
		return "error " + string(r.code)
	default:
		return fmt.Sprintf("close %d %q", r.close, r.reason)
	}
}

func (r *secRow) run(t *testing.T) {
	s := newSecEnv(t, r)
	s.served(t, "before")
	switch {
	case r.attack != nil:
		r.attack(t, s, r)
	case r.request != nil:
		s.refused(t, r)
	default:
		s.sendFrames(t, r)
	}
	if r.after != nil {
		r.after(t, s)
	}
	s.served(t, "after")
}

// refused sends the row's request and checks it is refused with the row's
// status before any WebSocket is opened.
func (s *secEnv) refused(t *testing.T, r *secRow) {
	t.Helper()
	req := r.request
	before := s.srv.Stats()
	if req.websocket {
		s.srv.Refused(req.path, r.status, pubsubtest.Header(req.header), pubsubtest.Subprotocols(req.subprotocols...))
	} else {
		body := ""
		if req.method == http.MethodPost {
			body = "x=1"
		}
		resp, _ := plainRequest(t, s.srv, req.method, req.path, req.header, body)
		if resp.StatusCode != r.status {
			t.Fatalf("HTTP %d, want %d", resp.StatusCode, r.status)
		}
		if r.status == http.StatusUpgradeRequired && !strings.EqualFold(resp.Header.Get("Upgrade"), "websocket") {
			t.Fatalf("426 without Upgrade: websocket (got %q)", resp.Header.Get("Upgrade"))
		}
	}
	after := s.srv.Stats()
	wantRefused := before.Refused + 1
	if req.byLibrary {
		wantRefused = before.Refused
	}
	if after.Refused != wantRefused || after.Connections != before.Connections {
		t.Fatalf("after the refusal: %d refused, %d connections; want %d and %d",
			after.Refused, after.Connections, wantRefused, before.Connections)
	}
	if n := after.Rooms; n != 1 {
		t.Fatalf("Stats().Rooms = %d after a refused upgrade, want 1 (the bystanders' room only)", n)
	}
}

// closed checks what the attacker's connection was closed with: the close
// frame's reason, and OnDisconnect's event.
func (s *secEnv) closed(t *testing.T, r *secRow, id, reason string) {
	t.Helper()
	// 1009 is sent by the WebSocket library with its own reason; the
	// server reports its own to the host.
	if r.close != protocol.CloseMessageTooBig && !strings.Contains(reason, r.reason) {
		t.Fatalf("closed with %d %q, want %d with %q", r.close, reason, r.close, r.reason)
	}
	if ev := s.hooks.disconnected(t, id); ev.Code != r.close || !strings.Contains(ev.Reason, r.reason) {
		t.Fatalf("OnDisconnect got %d %q, want %d with %q", ev.Code, ev.Reason, r.close, r.reason)
	}
}

// sendFrames connects mallory, sends the row's frames and checks the reply
// or the close.
func (s *secEnv) sendFrames(t *testing.T, r *secRow) {
	t.Helper()
	path := r.path
	if r.mode != pubsub.ModeProtocol {
		if path == "" {
			path = "/ws?room=" + secRoom + "&token=mallory"
		}
		if r.close == 0 {
			t.Fatalf("row %q: raw mode has no replies; give it a close code", r.name)
		}
		c := s.srv.DialRaw(path)
		id := s.hooks.connectedAs(t, "mallory").ID
		for _, f := range r.frames {
			if f.binary {
				c.SendBinary([]byte(f.data))
			} else {
				c.Send(f.data)
			}
		}
		s.closed(t, r, id, c.ExpectClose(r.close))
		s.attackerGone(t)
		return
	}
	if path == "" {
		path = "/ws?token=mallory"
	}
	p := s.srv.Dial(path)
	for _, f := range r.frames {
		if f.binary {
			p.SendBinary([]byte(f.data))
		} else {
			p.Send(f.data)
		}
	}
	if r.close != 0 {
		s.closed(t, r, p.Welcome.ConnID, p.ExpectClose(r.close))
		s.attackerGone(t)
		return
	}
	for {
		e := p.Next()
		if r.ack && e.Type == "ack" && e.ID == r.id {
			break
		}
		if e.Type == "error" {
			if r.ack || e.Code != r.code || e.ID != r.id || e.Message == "" {
				t.Fatalf("got %s, want %s with id %q and a message", e, r.outcome(), r.id)
			}
			break
		}
	}
	// The connection stays open and served.
	if err := s.srv.PublishToConn(pubsubtest.Context(t), p.Welcome.ConnID, []byte(`"still open"`)); err != nil {
		t.Fatalf("PublishToConn after the error: %v", err)
	}
	p.Await("the direct message", func(e pubsubtest.Envelope) bool { return e.Type == "direct" && string(e.Data) == `"still open"` })
	if n := s.srv.Stats().Connections; n != 3 {
		t.Fatalf("Stats().Connections = %d, want 3 (two bystanders and the attacker)", n)
	}
}

// attackerGone waits until only the two bystanders are left, in the room.
func (s *secEnv) attackerGone(t *testing.T) {
	t.Helper()
	pubsubtest.WaitFor(t, "the attacker's connection to be gone", func() bool {
		return s.srv.Stats().Connections == 2 && len(s.srv.Connections(secRoom)) == 2
	})
}

// secStats checks Stats counters after a row.
func secStats(check func(st pubsub.Stats) string) func(*testing.T, *secEnv) {
	return func(t *testing.T, s *secEnv) {
		t.Helper()
		if msg := check(s.srv.Stats()); msg != "" {
			t.Fatal(msg)
		}
	}
}

func secHookPanics(n uint64) func(*testing.T, *secEnv) {
	return secStats(func(st pubsub.Stats) string {
		if st.HookPanics != n {
			return fmt.Sprintf("Stats().HookPanics = %d, want %d", st.HookPanics, n)
		}
		return ""
	})
}

// ---- the custom attacks ----

// secNeverReads: a raw client in the room that never reads while the room
// is busy. Messages are published one at a time and each waits until both
// bystanders got it, so only the attacker falls behind.
func secNeverReads(t *testing.T, s *secEnv, r *secRow) {
	c := s.srv.DialRaw("/ws?room=" + secRoom + "&token=mallory") // never read until the end
	id := s.hooks.connectedAs(t, "mallory").ID
	filler := bytes.Repeat([]byte("x"), 32<<10)
	start := []int{s.bystanders[0].count(), s.bystanders[1].count()}
	for i := 1; s.srv.Stats().SlowConsumers == 0; i++ {
		if i > 4096 {
			t.Fatalf("no slow consumer after %d messages of 32 KiB", i)
		}
		s.srv.Publish(secRoom, filler)
		for j, b := range s.bystanders {
			b.await(t, fmt.Sprintf("flood message %d", i), func() bool { return b.frames >= start[j]+i })
		}
	}
	s.closed(t, r, id, c.ExpectClose(r.close)) // reads the backlog the socket holds, then the close
	if n := s.srv.Stats().SlowConsumers; n != 1 {
		t.Fatalf("Stats().SlowConsumers = %d, want 1", n)
	}
}

// secSilent: a protocol client that reads the server's pings but never
// answers.
func secSilent(t *testing.T, s *secEnv, r *secRow) {
	p := s.srv.Dial("/ws?token=mallory")
	s.closed(t, r, p.Welcome.ConnID, p.ExpectClose(r.close))
}

// secNoPong: a raw client that never reads, so never answers a WebSocket
// ping.
func secNoPong(t *testing.T, s *secEnv, r *secRow) {
	c := s.srv.DialRaw("/ws?room=" + secRoom + "&token=mallory")
	id := s.hooks.connectedAs(t, "mallory").ID
	// A closing connection takes no more messages; until then the probes
	// queue up unread.
	ctx := pubsubtest.Context(t)
	pubsubtest.WaitFor(t, "the server to give up on the client", func() bool {
		return errors.Is(s.srv.PublishToConn(ctx, id, []byte("probe")), pubsub.ErrConnNotFound)
	})
	s.closed(t, r, id, c.ExpectClose(r.close))
}

// secFragment: a protocol client that sends the first part of a message
// and never the rest, so the server's read never completes.
func secFragment(t *testing.T, s *secEnv, r *secRow) {
	cc := s.bare.must(t, s.srv.WS("/ws?token=mallory"), true)
	id := s.hooks.connectedAs(t, "mallory").ID
	ctx := pubsubtest.Context(t)
	w, err := cc.c.Writer(ctx, websocket.MessageText)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte(`{"type":"ping","pad":"` + strings.Repeat("x", 16<<10))); err != nil {
		t.Fatal(err)
	}
	// Read, without answering the pings: the reader is the client's only
	// sign of life, and its unfinished message holds the writer.
	for err == nil {
		_, _, err = cc.c.Read(ctx)
	}
	code, reason, ok := pubsubtest.CloseOf(err)
	if !ok || code != r.close || !strings.Contains(reason, r.reason) {
		t.Fatalf("closed with %v (%d %q), want %d with %q", err, code, reason, r.close, r.reason)
	}
	// The server's reader is stuck in the unfinished message until the
	// close handshake gives up on the peer; the connection still ends.
	if ev := s.hooks.disconnected(t, id); ev.Code != r.close {
		t.Fatalf("OnDisconnect got %d %q, want %d", ev.Code, ev.Reason, r.close)
	}
	pubsubtest.WaitFor(t, "the connection to be gone", func() bool { return s.srv.Stats().Connections == 2 })
}

// secVanish: a subscribed protocol client whose TCP connection is reset,
// with no close frame, as when a network drops.
func secVanish(t *testing.T, s *secEnv, r *secRow) {
	cc := s.bare.must(t, s.srv.WS("/ws?token=mallory"), true)
	id := s.hooks.connectedAs(t, "mallory").ID
	if err := cc.ack(pubsubtest.Context(t), "subscribe", secRoom); err != nil {
		t.Fatal(err)
	}
	if n := len(s.srv.Connections(secRoom)); n != 3 {
		t.Fatalf("%d connections in the room, want 3", n)
	}
	if err := cc.tcp.SetLinger(0); err != nil { // close with RST, not FIN
		t.Fatal(err)
	}
	cc.end(bareReset)
	if ev := s.hooks.disconnected(t, id); ev.Code != r.close {
		t.Fatalf("OnDisconnect got %d %q, want %d", ev.Code, ev.Reason, r.close)
	}
	s.attackerGone(t)
}

// secHalfRequest dials TCP and sends the start of an HTTP request line,
// and nothing more.
func secHalfRequest(t *testing.T, s *secEnv) net.Conn {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(s.srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, err := conn.Write([]byte("GET /ws?room=" + secRoom + "&token=mallory HTT")); err != nil {
		t.Fatal(err)
	}
	return conn
}

// secSlowlorisHeaderTimeout is what a slowloris attack is answered with
// when the host set http.Server.ReadHeaderTimeout (the row's http func):
// the server closes the connection once the timeout passes.
const secSlowlorisHeaderTimeout = 300 * time.Millisecond

func secSlowloris(t *testing.T, s *secEnv, r *secRow) {
	conn := secHalfRequest(t, s)
	start := time.Now()
	// The bound is generous for a loaded machine; the close comes at the
	// timeout.
	conn.SetReadDeadline(start.Add(10 * time.Second))
	b, err := io.ReadAll(conn)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the half-sent request was still open after %v", time.Since(start))
	}
	t.Logf("closed after %v (ReadHeaderTimeout %v), having sent %q (%v)", time.Since(start), secSlowlorisHeaderTimeout, b, err)
	if st := s.srv.Stats(); st.Refused != 0 || st.Connections != 2 {
		t.Fatalf("the handler saw the half request: %+v", st)
	}
}

// secSlowlorisUnprotected shows why ReadHeaderTimeout is the host's job: the
// request never reaches the Handler, so nothing of the Handler's can close
// it. It is still open at three times the timeout the protected server
// closes it at.
func secSlowlorisUnprotected(t *testing.T, s *secEnv, r *secRow) {
	conn := secHalfRequest(t, s)
	conn.SetReadDeadline(time.Now().Add(3 * secSlowlorisHeaderTimeout))
	n, err := conn.Read(make([]byte, 1))
	if n != 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read %d bytes, %v; want the connection still open and silent", n, err)
	}
	if st := s.srv.Stats(); st.Refused != 0 || st.Connections != 2 {
		t.Fatalf("the handler saw the half request: %+v", st)
	}
}

// secRows is the matrix. Every row's name appears in SECURITY.md.
func secRows() []secRow {
	id65 := strings.Repeat("i", 65)
	room129 := strings.Repeat("r", 128+1)
	clientPublish := pubsub.WithClientPublish(true)
	noRefill := func(burst int) pubsub.Option { return pubsub.WithRateLimit(0.001, burst) }
	heartbeat := pubsub.WithHeartbeat(100*time.Millisecond, time.Second)
	proto := pubsub.ModeProtocol
	rawReq := func(path string) *secRequest { return &secRequest{websocket: true, path: path} }
	// An event stream's request: a GET that accepts text/event-stream.
	sseReq := func(path string, extra ...string) *secRequest {
		h := http.Header{"Accept": {"text/event-stream"}}
		for i := 0; i+1 < len(extra); i += 2 {
			h.Set(extra[i], extra[i+1])
		}
		return &secRequest{method: http.MethodGet, path: path, header: h}
	}

	subscribeFlood := make([]secFrame, 30)
	for i := range subscribeFlood {
		subscribeFlood[i] = secText(fmt.Sprintf(`{"type":"subscribe","room":"flood-%d","id":"s%d"}`, i, i))
	}
	publishFlood := make([]secFrame, 6)
	for i := range publishFlood {
		publishFlood[i] = secText(fmt.Sprintf(`{"type":"publish","room":"lobby","text":"flood","id":"p%d"}`, i))
	}

	return []secRow{
		// ---- refused before the upgrade ----
		{name: "plain GET is 426", request: &secRequest{method: http.MethodGet, path: "/ws?room=lobby&token=mallory"}, status: http.StatusUpgradeRequired},
		{name: "plain POST is 426", request: &secRequest{method: http.MethodPost, path: "/ws?room=lobby&token=mallory"}, status: http.StatusUpgradeRequired},
		{
			name:    "upgrade over POST is 426",
			request: &secRequest{method: http.MethodPost, path: "/ws?room=lobby&token=mallory", header: http.Header{"Connection": {"Upgrade"}, "Upgrade": {"websocket"}}},
			status:  http.StatusUpgradeRequired,
		},
		{
			name:    "only a foreign subprotocol is 400",
			request: &secRequest{websocket: true, path: "/ws?room=lobby&token=mallory", subprotocols: []string{"chat.v2"}},
			status:  http.StatusBadRequest,
		},
		{
			name:    "cross-origin upgrade is 403",
			request: &secRequest{websocket: true, path: "/ws?room=lobby&token=mallory", header: http.Header{"Origin": {"https://evil.example"}}},
			status:  http.StatusForbidden,
		},
		{name: "upgrade without credentials is 401", request: rawReq("/ws?room=lobby"), status: http.StatusUnauthorized},
		{name: "authenticate returning ErrForbidden is 403", request: rawReq("/ws?room=lobby&token=banned"), status: http.StatusForbidden},
		{name: "authenticate panicking is 500", request: rawReq("/ws?room=lobby&token=buggy"), status: http.StatusInternalServerError, after: secHookPanics(1)},
		{name: "raw room with a forbidden character is 400", request: rawReq("/ws?room=lob%20by&token=mallory"), status: http.StatusBadRequest},
		{name: "raw room of 129 bytes is 400", request: rawReq("/ws?room=" + room129 + "&token=mallory"), status: http.StatusBadRequest},
		{name: "raw room in the path with a forbidden character is 400", request: rawReq("/ws/a%3Cscript%3E?token=mallory"), status: http.StatusBadRequest},
		{name: "raw empty room parameter is 400", request: rawReq("/ws?room=&token=mallory"), status: http.StatusBadRequest},
		{name: "raw history=-1 is 400", request: rawReq("/ws?room=lobby&history=-1&token=mallory"), status: http.StatusBadRequest},
		{name: "raw history over the maximum is 400", request: rawReq("/ws?room=lobby&history=100001&token=mallory"), status: http.StatusBadRequest},
		{name: "raw history that is not a number is 400", request: rawReq("/ws?room=lobby&history=ten&token=mallory"), status: http.StatusBadRequest},
		{
			name:    "raw subscribe denied by authorize is 403",
			opts:    []pubsub.Option{secAuthorize(func(pubsub.Action) error { return pubsub.ErrForbidden })},
			request: rawReq("/ws?room=lobby&token=mallory"), status: http.StatusForbidden,
			after: func(t *testing.T, s *secEnv) {
				if n := len(s.srv.Connections(secRoom)); n != 2 {
					t.Fatalf("%d connections in the room, want the 2 bystanders", n)
				}
			},
		},
		{
			name:    "raw subscribe whose authorize hook panics is 500",
			opts:    []pubsub.Option{secAuthorize(func(pubsub.Action) error { panic("authorize bug") })},
			request: rawReq("/ws?room=lobby&token=mallory"), status: http.StatusInternalServerError, after: secHookPanics(1),
		},
		{
			// The server joins a raw client's room before the upgrade; a
			// handshake the WebSocket library then refuses leaves it again.
			name: "handshake with a malformed Sec-WebSocket-Key is 400 and joins nothing",
			request: &secRequest{method: http.MethodGet, path: "/ws?room=elsewhere&token=mallory", byLibrary: true, header: http.Header{
				"Connection": {"Upgrade"}, "Upgrade": {"websocket"}, "Sec-Websocket-Version": {"13"}, "Sec-Websocket-Key": {"not-a-key"},
			}},
			status: http.StatusBadRequest,
			after: func(t *testing.T, s *secEnv) {
				pubsubtest.WaitFor(t, "the room to be left", func() bool { return len(s.srv.Connections("elsewhere")) == 0 && s.srv.Stats().Rooms == 1 })
			},
		},

		// ---- event streams: refused before anything is streamed ----
		{name: "event stream without a room is 400", request: sseReq("/ws?token=mallory"), status: http.StatusBadRequest},
		{name: "event stream room with a forbidden character is 400", request: sseReq("/ws?room=lob%20by&token=mallory"), status: http.StatusBadRequest},
		{name: "event stream empty room parameter is 400", request: sseReq("/ws?room=lobby&room=&token=mallory"), status: http.StatusBadRequest},
		{name: "event stream of more rooms than the limit is 400", opts: []pubsub.Option{pubsub.WithMaxRooms(2)},
			request: sseReq("/ws?room=a&room=b&room=c&token=mallory"), status: http.StatusBadRequest},
		{name: "event stream history that is not a number is 400", request: sseReq("/ws?room=lobby&history=ten&token=mallory"), status: http.StatusBadRequest},
		{name: "event stream events=other is 400", request: sseReq("/ws?room=lobby&events=other&token=mallory"), status: http.StatusBadRequest},
		{name: "event stream without credentials is 401", request: sseReq("/ws?room=lobby"), status: http.StatusUnauthorized},
		{name: "cross-origin event stream is 403", request: sseReq("/ws?room=lobby&token=mallory", "Origin", "https://evil.example"), status: http.StatusForbidden},
		{
			name:    "event stream room denied by authorize is 403",
			opts:    []pubsub.Option{secAuthorize(func(pubsub.Action) error { return pubsub.ErrForbidden })},
			request: sseReq("/ws?room=lobby&token=mallory"), status: http.StatusForbidden,
		},

		// ---- protocol mode: an error code, the connection stays open ----
		{name: "malformed JSON is bad_request", mode: proto, frames: []secFrame{secText(`{"type":"subscribe","room":"lobby","id":"atk"`)}, code: protocol.CodeBadRequest},
		{name: "JSON array instead of an object is bad_request", mode: proto, frames: []secFrame{secText(`[{"type":"ping","id":"atk"}]`)}, code: protocol.CodeBadRequest},
		{name: "JSON number instead of an object is bad_request", mode: proto, frames: []secFrame{secText(`42`)}, code: protocol.CodeBadRequest},
		{name: "JSON string instead of an object is bad_request", mode: proto, frames: []secFrame{secText(`"subscribe"`)}, code: protocol.CodeBadRequest},
		{name: "unknown type is unknown_type", mode: proto, frames: []secFrame{secText(`{"type":"frobnicate","id":"atk"}`)}, code: protocol.CodeUnknownType, id: "atk"},
		{name: "missing type is bad_request", mode: proto, frames: []secFrame{secText(`{"room":"lobby","id":"atk"}`)}, code: protocol.CodeBadRequest, id: "atk"},
		{name: "missing room is bad_request", mode: proto, frames: []secFrame{secText(`{"type":"subscribe","id":"atk"}`)}, code: protocol.CodeBadRequest, id: "atk"},
		{name: "room as a number is bad_request", mode: proto, frames: []secFrame{secText(`{"type":"subscribe","room":7,"id":"atk"}`)}, code: protocol.CodeBadRequest, id: "atk"},
		{name: "id as an object is bad_request without id", mode: proto, frames: []secFrame{secText(`{"type":"subscribe","room":"lobby","id":{"a":1}}`)}, code: protocol.CodeBadRequest},
		{
			name: "publish with data and a 65-byte id is bad_request without id", mode: proto, opts: []pubsub.Option{clientPublish},
			frames: []secFrame{secText(`{"type":"publish","room":"lobby","data":{"a":1},"id":"` + id65 + `"}`)}, code: protocol.CodeBadRequest,
		},
		{
			name: "publish with no payload field is bad_request", mode: proto, opts: []pubsub.Option{clientPublish},
			frames: []secFrame{secText(`{"type":"publish","room":"lobby","id":"atk"}`)}, code: protocol.CodeBadRequest, id: "atk",
		},
		{
			name: "publish with two payload fields is bad_request", mode: proto, opts: []pubsub.Option{clientPublish},
			frames: []secFrame{secText(`{"type":"publish","room":"lobby","data":1,"text":"1","id":"atk"}`)}, code: protocol.CodeBadRequest, id: "atk",
		},
		{
			name: "publish with invalid base64 is bad_request", mode: proto, opts: []pubsub.Option{clientPublish},
			frames: []secFrame{secText(`{"type":"publish","room":"lobby","binary":"*not base64*","id":"atk"}`)}, code: protocol.CodeBadRequest, id: "atk",
		},
		{
			name: "publish larger than any queue is bad_request", mode: proto, opts: []pubsub.Option{clientPublish, pubsub.WithQueueLimits(64, 1024)},
			frames: []secFrame{secText(`{"type":"publish","room":"lobby","text":"` + strings.Repeat("x", 1025) + `","id":"atk"}`)}, code: protocol.CodeBadRequest, id: "atk",
		},
		{name: "room with forbidden characters is invalid_room", mode: proto, frames: []secFrame{secText(`{"type":"subscribe","room":"<script>","id":"atk"}`)}, code: protocol.CodeInvalidRoom, id: "atk"},
		{name: "room of 129 bytes is invalid_room", mode: proto, frames: []secFrame{secText(`{"type":"subscribe","room":"` + room129 + `","id":"atk"}`)}, code: protocol.CodeInvalidRoom, id: "atk"},
		{
			name: "one room more than WithMaxRooms is too_many_rooms", mode: proto, opts: []pubsub.Option{pubsub.WithMaxRooms(2)},
			frames: []secFrame{
				secText(`{"type":"subscribe","room":"a","id":"a1"}`),
				secText(`{"type":"subscribe","room":"b","id":"a2"}`),
				secText(`{"type":"subscribe","room":"c","id":"atk"}`),
			},
			code: protocol.CodeTooManyRooms, id: "atk",
		},
		{
			name: "publish flood past the rate limit is rate_limited", mode: proto, opts: []pubsub.Option{clientPublish, noRefill(5)},
			frames: publishFlood, code: protocol.CodeRateLimited, id: "p5",
			after: secStats(func(st pubsub.Stats) string {
				if st.RateLimited != 1 {
					return fmt.Sprintf("Stats().RateLimited = %d, want 1", st.RateLimited)
				}
				return ""
			}),
		},
		{
			name: "subscribe flood past the rate limit is rate_limited", mode: proto, opts: []pubsub.Option{noRefill(10)},
			frames: subscribeFlood, code: protocol.CodeRateLimited, id: "s10",
			after: func(t *testing.T, s *secEnv) {
				// Only the ten subscribes within the burst joined a room.
				pubsubtest.WaitFor(t, "every flood subscribe to be answered", func() bool { return s.srv.Stats().RateLimited == 20 })
				if n := s.srv.Stats().Rooms; n != 11 {
					t.Fatalf("Stats().Rooms = %d, want 11 (the lobby and ten flood rooms)", n)
				}
			},
		},
		{
			name: "subscribe denied by authorize is forbidden", mode: proto,
			opts:   []pubsub.Option{secAuthorize(func(pubsub.Action) error { return pubsub.ErrForbidden })},
			frames: []secFrame{secText(`{"type":"subscribe","room":"lobby","id":"atk"}`)}, code: protocol.CodeForbidden, id: "atk",
		},
		{name: "publish under the default policy is forbidden", mode: proto, frames: []secFrame{secText(`{"type":"publish","room":"lobby","text":"x","id":"atk"}`)}, code: protocol.CodeForbidden, id: "atk"},
		{name: "since with a numeric epoch is bad_request", mode: proto, frames: []secFrame{secText(`{"type":"subscribe","room":"lobby","since":{"epoch":5,"seq":1},"id":"atk"}`)}, code: protocol.CodeBadRequest, id: "atk"},
		{name: "since without seq is bad_request", mode: proto, frames: []secFrame{secText(`{"type":"subscribe","room":"lobby","since":{"epoch":"e"},"id":"atk"}`)}, code: protocol.CodeBadRequest, id: "atk"},
		{name: "history over the maximum is bad_request", mode: proto, frames: []secFrame{secText(`{"type":"subscribe","room":"lobby","history":100001,"id":"atk"}`)}, code: protocol.CodeBadRequest, id: "atk"},
		{name: "negative history is bad_request", mode: proto, frames: []secFrame{secText(`{"type":"subscribe","room":"lobby","history":-1,"id":"atk"}`)}, code: protocol.CodeBadRequest, id: "atk"},
		{
			name: "info over WithMaxInfoBytes is bad_request", mode: proto,
			frames: []secFrame{secText(`{"type":"subscribe","room":"lobby","info":{"pad":"` + strings.Repeat("x", 1024) + `"},"id":"atk"}`)},
			code:   protocol.CodeBadRequest, id: "atk",
		},
		{name: "info that is not an object is bad_request", mode: proto, frames: []secFrame{secText(`{"type":"subscribe","room":"lobby","info":[1,2],"id":"atk"}`)}, code: protocol.CodeBadRequest, id: "atk"},
		{
			name: "authorize panicking is internal", mode: proto,
			opts:   []pubsub.Option{secAuthorize(func(pubsub.Action) error { panic("authorize bug") })},
			frames: []secFrame{secText(`{"type":"subscribe","room":"lobby","id":"atk"}`)}, code: protocol.CodeInternal, id: "atk", after: secHookPanics(1),
		},
		{
			name: "on_message panicking is internal", mode: proto,
			opts:   []pubsub.Option{secOnMessage(func() error { panic("on_message bug") })},
			frames: []secFrame{secText(`{"type":"send","text":"x","id":"atk"}`)}, code: protocol.CodeInternal, id: "atk", after: secHookPanics(1),
		},
		{
			name: "unknown fields are ignored", mode: proto,
			frames: []secFrame{secText(`{"type":"subscribe","room":"lobby","id":"atk","x-evil":{"deep":[1,{"z":null}]},"admin":true}`)},
			ack:    true, id: "atk",
		},

		// ---- closed with a close code ----
		{name: "frame over WithMaxMessageBytes closes 1009", mode: proto, opts: []pubsub.Option{pubsub.WithMaxMessageBytes(1024)}, frames: []secFrame{secText(`{"type":"ping","pad":"` + strings.Repeat("x", 1024) + `"}`)}, close: protocol.CloseMessageTooBig, reason: "message too big"},
		{name: "raw frame over WithMaxMessageBytes closes 1009", opts: []pubsub.Option{clientPublish, pubsub.WithMaxMessageBytes(1024)}, frames: []secFrame{secText(strings.Repeat("x", 1025))}, close: protocol.CloseMessageTooBig, reason: "message too big"},
		{name: "binary frame in protocol mode closes 1003", mode: proto, frames: []secFrame{secBinary(`{"type":"ping"}`)}, close: protocol.CloseUnsupportedData, reason: "text frames only"},
		{name: "invalid UTF-8 in a text frame closes 1007", mode: proto, frames: []secFrame{secText("{\"type\":\"ping\",\"x\":\"\xc3\x28\"}")}, close: protocol.CloseInvalidPayload, reason: "not valid UTF-8"},
		{name: "raw invalid UTF-8 in a text frame closes 1007", opts: []pubsub.Option{clientPublish}, frames: []secFrame{secText("\xff\xfe")}, close: protocol.CloseInvalidPayload, reason: "not valid UTF-8"},
		{
			name: "raw publish flood past the rate limit closes 4004", opts: []pubsub.Option{clientPublish, noRefill(3)},
			frames: []secFrame{secText("f1"), secText("f2"), secText("f3"), secText("f4")}, close: protocol.CloseRateLimited, reason: "rate limit",
		},
		{name: "raw publish under the default policy closes 1008", frames: []secFrame{secText("hello")}, close: protocol.ClosePolicyViolation, reason: "publish not allowed"},
		{name: "raw publish without a room closes 1008", path: "/ws?token=mallory", opts: []pubsub.Option{clientPublish}, frames: []secFrame{secText("hello")}, close: protocol.ClosePolicyViolation, reason: "no room"},
		{
			name: "raw publish whose authorize hook panics closes 1011",
			opts: []pubsub.Option{secAuthorize(func(a pubsub.Action) error {
				if a == pubsub.ActionPublish {
					panic("authorize bug")
				}
				return nil
			})},
			frames: []secFrame{secText("hello")}, close: protocol.CloseInternalError, reason: "internal error", after: secHookPanics(1),
		},
		{
			name: "raw message whose on_message hook panics closes 1011", opts: []pubsub.Option{secOnMessage(func() error { panic("on_message bug") })},
			frames: []secFrame{secText("hello")}, close: protocol.CloseInternalError, reason: "internal error", after: secHookPanics(1),
		},
		{
			name: "raw message the on_message hook rejects closes 1008", opts: []pubsub.Option{secOnMessage(func() error { return errors.New("no") })},
			frames: []secFrame{secText("hello")}, close: protocol.ClosePolicyViolation, reason: "message rejected",
		},

		// ---- resource attacks ----
		{
			name:   "client that never reads closes 4002",
			opts:   []pubsub.Option{pubsub.WithQueueLimits(16, 256<<10), pubsub.WithWriteTimeout(time.Minute)},
			attack: secNeverReads, close: protocol.CloseSlowConsumer, reason: "slow consumer",
		},
		{name: "client that stops answering heartbeats closes 4001", opts: []pubsub.Option{heartbeat}, attack: secSilent, close: protocol.CloseHeartbeatTimeout, reason: "heartbeat timeout"},
		{name: "raw client that never answers a ping closes 4001", opts: []pubsub.Option{heartbeat}, attack: secNoPong, close: protocol.CloseHeartbeatTimeout, reason: "heartbeat timeout"},
		{name: "message that is never finished closes 4001", opts: []pubsub.Option{heartbeat}, attack: secFragment, close: protocol.CloseHeartbeatTimeout, reason: "heartbeat timeout"},
		{
			name: "client that vanishes without a close frame is cleaned up as 1006", attack: secVanish, close: 1006,
			want: "OnDisconnect with 1006; the connection and its membership are gone",
		},
		{
			name:   "slowloris handshake is closed by ReadHeaderTimeout",
			http:   func(s *http.Server) { s.ReadHeaderTimeout = secSlowlorisHeaderTimeout },
			attack: secSlowloris, want: "the TCP connection is closed at the host's ReadHeaderTimeout; the Handler never sees it",
		},
		{
			name:   "slowloris handshake without ReadHeaderTimeout stays open",
			attack: secSlowlorisUnprotected, want: "open past 3x the timeout: the host must set ReadHeaderTimeout",
		},
	}
}

// TestBadInputGetsItsDocumentedOutcomeAndNeverAffectsOthers is the bad-input
// matrix (SECURITY.md): each row gets exactly its documented outcome, and
// after each the bystanders in the same room and new clients are served.
func TestBadInputGetsItsDocumentedOutcomeAndNeverAffectsOthers(t *testing.T) {
	t.Parallel()
	for _, r := range secRows() {
		t.Run(r.name, func(t *testing.T) {
			t.Parallel()
			r.run(t)
		})
	}
}

// TestSecurityMDListsEveryMatrixRow keeps SECURITY.md's table in step with
// the matrix: each row's name must appear there. A missing row is printed
// as the table line to add.
func TestSecurityMDListsEveryMatrixRow(t *testing.T) {
	t.Parallel()
	doc, err := os.ReadFile("SECURITY.md")
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, r := range secRows() {
		if names[r.name] {
			t.Errorf("two rows are named %q", r.name)
		}
		names[r.name] = true
		if !bytes.Contains(doc, []byte("`"+r.name+"`")) {
			t.Errorf("SECURITY.md does not list row %q; add:\n| %s | `%s` |", r.name, r.outcome(), r.name)
		}
	}
}

// TestHTTPServerTimeoutsDoNotCutUpgradedConnections: the http.Server
// timeouts SECURITY.md recommends bound plain HTTP requests and
// handshakes, not the WebSocket connections that outlive them (net/http
// clears its deadlines on hijack). Each connection here lives through
// many times every timeout.
func TestHTTPServerTimeoutsDoNotCutUpgradedConnections(t *testing.T) {
	t.Parallel()
	const timeout = 100 * time.Millisecond
	configure := func(s *http.Server) {
		s.ReadHeaderTimeout, s.ReadTimeout, s.WriteTimeout, s.IdleTimeout = timeout, timeout, timeout, timeout
	}
	t.Run("protocol", func(t *testing.T) {
		t.Parallel()
		srv := secServer(t, configure, pubsub.WithHeartbeat(20*time.Millisecond, 5*time.Second))
		p := srv.Dial("/ws")
		p.Subscribe("long")
		// The server's pings are the clock: 30 of them span at least 29
		// intervals, 580ms, well past every timeout.
		for range 30 {
			p.Ping()
			p.Send(`{"type":"pong"}`)
		}
		if e := p.Request(pubsubtest.Fields{"type": "ping"}); e.Type != "pong" {
			t.Fatalf("ping answered with %s, want pong", e)
		}
		srv.Publish("long", []byte(`"still here"`))
		p.NextMessage("long")
	})
	t.Run("raw", func(t *testing.T) {
		t.Parallel()
		srv := secServer(t, configure, pubsub.WithHeartbeat(20*time.Millisecond, 5*time.Second))
		pinged := make(chan struct{}, 64)
		c := srv.DialRaw("/ws?room=long", pubsubtest.OnPing(func() {
			select {
			case pinged <- struct{}{}:
			default:
			}
		}))
		frames := readLoop(t, c)
		// Silent raw clients are pinged at most once per interval: 30
		// pings span at least 580ms.
		for i := range 30 {
			select {
			case <-pinged:
			case f := <-frames:
				t.Fatalf("after %d pings the connection gave %q %v, want it open and quiet", i, f.data, f.err)
			case <-pubsubtest.Context(t).Done():
				t.Fatal("timed out waiting for pings")
			}
		}
		srv.Publish("long", []byte("still here"))
		nextText(t, frames, "still here")
	})
}
