package main

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/roomcast/pubsub/protocol"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub"
)

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// startTicker serves the example's mux on an httptest server, without the
// feed: tests publish what they need.
func startTicker(t *testing.T) (*pubsub.Handler, *httptest.Server) {
	t.Helper()
	h := newHandler(quietLogger())
	srv := httptest.NewServer(newMux(h))
	t.Cleanup(func() {
		h.Close()
		srv.Close()
	})
	return h, srv
}

// startServe runs the example as main does (serve: the feed included) on
// a loopback listener. It returns the host:port, a function that stops it
// as SIGINT would, and a channel closed when serve has returned, with its
// result in *err.
func startServe(t *testing.T) (addr string, stop func(), done <-chan struct{}, err *error) {
	t.Helper()
	ln, lerr := net.Listen("tcp", "127.0.0.1:0")
	if lerr != nil {
		t.Fatal(lerr)
	}
	ctx, cancel := context.WithCancel(context.Background())
	finished := make(chan struct{})
	var result error
	go func() {
		defer close(finished)
		result = serve(ctx, ln, newHandler(quietLogger()))
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-finished:
		case <-time.After(10 * time.Second):
			t.Error("serve did not return within 10s of its context ending")
		}
	})
	return ln.Addr().String(), cancel, finished, &result
}

type envelope struct {
	Type   string          `json:"type"`
	ID     string          `json:"id"`
	Code   string          `json:"code"`
	Room   string          `json:"room"`
	Epoch  string          `json:"epoch"`
	Seq    uint64          `json:"seq"`
	Missed int             `json:"missed"`
	Data   json.RawMessage `json:"data"`
}

// proto is a protocol-mode client, as the page's roomcast.js is.
type proto struct {
	t *testing.T
	c *websocket.Conn
}

func dialProto(t *testing.T, wsURL string) *proto {
	t.Helper()
	c, _, err := websocket.Dial(testCtx(t), wsURL, &websocket.DialOptions{Subprotocols: []string{protocol.Subprotocol}})
	if err != nil {
		t.Fatalf("dial %s: %v", wsURL, err)
	}
	t.Cleanup(func() { c.CloseNow() })
	p := &proto{t: t, c: c}
	p.expect("welcome")
	return p
}

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

func (p *proto) expect(typ string) envelope {
	p.t.Helper()
	e := p.next()
	if e.Type != typ {
		p.t.Fatalf("got %+v, want a %q envelope", e, typ)
	}
	return e
}

func (p *proto) send(env string) {
	p.t.Helper()
	if err := p.c.Write(testCtx(p.t), websocket.MessageText, []byte(env)); err != nil {
		p.t.Fatalf("write %s: %v", env, err)
	}
}

