package main

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/roomcast/pubsub/protocol"

	"github.com/coder/websocket"
)

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// startEcho serves the example's mux on an httptest server and returns
// its ws:// URL for /ws.
func startEcho(t *testing.T) string {
	t.Helper()
	h := newHandler(quietLogger())
	srv := httptest.NewServer(newMux(h))
	t.Cleanup(func() {
		h.Close()
		srv.Close()
	})
	return "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws"
}

func dial(t *testing.T, url string, subprotocols ...string) *websocket.Conn {
	t.Helper()
	c, _, err := websocket.Dial(testCtx(t), url, &websocket.DialOptions{Subprotocols: subprotocols})
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	t.Cleanup(func() { c.CloseNow() })
	return c
}

func write(t *testing.T, c *websocket.Conn, msg string) {
	t.Helper()
	if err := c.Write(testCtx(t), websocket.MessageText, []byte(msg)); err != nil {
		t.Fatalf("write %q: %v", msg, err)
	}
}

func readText(t *testing.T, c *websocket.Conn) string {
	t.Helper()
	typ, b, err := c.Read(testCtx(t))
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if typ != websocket.MessageText {
		t.Fatalf("read a %v frame %q, want text", typ, b)
	}
	return string(b)
}

func TestEchoAnswersEachRawMessageToItsSender(t *testing.T) {
	t.Parallel()
	url := startEcho(t)
	a, b := dial(t, url), dial(t, url)

	write(t, a, "hello")
	write(t, a, "again")
	write(t, b, "from b")
	for _, want := range []string{"Server received: hello", "Server received: again"} {
		if got := readText(t, a); got != want {
			t.Fatalf("a got %q, want %q", got, want)
		}
	}
	// b's first frame is its own answer: a's messages were not broadcast.
	if got, want := readText(t, b), "Server received: from b"; got != want {
		t.Fatalf("b got %q, want %q", got, want)
	}
}

func TestEchoAnswersProtocolSendWithDirectMessageAndAck(t *testing.T) {
	t.Parallel()
	c := dial(t, startEcho(t), protocol.Subprotocol)
	if c.Subprotocol() != protocol.Subprotocol {
		t.Fatalf("negotiated %q, want %q", c.Subprotocol(), protocol.Subprotocol)
	}
	type envelope struct {
		Type string  `json:"type"`
		ID   string  `json:"id"`
		Text *string `json:"text"`
	}
	next := func() envelope {
		for {
			var e envelope
			if b := readText(t, c); json.Unmarshal([]byte(b), &e) != nil {
				t.Fatalf("invalid envelope %q", b)
			}
			if e.Type != "ping" {
				return e
			}
		}
	}
	if e := next(); e.Type != "welcome" {
		t.Fatalf("first envelope %+v, want welcome", e)
	}

	write(t, c, `{"type":"send","id":"1","text":"hello"}`)
	var direct, ack bool
	for !direct || !ack {
		switch e := next(); {
		case e.Type == "direct" && e.Text != nil && *e.Text == "Server received: hello":
			direct = true
		case e.Type == "ack" && e.ID == "1":
			ack = true
		default:
			t.Fatalf("got %+v, want the direct reply and the ack of id 1", e)
		}
	}
}

func TestEchoServesWebSocketsAtWSOnly(t *testing.T) {
	t.Parallel()
	h := newHandler(quietLogger())
	t.Cleanup(func() { h.Close() })
	mux := newMux(h)
	for path, want := range map[string]int{"/ws": http.StatusUpgradeRequired, "/": http.StatusNotFound} {
		rec := httptest.NewRecorder()
		mux.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		if rec.Code != want {
			t.Errorf("GET %s: %d, want %d", path, rec.Code, want)
		}
	}
}

func TestServeClosesWebSocketsWithGoingAwayWhenItsContextEnds(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(testCtx(t))
	served := make(chan error, 1)
	go func() { served <- serve(ctx, ln, newHandler(quietLogger())) }()

	url := "ws://" + ln.Addr().String() + "/ws"
	c := dial(t, url)
	write(t, c, "before shutdown")
	if got := readText(t, c); got != "Server received: before shutdown" {
		t.Fatalf("got %q", got)
	}

	stop() // what SIGINT does in main
	_, _, err = c.Read(testCtx(t))
	if code := websocket.CloseStatus(err); code != websocket.StatusGoingAway {
		t.Fatalf("read after shutdown: %v, want close code 1001", err)
	}
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("serve returned %v, want nil after a graceful shutdown", err)
		}
	case <-testCtx(t).Done():
		t.Fatal("serve did not return after its context ended")
	}
	if c, _, err := websocket.Dial(testCtx(t), url, nil); err == nil {
		c.CloseNow()
		t.Fatal("dial after shutdown succeeded, want the listener closed")
	}
}
