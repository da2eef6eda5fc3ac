// Command chat is a multi-room chat server with a one-file web page, built
// on roomcast in protocol mode: the page imports the browser client the
// Handler serves (/ws/roomcast.js) and gets rooms, nicknames, a live member
// list, the recent history on joining, and reconnects that recover what
// was missed meanwhile.
//
//	go run ./examples/chat              # listens on 127.0.0.1:8080
//	go run ./examples/chat -addr :9000  # or anywhere else
//
// Open http://127.0.0.1:8080/?nick=ann and http://127.0.0.1:8080/?nick=bob
// in two tabs and chat between them. Any WebSocket tool can join the same
// rooms in raw mode, with no client library, and type lines back:
//
//	npx wscat -c 'ws://127.0.0.1:8080/ws?room=lobby'
//
// What travels:
//   - The page publishes each message as JSON, {"nick":"ann","text":"hi"};
//     a raw-mode client receives exactly those bytes as a text frame.
//   - A raw-mode client's lines are published verbatim; the page shows
//     them as plain lines.
//   - The page subscribes with presence info {"name": nick}, so everyone's
//     member list shows nicknames, and joins and leaves as they happen.
//   - Every room keeps its last 100 messages for an hour: the page asks for
//     the last 50 when it joins, and after a reconnect the client asks for
//     exactly the ones it missed. When that is impossible (the server
//     restarted, or more were missed than kept) the page reloads the room
//     from GET /api/history instead.
//
// Ctrl-C (SIGINT) or SIGTERM shuts it down gracefully: connected clients
// get close code 1001 "going away", and the page reconnects by itself once
// a server is back.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/examples/chat/chatapp"
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
	// The first line names the address actually bound (useful with port
	// 0); scripts may parse it.
	host := displayHost(ln)
	fmt.Printf("chat server listening on http://%s\n", host)
	fmt.Printf("open http://%s/?nick=ann and http://%s/?nick=bob in two tabs\n", host, host)
	fmt.Printf("or join from a terminal: wscat -c 'ws://%s/ws?room=lobby'\n", host)

	if err := chatapp.Serve(ctx, ln, newHandler(logger)); err != nil {
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

// newHandler returns the chat Handler, on the in-process broker.
func newHandler(logger *slog.Logger) *pubsub.Handler {
	return pubsub.NewHandler(append(chatapp.Options(), pubsub.WithLogger(logger))...)
}
