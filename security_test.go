package pubsub_test

import (
	"bytes"
	"context"
	"encoding/json"
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

	"github.com/roomcast/pubsub/protocol"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub"
)

// The bad-input matrix: every way a hostile or broken client can misbehave,
// the documented outcome it gets (an HTTP status before the upgrade, an
// error code, or a close code and reason), and proof after every row that
// two bystanders in the same room, one per mode, are still served and that
// a new client can still connect. SECURITY.md lists every row by name.
// Helpers of this file start with "sec".

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

// secEvents records every connect and disconnect of a Handler.
type secEvents struct {
	mu          sync.Mutex
	connects    []pubsub.Client
	disconnects []pubsub.DisconnectEvent
}

func (e *secEvents) options() []pubsub.Option {
	return []pubsub.Option{
		pubsub.WithOnConnect(func(ev pubsub.ConnectEvent) {
			e.mu.Lock()
			e.connects = append(e.connects, ev.Client)
			e.mu.Unlock()
		}),
		pubsub.WithOnDisconnect(func(ev pubsub.DisconnectEvent) {
			e.mu.Lock()
			e.disconnects = append(e.disconnects, ev)
			e.mu.Unlock()
		}),
	}
}

// connected waits for the first connection of userID and returns it.
func (e *secEvents) connected(t *testing.T, userID string) pubsub.Client {
	t.Helper()
	var cl pubsub.Client
	waitFor(t, "a connection of "+userID, func() bool {
		e.mu.Lock()
		defer e.mu.Unlock()
		for _, c := range e.connects {
			if c.UserID == userID {
				cl = c
				return true
			}
		}
		return false
	})
	return cl
}

// disconnected waits for the disconnect of connection id and returns it.
func (e *secEvents) disconnected(t *testing.T, id string) pubsub.DisconnectEvent {
	t.Helper()
	var ev pubsub.DisconnectEvent
	waitFor(t, "the disconnect of "+id, func() bool {
		e.mu.Lock()
		defer e.mu.Unlock()
		for _, d := range e.disconnects {
			if d.Client.ID == id {
				ev = d
				return true
			}
		}
		return false
	})
	return ev
}

