package pubsub_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// Server-Sent Events, the third mode: rooms as events, payloads verbatim,
// and exact recovery by Last-Event-ID with no client library.

func TestSSEStreamsARoomsMessagesAsEventsNamedAfterIt(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	s := srv.Listen("/ws?room=news")
	if s.Header.Get("Cache-Control") != "no-cache" {
		t.Fatalf("headers %v", s.Header)
	}
	pubsubtest.WaitFor(t, "the listener", func() bool { return len(srv.Connections("news")) == 1 })
	srv.Publish("news", []byte(`{"headline":"hi"}`))
	srv.Publish("news", []byte("two\nlines"))
	srv.Publish("news", []byte{0xff, 0x00})
	srv.Publish("news", []byte("a\r\nb"))
	srv.Publish("news", []byte(""))
	s.Expect("news", `{"headline":"hi"}`)
	s.Expect("news", "two\nlines")
	s.Expect("news+base64", base64.StdEncoding.EncodeToString([]byte{0xff, 0x00}))
	s.Expect("news+base64", base64.StdEncoding.EncodeToString([]byte("a\r\nb")))
	s.Expect("news", "")
	if s.Retry != time.Second {
		t.Fatalf("retry %v, want 1s", s.Retry)
	}
	if c := srv.Connections("news"); c[0].Mode != pubsub.ModeSSE {
		t.Fatalf("mode %v, want sse", c[0].Mode)
	}
}

func TestSSEReconnectWithLastEventIDGetsExactlyWhatItMissed(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithHistory(100, time.Hour))
	s := srv.Listen("/ws?room=a&room=b")
	pubsubtest.WaitFor(t, "the listener", func() bool { return len(srv.Connections("b")) == 1 })
	srv.Publish("a", []byte("a1"))
	srv.Publish("b", []byte("b1"))
	s.Expect("a", "a1")
	s.Expect("b", "b1")
	s.Close()
	srv.Publish("b", []byte("b2"))
	srv.Publish("a", []byte("a2"))
	srv.Publish("a", []byte("a3"))
	s.Reconnect()
	// Each room's missed messages, in order (room by room), then live.
	s.Expect("a", "a2")
	s.Expect("a", "a3")
	s.Expect("b", "b2")
	srv.Publish("b", []byte("b3"))
	s.Expect("b", "b3")
}

func TestSSEAStreamThatGotNothingStillResumesFromWhereItStarted(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithHistory(100, time.Hour))
	srv.Publish("r", []byte("before"))
	s := srv.Listen("/ws?room=r")
	s.AwaitID() // the stream's first bytes: where it starts
	s.Close()
	srv.Publish("r", []byte("while away"))
	s.Reconnect()
	s.Expect("r", "while away")
}

func TestSSERecoveryImpossibleSaysSoWithAResetEvent(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithHistory(2, time.Hour))
	s := srv.Listen("/ws?room=r")
	pubsubtest.WaitFor(t, "the listener", func() bool { return len(srv.Connections("r")) == 1 })
	srv.Publish("r", []byte("1"))
	s.Expect("r", "1")
	s.Close()
	for _, m := range []string{"2", "3", "4"} {
		srv.Publish("r", []byte(m)) // history keeps 2: message 2 is gone
	}
	s.Reconnect()
	s.Expect("+reset", `{"room":"r","reason":"history_too_short"}`)
	srv.Publish("r", []byte("5"))
	s.Expect("r", "5")
	s.Close()
	srv.Publish("r", []byte("6"))
	s.Reconnect() // from after 5: recoverable again
	s.Expect("r", "6")
}

func TestSSERefusals(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithAuthorize(func(_ context.Context, _ pubsub.Client, _ pubsub.Action, room string) error {
		if room == "secret" {
			return pubsub.ErrForbidden
		}
		return nil
	}))
	pubsubtest.ListenStatus(t, srv.URL+"/ws", http.StatusBadRequest)
	pubsubtest.ListenStatus(t, srv.URL+"/ws?room=", http.StatusBadRequest)
	pubsubtest.ListenStatus(t, srv.URL+"/ws?room=bad%20room", http.StatusBadRequest)
	pubsubtest.ListenStatus(t, srv.URL+"/ws?room=ok&room=secret", http.StatusForbidden)
	pubsubtest.ListenStatus(t, srv.URL+"/ws?room=ok", http.StatusForbidden, pubsubtest.Origin("http://evil.example"))
}