func decodeQuote(t *testing.T, e envelope) quote {
	t.Helper()
	var q quote
	if e.Type != "message" || json.Unmarshal(e.Data, &q) != nil {
		t.Fatalf("got %+v, want a message with a JSON quote", e)
	}
	return q
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

func TestTickerPricesFlowToSubscribersOfEverySymbol(t *testing.T) {
	t.Parallel()
	addr, _, _, _ := startServe(t)
	c := dialProto(t, "ws://"+addr+"/ws")
	for _, s := range symbols {
		c.send(`{"type":"subscribe","id":"` + s.Name + `","room":"` + roomPrefix + s.Name + `"}`)
	}
	// Every symbol moves within a few rounds of 50-200 ms; wait until each
	// has been seen twice, with its own symbol and a plausible price.
	seen := map[string][]quote{}
	for complete := 0; complete < len(symbols); {
		e := c.next()
		if e.Type == "ack" {
			continue
		}
		q := decodeQuote(t, e)
		if e.Room != roomPrefix+q.Symbol {
			t.Fatalf("a %s quote in room %s", q.Symbol, e.Room)
		}
		if q.Price <= 0 || q.Time == 0 {
			t.Fatalf("implausible quote %+v", q)
		}
		seen[q.Symbol] = append(seen[q.Symbol], q)
		if len(seen[q.Symbol]) == 2 {
			complete++
		}
	}
}

func TestTickerRoomsUseKeepLatestAndKeepTheLastPrice(t *testing.T) {
	t.Parallel()
	h, srv := startTicker(t)
	want := pubsub.RoomOptions{HistorySize: 1, HistoryTTL: time.Hour, Presence: pubsub.PresenceOff, SlowConsumer: pubsub.SlowConsumerKeepLatest}
	if got := h.RoomStats("ticker:BTC").Options; got != want {
		t.Fatalf("ticker:BTC options %+v, want %+v", got, want)
	}
	// Other rooms keep the defaults: the policy is for the feed only.
	if got := h.RoomStats("news").Options; got.SlowConsumer != pubsub.SlowConsumerDisconnect || got.HistorySize != 0 {
		t.Fatalf("news options %+v, want the defaults", got)
	}

	// A live room has the same options, and a subscriber that asks for
	// history 1 gets the last price at once, not at the next change.
	if err := h.Publish(testCtx(t), "ticker:ETH", []byte(`{"symbol":"ETH","price":1,"open":1,"time":1}`)); err != nil {
		t.Fatal(err)
	}
	if err := h.Publish(testCtx(t), "ticker:ETH", []byte(`{"symbol":"ETH","price":2,"open":1,"time":2}`)); err != nil {
		t.Fatal(err)
	}
	c := dialProto(t, "ws"+strings.TrimPrefix(srv.URL, "http")+"/ws")
	c.send(`{"type":"subscribe","id":"1","room":"ticker:ETH","history":10}`)
	if ack := c.expect("ack"); ack.Missed != 1 || ack.Seq != 2 {
		t.Fatalf("ack %+v, want the one kept price (missed 1) at seq 2", ack)
	}
	if q := decodeQuote(t, c.expect("message")); q.Price != 2 {
		t.Fatalf("replayed %+v, want the latest price 2", q)
	}
	st := h.RoomStats("ticker:ETH")
	if st.Subscribers != 1 || st.Options != (pubsub.RoomOptions{HistorySize: 1, HistoryTTL: time.Hour, Presence: pubsub.PresenceOff, SlowConsumer: pubsub.SlowConsumerKeepLatest}) {
		t.Fatalf("live room stats %+v, want one subscriber and keep-latest", st)
	}
}

func TestTickerClientsMayNotPublish(t *testing.T) {
	t.Parallel()
	_, srv := startTicker(t)
	ws := "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws"
	c := dialProto(t, ws)
	c.send(`{"type":"publish","id":"1","room":"ticker:BTC","data":{"symbol":"BTC","price":1}}`)
	if e := c.expect("error"); e.Code != "forbidden" || e.ID != "1" {
		t.Fatalf("publish answered %+v, want error forbidden", e)
	}

	raw, _, err := websocket.Dial(testCtx(t), ws+"?room=ticker:BTC", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.CloseNow() })
	if err := raw.Write(testCtx(t), websocket.MessageText, []byte(`{"price":1}`)); err != nil {
		t.Fatal(err)
	}
	for {
		_, _, err := raw.Read(testCtx(t))
		if err == nil {
			continue // a quote published before the close
		}
		if code := websocket.CloseStatus(err); code != websocket.StatusPolicyViolation {
			t.Fatalf("raw publish: %v, want close 1008", err)
		}
		break
	}
}

