package main

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// startChat serves the example's mux on an httptest server.
func startChat(t *testing.T) *httptest.Server {
	t.Helper()
	h := newHandler(quietLogger())
	srv := httptest.NewServer(newMux(h))
	t.Cleanup(func() {
		h.Close()
		srv.Close()
	})
	return srv
}

// join connects a raw-mode client, as the page and wscat do, to room.
func join(t *testing.T, srv *httptest.Server, room string) *websocket.Conn {
	t.Helper()
	url := "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws?room=" + room
	c, _, err := websocket.Dial(testCtx(t), url, nil)
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	t.Cleanup(func() { c.CloseNow() })
	return c
}

func say(t *testing.T, c *websocket.Conn, line string) {
	t.Helper()
	if err := c.Write(testCtx(t), websocket.MessageText, []byte(line)); err != nil {
		t.Fatalf("write %q: %v", line, err)
	}
}

func hear(t *testing.T, c *websocket.Conn, who, want string) {
	t.Helper()
	typ, b, err := c.Read(testCtx(t))
	if err != nil {
		t.Fatalf("%s: read: %v (want %q)", who, err, want)
	}
	if typ != websocket.MessageText || string(b) != want {
		t.Fatalf("%s got %v %q, want text %q", who, typ, b, want)
	}
}

func TestChatServesThePageAtRoot(t *testing.T) {
	t.Parallel()
	srv := startChat(t)
	resp, err := srv.Client().Get(srv.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /: %d, want 200", resp.StatusCode)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/html") {
		t.Errorf("GET /: Content-Type %q, want text/html", ct)
	}
	for _, want := range []string{"new WebSocket(", "/ws?room=", "textContent"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("the page does not contain %q", want)
		}
	}
	if strings.Contains(string(body), "innerHTML") {
		t.Error("the page uses innerHTML; user text must go through textContent")
	}
}

func TestChatServesNothingElseBesideThePageAndWS(t *testing.T) {
	t.Parallel()
	srv := startChat(t)
	resp, err := srv.Client().Get(srv.URL + "/index.html")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("GET /index.html: %d, want 404", resp.StatusCode)
	}
}

func TestChatDeliversLinesWithinTheRoomOnly(t *testing.T) {
	t.Parallel()
	srv := startChat(t)
	alice, bob := join(t, srv, "lobby"), join(t, srv, "lobby")
	carol := join(t, srv, "kitchen")

	say(t, alice, "alice: hi bob")
	hear(t, bob, "bob", "alice: hi bob")
	hear(t, alice, "alice", "alice: hi bob") // the sender hears herself, as the page expects
	say(t, bob, "bob: hi alice")
	hear(t, alice, "alice", "bob: hi alice")
	// A room's messages are delivered one at a time, in order, so bob's
	// line reaching alice means alice's line has been queued for every
	// subscriber of the lobby. Had carol been one, both lines would be in
	// her queue now, ahead of anything from her own room.
	say(t, carol, "carol: anyone here?")
	hear(t, carol, "carol", "carol: anyone here?")
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

	url := "ws://" + ln.Addr().String() + "/ws?room=lobby"
	c, _, err := websocket.Dial(testCtx(t), url, nil)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.CloseNow() })

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
}
