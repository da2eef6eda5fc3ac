// Command chat is a chat room server with a one-file web page, built on
// roomcast in raw mode: the page uses the browser's bare WebSocket, no
// client library, and any WebSocket tool can join the same rooms.
//
//	go run ./examples/chat              # listens on 127.0.0.1:8080
//	go run ./examples/chat -addr :9000  # or anywhere else
//
// Open http://127.0.0.1:8080 in two tabs and chat between them, or join
// from a terminal and type lines back:
//
//	npx wscat -c 'ws://127.0.0.1:8080/ws?room=lobby'
//
// The room is the ?room= query parameter. Every text a client sends is
// published, verbatim, to everyone in its room (the sender included); the
// page sends "nick: text" lines, so terminal users read plain lines too.
//
// Ctrl-C (SIGINT) or SIGTERM shuts it down gracefully: connected clients
// get close code 1001 "going away", and the page reconnects by itself once
// a server is back.
package main

import (
	"context"
	_ "embed"
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

//go:embed index.html
var indexHTML []byte

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "address to listen on")
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
	host := displayHost(ln)
	fmt.Printf("chat server listening on http://%s\n", host)
	fmt.Printf("open http://%s in two tabs\n", host)
	fmt.Printf("or join from a terminal: wscat -c 'ws://%s/ws?room=lobby'\n", host)

	if err := serve(ctx, ln, newHandler(logger)); err != nil {
		logger.Error("chat: serve", "err", err)
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

// newHandler returns the chat Handler: raw-mode clients name their room
// with ?room=, and whatever they send is published to it.
func newHandler(logger *slog.Logger) *pubsub.Handler {
	return pubsub.NewHandler(
		pubsub.WithLogger(logger),
		// Clients only listen by default; a chat lets them talk. The default
		// rate limit (20 messages a second, burst 50) still applies.
		pubsub.WithClientPublish(true),
	)
}

// newMux serves the page at / and the WebSocket endpoint at /ws.
func newMux(h *pubsub.Handler) *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("/ws", h)
	mux.HandleFunc("GET /{$}", servePage)
	return mux
}

func servePage(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	_, _ = w.Write(indexHTML)
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
	//     HTTP requests (page loads). It does NOT close hijacked
	//     connections, and every WebSocket is one: they stay open.
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