func TestTickerServesThePageTheClientAndTheSymbols(t *testing.T) {
	t.Parallel()
	_, srv := startTicker(t)
	resp, body := get(t, srv, "/")
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
		t.Fatalf("GET /: %d %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	for _, want := range []string{`from "/ws/roomcast.js"`, "/api/symbols", "history: 1"} {
		if !strings.Contains(body, want) {
			t.Errorf("the page does not contain %q", want)
		}
	}
	if strings.Contains(body, "innerHTML") {
		t.Error("the page uses innerHTML")
	}

	if resp, body := get(t, srv, "/ws/roomcast.js"); resp.StatusCode != http.StatusOK || !strings.Contains(body, "export function connect(") {
		t.Fatalf("GET /ws/roomcast.js: %d, want the browser client", resp.StatusCode)
	}

	resp, body = get(t, srv, "/api/symbols")
	var list []struct{ Symbol, Room string }
	if resp.StatusCode != http.StatusOK || json.Unmarshal([]byte(body), &list) != nil || len(list) != len(symbols) {
		t.Fatalf("GET /api/symbols: %d %s", resp.StatusCode, body)
	}
	for i, s := range symbols {
		if list[i].Symbol != s.Name || list[i].Room != roomPrefix+s.Name {
			t.Errorf("symbol %d: %+v, want %s in room %s", i, list[i], s.Name, roomPrefix+s.Name)
		}
	}
}

func TestFeedRunReturnsWhenItsContextEnds(t *testing.T) {
	t.Parallel()
	h := newHandler(quietLogger())
	t.Cleanup(func() { h.Close() })
	f := newFeed(h, 1)
	rounds := make(chan struct{}, 100)
	f.onRound = func() { rounds <- struct{}{} }
	ctx, cancel := context.WithCancel(testCtx(t))
	done := make(chan error, 1)
	go func() { done <- f.run(ctx) }()
	for range 3 {
		select {
		case <-rounds:
		case <-testCtx(t).Done():
			t.Fatal("the feed ran no round")
		}
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run returned %v, want nil when its context ends", err)
		}
	case <-testCtx(t).Done():
		t.Fatal("run did not return after its context ended")
	}
	// Three rounds with every symbol at a coin flip: something moved.
	moved := false
	for i, s := range symbols {
		if f.prices[i] <= 0 {
			t.Fatalf("%s price %v, want positive", s.Name, f.prices[i])
		}
		moved = moved || f.prices[i] != s.Start
	}
	if !moved {
		t.Fatal("no price moved in three rounds")
	}
}

func TestStepStaysPositiveAndRounded(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ price, z, want float64 }{
		{100, 0, 100},
		{0.1235, 0, 0.1235},
		{64250, 1, 64275.71}, // 64250·e^0.0004, to the cent
		{5, -1, 4.998},
	} {
		if got := step(tc.price, tc.z); got != tc.want {
			t.Errorf("step(%v, %v) = %v, want %v", tc.price, tc.z, got, tc.want)
		}
	}
	// A price that would round to zero stays positive.
	if got := step(0.00001, -3); got <= 0 {
		t.Errorf("step(0.00001, -3) = %v, want > 0", got)
	}
}

// feedRunning reports whether a goroutine is inside the feed's loop.
func feedRunning() bool {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	return strings.Contains(string(buf), ".(*feed).run(")
}

func TestServeStopsTheFeedAndClosesWebSocketsWithGoingAway(t *testing.T) {
	// Not parallel: it inspects every goroutine of the process for the
	// feed's, and other tests run feeds of their own.
	addr, stop, served, result := startServe(t)
	c := dialProto(t, "ws://"+addr+"/ws")
	c.send(`{"type":"subscribe","id":"1","room":"ticker:BTC"}`)
	c.expect("ack")
	decodeQuote(t, c.expect("message")) // the feed is running
	if !feedRunning() {
		t.Fatal("no goroutine runs the feed while serving; the leak check below would prove nothing")
	}

	stop() // what SIGINT does in main
	for {
		_, _, err := c.c.Read(testCtx(t))
		if err == nil {
			continue // prices queued before the close
		}
		if code := websocket.CloseStatus(err); code != websocket.StatusGoingAway {
			t.Fatalf("read after shutdown: %v, want close code 1001", err)
		}
		break
	}
	select {
	case <-served:
		if *result != nil {
			t.Fatalf("serve returned %v, want nil after a graceful shutdown", *result)
		}
	case <-testCtx(t).Done():
		t.Fatal("serve did not return after its context ended")
	}
	// serve has returned: the feed's goroutine must be gone already, not
	// merely on its way out.
	if feedRunning() {
		t.Fatal("the feed's goroutine outlived serve")
	}
}
