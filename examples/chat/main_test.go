package main

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/examples/chat/chatapp"
)

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// startChat serves the example's mux on an httptest server.
func startChat(t *testing.T) (*pubsub.Handler, *httptest.Server) {
	t.Helper()
	h := newHandler(quietLogger())
	srv := httptest.NewServer(chatapp.Mux(h))
	t.Cleanup(func() {
		h.Close()
		srv.Close()
	})
	return h, srv
}

func wsURL(srv *httptest.Server, path string) string {
	return "ws" + strings.TrimPrefix(srv.URL, "http") + path
}

// join connects a raw-mode client, as wscat does, to room.
func join(t *testing.T, srv *httptest.Server, room string) *websocket.Conn {
	t.Helper()
	u := wsURL(srv, "/ws?room="+url.QueryEscape(room))
	c, _, err := websocket.Dial(testCtx(t), u, nil)
	if err != nil {
		t.Fatalf("dial %s: %v", u, err)
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

// envelope is the part of a server envelope these tests look at.
type envelope struct {
	Type      string          `json:"type"`
	ID        string          `json:"id"`
	Room      string          `json:"room"`
	Code      string          `json:"code"`
	Epoch     string          `json:"epoch"`
	Seq       uint64          `json:"seq"`
	Missed    int             `json:"missed"`
	Recovered *bool           `json:"recovered"`
	Presence  string          `json:"presence"`
	ConnID    string          `json:"conn_id"`
	Data      json.RawMessage `json:"data"`
	Text      *string         `json:"text"`
	Info      json.RawMessage `json:"info"`
	Members   []struct {
		Info json.RawMessage `json:"info"`
	} `json:"members"`
}

// proto is a protocol-mode client, as the page's roomcast.js is.
type proto struct {
	t      *testing.T
	c      *websocket.Conn
	connID string
}

func dialProto(t *testing.T, srv *httptest.Server) *proto {
	t.Helper()
	c, _, err := websocket.Dial(testCtx(t), wsURL(srv, "/ws"), &websocket.DialOptions{Subprotocols: []string{protocol.Subprotocol}})
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.CloseNow() })
	p := &proto{t: t, c: c}
	if w := p.next(); w.Type != "welcome" {
		t.Fatalf("first envelope %+v, want welcome", w)
	} else {
		p.connID = w.ConnID
	}
	return p
}

// next returns the next envelope other than a server ping.
func (p *proto) next() envelope {
	p.t.Helper()
	for {
		typ, b, err := p.c.Read(testCtx(p.t))
		if err != nil {
			p.t.Fatalf("read: %v", err)
		}
		var e envelope
		if typ != websocket.MessageText || json.Unmarshal(b, &e) != nil {
			p.t.Fatalf("not an envelope: %v %q", typ, b)
		}
		if e.Type != "ping" {
			return e
		}
	}
}

// send writes one envelope, given as JSON.
func (p *proto) send(env string) {
	p.t.Helper()
	if err := p.c.Write(testCtx(p.t), websocket.MessageText, []byte(env)); err != nil {
		p.t.Fatalf("write %s: %v", env, err)
	}
}

// expect returns the next envelope and fails unless it has type typ.
func (p *proto) expect(typ string) envelope {
	p.t.Helper()
	e := p.next()
	if e.Type != typ {
		p.t.Fatalf("got %+v, want a %q envelope", e, typ)
	}
	return e
}

func sameJSON(t *testing.T, got json.RawMessage, want string) bool {
	t.Helper()
	var g, w any
	if json.Unmarshal(got, &g) != nil || json.Unmarshal([]byte(want), &w) != nil {
		return false
	}
	gb, _ := json.Marshal(g)
	wb, _ := json.Marshal(w)
	return string(gb) == string(wb)
}

func get(t *testing.T, srv *httptest.Server, path string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(testCtx(t), http.MethodGet, srv.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(body)
}

func TestChatServesThePageUsingTheEmbeddedClient(t *testing.T) {
	t.Parallel()
	_, srv := startChat(t)
	resp, body := get(t, srv, "/")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /: %d, want 200", resp.StatusCode)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/html") {
		t.Errorf("GET /: Content-Type %q, want text/html", ct)
	}
	for _, want := range []string{`from "/ws/roomcast.js"`, "presence: true", "history: HISTORY", "/api/history", "textContent"} {
		if !strings.Contains(body, want) {
			t.Errorf("the page does not contain %q", want)
		}
	}
	for _, bad := range []string{"innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "<script src=\"http"} {
		if strings.Contains(body, bad) {
			t.Errorf("the page contains %q; user text must go through textContent, and nothing comes from a CDN", bad)
		}
	}
}

