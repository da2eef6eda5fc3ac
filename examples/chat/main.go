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
	_ "embed"
	"encoding/json"
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
	"unicode/utf8"

	"github.com/roomcast/pubsub"
)

//go:embed index.html
var indexHTML []byte

// Each room keeps this many of its latest messages, each for at most
// historyTTL: what a page shows when it joins, and what a client that
// reconnects can recover.
const (
	historySize = 100
	historyTTL  = time.Hour
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

// newHandler returns the chat Handler. Clients may publish into any room;
// rooms keep their recent history and track their members.
func newHandler(logger *slog.Logger) *pubsub.Handler {
	return pubsub.NewHandler(
		pubsub.WithLogger(logger),
		// Clients only listen by default; a chat lets them talk. The default
		// rate limit (20 messages a second, burst 50) still applies.
		pubsub.WithClientPublish(true),
		pubsub.WithHistory(historySize, historyTTL),
		// The default, spelled out: members are listed, with join and leave
		// events for the subscribers that ask for them.
		pubsub.WithPresence(pubsub.PresenceOn),
	)
}

// newMux serves the page at /, the WebSocket endpoint at /ws, the browser
// client at /ws/roomcast.js (so the Handler is mounted below /ws/ too,
// which also lets raw clients name the room as /ws/lobby), and the rooms'
// history at /api/history.
func newMux(h *pubsub.Handler) *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("/ws", h)
	mux.Handle("/ws/", h)
	mux.HandleFunc("GET /{$}", servePage)
	mux.Handle("GET /api/history", historyHandler(h))
	return mux
}

func servePage(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	_, _ = w.Write(indexHTML)
}

// historyMessage is one message of GET /api/history, with its payload in
// the field the protocol would use: "data" for JSON, "text" for other
// UTF-8, "binary" (base64) for the rest.
type historyMessage struct {
	ID     string          `json:"id"`
	Epoch  string          `json:"epoch"`
	Seq    uint64          `json:"seq"`
	Time   int64           `json:"time"` // milliseconds since the Unix epoch
	Data   json.RawMessage `json:"data,omitempty"`
	Text   *string         `json:"text,omitempty"`
	Binary []byte          `json:"binary,omitempty"`
}

// defaultHistoryLimit is how many messages GET /api/history returns when
// the request does not say.
const defaultHistoryLimit = 50

// historyHandler answers GET /api/history?room=R&limit=N with the room's
// latest N kept messages, oldest first: how a page reloads a room whose
// missed messages could not be recovered.
func historyHandler(h *pubsub.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		room := r.URL.Query().Get("room")
		if err := pubsub.ValidRoomName(room); err != nil {
			http.Error(w, "invalid room: "+err.Error(), http.StatusBadRequest)
			return
		}
		limit := defaultHistoryLimit
		if v := r.URL.Query().Get("limit"); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > historySize {
				http.Error(w, fmt.Sprintf("limit must be a number from 1 to %d", historySize), http.StatusBadRequest)
				return
			}
			limit = n
		}
		msgs, err := h.History(r.Context(), room, limit)
		if err != nil {
			http.Error(w, "history unavailable", http.StatusServiceUnavailable)
			return
		}
		out := struct {
			Room     string           `json:"room"`
			Messages []historyMessage `json:"messages"`
		}{Room: room, Messages: make([]historyMessage, 0, len(msgs))}
		for _, m := range msgs {
			hm := historyMessage{ID: m.ID, Epoch: m.Epoch, Seq: m.Seq, Time: m.Time.UnixMilli()}
			switch {
			case json.Valid(m.Data):
				hm.Data = m.Data
			case utf8.Valid(m.Data):
				s := string(m.Data)
				hm.Text = &s
			default:
				hm.Binary = m.Data // encoding/json writes []byte as standard base64
			}
			out.Messages = append(out.Messages, hm)
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		_ = json.NewEncoder(w).Encode(out)
	})
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
