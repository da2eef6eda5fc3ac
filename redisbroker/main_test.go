package redisbroker_test

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"
	"testing"

	"github.com/redis/go-redis/v9"
	"github.com/roomcast/pubsub/internal/faultproxy"
	"github.com/roomcast/pubsub/internal/leaktest"
	"github.com/roomcast/pubsub/pubsubtest"
	"github.com/roomcast/pubsub/redisbroker"
	"github.com/roomcast/pubsub/redisbroker/internal/redistest"
)

// shared is the redis-server most tests use; each test keeps to keys of
// its own prefix. Tests that stop or restart Redis start their own.
var shared *redistest.Server

// TestMain starts redis-server, runs the tests, stops it, and fails the
// run when goroutines outlive the tests.
func TestMain(m *testing.M) {
	srv, err := redistest.Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, "redisbroker tests need a real Redis:", err)
		os.Exit(1)
	}
	shared = srv
	if os.Getenv("ROOMCAST_TEST_LOG") == "" {
		redis.SetLogger(quietRedisLogger{}) // go-redis logs every failed dial of the outage tests
	}
	code := m.Run()
	srv.Close()
	os.Exit(leaktest.After(code, "go-redis"))
}

type quietRedisLogger struct{}

func (quietRedisLogger) Printf(context.Context, string, ...any) {}

var prefixes atomic.Int64

// uniquePrefix keeps a test's keys apart from every other test's, across
// -count runs too.
func uniquePrefix() string {
	return fmt.Sprintf("test%d", prefixes.Add(1))
}

// newClient returns a client of addr, closed at cleanup (after the
// brokers and handlers registered later).
func newClient(t testing.TB, addr string, adjust ...func(*redis.Options)) *redis.Client {
	t.Helper()
	o := &redis.Options{Addr: addr}
	for _, f := range adjust {
		f(o)
	}
	c := redis.NewClient(o)
	t.Cleanup(func() { c.Close() })
	return c
}

// newBroker returns a broker on addr with its own client.
func newBroker(t testing.TB, addr, prefix string, opts ...redisbroker.Option) *redisbroker.Broker {
	t.Helper()
	c := newClient(t, addr)
	return redisbroker.New(c, append([]redisbroker.Option{redisbroker.WithPrefix(prefix), redisbroker.WithLogger(pubsubtest.Logger())}, opts...)...)
}

// startProxy starts a fault-injecting proxy to addr, closed at cleanup
// (after the clients and brokers registered later).
func startProxy(t testing.TB, addr string) *faultproxy.Proxy {
	t.Helper()
	p, err := faultproxy.Start(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}