func TestChatServesTheBrowserClientBelowWS(t *testing.T) {
	t.Parallel()
	_, srv := startChat(t)
	resp, body := get(t, srv, "/ws/roomcast.js")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /ws/roomcast.js: %d, want 200 (is the Handler mounted at /ws/ too?)", resp.StatusCode)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/javascript") {
		t.Errorf("Content-Type %q, want text/javascript: browsers refuse modules of other types", ct)
	}
	if !strings.Contains(body, "export function connect(") {
		t.Error("/ws/roomcast.js is not the browser client: no exported connect")
	}
}

func TestChatServesNothingElseBesideThePageTheAPIAndWS(t *testing.T) {
	t.Parallel()
	_, srv := startChat(t)
	for _, path := range []string{"/index.html", "/api/", "/ws/nothing.js"} {
		resp, _ := get(t, srv, path)
		if want := http.StatusNotFound; path == "/ws/nothing.js" {
			// Below /ws/ everything is the Handler's: a plain GET is not an upgrade.
			if resp.StatusCode != http.StatusUpgradeRequired {
				t.Errorf("GET %s: %d, want %d", path, resp.StatusCode, http.StatusUpgradeRequired)
			}
		} else if resp.StatusCode != want {
			t.Errorf("GET %s: %d, want %d", path, resp.StatusCode, want)
		}
	}
}

