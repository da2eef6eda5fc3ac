package pubsubtest

import (
	"context"
	"errors"
	"net/http"
	"testing"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub/protocol"
)

// DialOption adjusts how a client dials.
type DialOption func(*dialConfig)

type dialConfig struct {
	header       http.Header
	subprotocols []string
	allowGaps    bool
	httpClient   *http.Client
	onPing       func()
}

// Header adds h to the upgrade request: cookies, a token, an Origin.
func Header(h http.Header) DialOption {
	return func(c *dialConfig) {
		if c.header == nil {
			c.header = http.Header{}
		}
		for k, vs := range h {
			for _, v := range vs {
				c.header.Add(k, v)
			}
		}
	}
}

// Origin sets the upgrade request's Origin header, as a browser would.
func Origin(origin string) DialOption {
	return Header(http.Header{"Origin": {origin}})
}

// Subprotocols offers these subprotocols instead of the mode's own: for
// testing negotiation. DialRaw offers none by default, Dial roomcast.v1.
func Subprotocols(p ...string) DialOption {
	return func(c *dialConfig) { c.subprotocols = p }
}

// HTTPClient makes the client send its HTTP request (a WebSocket upgrade,
// an event stream) with c: for a TLS or HTTP/2 server,
// httptest.Server.Client(), which a Server's own Dial, DialRaw, Refused
// and Listen use when it serves TLS. Default: http.DefaultClient.
func HTTPClient(c *http.Client) DialOption {
	return func(cfg *dialConfig) { cfg.httpClient = c }
}

// AllowGaps turns off a protocol client's check that each room's messages
// follow one another (seq + 1 within an epoch): for rooms whose policy
// drops messages on purpose (SlowConsumerDropOldest,
// SlowConsumerKeepLatest).
func AllowGaps() DialOption {
	return func(c *dialConfig) { c.allowGaps = true }
}

// OnPing calls f for each WebSocket ping the client gets (raw mode's
// heartbeat) while it reads; the client answers every ping, as browsers do.
func OnPing(f func()) DialOption {
	return func(c *dialConfig) { c.onPing = f }
}

func dialOptions(opts []DialOption) dialConfig {
	var c dialConfig
	for _, o := range opts {
		o(&c)
	}
	return c
}

// dial opens a WebSocket, or returns the HTTP status of the refusal.
func dial(t testing.TB, url string, c dialConfig) (*websocket.Conn, int, error) {
	t.Helper()
	o := &websocket.DialOptions{HTTPClient: c.httpClient, HTTPHeader: c.header, Subprotocols: c.subprotocols}
	if f := c.onPing; f != nil {
		o.OnPingReceived = func(context.Context, []byte) bool { f(); return true }
	}
	ws, resp, err := websocket.Dial(Context(t), url, o)
	status := 0
	if resp != nil {
		status = resp.StatusCode
	}
	if err != nil {
		return nil, status, err
	}
	ws.SetReadLimit(-1)
	t.Cleanup(func() { ws.CloseNow() })
	return ws, status, nil
}

// Refused dials url and expects the upgrade to be refused with the HTTP
// status.
func Refused(t testing.TB, url string, status int, opts ...DialOption) {
	t.Helper()
	ws, got, err := dial(t, url, dialOptions(opts))
	if err == nil {
		ws.CloseNow()
		t.Fatalf("dial %s: upgraded, want HTTP %d", url, status)
	}
	if got != status {
		t.Fatalf("dial %s: HTTP %d (%v), want %d", url, got, err, status)
	}
}

// CloseOf is the close code and reason that err, as returned by
// RawConn.TryRead or Conn.TryNext, carries; ok is false when the connection
// ended without a close frame (code is then CloseAbnormal, 1006).
func CloseOf(err error) (code protocol.CloseCode, reason string, ok bool) {
	var ce websocket.CloseError
	if !errors.As(err, &ce) {
		return protocol.CloseAbnormal, "", false
	}
	return protocol.CloseCode(ce.Code), ce.Reason, true
}

// readCtx bounds one read or write by the kit's timeout.
func readCtx(testing.TB) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), Timeout)
}
