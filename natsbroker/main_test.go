package natsbroker_test

import (
	"fmt"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/roomcast/pubsub/internal/faultproxy"
	"github.com/roomcast/pubsub/internal/leaktest"
	"github.com/roomcast/pubsub/natsbroker"
	"github.com/roomcast/pubsub/natsbroker/internal/natstest"
	"github.com/roomcast/pubsub/pubsubtest"
)

// shared is the nats-server most tests use; each test keeps to a stream
// (a prefix) of its own. Tests that stop or restart NATS start their own.
var shared *natstest.Server

// TestMain starts nats-server, runs the tests, stops it, and fails the
// run when goroutines (the broker's, the NATS client's or a server's)
// outlive the tests.
func TestMain(m *testing.M) {
	srv, err := natstest.Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, "natsbroker tests need an embedded nats-server:", err)
		os.Exit(1)
	}
	shared = srv
	code := m.Run()
	srv.Close()
	os.Exit(leaktest.After(code, "nats-io/nats.go", "nats-io/nats-server"))
}

var prefixes atomic.Int64

// uniquePrefix keeps a test's stream and subjects apart from every other
// test's, across -count runs too.
func uniquePrefix() string {
	return fmt.Sprintf("t%d", prefixes.Add(1))
}

// connect returns a connection to url, closed at cleanup (after the
// brokers and handlers registered later). It reconnects fast and forever,
// and never buffers publishes while disconnected, as the package
// documentation advises.
func connect(t testing.TB, url string, extra ...nats.Option) *nats.Conn {
	t.Helper()
	opts := append([]nats.Option{
		nats.MaxReconnects(-1),
		nats.ReconnectWait(50 * time.Millisecond),
		nats.ReconnectJitter(0, 0),
		nats.ReconnectBufSize(-1),
		nats.Timeout(time.Second),
		nats.PingInterval(500 * time.Millisecond),
		nats.MaxPingsOutstanding(2),
		nats.ErrorHandler(func(*nats.Conn, *nats.Subscription, error) {}), // slow consumers: the broker fills the gaps
	}, extra...)
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		t.Fatalf("connect to %s: %v", url, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// newBroker returns a broker on a new connection to url.
func newBroker(t testing.TB, url, prefix string, opts ...natsbroker.Option) *natsbroker.Broker {
	t.Helper()
	return newBrokerOn(t, connect(t, url), prefix, opts...)
}

// newBrokerOn returns a broker on nc, closed at cleanup.
func newBrokerOn(t testing.TB, nc *nats.Conn, prefix string, opts ...natsbroker.Option) *natsbroker.Broker {
	t.Helper()
	b, err := natsbroker.New(pubsubtest.Context(t), nc, append([]natsbroker.Option{
		natsbroker.WithPrefix(prefix), natsbroker.WithLogger(pubsubtest.Logger()),
	}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

// startProxy starts a fault-injecting proxy to addr, closed at cleanup
// (after the connections and brokers registered later).
func startProxy(t testing.TB, addr string) *faultproxy.Proxy {
	t.Helper()
	p, err := faultproxy.Start(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// proxied connects through proxy to one server: the client must not learn
// the server's own address and go around the proxy.
func proxied(t testing.TB, proxy *faultproxy.Proxy) *nats.Conn {
	t.Helper()
	return connect(t, "nats://"+proxy.Addr(), nats.IgnoreDiscoveredServers(), nats.DontRandomize())
}
