// Package chatapp is the chat of examples/chat as a package: its Handler
// options, its page and history endpoint, and a graceful serve loop, so the
// same chat runs on any broker. examples/chat runs it in one process;
// pgbroker/examples/chat runs it on PostgreSQL, natsbroker's and
// redisbroker's multi-node examples on their engines.
package chatapp

import (
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/roomcast/pubsub"
)

//go:embed index.html
var indexHTML []byte

// Each room keeps this many of its latest messages, each for at most
// HistoryTTL: what a page shows when it joins, and what a client that
// reconnects can recover.
const (
	HistorySize = 100
	HistoryTTL  = time.Hour
)

// Options are the chat's Handler options. Clients may publish into any
// room; rooms keep their recent history and track their members. Append a
// WithBroker (and anything else) to run the chat on another engine.
func Options() []pubsub.Option {
	return []pubsub.Option{
		// Clients only listen by default; a chat lets them talk. The default
		// rate limit (20 messages a second, burst 50) still applies.
		pubsub.WithClientPublish(true),
		pubsub.WithHistory(HistorySize, HistoryTTL),
		// The default, spelled out: members are listed, with join and leave
		// events for the subscribers that ask for them.
		pubsub.WithPresence(pubsub.PresenceOn),
		// A tutorial's first step, `wscat -c ws://127.0.0.1:8080/ws`, names
		// no room: it joins the lobby, where the page starts.
		pubsub.WithDefaultRoom("lobby"),
	}
}

// Mux serves the page at /, the WebSocket endpoint at /ws, the browser
// client at /ws/roomcast.js (so the Handler is mounted below /ws/ too,
// which also lets raw clients name the room as /ws/lobby), and the rooms'
// history at /api/history.
func Mux(h *pubsub.Handler) *http.ServeMux {
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
			if err != nil || n < 1 || n > HistorySize {
				http.Error(w, fmt.Sprintf("limit must be a number from 1 to %d", HistorySize), http.StatusBadRequest)
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

// Serve serves the chat (Mux) of h on ln until ctx ends, then shuts down
// gracefully and returns. It closes h in every case.
func Serve(ctx context.Context, ln net.Listener, h *pubsub.Handler) error {
	srv := &http.Server{Handler: Mux(h), ReadHeaderTimeout: 10 * time.Second}
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
