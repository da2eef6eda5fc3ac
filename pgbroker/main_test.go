package pgbroker_test

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/roomcast/pubsub/internal/faultproxy"
	"github.com/roomcast/pubsub/internal/leaktest"
	"github.com/roomcast/pubsub/pgbroker"
	"github.com/roomcast/pubsub/pgbroker/internal/pgtest"
	"github.com/roomcast/pubsub/pubsubtest"
)

// shared is the PostgreSQL server most tests use; each test keeps to a
// schema of its own. Tests that stop or restart PostgreSQL start their own.
var shared *pgtest.Server

// TestMain starts PostgreSQL, runs the tests, stops it, and fails the run
// when goroutines outlive the tests.
func TestMain(m *testing.M) {
	srv, err := pgtest.Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, "pgbroker tests need a real PostgreSQL:", err)
		os.Exit(1)
	}
	shared = srv
	code := m.Run()
	if code != 0 && os.Getenv("ROOMCAST_TEST_LOG") != "" {
		fmt.Fprintln(os.Stderr, srv.Log())
	}
	srv.Close()
	os.Exit(leaktest.After(code, "jackc/pgx", "jackc/puddle"))
}

var schemas atomic.Int64

// uniqueSchema keeps a test's tables apart from every other test's.
func uniqueSchema() string {
	return fmt.Sprintf("test_%d", schemas.Add(1))
}

// newPool returns a pool on dsn, closed at cleanup (after the brokers and
// handlers registered later).
func newPool(t testing.TB, dsn string, adjust ...func(*pgxpool.Config)) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 8
	for _, f := range adjust {
		f(cfg)
	}
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// newBroker returns a broker on its own pool of dsn, in schema; the
// factory's caller binds and closes it.
func newBroker(t testing.TB, dsn, schema string, opts ...pgbroker.Option) *pgbroker.Broker {
	t.Helper()
	b, err := pgbroker.New(pubsubtest.Context(t), newPool(t, dsn), append([]pgbroker.Option{
		pgbroker.WithSchema(schema), pgbroker.WithLogger(pubsubtest.Logger()),
	}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// startProxy starts a fault-injecting proxy to addr, closed at cleanup
// (after the pools and brokers registered later).
func startProxy(t testing.TB, addr string) *faultproxy.Proxy {
	t.Helper()
	p, err := faultproxy.Start(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// viaProxy is dsn with its host and port replaced by the proxy's.
func viaProxy(srv *pgtest.Server, p *faultproxy.Proxy) string {
	return strings.Replace(srv.DSN, fmt.Sprintf("127.0.0.1:%d", srv.Port), p.Addr(), 1)
}

// addr is the server's TCP address.
func addr(srv *pgtest.Server) string { return fmt.Sprintf("127.0.0.1:%d", srv.Port) }

// waitListening waits until n nodes of schema hold their listening
// connection (seen in pg_stat_activity on the server at dsn).
func waitListening(t testing.TB, dsn, schema string, n int) {
	t.Helper()
	admin := newPool(t, dsn)
	pubsubtest.WaitFor(t, fmt.Sprint(n, " nodes of ", schema, " to listen"), func() bool {
		var listening int
		err := admin.QueryRow(pubsubtest.Context(t), `SELECT count(*) FROM pg_stat_activity
			WHERE application_name LIKE '%pgbroker listener%' AND query = 'LISTEN "' || $1 || '"'`, schema).Scan(&listening)
		return err == nil && listening >= n
	})
}
