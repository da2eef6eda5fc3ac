// Command echo is the classic WebSocket echo server, built on roomcast.
//
//	go run ./examples/echo              # listens on 127.0.0.1:8080
//	go run ./examples/echo -addr :9000  # or anywhere else
//
// Every message a client sends comes back as "Server received: <msg>".
// Try it with any WebSocket client, no library needed (raw mode):
//
//	npx wscat -c ws://127.0.0.1:8080/ws
//
// A client that speaks roomcast.v1 (protocol mode) gets the same answer as
// a "direct" envelope, after sending a "send" envelope:
//
//	npx wscat -s roomcast.v1 -c ws://127.0.0.1:8080/ws
//	> {"type":"send","id":"1","text":"hi"}
//	< {"type":"direct","text":"Server received: hi"}
//	< {"type":"ack","id":"1"}
//
// Ctrl-C (SIGINT) or SIGTERM shuts it down gracefully: connected clients
// get close code 1001 "going away".
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
	"strconv"
	"syscall"
	"time"

	"github.com/roomcast/pubsub"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "address to listen on")
	flag.Parse()

	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	context.AfterFunc(ctx, stop) // after the first signal, a second one kills at once

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		logger.Error("echo: listen", "err", err)
		os.Exit(1)
	}
	url := "ws://" + displayHost(ln) + "/ws"
	fmt.Printf("echo server listening; connect to %s\n", url)
	fmt.Printf("try: wscat -c %s\n", url)

	if err := serve(ctx, ln, newHandler(logger)); err != nil {
		logger.Error("echo: serve", "err", err)
		os.Exit(1)
	}
}

// displayHost is how to reach ln from this machine: an unspecified listen
// address (":8080") is shown as localhost.
func displayHost(ln net.Listener) string {
	if a, ok := ln.Addr().(*net.TCPAddr); ok && a.IP.IsUnspecified() {
		return net.JoinHostPort("localhost", strconv.Itoa(a.Port))
	}
	return ln.Addr().String()
}

// newHandler returns the echo Handler: every client message, in raw mode
// or as a protocol-mode "send", is answered to its sender only.
func newHandler(logger *slog.Logger) *pubsub.Handler {
	return pubsub.NewHandler(
		pubsub.WithLogger(logger),
		pubsub.WithOnMessage(func(ctx context.Context, m *pubsub.ClientMessage) error {
			// m.Data is valid only until we return; Reply copies it.
			return m.Reply(append([]byte("Server received: "), m.Data...))
		}),
	)
}

// newMux mounts h at /ws.
func newMux(h *pubsub.Handler) *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("/ws", h)
	return mux
}

// shutdownTimeout bounds the whole graceful shutdown.
const shutdownTimeout = 10 * time.Second

// serve serves h on ln until ctx ends, then shuts down gracefully and
// returns. It closes h in every case.
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
	// Both are needed, in this order:
	//  1. srv.Shutdown closes the listener and waits for in-flight plain
	//     HTTP requests. It does NOT close hijacked connections, and every
	//     WebSocket is one: they stay open, so anything those requests
	//     publish still reaches its subscribers.
	//  2. h.Shutdown flushes what each connection has queued, closes it
	//     with 1001 "going away", and waits for its goroutines to end.
	// Without step 2, srv.Shutdown returns with every WebSocket still open,
	// and they die without a close frame when the process exits.
	err := srv.Shutdown(sctx)
	err = errors.Join(err, h.Shutdown(sctx))
	if serr := <-served; !errors.Is(serr, http.ErrServerClosed) {
		err = errors.Join(err, serr)
	}
	return err
}