func TestSSERefusalOfAnHTMXRequestShowsAsText(t *testing.T) {
	t.Parallel()
	// htmx 4 swaps an error response into the page as HTML, whatever its
	// Content-Type: a reason quoting the request must not become markup.
	// This host's validator accepts any name, and its authorize hook
	// refuses one.
	srv := pubsubtest.Start(t,
		pubsub.WithRoomValidator(func(string) error { return nil }),
		pubsub.WithAuthorize(func(_ context.Context, _ pubsub.Client, _ pubsub.Action, room string) error {
			if strings.HasPrefix(room, "<") {
				return pubsub.ErrForbidden
			}
			return nil
		}))
	refusal := func(path string, fromHTMX bool) (int, string) {
		req, err := http.NewRequestWithContext(pubsubtest.Context(t), http.MethodGet, srv.URL+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Accept", "text/html, text/event-stream")
		if fromHTMX {
			req.Header.Set("HX-Request", "true")
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var b bytes.Buffer
		if _, err := b.ReadFrom(resp.Body); err != nil {
			t.Fatal(err)
		}
		if ct := resp.Header.Get("Content-Type"); ct != "text/plain; charset=utf-8" || resp.Header.Get("X-Content-Type-Options") != "nosniff" {
			t.Fatalf("GET %s: Content-Type %q, nosniff %q, want plain text, not sniffed", path, ct, resp.Header.Get("X-Content-Type-Options"))
		}
		return resp.StatusCode, b.String()
	}

	room := "/ws?room=" + url.QueryEscape(`<img src=x onerror="alert(1)">`)
	if status, body := refusal(room, true); status != http.StatusForbidden ||
		body != "roomcast: not allowed to subscribe in room &lt;img src=x onerror=&#34;alert(1)&#34;&gt;\n" {
		t.Errorf("htmx, a refused room: %d %q, want 403 with the room escaped", status, body)
	}
	if status, body := refusal(room, false); status != http.StatusForbidden || !strings.Contains(body, `room <img src=x onerror="alert(1)">`) {
		t.Errorf("EventSource, a refused room: %d %q, want 403 with the room as it was (plain text)", status, body)
	}
	// A bad parameter is not quoted back at all.
	for _, fromHTMX := range []bool{true, false} {
		if status, body := refusal("/ws?room=feed&events="+url.QueryEscape("<img src=x onerror=alert(1)>"), fromHTMX); status != http.StatusBadRequest || strings.Contains(body, "img") {
			t.Errorf("events=<img …> (htmx %v): %d %q, want 400 without the value", fromHTMX, status, body)
		}
	}
}

func TestSSEWithDefaultRoomListensToItWhenTheRequestNamesNone(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithDefaultRoom("lobby"))
	s := srv.Listen("/ws")
	named := srv.Listen("/ws?room=news")
	pubsubtest.WaitFor(t, "both listeners", func() bool {
		return len(srv.Connections("lobby")) == 1 && len(srv.Connections("news")) == 1
	})
	srv.Publish("news", []byte("news only"))
	srv.Publish("lobby", []byte("hello lobby"))
	s.Expect("lobby", "hello lobby")
	named.Expect("news", "news only")
}

func TestSSEEventsMessageSendsPayloadsAsUnnamedEvents(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithHistory(10, time.Hour))
	// htmx 4's SSE extension fetches with these headers and swaps only
	// unnamed events: a request from htmx gets them without asking.
	htmx := pubsubtest.Header(http.Header{"Accept": {"text/html, text/event-stream"}, "Hx-Request": {"true"}})
	unnamed := srv.Listen("/ws?room=feed&events=message")
	fromHTMX := srv.Listen("/ws/feed", htmx)
	named := srv.Listen("/ws/feed?events=room", htmx) // the parameter wins over the header
	pubsubtest.WaitFor(t, "three listeners", func() bool { return len(srv.Connections("feed")) == 3 })
	for _, s := range []*pubsubtest.EventStream{unnamed, fromHTMX, named} {
		s.AwaitID()
	}
	srv.Publish("feed", []byte("<p>one</p>\n<p>two</p>"))
	srv.Publish("feed", []byte{0xff}) // not UTF-8: still named, so it says it is base64
	for _, c := range srv.Connections("feed") {
		if err := srv.PublishToConn(pubsubtest.Context(t), c.ID, []byte("<p>for you</p>")); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range []*pubsubtest.EventStream{unnamed, fromHTMX} {
		s.Expect("message", "<p>one</p>\n<p>two</p>")
		s.Expect("feed+base64", "/w==")
		s.Expect("message", "<p>for you</p>")
	}
	named.Expect("feed", "<p>one</p>\n<p>two</p>")
	named.Expect("feed+base64", "/w==")
	named.Expect("+direct", "<p>for you</p>")

	// Unnamed events carry the same ids: recovery stays exact.
	unnamed.Close()
	srv.Publish("feed", []byte("<p>missed</p>"))
	unnamed.Reconnect()
	unnamed.Expect("message", "<p>missed</p>")

	pubsubtest.ListenStatus(t, srv.URL+"/ws?room=feed&events=named", http.StatusBadRequest)
}

func TestSSEShutdownEndsTheStreamAfterItsQueueWithACloseEvent(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	s := srv.Listen("/ws?room=r")
	pubsubtest.WaitFor(t, "the listener", func() bool { return len(srv.Connections("r")) == 1 })
	srv.Publish("r", []byte("last"))
	if err := srv.Handler.Shutdown(pubsubtest.Context(t)); err != nil {
		t.Fatal(err)
	}
	evs := s.ExpectEnd()
	if len(evs) != 2 || evs[0].Data != "last" || evs[1].Event != "+close" || evs[1].Data != `{"code":1001,"reason":"server shutting down"}` {
		t.Fatalf("events %+v, want the message then +close 1001", evs)
	}
}

// Over HTTP/2 (TLS) the connection cannot be taken over: the stream flows
// through the ResponseWriter, with the same events and the same end.
func TestSSEOverHTTP2(t *testing.T) {
	t.Parallel()
	h := pubsub.NewHandler(pubsub.WithLogger(pubsubtest.Logger()), pubsub.WithHistory(10, time.Hour))
	mux := http.NewServeMux()
	mux.Handle("/ws", h)
	ts := httptest.NewUnstartedServer(mux)
	ts.EnableHTTP2 = true
	ts.StartTLS()
	t.Cleanup(func() { h.Close(); ts.Close() })
	s := pubsubtest.Listen(t, ts.URL+"/ws?room=r", pubsubtest.HTTPClient(ts.Client()))
	s.AwaitID()
	if err := h.Publish(pubsubtest.Context(t), "r", []byte("over h2")); err != nil {
		t.Fatal(err)
	}
	s.Expect("r", "over h2")
	s.Close()
	if err := h.Publish(pubsubtest.Context(t), "r", []byte("missed")); err != nil {
		t.Fatal(err)
	}
	s.Reconnect()
	s.Expect("r", "missed")
	if err := h.Shutdown(pubsubtest.Context(t)); err != nil {
		t.Fatal(err)
	}
	if evs := s.ExpectEnd(); len(evs) != 1 || evs[0].Event != "+close" {
		t.Fatalf("events at shutdown %+v, want +close", evs)
	}
}

func TestSSEHeartbeatsAreComments(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithHeartbeat(20*time.Millisecond, time.Second))
	s := srv.Listen("/ws?room=r")
	s.AwaitID()
	srv.Publish("r", []byte("x"))
	pubsubtest.WaitFor(t, "two heartbeat comments", func() bool {
		s.Next() // the message; pings are counted on the way to it
		srv.Publish("r", []byte("x"))
		return s.Comments >= 2
	})
}

