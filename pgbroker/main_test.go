package pgbroker_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/roomcast/pubsub/internal/faultproxy"
	"github.com/roomcast/pubsub/internal/leaktest"
	"github.com/roomcast/pubsub/pgbroker"
	"github.com/roomcast/pubsub/pgbroker/internal/pgtest"
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

func testCtx(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	t.Cleanup(cancel)
	return ctx
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
	b, err := pgbroker.New(testCtx(t), newPool(t, dsn), append([]pgbroker.Option{
		pgbroker.WithSchema(schema), pgbroker.WithLogger(quietLogger()),
	}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// quietLogger keeps test output to failures; ROOMCAST_TEST_LOG=1 shows logs.
func quietLogger() *slog.Logger {
	if os.Getenv("ROOMCAST_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// logRecorder captures a broker's log records for assertions.
type logRecorder struct {
	mu      sync.Mutex
	records []logRecord
}

type logRecord struct {
	level slog.Level
	msg   string
	attrs map[string]string
}

func (l *logRecorder) logger() *slog.Logger {
	return slog.New(&captureHandler{rec: l, next: quietLogger().Handler()})
}

func (l *logRecorder) find(level slog.Level, msgPart, room string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.ContainsFunc(l.records, func(r logRecord) bool {
		return r.level == level && strings.Contains(r.msg, msgPart) && (room == "" || r.attrs["room"] == room)
	})
}

type captureHandler struct {
	rec   *logRecorder
	next  slog.Handler
	attrs []slog.Attr
}

func (h *captureHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *captureHandler) Handle(ctx context.Context, r slog.Record) error {
	lr := logRecord{level: r.Level, msg: r.Message, attrs: make(map[string]string)}
	for _, a := range h.attrs {
		lr.attrs[a.Key] = a.Value.String()
	}
	r.Attrs(func(a slog.Attr) bool {
		lr.attrs[a.Key] = a.Value.String()
		return true
	})
	h.rec.mu.Lock()
	h.rec.records = append(h.rec.records, lr)
	h.rec.mu.Unlock()
	if h.next.Enabled(ctx, r.Level) {
		return h.next.Handle(ctx, r)
	}
	return nil
}
func (h *captureHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &captureHandler{rec: h.rec, next: h.next.WithAttrs(as), attrs: append(slices.Clone(h.attrs), as...)}
}
func (h *captureHandler) WithGroup(name string) slog.Handler {
	return &captureHandler{rec: h.rec, next: h.next.WithGroup(name), attrs: h.attrs}
}

// waitFor polls cond until it holds or the test's timeout passes. It is
// for state with no event to wait on (rows in a table, presence).
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	ctx := testCtx(t)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s", what)
		case <-tick.C:
		}
	}
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
