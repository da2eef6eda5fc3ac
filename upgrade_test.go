package pubsub_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// The upgrade (upgrade.go), refusals first: who may open a WebSocket, in
// the order the checks run. Each refusal is an HTTP status before any
// WebSocket resource is spent: 426 for a plain request, 400 for a foreign
// subprotocol or a bad room, 403 for a foreign origin or a denied room,
// 401/403 from the authenticate hook, 429 past the per-user limit, 503
// when full (and while shutting down: pubsub_test.go), 500 when a hook
// fails (hooks_test.go).

// headerAuth identifies a client from its X-User and X-Info request
// headers.
func headerAuth() pubsub.Option {
	return pubsub.WithAuthenticate(func(r *http.Request) (pubsub.Identity, error) {
		id := pubsub.Identity{UserID: r.Header.Get("X-User")}
		if info := r.Header.Get("X-Info"); info != "" {
			id.Info = json.RawMessage(info)
		}
		return id, nil
	})
}

// asUser dials as user name, for headerAuth.
func asUser(name string) pubsubtest.DialOption {
	return pubsubtest.Header(http.Header{"X-User": {name}})
}

// plainRequest sends srv a plain HTTP request (not a WebSocket dial), with
// body when it is not empty, and returns the response and its body, read
// and closed (an upgraded connection is closed unread).
func plainRequest(t *testing.T, srv *pubsubtest.Server, method, path string, header http.Header, body string) (*http.Response, []byte) {
	t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(pubsubtest.Context(t), method, srv.URL+path, r)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusSwitchingProtocols {
		return resp, nil
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, b
}

// upgradeRequest sends a WebSocket upgrade request as plain HTTP, to read
// the answer's headers; an upgraded connection is closed at once.
func upgradeRequest(t *testing.T, srv *pubsubtest.Server, path string) *http.Response {
	t.Helper()
	resp, _ := plainRequest(t, srv, http.MethodGet, path, http.Header{
		"Connection":            {"Upgrade"},
		"Upgrade":               {"websocket"},
		"Sec-Websocket-Version": {"13"},
		"Sec-Websocket-Key":     {"dGhlIHNhbXBsZSBub25jZQ=="},
	}, "")
	return resp
}

// expectRefused checks how many upgrades the Handler has refused.
func expectRefused(t *testing.T, srv *pubsubtest.Server, want uint64) {
	t.Helper()
	if got := srv.Stats().Refused; got != want {
		t.Fatalf("Stats().Refused = %d, want %d", got, want)
	}
}

// ---- Request checks ----

func TestRawNonWebSocketRequestGets426(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		method string
		header http.Header
	}{
		{name: "plain GET", method: http.MethodGet},
		{name: "plain POST", method: http.MethodPost},
		{name: "POST with upgrade headers", method: http.MethodPost, header: http.Header{"Connection": {"Upgrade"}, "Upgrade": {"websocket"}}},
		{name: "Upgrade without Connection", method: http.MethodGet, header: http.Header{"Upgrade": {"websocket"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			srv := pubsubtest.Start(t)
			resp, _ := plainRequest(t, srv, tt.method, "/ws?room=lobby", tt.header, "body")
			if resp.StatusCode != http.StatusUpgradeRequired {
				t.Fatalf("HTTP %d, want 426", resp.StatusCode)
			}
			if got := resp.Header.Get("Upgrade"); !strings.EqualFold(got, "websocket") {
				t.Fatalf("Upgrade header %q, want websocket", got)
			}
			expectRefused(t, srv, 1)
			expectMembers(t, srv, "lobby", 0)
		})
	}
}

func TestRawSubprotocolNegotiation(t *testing.T) {
	t.Parallel()
	t.Run("foreign subprotocol only is 400", func(t *testing.T) {
		t.Parallel()
		srv := pubsubtest.Start(t)
		srv.Refused("/ws?room=lobby", http.StatusBadRequest, pubsubtest.Subprotocols("chat.v2"))
		expectRefused(t, srv, 1)
	})
	t.Run("foreign and ours is protocol mode", func(t *testing.T) {
		t.Parallel()
		srv := pubsubtest.Start(t)
		// Dial checks that roomcast.v1 was selected and that the welcome
		// envelope comes first.
		srv.Dial("/ws?room=lobby", pubsubtest.Subprotocols("chat.v2", protocol.Subprotocol))
	})
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
			srv := pubsubtest.Start(t, tt.opts...)
			var dial []pubsubtest.DialOption
			if origin := strings.ReplaceAll(tt.origin, self, srv.URL); origin != "" {
				dial = append(dial, pubsubtest.Origin(origin))
			}
			if !tt.allowed {
				srv.Refused("/ws?room=lobby", http.StatusForbidden, dial...)
				expectRefused(t, srv, 1)
				return
			}
			c := srv.DialRaw("/ws?room=lobby", dial...)
			srv.Publish("lobby", []byte("allowed"))
			c.ExpectText("allowed")
		})
	}
}

