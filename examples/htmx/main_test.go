package main

import (
	"context"
	"encoding/json"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

func TestMain(m *testing.M) { pubsubtest.Main(m) }

// start serves the example's mux, its Handler mounted at /ws.
func start(t *testing.T) *pubsubtest.Server {
	t.Helper()
	a := newApp(pubsubtest.Logger())
	return pubsubtest.Serve(t, a.h, a.newMux())
}

// asHTMX makes a request the way htmx 4's SSE extension does.
var asHTMX = pubsubtest.Header(http.Header{
	"Hx-Request": {"true"},
	"Accept":     {"text/html, text/event-stream"},
})

// feedPath is the stream page.html connects to.
const feedPath = "/ws?room=feed&room=watching&history=20"

// listen opens the page's event stream as htmx does and expects its
// first event: the watcher count that its own arrival published, n.
func listen(t *testing.T, srv *pubsubtest.Server, n int) *pubsubtest.EventStream {
	t.Helper()
	s := srv.Listen(feedPath, asHTMX)
	s.AwaitID()
	s.Expect("message", watching(n))
	return s
}

// watching is the fragment that shows n watchers.
func watching(n int) string {
	return `<span id="watching" class="muted" hx-swap-oob="true">` + strconv.Itoa(n) + ` watching</span>`
}

// post sends POST /notify as htmx does (headers add to or replace
// HX-Request) and returns the status and the body.
func post(t *testing.T, srv *pubsubtest.Server, text string, headers ...string) (int, string) {
	t.Helper()
	body := url.Values{"text": {text}}.Encode()
	req, err := http.NewRequestWithContext(pubsubtest.Context(t), http.MethodPost, srv.URL+"/notify", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("HX-Request", "true")
	for i := 0; i+1 < len(headers); i += 2 {
		if headers[i+1] == "" {
			req.Header.Del(headers[i])
		} else {
			req.Header.Set(headers[i], headers[i+1])
		}
	}
	return do(t, req)
}

func get(t *testing.T, srv *pubsubtest.Server, path string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(pubsubtest.Context(t), http.MethodGet, srv.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(b)
}

func do(t *testing.T, req *http.Request) (int, string) {
	t.Helper()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// expectNote reads the stream's next event and expects notification n
// with text (as HTML), and the total n out of band, as an unnamed event:
// the kind htmx swaps.
func expectNote(t *testing.T, s *pubsubtest.EventStream, n, text string) {
	t.Helper()
	ev := s.Next()
	if ev.Event != "message" {
		t.Fatalf("got a %q event, want an unnamed one (htmx swaps only those): %q", ev.Event, ev.Data)
	}
	for _, want := range []string{`<li id="note-` + n + `" class="note">`, "</time> " + text + "</li>", `<span id="total" hx-swap-oob="true">` + n + `</span>`} {
		if !strings.Contains(ev.Data, want) {
			t.Fatalf("event data %q does not contain %q", ev.Data, want)
		}
	}
}

func TestPostPublishesTheEscapedNotificationToTheFeed(t *testing.T) {
	t.Parallel()
	srv := start(t)
	ann, bob := listen(t, srv, 1), listen(t, srv, 2)
	ann.Expect("message", watching(2))
	status, body := post(t, srv, `  <script>alert("hi")</script> & more  `)
	if status != http.StatusOK || !strings.Contains(body, `<form id="post-form"`) || !strings.Contains(body, `value=""`) {
		t.Fatalf("POST /notify: %d %q, want 200 and an empty form", status, body)
	}
	for _, s := range []*pubsubtest.EventStream{ann, bob} {
		// Trimmed, then escaped: a <script> never reaches a page as markup.
		expectNote(t, s, "1", `&lt;script&gt;alert(&#34;hi&#34;)&lt;/script&gt; &amp; more`)
	}
	post(t, srv, "second")
	expectNote(t, ann, "2", "second")
}

func TestPostRefusals(t *testing.T) {
	t.Parallel()
	srv := start(t)
	feed := listen(t, srv, 1)
	for _, tc := range []struct {
		name    string
		text    string
		headers []string
		status  int
		reason  string // in the body
	}{
		{"not from htmx", "hi", []string{"HX-Request", ""}, http.StatusForbidden, "htmx requests only"},
		{"cross-site", "hi", []string{"Sec-Fetch-Site", "cross-site"}, http.StatusForbidden, ""},
		{"cross-origin", "hi", []string{"Origin", "https://evil.example"}, http.StatusForbidden, ""},
		{"empty", "", nil, http.StatusUnprocessableEntity, "Write something first."},
		{"blank", " \t ", nil, http.StatusUnprocessableEntity, "Write something first."},
		{"too long", strings.Repeat("é", maxText+1), nil, http.StatusUnprocessableEntity, "At most 200 characters, please (that was 201)."},
		{"two lines", "one\r\ntwo", nil, http.StatusUnprocessableEntity, "One line of text, please."},
		{"a control character", "bell\a", nil, http.StatusUnprocessableEntity, "One line of text, please."},
		{"not UTF-8", "caf\xe9", nil, http.StatusUnprocessableEntity, "That is not valid text."},
		{"a huge body", strings.Repeat("x", 20<<10), nil, http.StatusBadRequest, "try a shorter text"},
	} {
		status, body := post(t, srv, tc.text, tc.headers...)
		if status != tc.status || !strings.Contains(body, tc.reason) {
			t.Errorf("%s: %d %q, want %d with %q", tc.name, status, body, tc.status, tc.reason)
		}
		if tc.status == http.StatusUnprocessableEntity && !strings.Contains(body, `<form id="post-form"`) {
			t.Errorf("%s: %q, want the form back (htmx swaps a 422 too)", tc.name, body)
		}
	}
	// The form keeps what was typed, escaped.
	if _, body := post(t, srv, `<b>`+strings.Repeat("x", maxText)); !strings.Contains(body, `value="&lt;b&gt;xxx`) {
		t.Errorf("a refused post's form: %q, want the text kept, escaped", body)
	}
	// Nothing was published: the next notification is the first.
	if status, _ := post(t, srv, strings.Repeat("é", maxText)); status != http.StatusOK {
		t.Fatalf("a post of exactly %d characters: %d, want 200", maxText, status)
	}
	expectNote(t, feed, "1", strings.Repeat("é", maxText))
}

// chatLine is what htmx's WebSocket extension sends for the chat form:
// the form's values and the request headers htmx would send, as JSON.
func chatLine(text string) string {
	b, err := json.Marshal(struct {
		Text    string            `json:"text"`
		Headers map[string]string `json:"headers"`
	}{text, map[string]string{"HX-Request": "true", "HX-Current-URL": "http://127.0.0.1/"}})
	if err != nil {
		panic(err)
	}
	return string(b)
}

// readLine reads a chat fragment and expects text in it, rendered.
func readLine(t *testing.T, c *pubsubtest.RawConn, text string) {
	t.Helper()
	binary, data := c.Read()
	if binary || !strings.HasPrefix(string(data), `<li class="line">`) || !strings.HasSuffix(string(data), "</time> "+text+"</li>") {
		t.Fatalf("got %q (binary %v), want the chat line %q", data, binary, text)
	}
}

func TestChatLineIsRenderedAndPublished(t *testing.T) {
	t.Parallel()
	srv := start(t)
	ann, bob := srv.DialRaw("/ws?room=chat"), srv.DialRaw("/ws?room=chat")
	pubsubtest.WaitFor(t, "two chat connections", func() bool { return len(srv.Connections(chatRoom)) == 2 })
	ann.Send(chatLine(`<img src=x onerror="alert(1)"> hi`))
	for _, c := range []*pubsubtest.RawConn{ann, bob} {
		readLine(t, c, `&lt;img src=x onerror=&#34;alert(1)&#34;&gt; hi`)
	}
}

func TestChatRefusals(t *testing.T) {
	t.Parallel()
	srv := start(t)
	bob := srv.DialRaw("/ws?room=chat")

	// A line htmx sent but the server will not publish: the reason goes to
	// its sender only, out of band, and the connection stays open.
	ann := srv.DialRaw("/ws?room=chat")
	for text, reason := range map[string]string{
		"  ":                           "Write something first.",
		strings.Repeat("x", maxText+1): "At most 200 characters",
		"one\ntwo":                     "One line of text, please.",
	} {
		ann.Send(chatLine(text))
		_, data := ann.Read()
		if !strings.HasPrefix(string(data), `<p id="chat-error" class="error" hx-swap-oob="true">`) || !strings.Contains(string(data), reason) {
			t.Fatalf("%q answered %q, want the chat error %q", text, data, reason)
		}
	}
	ann.Send(chatLine("fine"))
	readLine(t, bob, "fine") // bob got none of the refusals
	readLine(t, ann, "fine")

	// What is not htmx's JSON in the chat room is rejected: 1008.
	for name, send := range map[string]func(c *pubsubtest.RawConn){
		"plain text":   func(c *pubsubtest.RawConn) { c.Send("hello from wscat") },
		"bad JSON":     func(c *pubsubtest.RawConn) { c.Send(`{"text":`) },
		"no text":      func(c *pubsubtest.RawConn) { c.Send(`{"headers":{}}`) },
		"a number":     func(c *pubsubtest.RawConn) { c.Send(`{"text":42}`) },
		"binary":       func(c *pubsubtest.RawConn) { c.SendBinary([]byte(chatLine("hi"))) },
		"another room": nil,
	} {
		c := srv.DialRaw("/ws?room=chat")
		if send == nil {
			c = srv.DialRaw("/ws?room=feed")
			c.Send(chatLine("hi"))
		} else {
			send(c)
		}
		if reason := c.ExpectClose(protocol.ClosePolicyViolation); reason != "message rejected" {
			t.Errorf("%s: closed with reason %q, want \"message rejected\"", name, reason)
		}
	}
	ann.Send(chatLine("still here"))
	readLine(t, bob, "still here")
}

func TestWatchingCountFollowsTheFeedsListeners(t *testing.T) {
	t.Parallel()
	srv := start(t)
	ann := listen(t, srv, 1)
	bob := listen(t, srv, 2)
	ann.Expect("message", watching(2))
	srv.DialRaw("/ws?room=chat") // not a listener of the feed
	ann.Expect("message", watching(2))
	bob.Close()
	ann.Expect("message", watching(1))
}

func TestAReconnectingPageGetsWhatItMissedAndAFreshCount(t *testing.T) {
	t.Parallel()
	srv := start(t)
	ann := listen(t, srv, 1) // keeps the rooms alive
	bob := listen(t, srv, 2)
	ann.Expect("message", watching(2))
	post(t, srv, "one")
	expectNote(t, ann, "1", "one")
	expectNote(t, bob, "1", "one")

	bob.Close()
	ann.Expect("message", watching(1))
	post(t, srv, "two")
	post(t, srv, "three")
	bob.Reconnect() // with Last-Event-ID, as htmx does
	expectNote(t, bob, "2", "two")
	expectNote(t, bob, "3", "three")
	// The count published when bob left is gone (the watching room keeps
	// nothing): htmx dispatches this as a DOM event, which the page
	// ignores for that room...
	bob.Expect("+reset", `{"room":"watching","reason":"history_too_short"}`)
	// ...because its own arrival publishes the current count.
	bob.Expect("message", watching(2))
}

func TestServesThePageAndTheVendoredHTMX(t *testing.T) {
	t.Parallel()
	srv := start(t)
	resp, body := get(t, srv, "/")
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/html; charset=utf-8" {
		t.Fatalf("GET /: %d %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	for _, want := range []string{
		`<script src="/static/htmx.min.js"></script>`,
		`<script src="/static/hx-sse.js"></script>`,
		`<script src="/static/hx-ws.js"></script>`,
		`hx-sse:connect="` + feedPath + `"`,
		`hx-on:+reset="if (JSON.parse(data).room === '` + feedRoom + `') location.reload()"`,
		`hx-ws:connect="/ws?room=` + chatRoom + `"`,
		// htmx's own list, and roomcast's codes that mean "come back".
		`"reconnectCodes": [1001, 1005, 1006, 1011, 1012, 1013, 1014, 4001, 4002, 4005, 4006]`,
		`<form id="post-form" hx-post="/notify"`,
		`<span id="total">0</span>`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("the page does not contain %s", want)
		}
	}
	if resp, _ := get(t, srv, "/nope"); resp.StatusCode != http.StatusNotFound {
		t.Errorf("GET /nope: %d, want 404", resp.StatusCode)
	}

	for name, ctype := range map[string]string{
		"htmx.min.js": "text/javascript; charset=utf-8",
		"hx-sse.js":   "text/javascript; charset=utf-8",
		"hx-ws.js":    "text/javascript; charset=utf-8",
		"LICENSE":     "text/plain; charset=utf-8",
	} {
		want, err := fs.ReadFile(static, "static/"+name)
		if err != nil {
			t.Fatal(err)
		}
		resp, body := get(t, srv, "/static/"+name)
		if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != ctype || body != string(want) {
			t.Errorf("GET /static/%s: %d %q (%d bytes), want %s, the embedded %d bytes", name, resp.StatusCode, resp.Header.Get("Content-Type"), len(body), ctype, len(want))
		}
	}
	if _, body := get(t, srv, "/static/LICENSE"); !strings.Contains(body, "Zero-Clause BSD") {
		t.Error("the vendored LICENSE is not htmx's 0BSD")
	}
}

func TestServeShutsDownGracefully(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	served := make(chan error, 1)
	go func() { served <- serve(ctx, ln, newApp(pubsubtest.Logger())) }()
	base := "http://" + ln.Addr().String()

	stream := pubsubtest.Listen(t, base+feedPath, asHTMX)
	stream.AwaitID()
	chat := pubsubtest.DialRaw(t, "ws://"+ln.Addr().String()+"/ws?room=chat")
	stop() // what SIGINT does in main
	if reason := chat.ExpectClose(protocol.CloseGoingAway); reason == "" {
		t.Error("the WebSocket was closed with 1001 and no reason")
	}
	var closed bool
	for _, ev := range stream.ExpectEnd() {
		closed = closed || ev.Event == "+close" && strings.Contains(ev.Data, `"code":1001`)
	}
	if !closed {
		t.Error("the event stream ended without a +close event saying 1001")
	}
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("serve returned %v, want nil after a graceful shutdown", err)
		}
	case <-time.After(pubsubtest.Timeout):
		t.Fatal("serve did not return after its context ended")
	}
}