func TestChatDeliversLinesWithinTheRoomOnly(t *testing.T) {
	t.Parallel()
	_, srv := startChat(t)
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

// The tutorial's first step names no room (wscat -c ws://host/ws): the
// chat puts such a client in the lobby, where the page starts.
func TestChatPutsARawClientWithNoRoomInTheLobby(t *testing.T) {
	t.Parallel()
	h, srv := startChat(t)
	alice := join(t, srv, "lobby")
	u := wsURL(srv, "/ws")
	tutorial, _, err := websocket.Dial(testCtx(t), u, nil)
	if err != nil {
		t.Fatalf("dial %s: %v", u, err)
	}
	t.Cleanup(func() { tutorial.CloseNow() })
	pubsubtest.WaitFor(t, "the client with no room to join the lobby", func() bool { return len(h.Connections("lobby")) == 2 })
	say(t, tutorial, "hello")
	hear(t, alice, "alice", "hello")
	hear(t, tutorial, "tutorial", "hello")
}

func TestChatLetsPageAndRawClientsTalkBothWays(t *testing.T) {
	t.Parallel()
	_, srv := startChat(t)
	page := dialProto(t, srv)
	page.send(`{"type":"subscribe","id":"1","room":"lobby"}`)
	page.expect("ack")
	wscat := join(t, srv, "lobby")

	// A terminal line reaches the page as "text", a plain line.
	say(t, wscat, "hello from wscat")
	if m := page.expect("message"); m.Text == nil || *m.Text != "hello from wscat" {
		t.Fatalf("the page got %+v, want text %q", m, "hello from wscat")
	}
	hear(t, wscat, "wscat", "hello from wscat")

	// The page's JSON message reaches the terminal verbatim.
	page.send(`{"type":"publish","room":"lobby","data":{"nick":"ann","text":"hi wscat"}}`)
	hear(t, wscat, "wscat", `{"nick":"ann","text":"hi wscat"}`)
}

func TestChatReplaysARoomsHistoryToANewSubscriber(t *testing.T) {
	t.Parallel()
	_, srv := startChat(t)
	ann := dialProto(t, srv)
	for i, text := range []string{"first", "second", "third"} {
		ann.send(`{"type":"publish","id":"` + strconv.Itoa(i) + `","room":"dev","data":{"nick":"ann","text":"` + text + `"}}`)
		ann.expect("ack") // ann is not subscribed: the ack is all that comes back
	}
	// Nobody was subscribed while these were published: only the room's
	// history can bring them back.
	bob := dialProto(t, srv)
	bob.send(`{"type":"subscribe","id":"s","room":"dev","history":2}`)
	if ack := bob.expect("ack"); ack.Missed != 2 || ack.Seq != 3 {
		t.Fatalf("subscribe ack %+v, want missed 2 at seq 3", ack)
	}
	for _, want := range []string{`{"nick":"ann","text":"second"}`, `{"nick":"ann","text":"third"}`} {
		if m := bob.expect("message"); !sameJSON(t, m.Data, want) {
			t.Fatalf("replayed %s, want %s", m.Data, want)
		}
	}
}

func TestChatRecoversExactlyWhatAReconnectingClientMissed(t *testing.T) {
	t.Parallel()
	_, srv := startChat(t)
	other := join(t, srv, "random") // someone stays in the room throughout
	ann := dialProto(t, srv)
	ann.send(`{"type":"subscribe","id":"1","room":"random"}`)
	pos := ann.expect("ack") // where ann stands: nothing received since
	ann.c.Close(websocket.StatusNormalClosure, "")

	say(t, other, "missed 1")
	say(t, other, "missed 2")
	hear(t, other, "other", "missed 1")
	hear(t, other, "other", "missed 2")

	again := dialProto(t, srv)
	again.send(`{"type":"subscribe","id":"2","room":"random","since":{"epoch":"` + pos.Epoch + `","seq":` +
		strconv.FormatUint(pos.Seq, 10) + `}}`)
	if r := again.expect("ack"); r.Recovered == nil || !*r.Recovered || r.Missed != 2 {
		t.Fatalf("resubscribe ack %+v, want recovered with 2 missed", r)
	}
	for _, want := range []string{"missed 1", "missed 2"} {
		if m := again.expect("message"); m.Text == nil || *m.Text != want {
			t.Fatalf("recovered %+v, want text %q", m, want)
		}
	}
}

func TestChatAnnouncesMembersWithTheirNicknames(t *testing.T) {
	t.Parallel()
	_, srv := startChat(t)
	ann := dialProto(t, srv)
	ann.send(`{"type":"subscribe","id":"1","room":"lobby","presence":true,"info":{"name":"ann"}}`)
	if ack := ann.expect("ack"); ack.Presence != "on" {
		t.Fatalf("ack %+v, want presence on", ack)
	}

	bob := dialProto(t, srv)
	bob.send(`{"type":"subscribe","id":"1","room":"lobby","presence":true,"info":{"name":"bob"}}`)
	bob.expect("ack")
	for {
		j := ann.expect("join")
		if j.ConnID == ann.connID {
			continue // ann's own
		}
		if j.ConnID != bob.connID || !sameJSON(t, j.Info, `{"name":"bob"}`) {
			t.Fatalf("ann got %+v, want bob's join with his nickname", j)
		}
		break
	}
	ann.send(`{"type":"presence","id":"p","room":"lobby"}`)
	p := ann.expect("presence")
	var names []string
	for _, m := range p.Members {
		var info struct{ Name string }
		_ = json.Unmarshal(m.Info, &info)
		names = append(names, info.Name)
	}
	if strings.Join(names, ",") != "ann,bob" && strings.Join(names, ",") != "bob,ann" {
		t.Fatalf("members %v, want ann and bob", names)
	}

	bob.c.Close(websocket.StatusGoingAway, "tab closed")
	if l := ann.expect("leave"); l.ConnID != bob.connID || !sameJSON(t, l.Info, `{"name":"bob"}`) {
		t.Fatalf("ann got %+v, want bob's leave", l)
	}
}

func TestChatHistoryAPIReturnsTheLatestMessagesByPayloadKind(t *testing.T) {
	t.Parallel()
	h, srv := startChat(t)
	for _, p := range []string{`{"nick":"ann","text":"one"}`, "plain line", "\xff\x00", `{"nick":"bob","text":"four"}`} {
		if err := h.Publish(testCtx(t), "api-room", []byte(p)); err != nil {
			t.Fatal(err)
		}
	}
	resp, body := get(t, srv, "/api/history?room=api-room&limit=3")
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		t.Fatalf("GET /api/history: %d %q %s", resp.StatusCode, resp.Header.Get("Content-Type"), body)
	}
	var got struct {
		Room     string `json:"room"`
		Messages []struct {
			ID     string          `json:"id"`
			Epoch  string          `json:"epoch"`
			Seq    uint64          `json:"seq"`
			Time   int64           `json:"time"`
			Data   json.RawMessage `json:"data"`
			Text   *string         `json:"text"`
			Binary []byte          `json:"binary"`
		} `json:"messages"`
	}
	if err := json.Unmarshal([]byte(body), &got); err != nil {
		t.Fatalf("%v: %s", err, body)
	}
	if got.Room != "api-room" || len(got.Messages) != 3 {
		t.Fatalf("got %s, want the room's last 3 messages", body)
	}
	m := got.Messages
	if m[0].Seq != 2 || m[0].Text == nil || *m[0].Text != "plain line" ||
		m[1].Seq != 3 || string(m[1].Binary) != "\xff\x00" ||
		m[2].Seq != 4 || !sameJSON(t, m[2].Data, `{"nick":"bob","text":"four"}`) {
		t.Fatalf("got %s, want seq 2 text, 3 binary, 4 data, oldest first", body)
	}
	for _, x := range m {
		if x.ID == "" || x.Epoch == "" || x.Time == 0 {
			t.Fatalf("a message lacks its id, epoch or time: %s", body)
		}
	}

	for _, q := range []string{"", "?room=", "?room=bad%20room", "?room=ok&limit=0", "?room=ok&limit=101", "?room=ok&limit=x"} {
		if resp, _ := get(t, srv, "/api/history"+q); resp.StatusCode != http.StatusBadRequest {
			t.Errorf("GET /api/history%s: %d, want 400", q, resp.StatusCode)
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
	go func() { served <- chatapp.Serve(ctx, ln, newHandler(quietLogger())) }()

	u := "ws://" + ln.Addr().String() + "/ws?room=lobby"
	c, _, err := websocket.Dial(testCtx(t), u, nil)
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