func TestRawOriginIsCheckedBeforeAuthentication(t *testing.T) {
	t.Parallel()
	var calls atomic.Int64
	srv := pubsubtest.Start(t, pubsub.WithAuthenticate(rawTokenAuth(&calls)))
	bearer := pubsubtest.Header(http.Header{"Authorization": {"Bearer alice-token"}})
	srv.Refused("/ws?room=lobby", http.StatusForbidden, pubsubtest.Origin("https://evil.com"), bearer)
	if n := calls.Load(); n != 0 {
		t.Fatalf("authenticate ran %d times for a foreign origin, want 0", n)
	}
	// The same request from our own origin does reach the hook.
	srv.DialRaw("/ws?room=lobby", pubsubtest.Origin(srv.URL), bearer)
	if n := calls.Load(); n != 1 {
		t.Fatalf("authenticate ran %d times for an allowed origin, want 1", n)
	}
	expectRefused(t, srv, 1)
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
		name, path string
		header     http.Header
		status     int // 0: upgraded as alice
		hookPanics uint64
	}{
		{name: "bearer header", path: "/ws?room=lobby", header: http.Header{"Authorization": {"Bearer alice-token"}}},
		{name: "session cookie", path: "/ws?room=lobby", header: http.Header{"Cookie": {"session=alice-token"}}},
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
			var hooks hookLog
			srv := pubsubtest.Start(t, hooks.options(pubsub.WithAuthenticate(rawTokenAuth(nil)),
				pubsub.WithAuthorize(func(_ context.Context, c pubsub.Client, _ pubsub.Action, _ string) error {
					offer(authzUsers, c.UserID)
					return nil
				}))...)
			if tt.status != 0 {
				srv.Refused(tt.path, tt.status, pubsubtest.Header(tt.header))
				expectRefused(t, srv, 1)
				if got := srv.Stats().HookPanics; got != tt.hookPanics {
					t.Fatalf("Stats().HookPanics = %d, want %d", got, tt.hookPanics)
				}
				if len(authzUsers) != 0 {
					t.Fatal("authorize was consulted for an unauthenticated client")
				}
				// A refused client never breaks the next one.
				srv.DialRaw("/ws?token=alice-token")
				return
			}
			c := srv.DialRaw(tt.path, pubsubtest.Header(tt.header))
			if cl := hooks.connected(t, 1); cl.UserID != "alice" {
				t.Fatalf("connect hook saw UserID %q, want alice", cl.UserID)
			}
			if strings.Contains(tt.path, "room=") {
				if u := pubsubtest.Receive(t, authzUsers, "the authorize hook"); u != "alice" {
					t.Fatalf("authorize hook saw UserID %q, want alice", u)
				}
			}
			if err := srv.PublishToUser(pubsubtest.Context(t), "alice", []byte("hi alice")); err != nil {
				t.Fatalf("PublishToUser: %v", err)
			}
			c.ExpectText("hi alice")
			expectRefused(t, srv, 0)
		})
	}
}

