package pubsubtest

import (
	"testing"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub/protocol"
)

// RawConn is a raw-mode client, like a browser's bare WebSocket or wscat:
// frames carry payloads verbatim.
type RawConn struct {
	t  testing.TB
	ws *websocket.Conn
}

// DialRaw connects to url (ws://…) offering no subprotocol, and fails the
// test when the upgrade is refused.
func DialRaw(t testing.TB, url string, opts ...DialOption) *RawConn {
	t.Helper()
	ws, status, err := dial(t, url, dialOptions(opts))
	if err != nil {
		t.Fatalf("dial %s: %v (HTTP %d)", url, err, status)
	}
	return &RawConn{t: t, ws: ws}
}

// Subprotocol is the subprotocol the server selected ("" in raw mode).
func (c *RawConn) Subprotocol() string { return c.ws.Subprotocol() }

// Send sends s in a text frame.
func (c *RawConn) Send(s string) {
	c.t.Helper()
	c.write(websocket.MessageText, []byte(s))
}

// SendBinary sends b in a binary frame.
func (c *RawConn) SendBinary(b []byte) {
	c.t.Helper()
	c.write(websocket.MessageBinary, b)
}

func (c *RawConn) write(typ websocket.MessageType, b []byte) {
	c.t.Helper()
	ctx, cancel := readCtx(c.t)
	defer cancel()
	if err := c.ws.Write(ctx, typ, b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// Read returns the next frame's payload and whether it was binary.
func (c *RawConn) Read() (binary bool, data []byte) {
	c.t.Helper()
	binary, data, err := c.TryRead()
	if err != nil {
		c.t.Fatalf("read: %v", err)
	}
	return binary, data
}

// TryRead returns the next frame, or the error that ended the connection
// (see CloseOf) or the read (nothing within Timeout). It does not fail the
// test, so a test may call it on a goroutine of its own, while no other
// goroutine uses the client.
func (c *RawConn) TryRead() (binary bool, data []byte, err error) {
	ctx, cancel := readCtx(c.t)
	defer cancel()
	typ, data, err := c.ws.Read(ctx)
	return typ == websocket.MessageBinary, data, err
}

// ExpectText reads the next frame and expects text equal to want.
func (c *RawConn) ExpectText(want string) {
	c.t.Helper()
	if binary, got := c.Read(); binary || string(got) != want {
		c.t.Fatalf("read %q (binary %v), want text %q", got, binary, want)
	}
}

// ExpectBinary reads the next frame and expects binary equal to want.
func (c *RawConn) ExpectBinary(want []byte) {
	c.t.Helper()
	if binary, got := c.Read(); !binary || string(got) != string(want) {
		c.t.Fatalf("read %q (binary %v), want binary %q", got, binary, want)
	}
}

// ExpectClose reads past any frames until the connection closes, expects
// the close code, and returns the reason.
func (c *RawConn) ExpectClose(code protocol.CloseCode) string {
	c.t.Helper()
	return expectClose(c.t, c.ws, code, false)
}

// ExpectCloseNext expects the next thing to arrive to be the close, with
// code: a frame first fails the test.
func (c *RawConn) ExpectCloseNext(code protocol.CloseCode) string {
	c.t.Helper()
	return expectClose(c.t, c.ws, code, true)
}

// Close closes the connection with code and reason, and waits (a bounded
// time) for the server's close frame.
func (c *RawConn) Close(code protocol.CloseCode, reason string) {
	_ = c.ws.Close(websocket.StatusCode(code), reason)
}

// CloseNow closes the connection at once, with no close frame: a client
// that vanished.
func (c *RawConn) CloseNow() { _ = c.ws.CloseNow() }

// expectClose reads until the connection ends and checks its close code;
// with next, a data frame first (a heartbeat ping of protocol mode aside)
// fails the test.
func expectClose(t testing.TB, ws *websocket.Conn, code protocol.CloseCode, next bool) string {
	t.Helper()
	ctx, cancel := readCtx(t)
	defer cancel()
	for {
		_, b, err := ws.Read(ctx)
		if err == nil {
			if next && string(b) != `{"type":"ping"}` {
				t.Fatalf("got %s, want the connection closed with %s first", b, code)
			}
			continue
		}
		got, reason, ok := CloseOf(err)
		if !ok {
			t.Fatalf("the connection ended with %v, want close code %s", err, code)
		}
		if got != code {
			t.Fatalf("close %s %q, want %s", got, reason, code)
		}
		return reason
	}
}