// secServer is newServer with a hook to configure the http.Server before
// it starts (ReadHeaderTimeout and friends).
func secServer(t *testing.T, configure func(*http.Server), opts ...pubsub.Option) (*pubsub.Handler, *httptest.Server) {
	t.Helper()
	h := pubsub.NewHandler(append([]pubsub.Option{pubsub.WithLogger(quietLogger())}, opts...)...)
	mux := http.NewServeMux()
	mux.Handle("/ws", h)
	mux.Handle("/ws/", h)
	srv := httptest.NewUnstartedServer(mux)
	if configure != nil {
		configure(srv.Config)
	}
	srv.Start()
	t.Cleanup(func() {
		h.Close()
		srv.Close()
	})
	return h, srv
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

func secWatch(t *testing.T, name string, c *websocket.Conn, proto bool) *secBystander {
	b := &secBystander{name: name, got: make(map[string]bool), wake: make(chan struct{})}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			_, data, err := c.Read(context.Background())
			if err != nil {
				b.record(nil, err)
				return
			}
			if proto {
				var e envelope
				if err := json.Unmarshal(data, &e); err != nil {
					b.record(nil, fmt.Errorf("invalid JSON %q: %v", data, err))
					return
				}
				switch {
				case e.Type == "ping":
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					_ = c.Write(ctx, websocket.MessageText, []byte(`{"type":"pong"}`))
					cancel()
					continue
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
		c.CloseNow()
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
	ctx := testCtx(t)
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

// secEnv is one row's world: a server, its event log and the bystanders.
type secEnv struct {
	h          *pubsub.Handler
	srv        *httptest.Server
	events     *secEvents
	bystanders []*secBystander
	markers    int
}

func newSecEnv(t *testing.T, r *secRow) *secEnv {
	t.Helper()
	s := &secEnv{events: &secEvents{}}
	opts := append([]pubsub.Option{secAuth()}, s.events.options()...)
	s.h, s.srv = secServer(t, r.http, append(opts, r.opts...)...)
	p := dialProto(t, wsURL(s.srv, "/ws?token=bystander"))
	p.subscribe(secRoom)
	raw := dial(t, wsURL(s.srv, "/ws?room="+secRoom+"&token=bystander"))
	s.bystanders = []*secBystander{secWatch(t, "protocol", p.c, true), secWatch(t, "raw", raw, false)}
	waitFor(t, "both bystanders in the room", func() bool { return len(s.h.Connections(secRoom)) == 2 })
	return s
}

func (s *secEnv) url(path string) string { return wsURL(s.srv, path) }

// served proves the server still serves others: a publish into the room
// reaches both bystanders, and a new client can connect, subscribe and
// receive.
func (s *secEnv) served(t *testing.T, when string) {
	t.Helper()
	ctx := testCtx(t)
	s.markers++
	marker := fmt.Sprintf(`"%s-%d"`, when, s.markers)
	if err := s.h.Publish(ctx, secRoom, []byte(marker)); err != nil {
		t.Fatalf("%s: Publish: %v", when, err)
	}
	for _, b := range s.bystanders {
		b.await(t, when+" marker "+marker, func() bool { return b.got[marker] })
	}
	conns := s.h.Stats().Connections
	p := dialProto(t, s.url("/ws?token=bystander"))
	defer func() {
		p.c.CloseNow()
		waitFor(t, "the new client to be gone", func() bool { return s.h.Stats().Connections == conns })
	}()
	p.subscribe(secRoom)
	fresh := fmt.Sprintf(`"%s-fresh-%d"`, when, s.markers)
	if err := s.h.Publish(ctx, secRoom, []byte(fresh)); err != nil {
		t.Fatalf("%s: Publish: %v", when, err)
	}
	for {
		if e := p.read(); e.Type == "message" && string(e.Data) == fresh {
			return
		}
	}
}

// secFrame is one WebSocket message an attacker sends.
type secFrame struct {
	typ  websocket.MessageType
	data string
}

func secText(s string) secFrame   { return secFrame{websocket.MessageText, s} }
func secBinary(s string) secFrame { return secFrame{websocket.MessageBinary, s} }

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
	opts []pubsub.Option    // beside secAuth and the event recorders
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
	before := s.h.Stats()
	ctx := testCtx(t)
	var resp *http.Response
	if req.websocket {
		c, res, err := websocket.Dial(ctx, s.url(req.path), &websocket.DialOptions{HTTPHeader: req.header, Subprotocols: req.subprotocols})
		if err == nil {
			c.CloseNow()
			t.Fatalf("the upgrade succeeded, want HTTP %d", r.status)
		}
		if res == nil {
			t.Fatalf("dial failed without a response (%v), want HTTP %d", err, r.status)
		}
		resp = res
	} else {
		var body io.Reader
		if req.method == http.MethodPost {
			body = strings.NewReader("x=1")
		}
		hr, err := http.NewRequestWithContext(ctx, req.method, s.srv.URL+req.path, body)
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range req.header {
			hr.Header[k] = v
		}
		if resp, err = s.srv.Client().Do(hr); err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	if resp.StatusCode != r.status {
		t.Fatalf("HTTP %d, want %d", resp.StatusCode, r.status)
	}
	if r.status == http.StatusUpgradeRequired && !strings.EqualFold(resp.Header.Get("Upgrade"), "websocket") {
		t.Fatalf("426 without Upgrade: websocket (got %q)", resp.Header.Get("Upgrade"))
	}
	after := s.h.Stats()
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

// sendFrames connects mallory, sends the row's frames and checks the reply
// or the close.
func (s *secEnv) sendFrames(t *testing.T, r *secRow) {
	t.Helper()
	ctx := testCtx(t)
	path := r.path
	var c *websocket.Conn
	var p *protoClient
	var connID string
	if r.mode == pubsub.ModeProtocol {
		if path == "" {
			path = "/ws?token=mallory"
		}
		p = dialProto(t, s.url(path))
		c, connID = p.c, p.welcome.ConnID
	} else {
		if path == "" {
			path = "/ws?room=" + secRoom + "&token=mallory"
		}
		c = dial(t, s.url(path))
		connID = s.events.connected(t, "mallory").ID
	}
	for _, f := range r.frames {
		if err := c.Write(ctx, f.typ, []byte(f.data)); err != nil {
			t.Fatalf("write %.40q: %v", f.data, err)
		}
	}
	if r.close != 0 {
		code, reason := secCloseOf(t, c)
		// 1009 is sent by the WebSocket library with its own reason; the
		// server reports its own to the host.
		if code != r.close || (r.close != protocol.CloseMessageTooBig && !strings.Contains(reason, r.reason)) {
			t.Fatalf("closed with %d %q, want %d with %q", code, reason, r.close, r.reason)
		}
		ev := s.events.disconnected(t, connID)
		if ev.Code != r.close || !strings.Contains(ev.Reason, r.reason) {
			t.Fatalf("OnDisconnect got %d %q, want %d with %q", ev.Code, ev.Reason, r.close, r.reason)
		}
		waitFor(t, "the attacker's connection to be gone", func() bool {
			return s.h.Stats().Connections == 2 && len(s.h.Connections(secRoom)) == 2
		})
		return
	}
	if p == nil {
		t.Fatalf("row %q: raw mode has no replies; give it a close code", r.name)
	}
	for {
		e := p.read()
		if r.ack && e.Type == "ack" && e.ID == r.id {
			break
		}
		if e.Type == "error" {
			if r.ack || e.Code != r.code || e.ID != r.id || e.Message == "" {
				t.Fatalf("got %s, want %s with id %q and a message", e.raw, r.outcome(), r.id)
			}
			break
		}
	}
	// The connection stays open and served.
	if err := s.h.PublishToConn(ctx, connID, []byte(`"still open"`)); err != nil {
		t.Fatalf("PublishToConn after the error: %v", err)
	}
	for {
		if e := p.read(); e.Type == "direct" && string(e.Data) == `"still open"` {
			break
		}
	}
	if n := s.h.Stats().Connections; n != 3 {
		t.Fatalf("Stats().Connections = %d, want 3 (two bystanders and the attacker)", n)
	}
}

// secCloseOf reads until the connection closes and returns the close code
// and reason; a connection that ends without a close frame fails the test.
func secCloseOf(t *testing.T, c *websocket.Conn) (protocol.CloseCode, string) {
	t.Helper()
	ctx := testCtx(t)
	for {
		_, _, err := c.Read(ctx)
		if err == nil {
			continue
		}
		var ce websocket.CloseError
		if !errors.As(err, &ce) {
			t.Fatalf("the connection ended with %v, want a close frame", err)
		}
		return protocol.CloseCode(ce.Code), ce.Reason
	}
}

// secStats checks Stats counters after a row.
func secStats(check func(st pubsub.Stats) string) func(*testing.T, *secEnv) {
	return func(t *testing.T, s *secEnv) {
		t.Helper()
		if msg := check(s.h.Stats()); msg != "" {
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
	c := dial(t, s.url("/ws?room="+secRoom+"&token=mallory")) // never read until the end
	id := s.events.connected(t, "mallory").ID
	ctx := testCtx(t)
	filler := bytes.Repeat([]byte("x"), 32<<10)
	start := []int{s.bystanders[0].count(), s.bystanders[1].count()}
	for i := 1; s.h.Stats().SlowConsumers == 0; i++ {
		if i > 4096 {
			t.Fatalf("no slow consumer after %d messages of 32 KiB", i)
		}
		if err := s.h.Publish(ctx, secRoom, filler); err != nil {
			t.Fatal(err)
		}
		for j, b := range s.bystanders {
			b.await(t, fmt.Sprintf("flood message %d", i), func() bool { return b.frames >= start[j]+i })
		}
	}
	code, reason := secCloseOf(t, c) // reads the backlog the socket holds, then the close
	ev := s.events.disconnected(t, id)
	if code != r.close || !strings.Contains(reason, r.reason) || ev.Code != r.close {
		t.Fatalf("closed with %d %q (OnDisconnect %d %q), want %d with %q", code, reason, ev.Code, ev.Reason, r.close, r.reason)
	}
	if n := s.h.Stats().SlowConsumers; n != 1 {
		t.Fatalf("Stats().SlowConsumers = %d, want 1", n)
	}
}

// secSilent: a protocol client that reads the server's pings but never
// answers.
func secSilent(t *testing.T, s *secEnv, r *secRow) {
	p := dialProto(t, s.url("/ws?token=mallory"))
	code, reason := secCloseOf(t, p.c)
	ev := s.events.disconnected(t, p.welcome.ConnID)
	if code != r.close || !strings.Contains(reason, r.reason) || ev.Code != r.close {
		t.Fatalf("closed with %d %q (OnDisconnect %d), want %d with %q", code, reason, ev.Code, r.close, r.reason)
	}
}

// secNoPong: a raw client that never reads, so never answers a WebSocket
// ping.
func secNoPong(t *testing.T, s *secEnv, r *secRow) {
	c := dial(t, s.url("/ws?room="+secRoom+"&token=mallory"))
	id := s.events.connected(t, "mallory").ID
	// A closing connection takes no more messages; until then the probes
	// queue up unread.
	waitFor(t, "the server to give up on the client", func() bool {
		return errors.Is(s.h.PublishToConn(testCtx(t), id, []byte("probe")), pubsub.ErrConnNotFound)
	})
	code, reason := secCloseOf(t, c)
	ev := s.events.disconnected(t, id)
	if code != r.close || !strings.Contains(reason, r.reason) || ev.Code != r.close {
		t.Fatalf("closed with %d %q (OnDisconnect %d), want %d with %q", code, reason, ev.Code, r.close, r.reason)
	}
}

// secFragment: a protocol client that sends the first part of a message
// and never the rest, so the server's read never completes.
func secFragment(t *testing.T, s *secEnv, r *secRow) {
	p := dialProto(t, s.url("/ws?token=mallory"))
	w, err := p.c.Writer(testCtx(t), websocket.MessageText)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte(`{"type":"ping","pad":"` + strings.Repeat("x", 16<<10))); err != nil {
		t.Fatal(err)
	}
	code, reason := secCloseOf(t, p.c)
	if code != r.close || !strings.Contains(reason, r.reason) {
		t.Fatalf("closed with %d %q, want %d with %q", code, reason, r.close, r.reason)
	}
	// The server's reader is stuck in the unfinished message until the
	// close handshake gives up on the peer; the connection still ends.
	if ev := s.events.disconnected(t, p.welcome.ConnID); ev.Code != r.close {
		t.Fatalf("OnDisconnect got %d %q, want %d", ev.Code, ev.Reason, r.close)
	}
	waitFor(t, "the connection to be gone", func() bool { return s.h.Stats().Connections == 2 })
}

// secDialTCP dials a WebSocket and also returns the TCP connection under
// it, so a test can kill it the way a network does.
func secDialTCP(t *testing.T, url string, subprotocols ...string) (*websocket.Conn, *net.TCPConn) {
	t.Helper()
	var tcp *net.TCPConn
	tr := &http.Transport{
		MaxIdleConnsPerHost: -1, // no pooling: every dial is a new connection
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
			if err == nil {
				tcp = c.(*net.TCPConn)
			}
			return c, err
		},
	}
	t.Cleanup(tr.CloseIdleConnections)
	c, _, err := websocket.Dial(testCtx(t), url, &websocket.DialOptions{
		HTTPClient: &http.Client{Transport: tr}, Subprotocols: subprotocols,
	})
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	t.Cleanup(func() { c.CloseNow() })
	return c, tcp
}

// secVanish: a subscribed protocol client whose TCP connection is reset,
// with no close frame, as when a network drops.
func secVanish(t *testing.T, s *secEnv, r *secRow) {
	c, tcp := secDialTCP(t, s.url("/ws?token=mallory"), protocol.Subprotocol)
	p := &protoClient{t: t, c: c}
	if p.welcome = p.read(); p.welcome.Type != "welcome" {
		t.Fatalf("first envelope %s, want welcome", p.welcome.raw)
	}
	p.subscribe(secRoom)
	if n := len(s.h.Connections(secRoom)); n != 3 {
		t.Fatalf("%d connections in the room, want 3", n)
	}
	if err := tcp.SetLinger(0); err != nil { // close with RST, not FIN
		t.Fatal(err)
	}
	tcp.Close()
	if ev := s.events.disconnected(t, p.welcome.ConnID); ev.Code != r.close {
		t.Fatalf("OnDisconnect got %d %q, want %d", ev.Code, ev.Reason, r.close)
	}
	waitFor(t, "the server to clean up", func() bool {
		return s.h.Stats().Connections == 2 && len(s.h.Connections(secRoom)) == 2
	})
}

// secHalfRequest dials TCP and sends the start of an HTTP request line,
// and nothing more.
func secHalfRequest(t *testing.T, s *secEnv) net.Conn {
	t.Helper()
	conn, err := net.Dial("tcp", s.srv.Listener.Addr().String())
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
	if st := s.h.Stats(); st.Refused != 0 || st.Connections != 2 {
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
	if st := s.h.Stats(); st.Refused != 0 || st.Connections != 2 {
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
				if n := len(s.h.Connections(secRoom)); n != 2 {
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
				waitFor(t, "the room to be left", func() bool { return len(s.h.Connections("elsewhere")) == 0 && s.h.Stats().Rooms == 1 })
			},
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
				waitFor(t, "every flood subscribe to be answered", func() bool { return s.h.Stats().RateLimited == 20 })
				if n := s.h.Stats().Rooms; n != 11 {
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
		h, srv := secServer(t, configure, pubsub.WithHeartbeat(20*time.Millisecond, 5*time.Second))
		p := dialProto(t, wsURL(srv, "/ws"))
		p.subscribe("long")
		// The server's pings are the clock: 30 of them span at least 29
		// intervals, 580ms, well past every timeout.
		for pings := 0; pings < 30; {
			if _, b := readFrame(t, p.c); string(b) == `{"type":"ping"}` {
				pings++
				p.send(`{"type":"pong"}`)
			}
		}
		if e := p.request(map[string]any{"type": "ping"}); e.Type != "pong" {
			t.Fatalf("ping answered with %s, want pong", e.raw)
		}
		if err := h.Publish(testCtx(t), "long", []byte(`"still here"`)); err != nil {
			t.Fatal(err)
		}
		p.readMessage("long")
	})
	t.Run("raw", func(t *testing.T) {
		t.Parallel()
		h, srv := secServer(t, configure, pubsub.WithHeartbeat(20*time.Millisecond, 5*time.Second))
		pinged := make(chan struct{}, 64)
		c, _, err := websocket.Dial(testCtx(t), wsURL(srv, "/ws?room=long"), &websocket.DialOptions{
			OnPingReceived: func(context.Context, []byte) bool {
				select {
				case pinged <- struct{}{}:
				default:
				}
				return true
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.CloseNow() })
		read := make(chan error, 1)
		go func() {
			_, b, err := c.Read(context.Background())
			if err == nil && string(b) != "still here" {
				err = fmt.Errorf("read %q, want %q", b, "still here")
			}
			read <- err
		}()
		// Silent raw clients are pinged at most once per interval: 30
		// pings span at least 580ms.
		ctx := testCtx(t)
		for range 30 {
			select {
			case <-pinged:
			case err := <-read:
				t.Fatalf("the connection ended while waiting for pings: %v", err)
			case <-ctx.Done():
				t.Fatal("timed out waiting for pings")
			}
		}
		if err := h.Publish(ctx, "long", []byte("still here")); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-read:
			if err != nil {
				t.Fatal(err)
			}
		case <-ctx.Done():
			t.Fatal("timed out waiting for the message")
		}
	})
}
