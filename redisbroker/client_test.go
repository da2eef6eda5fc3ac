package redisbroker_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/roomcast/pubsub/protocol"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/redisbroker"
)

// node is one Handler with its own Redis broker and HTTP server: one node
// of a cluster.
type node struct {
	h   *pubsub.Handler
	b   *redisbroker.Broker
	srv *httptest.Server
}

// startNode starts a node on addr. Clients name their user with ?user=.
// Cleanup closes the handler (and so the broker), then the server.
func startNode(t *testing.T, addr, prefix string, bopts []redisbroker.Option, hopts ...pubsub.Option) *node {
	t.Helper()
	return startNodeWith(t, newBroker(t, addr, prefix, bopts...), hopts...)
}

// startNodeWith starts a node on broker b.
func startNodeWith(t *testing.T, b *redisbroker.Broker, hopts ...pubsub.Option) *node {
	t.Helper()
	h := pubsub.NewHandler(append([]pubsub.Option{
		pubsub.WithBroker(b),
		pubsub.WithLogger(quietLogger()),
		pubsub.WithClientPublish(true),
		pubsub.WithHistory(100, time.Minute),
		pubsub.WithAuthenticate(func(r *http.Request) (pubsub.Identity, error) {
			return pubsub.Identity{UserID: r.URL.Query().Get("user")}, nil
		}),
	}, hopts...)...)
	srv := httptest.NewServer(h)
	t.Cleanup(func() {
		h.Close()
		srv.Close()
	})
	return &node{h: h, b: b, srv: srv}
}

func (n *node) url(user string) string {
	u := "ws" + strings.TrimPrefix(n.srv.URL, "http") + "/ws"
	if user != "" {
		u += "?user=" + user
	}
	return u
}

func (n *node) publish(t *testing.T, room, data string) {
	t.Helper()
	if err := n.h.Publish(testCtx(t), room, []byte(data)); err != nil {
		t.Fatalf("Publish(%s, %s): %v", room, data, err)
	}
}

// envelope is any server envelope, decoded loosely for assertions.
type envelope struct {
	Type        string          `json:"type"`
	ID          string          `json:"id"`
	Room        string          `json:"room"`
	Epoch       string          `json:"epoch"`
	Seq         uint64          `json:"seq"`
	Data        json.RawMessage `json:"data"`
	Text        *string         `json:"text"`
	Code        string          `json:"code"`
	ConnID      string          `json:"conn_id"`
	UserID      string          `json:"user_id"`
	Recovered   *bool           `json:"recovered"`
	Reason      protocol.Reason `json:"reason"`
	Missed      int             `json:"missed"`
	Count       int             `json:"count"`
	Connections int             `json:"connections"`
	Members     []struct {
		UserID string   `json:"user_id"`
		Conns  []string `json:"conns"`
	} `json:"members"`
	raw []byte
}

// payload is the message's payload as text.
func (e envelope) payload() string {
	if e.Text != nil {
		return *e.Text
	}
	return string(e.Data)
}

// client is a protocol-mode test client.
type client struct {
	t       *testing.T
	c       *websocket.Conn
	welcome envelope
	nextID  int
	pending []envelope
}

func dialProto(t *testing.T, url string) *client {
	t.Helper()
	c, _, err := websocket.Dial(testCtx(t), url, &websocket.DialOptions{Subprotocols: []string{protocol.Subprotocol}})
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	c.SetReadLimit(-1)
	t.Cleanup(func() { c.CloseNow() })
	p := &client{t: t, c: c}
	if p.welcome = p.read(); p.welcome.Type != "welcome" {
		t.Fatalf("first envelope %s, want welcome", p.welcome.raw)
	}
	return p
}

func (p *client) readWire() envelope {
	p.t.Helper()
	for {
		typ, b, err := p.c.Read(testCtx(p.t))
		if err != nil {
			p.t.Fatalf("read: %v", err)
		}
		if typ != websocket.MessageText {
			p.t.Fatalf("protocol mode sent a %v frame", typ)
		}
		var e envelope
		if err := json.NewDecoder(bytes.NewReader(b)).Decode(&e); err != nil {
			p.t.Fatalf("server sent invalid JSON %q: %v", b, err)
		}
		e.raw = b
		if e.Type == "ping" {
			continue
		}
		return e
	}
}

// read returns the next envelope, buffered ones first, skipping pings.
func (p *client) read() envelope {
	p.t.Helper()
	if len(p.pending) > 0 {
		e := p.pending[0]
		p.pending = p.pending[1:]
		return e
	}
	return p.readWire()
}

// request sends fields with a fresh id and returns the reply; envelopes
// that arrive first are kept for read.
func (p *client) request(fields map[string]any) envelope {
	p.t.Helper()
	return p.reply(p.send(fields))
}

// send sends fields with a fresh id and returns the id.
func (p *client) send(fields map[string]any) string {
	p.t.Helper()
	p.nextID++
	id := fmt.Sprint("r", p.nextID)
	fields["id"] = id
	b, err := json.Marshal(fields)
	if err != nil {
		p.t.Fatal(err)
	}
	if err := p.c.Write(testCtx(p.t), websocket.MessageText, b); err != nil {
		p.t.Fatalf("write: %v", err)
	}
	return id
}

// reply reads until the reply to id; envelopes that arrive first are kept
// for read.
func (p *client) reply(id string) envelope {
	p.t.Helper()
	for {
		e := p.readWire()
		if e.ID == id && e.Type != "message" {
			return e
		}
		p.pending = append(p.pending, e)
	}
}

// subscribe subscribes with extra fields (since, presence…) and returns the ack.
func (p *client) subscribe(room string, extra map[string]any) envelope {
	p.t.Helper()
	fields := map[string]any{"type": "subscribe", "room": room}
	for k, v := range extra {
		fields[k] = v
	}
	e := p.request(fields)
	if e.Type != "ack" {
		p.t.Fatalf("subscribe %s: got %s, want ack", room, e.raw)
	}
	return e
}

// readMessages reads n room messages, skipping presence events.
func (p *client) readMessages(room string, n int) []envelope {
	p.t.Helper()
	var out []envelope
	for len(out) < n {
		e := p.read()
		switch {
		case e.Type == "join" || e.Type == "leave":
		case e.Type == "message" && e.Room == room:
			out = append(out, e)
		default:
			p.t.Fatalf("got %s, want a message of room %s", e.raw, room)
		}
	}
	return out
}

// readUntil reads until an envelope matches, and returns it.
func (p *client) readUntil(what string, match func(envelope) bool) envelope {
	p.t.Helper()
	for {
		if e := p.read(); match(e) {
			return e
		}
	}
}

// checkSeqs checks the messages' payloads and consecutive seqs of one epoch.
func checkSeqs(t *testing.T, got []envelope, epoch string, firstSeq uint64, payloads ...string) {
	t.Helper()
	for i, e := range got {
		if e.Epoch != epoch || e.Seq != firstSeq+uint64(i) || e.payload() != payloads[i] {
			t.Fatalf("message %d is %s, want epoch %s seq %d payload %s", i, e.raw, epoch, firstSeq+uint64(i), payloads[i])
		}
	}
}

// expectClose reads until the connection closes and checks its close code.
func (p *client) expectClose(t *testing.T, code protocol.CloseCode) {
	t.Helper()
	for {
		_, _, err := p.c.Read(testCtx(t))
		if err == nil {
			continue
		}
		if got := websocket.CloseStatus(err); protocol.CloseCode(got) != code {
			t.Fatalf("connection ended with %v, want close code %d", err, code)
		}
		return
	}
}