func TestIdentityInfoThatIsNotJSONFailsTheUpgradeWith500(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, headerAuth())
	bad := pubsubtest.Header(http.Header{"X-User": {"ann"}, "X-Info": {`{"name": Ann}`}})
	srv.Refused("/ws", http.StatusInternalServerError, bad, pubsubtest.Subprotocols(protocol.Subprotocol))
	srv.Refused("/ws?room=r", http.StatusInternalServerError, bad)
	// Valid info is accepted.
	srv.Dial("/ws", pubsubtest.Header(http.Header{"X-User": {"ann"}, "X-Info": {`{"name":"Ann"}`}}))
}

// ---- A raw client's room ----

func TestRawAuthorizeDenyingSubscribeRefusesUpgradeWith403(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithAuthorize(func(_ context.Context, _ pubsub.Client, a pubsub.Action, room string) error {
		if a == pubsub.ActionSubscribe && room == "vault" {
			return pubsub.ErrForbidden
		}
		return nil
	}))
	srv.Refused("/ws?room=vault", http.StatusForbidden)
	srv.Refused("/ws/vault", http.StatusForbidden)
	expectRefused(t, srv, 2)
	expectMembers(t, srv, "vault", 0)

	c := srv.DialRaw("/ws?room=lobby")
	srv.Publish("lobby", []byte("welcome"))
	c.ExpectText("welcome")
}

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
			srv := pubsubtest.Start(t)
			srv.Refused(tt.path, http.StatusBadRequest)
			expectRefused(t, srv, 1)
			if n := srv.Stats().Rooms; n != 0 {
				t.Fatalf("Stats().Rooms = %d after a refused upgrade, want 0", n)
			}
		})
	}
	t.Run("exactly 128 bytes is accepted", func(t *testing.T) {
		t.Parallel()
		srv := pubsubtest.Start(t)
		room := strings.Repeat("a", 128)
		c := srv.DialRaw("/ws?room=" + room)
		srv.Publish(room, []byte("fits"))
		c.ExpectText("fits")
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
	srv := pubsubtest.Start(t, validator)
	// The default would refuse this name, and accept "lobby".
	srv.Refused("/ws?room=lobby", http.StatusBadRequest)
	c := srv.DialRaw("/ws?room=team-caf%C3%A9")
	srv.Publish("team-café", []byte("accepted"))
	c.ExpectText("accepted")
	expectRefused(t, srv, 1)
}

// ---- Admission ----

func TestMaxConnectionsRefusesOneMoreBeforeTheUpgrade(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithMaxConnections(2))
	const path = "/ws?room=full"
	first := srv.DialRaw(path)
	srv.DialRaw(path)
	resp := upgradeRequest(t, srv, path)
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("third connection: %d with Retry-After %q, want 503 with Retry-After", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	expectRefused(t, srv, 1)
	// A slot comes back when a connection ends.
	first.Close(protocol.CloseNormal, "")
	pubsubtest.WaitFor(t, "a free slot", func() bool {
		switch status := upgradeRequest(t, srv, path).StatusCode; status {
		case http.StatusSwitchingProtocols:
			return true
		case http.StatusServiceUnavailable:
			return false
		default:
			t.Fatalf("status %d while waiting for a slot", status)
			return false
		}
	})
}

func TestMaxConnectionsPerUserRefusesOneMoreWith429(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, headerAuth(), pubsub.WithMaxConnectionsPerUser(2))
	const path = "/ws?room=tabs"
	for range 2 {
		srv.DialRaw(path, asUser("ann"))
	}
	srv.Refused(path, http.StatusTooManyRequests, asUser("ann")) // ann's third tab
	srv.DialRaw(path, asUser("bob"))                             // another user
	for range 3 {                                                // anonymous connections are not counted per user
		srv.DialRaw(path)
	}
}

func TestDefaultPerUserLimitIs100Connections(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, headerAuth())
	for range 100 {
		srv.DialRaw("/ws", asUser("ann"))
	}
	srv.Refused("/ws", http.StatusTooManyRequests, asUser("ann")) // the 101st
}