func TestSSEDirectMessagesAndDisconnect(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	s := srv.Listen("/ws?room=r")
	s.AwaitID()
	id := srv.Connections("r")[0].ID
	if err := srv.Handler.PublishToConn(pubsubtest.Context(t), id, []byte(`{"note":"for you"}`)); err != nil {
		t.Fatal(err)
	}
	s.Expect("+direct", `{"note":"for you"}`)
	if err := srv.Handler.Disconnect(id, "kicked"); err != nil {
		t.Fatal(err)
	}
	if evs := s.ExpectEnd(); len(evs) != 1 || evs[0].Event != "+close" || evs[0].Data != `{"code":4003,"reason":"kicked"}` {
		t.Fatalf("events %+v, want +close 4003 kicked", evs)
	}
}

func TestSSEASlowListenerIsCutOffAndCounted(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithQueueLimits(4, 1<<20), pubsub.WithWriteTimeout(100*time.Millisecond))
	s := srv.Listen("/ws?room=r")
	s.AwaitID()
	big := bytes.Repeat([]byte("x"), 256<<10) // the client reads nothing: sockets fill, then the queue
	pubsubtest.WaitFor(t, "the listener to be closed as a slow consumer", func() bool {
		srv.Handler.Publish(pubsubtest.Context(t), "r", big)
		return srv.Handler.Stats().SlowConsumers == 1
	})
	pubsubtest.WaitFor(t, "its end to be counted under 4002", func() bool {
		return srv.Handler.Closed()[protocol.CloseSlowConsumer] == 1
	})
}

