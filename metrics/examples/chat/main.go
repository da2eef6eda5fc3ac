// Command chat is the roomcast chat (examples/chat of the core module)
// with Prometheus metrics at /metrics, beside the WebSocket endpoint at
// /ws. From the metrics directory, which is its own Go module:
//
//	go run ./examples/chat              # listens on 127.0.0.1:8080
//	go run ./examples/chat -addr :9000  # or anywhere else
//
// Open http://127.0.0.1:8080/?nick=ann in a tab or two, chat, and read the
// metrics:
//
//	curl -s http://127.0.0.1:8080/metrics | grep '^roomcast_'
//
// To see them on the dashboard, scrape the chat with a Prometheus
// (prometheus.yml: a job with targets: ["127.0.0.1:8080"]), and import
// metrics/dashboard.json into Grafana, picking that Prometheus as its data
// source.
//
// The chat lets anyone name a room, so it exports per-room series for the
// lobby and for at most 20 other rooms, the first in name order; a real
// app would match only rooms whose names it controls (see
// metrics.WithRoomFilter). Ctrl-C (SIGINT) or SIGTERM shuts it down
// gracefully: connected clients get close code 1001 "going away".
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/examples/chat/chatapp"
	"github.com/roomcast/pubsub/metrics"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "address to listen on (port 0 picks a free one)")
	flag.Parse()

	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	context.AfterFunc(ctx, stop) // after the first signal, a second one kills at once

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		logger.Error("chat: listen", "err", err)
		os.Exit(1)
	}
	fmt.Printf("chat server listening on http://%s\n", ln.Addr())
	fmt.Printf("open http://%s/?nick=ann; metrics at http://%s/metrics\n", ln.Addr(), ln.Addr())

	h := pubsub.NewHandler(append(chatapp.Options(), pubsub.WithLogger(logger))...)
	if err := serve(ctx, ln, h); err != nil {
		logger.Error("chat: serve", "err", err)
		os.Exit(1)
	}
}

// newMux serves the chat (page, /ws, history) and, at /metrics, h's
// metrics beside the Go runtime's and the process's.
func newMux(h *pubsub.Handler) *http.ServeMux {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		metrics.NewCollector(h,
			metrics.WithRooms("lobby"), // always, zero while empty
			metrics.WithRoomFilter(func(string) bool { return true }),
			metrics.WithMaxRooms(21)), // the lobby and 20 more
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	mux := http.NewServeMux()
	mux.Handle("/", chatapp.Mux(h))
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	return mux
}

// shutdownTimeout bounds the whole graceful shutdown.
const shutdownTimeout = 10 * time.Second

// serve serves newMux(h) on ln until ctx ends, then shuts down gracefully
// and returns. It closes h in every case.
func serve(ctx context.Context, ln net.Listener, h *pubsub.Handler) error {
	srv := &http.Server{Handler: newMux(h), ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	select {
	case err := <-served: // the listener failed
		return errors.Join(err, h.Close())
	case <-ctx.Done():
	}

	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	// srv.Shutdown does not close WebSockets (they are hijacked
	// connections); h.Shutdown then closes them with 1001 "going away".
	err := srv.Shutdown(sctx)
	err = errors.Join(err, h.Shutdown(sctx))
	if serr := <-served; !errors.Is(serr, http.ErrServerClosed) {
		err = errors.Join(err, serr)
	}
	return err
}
