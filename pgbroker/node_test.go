package pgbroker_test

import (
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/client"
	"github.com/roomcast/pubsub/internal/faultproxy"
	"github.com/roomcast/pubsub/pgbroker"
	"github.com/roomcast/pubsub/pubsubtest"
)

// node is one Handler with its own broker, served on a loopback port: one
// node of a cluster.
type node struct {
	*pubsubtest.Server
	b *pgbroker.Broker
}

// startNode starts a node on broker b. Clients name their user with
// ?user=. Cleanup closes the handler (and so the broker), then the server.
func startNode(t testing.TB, b *pgbroker.Broker, hopts ...pubsub.Option) *node {
	t.Helper()
	srv := pubsubtest.Start(t, append([]pubsub.Option{
		pubsub.WithBroker(b),
		pubsub.WithClientPublish(true),
		pubsub.WithHistory(100, time.Minute),
		pubsub.WithAuthenticate(func(r *http.Request) (pubsub.Identity, error) {
			return pubsub.Identity{UserID: r.URL.Query().Get("user")}, nil
		}),
	}, hopts...)...)
	return &node{Server: srv, b: b}
}

// newNode starts a node with a broker of its own on dsn, in schema.
func newNode(t testing.TB, dsn, schema string, bopts []pgbroker.Option, hopts ...pubsub.Option) *node {
	t.Helper()
	return startNode(t, newBroker(t, dsn, schema, bopts...), hopts...)
}

// url is the node's endpoint for user ("" for an anonymous client).
func (n *node) url(user string) string {
	return userURL(n.WS("/ws"), user)
}

func userURL(ws, user string) string {
	if user != "" {
		ws += "?user=" + url.QueryEscape(user)
	}
	return ws
}

// kill stops a node as a crash would: its broker first, so nothing it
// would say on the way out (its members leaving) reaches PostgreSQL, then
// its connections drop without a close handshake.
func (n *node) kill(t testing.TB) {
	t.Helper()
	if err := n.b.Close(); err != nil {
		t.Fatal(err)
	}
	n.Handler.Close()
}

// front is the load balancer in front of the nodes: a TCP proxy whose
// connections go to one node, which a test can change.
type front struct{ *faultproxy.Proxy }

func startFront(t testing.TB, to *node) front {
	t.Helper()
	return front{startProxy(t, hostOf(to))}
}

// point sends every connection to n from now on: the ones open to the
// previous node drop (idle HTTP connections too, which a client would
// reuse for its next upgrade), as when that node goes away.
func (f front) point(n *node) {
	f.SetTarget(hostOf(n))
	f.Cut()
	f.Heal()
}

func (f front) url(user string) string { return userURL("ws://"+f.Addr()+"/ws", user) }

func hostOf(n *node) string { return strings.TrimPrefix(n.URL, "http://") }

// watcher is a Go client subscribed to one room, recording everything its
// subscription gets, in order.
type watcher struct {
	t   testing.TB
	c   *client.Client
	sub *client.Subscription

	mu      sync.Mutex
	items   []item
	changed chan struct{} // closed on every item, then replaced
}

// item is one thing a subscription got: a message, a recovery or a
// presence event.
type item struct {
	m   *client.Message
	rec *client.Recovery
	ev  *client.Event
}

func (i item) String() string {
	switch {
	case i.m != nil:
		return fmt.Sprintf("%d:%s", i.m.Seq, i.m.Data)
	case i.rec != nil:
		if i.rec.Recovered {
			return fmt.Sprintf("recovered(%d missed)", i.rec.Missed)
		}
		return fmt.Sprintf("not recovered(%s)", i.rec.Reason)
	default:
		return fmt.Sprintf("%s(%s)", i.ev.Type, i.ev.UserID)
	}
}

// watch dials url and subscribes to room; presence asks for its events.
func watch(t testing.TB, url, room string, presence bool, opts ...client.SubscribeOption) *watcher {
	t.Helper()
	w := &watcher{t: t, changed: make(chan struct{})}
	c, err := client.Dial(pubsubtest.Context(t), url, client.WithReconnect(20*time.Millisecond, 200*time.Millisecond),
		client.WithLogger(pubsubtest.Logger()))
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	t.Cleanup(func() { c.Close() })
	w.c = c
	opts = append(opts, client.OnRecover(func(r client.Recovery) { w.add(item{rec: &r}) }))
	if presence {
		opts = append(opts, client.OnPresence(func(e client.Event) { w.add(item{ev: &e}) }))
	}
	if w.sub, err = c.Subscribe(pubsubtest.Context(t), room, func(m client.Message) { w.add(item{m: &m}) }, opts...); err != nil {
		t.Fatalf("subscribe %s: %v", room, err)
	}
	return w
}

func (w *watcher) add(i item) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.items = append(w.items, i)
	close(w.changed)
	w.changed = make(chan struct{})
}

// received is everything w has received so far.
func (w *watcher) received() []item {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.items)
}

// waitUntil waits until cond holds for everything received, and returns it.
func (w *watcher) waitUntil(what string, cond func([]item) bool) []item {
	w.t.Helper()
	ctx := pubsubtest.Context(w.t)
	for {
		w.mu.Lock()
		items, changed := slices.Clone(w.items), w.changed
		w.mu.Unlock()
		if cond(items) {
			return items
		}
		select {
		case <-changed:
		case <-ctx.Done():
			w.t.Fatalf("timed out waiting for %s; got %v", what, items)
		}
	}
}

// waitMessages waits for n messages and returns all the messages received.
func (w *watcher) waitMessages(n int) []client.Message {
	w.t.Helper()
	return messages(w.waitUntil(fmt.Sprint(n, " messages"), func(items []item) bool { return len(messages(items)) >= n }))
}

// waitData waits for a message with data.
func (w *watcher) waitData(data string) []item {
	w.t.Helper()
	return w.waitUntil("the message "+data, func(items []item) bool {
		return slices.ContainsFunc(messages(items), func(m client.Message) bool { return string(m.Data) == data })
	})
}

func messages(items []item) []client.Message {
	var out []client.Message
	for _, i := range items {
		if i.m != nil {
			out = append(out, *i.m)
		}
	}
	return out
}

func recoveries(items []item) []client.Recovery {
	var out []client.Recovery
	for _, i := range items {
		if i.rec != nil {
			out = append(out, *i.rec)
		}
	}
	return out
}

// checkStream checks that ms are the seqs from first on, one epoch, with
// the payloads want.
func checkStream(t testing.TB, ms []client.Message, epoch string, first uint64, want ...string) {
	t.Helper()
	if len(ms) != len(want) {
		t.Fatalf("got %d messages %v, want %d: %v", len(ms), payloads(ms), len(want), want)
	}
	for i, m := range ms {
		if m.Epoch != epoch || m.Seq != first+uint64(i) || string(m.Data) != want[i] {
			t.Fatalf("message %d is %s/%d %q, want %s/%d %q", i, m.Epoch, m.Seq, m.Data, epoch, first+uint64(i), want[i])
		}
	}
}

func payloads(ms []client.Message) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = string(m.Data)
	}
	return out
}

func numbered(from, to int) []string {
	var out []string
	for i := from; i <= to; i++ {
		out = append(out, fmt.Sprint(i))
	}
	return out
}
