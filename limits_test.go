package pubsub_test

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/roomcast/pubsub/protocol"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub"
)

// dialAs opens a raw connection to room authenticated as user (empty:
// anonymous), returning the HTTP status when the upgrade is refused.
func dialAs(t *testing.T, url, user string) (*websocket.Conn, int) {
	t.Helper()
	h := http.Header{}
	if user != "" {
		h.Set("X-User", user)
	}
	c, resp, err := websocket.Dial(testCtx(t), url, &websocket.DialOptions{HTTPHeader: h})
	if err != nil {
		if resp == nil {
			t.Fatalf("dial: %v", err)
		}
		return nil, resp.StatusCode
	}
	t.Cleanup(func() { c.CloseNow() })
	return c, http.StatusSwitchingProtocols
}

func headerUser(r *http.Request) (pubsub.Identity, error) {
	return pubsub.Identity{UserID: r.Header.Get("X-User")}, nil
}

func TestMaxConnectionsRefusesOneMoreBeforeTheUpgrade(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithMaxConnections(2))
	url := wsURL(srv, "/ws?room=full")
	first, _ := dialAs(t, url, "")
	dialAs(t, url, "")
	resp, err := http.DefaultClient.Do(upgradeRequest(t, url))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("third connection: %d with Retry-After %q, want 503 with Retry-After", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	if got := h.Stats().Refused; got != 1 {
		t.Fatalf("Stats().Refused = %d, want 1", got)
	}
	// A slot comes back when a connection ends.
	first.Close(websocket.StatusNormalClosure, "")
	waitFor(t, "a free slot", func() bool {
		c, status := dialAs(t, url, "")
		if c != nil {
			return true
		}
		if status != http.StatusServiceUnavailable {
			t.Fatalf("status %d while waiting for a slot", status)
		}
		return false
	})
}

// upgradeRequest is a WebSocket upgrade request as plain HTTP, to read the
// refusal's headers.
func upgradeRequest(t *testing.T, wsurl string) *http.Request {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, "http"+wsurl[2:], nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Sec-WebSocket-Version", "13")
	req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	return req
}

func TestMaxConnectionsPerUserRefusesOneMoreWith429(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t, pubsub.WithAuthenticate(headerUser), pubsub.WithMaxConnectionsPerUser(2))
	url := wsURL(srv, "/ws?room=tabs")
	for range 2 {
		if _, status := dialAs(t, url, "ann"); status != http.StatusSwitchingProtocols {
			t.Fatalf("ann's tab: %d", status)
		}
	}
	if _, status := dialAs(t, url, "ann"); status != http.StatusTooManyRequests {
		t.Fatalf("ann's third tab: %d, want 429", status)
	}
	if _, status := dialAs(t, url, "bob"); status != http.StatusSwitchingProtocols {
		t.Fatalf("bob, another user: %d, want an upgrade", status)
	}
	for range 3 { // anonymous connections are not counted per user
		if _, status := dialAs(t, url, ""); status != http.StatusSwitchingProtocols {
			t.Fatalf("anonymous: %d, want an upgrade", status)
		}
	}
}

func TestIdleTimeoutClosesAQuietConnectionAndSparesABusyOne(t *testing.T) {
	t.Parallel()
	const idle = 150 * time.Millisecond
	h, srv := newServer(t, pubsub.WithIdleTimeout(idle), pubsub.WithHeartbeat(20*time.Millisecond, 10*time.Second))
	quiet := dial(t, wsURL(srv, "/ws?room=quiet"))
	busy := dial(t, wsURL(srv, "/ws?room=busy"))
	go quiet.Read(context.Background()) // answers pings: alive, but idle

	// Traffic for three idle timeouts keeps the busy one open.
	start := time.Now()
	for time.Since(start) < 3*idle {
		if err := h.Publish(testCtx(t), "busy", []byte("tick")); err != nil {
			t.Fatal(err)
		}
		readText(t, busy, "tick")
	}
	waitFor(t, "the quiet connection to be closed", func() bool { return len(h.Connections("quiet")) == 0 })
	if len(h.Connections("busy")) != 1 {
		t.Fatal("the busy connection was closed too")
	}
}

func TestIdleTimeoutCloseCodeIs4005(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t, pubsub.WithIdleTimeout(50*time.Millisecond), pubsub.WithHeartbeat(20*time.Millisecond, 10*time.Second))
	c := dial(t, wsURL(srv, "/ws?room=quiet"))
	if reason := expectClose(t, c, protocol.CloseIdleTimeout); reason != "idle timeout" {
		t.Fatalf("reason %q", reason)
	}
}

