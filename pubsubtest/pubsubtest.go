// Package pubsubtest is a test kit for apps built on roomcast, and for
// roomcast's own tests: it serves a Handler (or a whole app) on a loopback
// port, dials raw-mode and protocol-mode clients, and waits for what they
// should receive (a message, a presence event, an error code, a close
// code), every wait bounded, every failure reported on the test that made
// the client. What a host usually tests with it: its authentication and
// authorization rules, which rooms its backend publishes to, and what its
// clients see.
//
//	func TestOnlyMembersMayJoinTheirTeamRoom(t *testing.T) {
//		app, ps := newApp() // the app's own mux, mounting its Handler ps at /ws
//		srv := pubsubtest.Serve(t, ps, app)
//		ann := srv.Dial("/ws?token=ann")
//		ann.Subscribe("team:red")
//		ann.Error(pubsubtest.Fields{"type": "subscribe", "room": "team:blue"}, protocol.CodeForbidden)
//	}
//
// A test binary checks that nothing outlived its tests with Main:
//
//	func TestMain(m *testing.M) { pubsubtest.Main(m) }
//
// Clients are bound to the test that dialed them: use them from that
// test's goroutine (subtests dial their own), or, with the methods that do
// not fail the test (RawConn.TryRead, Conn.TryNext), from one goroutine of
// the test's at a time. Each is closed at the test's cleanup; each server
// is closed after every client, its Handler first.
package pubsubtest

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/internal/leaktest"
)

// Timeout bounds every wait of the kit: a dial, a read, a WaitFor.
const Timeout = 10 * time.Second

// Context returns a context that ends after Timeout, or at the test's
// cleanup.
func Context(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	t.Cleanup(cancel)
	return ctx
}

// Receive waits for a value on ch and returns it, failing the test when
// Timeout passes first: for hooks that report to the test on a channel.
func Receive[T any](t testing.TB, ch <-chan T, what string) T {
	t.Helper()
	deadline := time.NewTimer(Timeout)
	defer deadline.Stop()
	select {
	case v := <-ch:
		return v
	case <-deadline.C:
		t.Fatalf("timed out after %v waiting for %s", Timeout, what)
		panic("unreachable")
	}
}

// WaitFor polls cond until it holds, and fails the test when Timeout
// passes first. It is for state that sends no event to wait on (counters,
// lists); to wait for something a client receives, read it instead.
func WaitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.NewTimer(Timeout)
	defer deadline.Stop()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-deadline.C:
			t.Fatalf("timed out after %v waiting for %s", Timeout, what)
		case <-tick.C:
		}
	}
}

// Main runs the tests and exits, failing a run that passed when goroutines
// of roomcast, coder/websocket or net/http outlive the tests (after a grace
// period): a connection, writer or server left running. Call it from
// TestMain.
func Main(m *testing.M) {
	os.Exit(leaktest.After(m.Run()))
}

// Logger returns a logger for a Handler under test: silent, unless the
// environment variable ROOMCAST_TEST_LOG is set, then everything to stderr.
func Logger() *slog.Logger {
	if os.Getenv("ROOMCAST_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// Server is an app under test, served on a loopback port.
type Server struct {
	// Handler is the Handler under test, for the backend's side: Publish,
	// Stats, Connections, Disconnect...
	*pubsub.Handler
	// URL is the server's base URL, "http://127.0.0.1:port".
	URL string

	t   testing.TB
	srv *httptest.Server
}

// Start serves a new Handler, made with a quiet logger (see Logger) and
// opts, at /ws and below it (/ws/roomcast.js, rooms in the path). It is
// closed at the test's cleanup.
func Start(t testing.TB, opts ...pubsub.Option) *Server {
	t.Helper()
	h := pubsub.NewHandler(append([]pubsub.Option{pubsub.WithLogger(Logger())}, opts...)...)
	mux := http.NewServeMux()
	mux.Handle("/ws", h)
	mux.Handle("/ws/", h)
	return serve(t, h, mux)
}

// Serve serves app, a host's whole HTTP handler, with h mounted in it
// where the app chose (or h.Middleware(app)). At the test's cleanup h is
// closed, then the server.
func Serve(t testing.TB, h *pubsub.Handler, app http.Handler) *Server {
	t.Helper()
	return serve(t, h, app)
}

// ServeOn is Serve on a server the test built itself, to set its
// http.Server's timeouts, wrap its listener or serve TLS: srv, started
// (Start or StartTLS), serves the app with h mounted in it. Clients dial
// it through srv.Client(), so a TLS server's certificate is trusted. At
// the test's cleanup h is closed, then srv.
func ServeOn(t testing.TB, h *pubsub.Handler, srv *httptest.Server) *Server {
	t.Helper()
	if srv.URL == "" {
		t.Fatal("pubsubtest.ServeOn: the server is not started")
	}
	return cleanUp(t, h, srv)
}

func serve(t testing.TB, h *pubsub.Handler, app http.Handler) *Server {
	return cleanUp(t, h, httptest.NewServer(app))
}

func cleanUp(t testing.TB, h *pubsub.Handler, srv *httptest.Server) *Server {
	t.Cleanup(func() {
		h.Close()
		srv.Close()
	})
	return &Server{Handler: h, URL: srv.URL, t: t, srv: srv}
}

// WS is the ws:// (or, over TLS, wss://) URL of path (with its query) on
// this server.
func (s *Server) WS(path string) string {
	return "ws" + strings.TrimPrefix(s.URL, "http") + path
}

// Dial connects to path in protocol mode (see the package function Dial).
func (s *Server) Dial(path string, opts ...DialOption) *Conn {
	s.t.Helper()
	return Dial(s.t, s.WS(path), s.client(opts)...)
}

// DialRaw connects to path in raw mode (see the package function DialRaw).
func (s *Server) DialRaw(path string, opts ...DialOption) *RawConn {
	s.t.Helper()
	return DialRaw(s.t, s.WS(path), s.client(opts)...)
}

// Refused dials path and expects the upgrade to be refused with status.
func (s *Server) Refused(path string, status int, opts ...DialOption) {
	s.t.Helper()
	Refused(s.t, s.WS(path), status, s.client(opts)...)
}

// client adds the server's own HTTP client to opts when it serves TLS.
func (s *Server) client(opts []DialOption) []DialOption {
	if s.srv.TLS == nil {
		return opts
	}
	return append([]DialOption{HTTPClient(s.srv.Client())}, opts...)
}

// Publish publishes data into room from the backend and fails the test on
// an error.
func (s *Server) Publish(room string, data []byte) {
	s.t.Helper()
	if err := s.Handler.Publish(Context(s.t), room, data); err != nil {
		s.t.Fatalf("Publish(%q): %v", room, err)
	}
}