func TestSSEBadInput(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithHistory(10, time.Hour), pubsub.WithMaxRooms(2),
		pubsub.WithOriginPatterns("app.example"))
	// Too many rooms.
	pubsubtest.ListenStatus(t, srv.URL+"/ws?room=a&room=b&room=c", http.StatusBadRequest)
	// A Last-Event-ID that is not ours is ignored: live from now.
	for _, id := range []string{"garbage", base64.RawURLEncoding.EncodeToString([]byte(`[["e",1],["f",2]]`)), strings.Repeat("x", 70<<10)} {
		s := pubsubtest.Listen(t, srv.URL+"/ws?room=a", pubsubtest.Header(http.Header{"Last-Event-ID": {id}}))
		s.AwaitID()
		s.Close()
	}
	// An allowed foreign origin is told so (CORS), with credentials.
	s := srv.Listen("/ws?room=a", pubsubtest.Origin("https://app.example"))
	if s.Header.Get("Access-Control-Allow-Origin") != "https://app.example" || s.Header.Get("Access-Control-Allow-Credentials") != "true" {
		t.Fatalf("headers %v, want CORS for the allowed origin", s.Header)
	}
	// A client that sends bytes on an event stream is cut off (1008).
	conn, err := net.Dial("tcp", strings.TrimPrefix(srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET /ws?room=a HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
	pubsubtest.WaitFor(t, "the raw stream", func() bool { return len(srv.Connections("a")) == 2 })
	fmt.Fprintf(conn, "unexpected")
	pubsubtest.WaitFor(t, "the stream to be closed as a policy violation", func() bool {
		return srv.Handler.Closed()[protocol.ClosePolicyViolation] == 1
	})
}

// A client that opens a stream for another set of rooms passes what it
// knows in the query: positions for the rooms it had, none for a new one.
func TestSSEPositionsInTheQueryForANewSetOfRooms(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithHistory(10, time.Hour))
	s := srv.Listen("/ws?room=a")
	s.AwaitID()
	srv.Publish("a", []byte("a1"))
	first := s.Expect("a", "a1")
	s.Close()
	srv.Publish("a", []byte("a2"))
	srv.Publish("b", []byte("b1")) // before the client knew b: not replayed
	var pos [][2]json.RawMessage
	raw, _ := base64.RawURLEncoding.DecodeString(first.ID)
	if err := json.Unmarshal(raw, &pos); err != nil || len(pos) != 1 {
		t.Fatalf("id %q: %v", first.ID, err)
	}
	both, _ := json.Marshal([][2]json.RawMessage{pos[0], {json.RawMessage(`""`), json.RawMessage(`0`)}})
	s2 := srv.Listen("/ws?room=a&room=b&last_event_id=" + base64.RawURLEncoding.EncodeToString(both))
	s2.Expect("a", "a2")
	srv.Publish("b", []byte("b2"))
	s2.Expect("b", "b2")
}