func TestShutdownDrainsInSpacedBatches(t *testing.T) {
	t.Parallel()
	const pause = 300 * time.Millisecond
	var mu sync.Mutex
	var closed []time.Time
	h, srv := newServer(t, pubsub.WithDrain(2, pause), pubsub.WithOnDisconnect(func(e pubsub.DisconnectEvent) {
		mu.Lock()
		closed = append(closed, time.Now())
		mu.Unlock()
	}))
	var clients []*websocket.Conn
	for range 6 {
		clients = append(clients, dial(t, wsURL(srv, "/ws?room=fleet")))
	}
	waitFor(t, "six connections", func() bool { return h.Stats().Connections == 6 })
	for _, c := range clients {
		go func() {
			for {
				if _, _, err := c.Read(context.Background()); err != nil {
					return
				}
			}
		}()
	}
	start := time.Now()
	if err := h.Shutdown(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	slices.SortFunc(closed, func(a, b time.Time) int { return a.Compare(b) })
	if len(closed) != 6 {
		t.Fatalf("%d disconnects, want 6", len(closed))
	}
	// Lower bounds only: a loaded machine can delay a batch, never hasten it.
	if d := closed[2].Sub(start); d < pause {
		t.Fatalf("the third close came %v after Shutdown, want at least one pause (%v): batches of 2", d, pause)
	}
	if d := closed[4].Sub(start); d < 2*pause {
		t.Fatalf("the fifth close came %v after Shutdown, want at least two pauses (%v)", d, 2*pause)
	}
}

func TestShutdownStopsPacingWhenItsContextEnds(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithDrain(1, time.Hour))
	for range 3 {
		c := dial(t, wsURL(srv, "/ws?room=fleet"))
		go func() {
			for {
				if _, _, err := c.Read(context.Background()); err != nil {
					return
				}
			}
		}()
	}
	waitFor(t, "three connections", func() bool { return h.Stats().Connections == 3 })
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	done := make(chan struct{})
	go func() { h.Shutdown(ctx); close(done) }()
	select {
	case <-done:
	case <-testCtx(t).Done():
		t.Fatal("Shutdown kept pacing after its context ended")
	}
	if n := h.Stats().Connections; n != 0 {
		t.Fatalf("%d connections after Shutdown, want 0", n)
	}
}

func TestNewHandlerRefusesLimitsOutOfRange(t *testing.T) {
	t.Parallel()
	for name, opt := range map[string]pubsub.Option{
		"WithMaxConnections":        pubsub.WithMaxConnections(-1),
		"WithMaxConnectionsPerUser": pubsub.WithMaxConnectionsPerUser(-1),
		"WithIdleTimeout":           pubsub.WithIdleTimeout(time.Millisecond),
		"WithDrain":                 pubsub.WithDrain(0, time.Second),
	} {
		func() {
			defer func() {
				p, _ := recover().(string)
				if len(p) < 8 || p[:8] != "pubsub: " || !contains(p, name) {
					t.Errorf("%s: panic %q, want a \"pubsub: \" message naming the option", name, p)
				}
			}()
			pubsub.NewHandler(opt)
		}()
	}
}

func contains(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return true
		}
	}
	return false
}

func TestDefaultPerUserLimitIs100Connections(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t, pubsub.WithAuthenticate(headerUser))
	url := wsURL(srv, "/ws")
	for i := range 100 {
		if _, status := dialAs(t, url, "ann"); status != http.StatusSwitchingProtocols {
			t.Fatalf("connection %d of ann: %d", i+1, status)
		}
	}
	if _, status := dialAs(t, url, "ann"); status != http.StatusTooManyRequests {
		t.Fatalf("connection %d of ann: %d, want 429", 100+1, status)
	}
}

func TestDefaultRateLimitAllowsABurstOf50(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t)
	p := dialProto(t, wsURL(srv, "/ws"))
	const sent = 80
	for i := range sent { // pipelined: far faster than the 20/s refill
		p.send(map[string]any{"type": "ping", "id": fmt.Sprint(i)})
	}
	pongs, limited := 0, 0
	for range sent {
		switch e := p.read(); {
		case e.Type == "pong":
			pongs++
		case e.Type == "error" && e.Code == protocol.CodeRateLimited:
			limited++
		default:
			t.Fatalf("unexpected %s", e.raw)
		}
	}
	// The whole burst, then refusals (a refill of 20/s adds only a few
	// while 80 pipelined frames go by).
	if pongs < 50 || limited == 0 {
		t.Fatalf("%d answered, %d rate-limited of %d: want the default burst of %d, then refusals", pongs, limited, sent, 50)
	}
}