// The 101 Switching Protocols: the Handler writes it itself when it has
// net/http's own ResponseWriter (see hijacker), and it says what net/http
// would have said, the host's own header fields included, as the same 101
// written by net/http through a middleware's wrapper (which sees the
// status) shows: the same fields, a value with a line break of its own
// made harmless, an invalid field name left out. The connection works
// after it.
func TestThe101IsWhatNetHTTPWouldWrite(t *testing.T) {
	t.Parallel()
	h := pubsub.NewHandler(pubsub.WithLogger(pubsubtest.Logger()))
	hostHeaders := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Frame-Options", "DENY")
			w.Header().Add("Set-Cookie", "a=1; HttpOnly")
			w.Header().Add("Set-Cookie", "b=2")
			w.Header().Set("X-Injected", "x\r\nEvil: 1")
			w.Header()["Bad Key"] = []string{"dropped"}
			next.ServeHTTP(w, r)
		})
	}
	var status atomic.Int64
	recordStatus := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			next.ServeHTTP(&statusRecorder{ResponseWriter: w, status: &status}, r)
		})
	}
	direct := pubsubtest.Serve(t, h, hostHeaders(h))
	wrapped := httptest.NewServer(hostHeaders(recordStatus(h)))
	t.Cleanup(wrapped.Close)

	read101 := func(base string) (*http.Response, net.Conn, *bufio.Reader) {
		t.Helper()
		c, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		req, _ := http.NewRequest(http.MethodGet, base+"/ws?room=head", nil)
		req.Header.Set("Upgrade", "websocket")
		req.Header.Set("Connection", "Upgrade")
		req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
		req.Header.Set("Sec-WebSocket-Version", "13")
		if err := req.Write(c); err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, req)
		if err != nil {
			t.Fatalf("reading the 101: %v", err)
		}
		return resp, c, br
	}
	ours, c, br := read101(direct.URL)
	theirs, _, _ := read101(wrapped.URL)
	if ours.StatusCode != http.StatusSwitchingProtocols || theirs.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("status %d (the Handler's) and %d (net/http's), want 101", ours.StatusCode, theirs.StatusCode)
	}
	if got := status.Load(); got != http.StatusSwitchingProtocols {
		t.Errorf("the wrapper saw status %d, want 101", got)
	}
	if ours.Header.Get("Date") != "" {
		t.Error("the direct 101 has a Date: net/http wrote it, not the Handler")
	}
	theirs.Header.Del("Date") // net/http's own addition, which a 101 does not need
	if !reflect.DeepEqual(ours.Header, theirs.Header) {
		t.Errorf("the Handler's 101 header:\n%v\nnet/http's:\n%v", ours.Header, theirs.Header)
	}
	if got := ours.Header.Get("Sec-WebSocket-Accept"); got != "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" {
		t.Errorf("Sec-WebSocket-Accept %q, want RFC 6455's example answer", got)
	}
	if ours.Header.Get("Evil") != "" || ours.Header.Get("Bad Key") != "" {
		t.Errorf("a field the host did not set as such: %v", ours.Header)
	}

	pubsubtest.WaitFor(t, "the client in its room", func() bool { return len(h.Connections("head")) == 2 })
	if err := h.Publish(pubsubtest.Context(t), "head", []byte("after the 101")); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	frame := make([]byte, 2+len("after the 101"))
	if _, err := io.ReadFull(br, frame); err != nil {
		t.Fatalf("reading the message after the 101: %v", err)
	}
	if frame[0] != 0x81 || int(frame[1]) != len("after the 101") || string(frame[2:]) != "after the 101" {
		t.Fatalf("read % x, want a text frame of %q", frame, "after the 101")
	}
}

// statusRecorder is a host middleware's ResponseWriter wrapper that
// records the status.
type statusRecorder struct {
	http.ResponseWriter
	status *atomic.Int64
}

func (w *statusRecorder) WriteHeader(code int) {
	w.status.Store(int64(code))
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusRecorder) Unwrap() http.ResponseWriter { return w.ResponseWriter }
