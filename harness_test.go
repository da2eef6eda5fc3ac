package pubsub_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/roomcast/pubsub/protocol"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/internal/leaktest"
)

// TestMain fails the run when goroutines outlive the tests: every
// connection's reader and writer, every handler and every test server must
// have ended.
func TestMain(m *testing.M) {
	os.Exit(leaktest.After(m.Run()))
}

// quietLogger keeps test output to failures; set ROOMCAST_TEST_LOG=1 to see
// the handler's logs.
func quietLogger() *slog.Logger {
	if os.Getenv("ROOMCAST_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// newServer starts h on an httptest server at "/ws" (and "/ws/" for rooms
// in the path). Cleanup closes the handler first, then the server.
func newServer(t *testing.T, opts ...pubsub.Option) (*pubsub.Handler, *httptest.Server) {
	t.Helper()
	h := pubsub.NewHandler(append([]pubsub.Option{pubsub.WithLogger(quietLogger())}, opts...)...)
	mux := http.NewServeMux()
	mux.Handle("/ws", h)
	mux.Handle("/ws/", h)
	srv := httptest.NewServer(mux)
	t.Cleanup(func() {
		h.Close()
		srv.Close()
	})
	return h, srv
}

// wsURL turns the test server's URL into a ws:// URL for path.
func wsURL(srv *httptest.Server, path string) string {
	return "ws" + strings.TrimPrefix(srv.URL, "http") + path
}

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// dial opens a WebSocket with optional subprotocols and fails the test on
// error. The connection is closed at cleanup.
func dial(t *testing.T, url string, subprotocols ...string) *websocket.Conn {
	t.Helper()
	c, resp, err := websocket.Dial(testCtx(t), url, &websocket.DialOptions{Subprotocols: subprotocols})
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

// dialStatus dials and expects the upgrade to be refused with status.
func dialStatus(t *testing.T, url string, header http.Header, status int, subprotocols ...string) {
	t.Helper()
	c, resp, err := websocket.Dial(testCtx(t), url, &websocket.DialOptions{HTTPHeader: header, Subprotocols: subprotocols})
	if err == nil {
		c.CloseNow()
		t.Fatalf("dial %s: upgraded, want HTTP %d", url, status)
	}
	if resp == nil || resp.StatusCode != status {
		got := 0
		if resp != nil {
			got = resp.StatusCode
		}
		t.Fatalf("dial %s: HTTP %d (%v), want %d", url, got, err, status)
	}
}

// readFrame reads one data frame.
func readFrame(t *testing.T, c *websocket.Conn) (websocket.MessageType, []byte) {
	t.Helper()
	typ, b, err := c.Read(testCtx(t))
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return typ, b
}

// readText reads one frame and expects it to be text equal to want.
func readText(t *testing.T, c *websocket.Conn, want string) {
	t.Helper()
	typ, b := readFrame(t, c)
	if typ != websocket.MessageText || string(b) != want {
		t.Fatalf("read %v %q, want text %q", typ, b, want)
	}
}

// expectClose reads until the connection closes and checks the close code.
func expectClose(t *testing.T, c *websocket.Conn, code protocol.CloseCode) string {
	t.Helper()
	ctx := testCtx(t)
	for {
		_, _, err := c.Read(ctx)
		if err == nil {
			continue
		}
		var ce websocket.CloseError
		if !errors.As(err, &ce) {
			t.Fatalf("connection ended with %v, want close code %d", err, code)
		}
		if protocol.CloseCode(ce.Code) != code {
			t.Fatalf("close code %d (%q), want %d", ce.Code, ce.Reason, code)
		}
		return ce.Reason
	}
}

// envelope is any server envelope, decoded loosely for assertions.
type envelope struct {
	Type    string             `json:"type"`
	ID      string             `json:"id"`
	Room    string             `json:"room"`
	Epoch   string             `json:"epoch"`
	Seq     uint64             `json:"seq"`
	Data    json.RawMessage    `json:"data"`
	Text    *string            `json:"text"`
	Binary  *string            `json:"binary"`
	Code    protocol.ErrorCode `json:"code"`
	Message string             `json:"message"`
	ConnID  string             `json:"conn_id"`
	UserID  string             `json:"user_id"`
	raw     []byte
}

// protoClient is a protocol-mode test client.
type protoClient struct {
	t       *testing.T
	c       *websocket.Conn
	welcome envelope
	nextID  int
	pending []envelope // envelopes read while waiting for a reply
}

// dialProto connects in protocol mode and consumes the welcome.
func dialProto(t *testing.T, url string) *protoClient {
	t.Helper()
	c := dial(t, url, protocol.Subprotocol)
	if c.Subprotocol() != protocol.Subprotocol {
		t.Fatalf("negotiated subprotocol %q, want %q", c.Subprotocol(), protocol.Subprotocol)
	}
	p := &protoClient{t: t, c: c}
	p.welcome = p.read()
	if p.welcome.Type != "welcome" {
		t.Fatalf("first envelope %s, want welcome", p.welcome.raw)
	}
	return p
}

func (p *protoClient) send(v any) {
	p.t.Helper()
	b, ok := v.([]byte)
	if !ok {
		if s, isString := v.(string); isString {
			b = []byte(s)
		} else {
			var err error
			if b, err = json.Marshal(v); err != nil {
				p.t.Fatal(err)
			}
		}
	}
	if err := p.c.Write(testCtx(p.t), websocket.MessageText, b); err != nil {
		p.t.Fatalf("write: %v", err)
	}
}

// read returns the next envelope, skipping server pings.
func (p *protoClient) read() envelope {
	p.t.Helper()
	if len(p.pending) > 0 {
		e := p.pending[0]
		p.pending = p.pending[1:]
		return e
	}
	return p.readWire()
}

func (p *protoClient) readWire() envelope {
	p.t.Helper()
	for {
		typ, b := readFrame(p.t, p.c)
		if typ != websocket.MessageText {
			p.t.Fatalf("protocol mode sent a %v frame", typ)
		}
		var e envelope
		d := json.NewDecoder(bytes.NewReader(b))
		if err := d.Decode(&e); err != nil {
			p.t.Fatalf("server sent invalid JSON %q: %v", b, err)
		}
		e.raw = b
		if e.Type == "ping" {
			continue
		}
		return e
	}
}

// request sends an envelope with a fresh id and returns the reply to it.
// Other envelopes that arrive first (room messages may precede the ack of
// the publish that caused them) are kept for read.
func (p *protoClient) request(fields map[string]any) envelope {
	p.t.Helper()
	p.nextID++
	id := fmt.Sprint("r", p.nextID)
	fields["id"] = id
	p.send(fields)
	for {
		e := p.readWire()
		if e.ID == id && e.Type != "message" {
			return e
		}
		p.pending = append(p.pending, e)
	}
}

// mustAck sends a request and expects an ack.
func (p *protoClient) mustAck(fields map[string]any) {
	p.t.Helper()
	if e := p.request(fields); e.Type != "ack" {
		p.t.Fatalf("request %v: got %s, want ack", fields, e.raw)
	}
}

// mustError sends a request and expects an error with code.
func (p *protoClient) mustError(fields map[string]any, code protocol.ErrorCode) envelope {
	p.t.Helper()
	e := p.request(fields)
	if e.Type != "error" || e.Code != code {
		p.t.Fatalf("request %v: got %s, want error %q", fields, e.raw, code)
	}
	return e
}

func (p *protoClient) subscribe(room string) {
	p.t.Helper()
	p.mustAck(map[string]any{"type": "subscribe", "room": room})
}

// readMessage reads the next envelope and expects a room message.
func (p *protoClient) readMessage(room string) envelope {
	p.t.Helper()
	e := p.read()
	if e.Type != "message" || e.Room != room {
		p.t.Fatalf("got %s, want a message of room %q", e.raw, room)
	}
	return e
}

// waitFor polls cond until it holds or the test's timeout passes. It is
// for server-side state with no event to wait on (counters, registries).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	ctx := testCtx(t)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s", what)
		case <-tick.C:
		}
	}
}
