// Command htmx is a live page built with htmx and html/template, with no
// JavaScript of its own: the Go backend renders HTML fragments and
// publishes them into rooms, and htmx swaps them into every open page.
//
//	go run ./examples/htmx              # listens on 127.0.0.1:8080
//	go run ./examples/htmx -addr :9000  # or anywhere else
//
// Open http://127.0.0.1:8080 in two tabs. The page has two parts:
//
//   - Notifications. A form posts a line with hx-post to POST /notify,
//     which renders it as a list item and publishes it into the "feed"
//     room. Every page listens to that room over an event stream
//     (Server-Sent Events, htmx's SSE extension: hx-sse:connect="/ws?…").
//     htmx gets each payload as an unnamed event and swaps it in: the item
//     on top of the feed, and the total, which the same fragment carries
//     out of band (hx-swap-oob), replaced in the heading. The feed room
//     keeps its last 100 notifications for an hour, so a page that lost
//     its connection gets exactly what it missed when htmx reconnects with
//     Last-Event-ID; when that is impossible it gets a "+reset" event and
//     reloads. The same stream carries "N watching", which the server
//     publishes itself whenever a connection comes or goes.
//   - Chat. A raw-mode WebSocket (htmx's WebSocket extension:
//     hx-ws:connect, hx-ws:send) in the "chat" room. htmx sends the form
//     as JSON, {"text":"hi","headers":{…}}; WithOnMessage gets each frame
//     instead of publishing it, renders the line, and publishes the
//     fragment, which every page appends. Raw mode recovers nothing after
//     a reconnect, which is why the feed, which must not lose anything,
//     is an event stream.
//
// Whatever a person typed is escaped by html/template before it reaches a
// page. POST /notify answers htmx requests only (HX-Request: true, which a
// cross-site form cannot send) and refuses cross-origin requests
// (http.CrossOriginProtection); the Handler refuses cross-origin
// WebSockets and event streams by default.
//
// htmx 4.0.1 and its two extensions are served from copies embedded in
// the binary (static/, from the htmx.org npm package, 0BSD license), so
// the page needs no CDN; the end-to-end suite checks that they are the
// package's files, byte for byte.
//
// Ctrl-C (SIGINT) or SIGTERM shuts it down gracefully: the WebSocket gets
// 1001 "going away" and the event stream a "+close" event, and htmx
// reconnects both once a server is back.
package main

import (
	"bytes"
	"context"
	"embed"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"html/template"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/roomcast/pubsub"
)

// The rooms. page.html names them in its hx-sse:connect and hx-ws:connect
// URLs.
const (
	feedRoom     = "feed"     // notifications; kept for recovery
	watchingRoom = "watching" // how many connections listen to the feed
	chatRoom     = "chat"     // the chat lines
)

// maxText is the longest notification or chat line, in characters.
const maxText = 200

//go:embed page.html
var pageHTML string

// templates renders the page and every fragment (see page.html).
var templates = template.Must(template.New("page.html").Parse(pageHTML))

// static holds the vendored htmx files, served at /static/.
//
//go:embed static
var static embed.FS

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "address to listen on (port 0 picks a free one)")
	flag.Parse()

	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	context.AfterFunc(ctx, stop) // after the first signal, a second one kills at once

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		logger.Error("htmx: listen", "err", err)
		os.Exit(1)
	}
	// The first line names the address actually bound (useful with port
	// 0); scripts may parse it.
	host := displayHost(ln)
	fmt.Printf("htmx server listening on http://%s\n", host)
	fmt.Printf("open http://%s in two tabs\n", host)

	if err := serve(ctx, ln, newApp(logger)); err != nil {
		logger.Error("htmx: serve", "err", err)
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

// app is the example's backend: the Handler and the numbers it publishes.
type app struct {
	h   *pubsub.Handler
	log *slog.Logger

	// mu makes numbering and publishing one step, so that pages get the
	// numbers in order: two posts (or two connections) at once cannot
	// publish 8 after 9.
	mu    sync.Mutex
	total int // notifications posted since the server started
}

func newApp(logger *slog.Logger) *app {
	a := &app{log: logger}
	a.h = pubsub.NewHandler(
		pubsub.WithLogger(logger),
		pubsub.WithRoomOptions(func(room string, o *pubsub.RoomOptions) {
			if room == feedRoom {
				// Enough for a page that was away for a while to recover
				// exactly; a longer absence gets "+reset" (and reloads).
				o.HistorySize, o.HistoryTTL = 100, time.Hour
			}
		}),
		// Clients publish nothing themselves (the default): the feed is
		// published by POST /notify, chat lines by WithOnMessage.
		pubsub.WithOnMessage(a.chat),
		// Publishing from these hooks is safe: the Handler holds no lock
		// while it calls them. A new event stream has already joined its
		// rooms when OnConnect runs, so it gets its own count.
		pubsub.WithOnConnect(func(pubsub.ConnectEvent) { a.publishWatching() }),
		pubsub.WithOnDisconnect(func(pubsub.DisconnectEvent) { a.publishWatching() }),
	)
	return a
}

// newMux serves the page at /, the vendored htmx at /static/, the
// notification form at POST /notify and the Handler (WebSockets and event
// streams) at /ws.
func (a *app) newMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", a.servePage)
	mux.Handle("GET /static/", http.FileServerFS(static))
	// CrossOriginProtection refuses (403) a browser's cross-origin POST,
	// by its Sec-Fetch-Site or Origin header.
	mux.Handle("POST /notify", http.NewCrossOriginProtection().Handler(http.HandlerFunc(a.notify)))
	mux.Handle("/ws", a.h)
	return mux
}

// form is what the "post-form" template shows.
type form struct {
	Text    string // what was typed, kept after a refusal
	Error   string // why it was refused
	MaxText int
}

func (a *app) servePage(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	total := a.total
	a.mu.Unlock()
	a.write(w, http.StatusOK, "page", struct {
		Total   int
		MaxText int
		Form    form
	}{total, maxText, form{MaxText: maxText}})
}

// notify posts a notification: it answers htmx's hx-post with the form to
// show next, empty after a post, or with the text and the reason after a
// refusal (422, which htmx swaps too).
func (a *app) notify(w http.ResponseWriter, r *http.Request) {
	// A cross-site form cannot set this header, and a cross-site script
	// that tries needs a CORS preflight, which nothing here answers.
	if r.Header.Get("HX-Request") != "true" {
		http.Error(w, "POST /notify answers htmx requests only (HX-Request: true)", http.StatusForbidden)
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, 16<<10)
	if err := r.ParseForm(); err != nil {
		a.write(w, http.StatusBadRequest, "post-form", form{Error: "That could not be read; try a shorter text.", MaxText: maxText})
		return
	}
	text, problem := checkText(r.PostFormValue("text"))
	if problem != "" {
		a.write(w, http.StatusUnprocessableEntity, "post-form", form{Text: r.PostFormValue("text"), Error: problem, MaxText: maxText})
		return
	}
	if err := a.postNote(r.Context(), text); err != nil {
		a.log.Error("htmx: publishing a notification", "err", err)
		a.write(w, http.StatusServiceUnavailable, "post-form", form{Text: text, Error: "Could not post it; try again.", MaxText: maxText})
		return
	}
	a.write(w, http.StatusOK, "post-form", form{MaxText: maxText})
}

// postNote numbers a notification and publishes it into the feed room.
func (a *app) postNote(ctx context.Context, text string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := a.total + 1
	frag, err := render("note", struct {
		N    int
		Text string
		Time time.Time
	}{n, text, time.Now()})
	if err != nil {
		return err
	}
	if err := a.h.Publish(ctx, feedRoom, frag); err != nil {
		return err
	}
	a.total = n
	return nil
}

// errNotChat rejects a client message that is not a chat line: the
// Handler closes its connection with 1008 "message rejected".
var errNotChat = errors.New("htmx: not a chat line")

// chat handles every message a client sends, which in this app means a
// line from the chat box's WebSocket: htmx's WebSocket extension sends the
// form's values as JSON, {"text":"hi","headers":{…}}. A valid line is
// rendered and published into the chat room; an invalid one is answered
// to its sender only, with a fragment that shows why. Anything that is not
// htmx's JSON in the chat room (a binary frame, a wscat user typing plain
// text, a frame from another room) is rejected: a raw-mode connection is
// closed with 1008 "message rejected" (a protocol-mode "send" is answered
// with the "rejected" error code).
func (a *app) chat(ctx context.Context, m *pubsub.ClientMessage) error {
	var in struct {
		Text *string `json:"text"`
	}
	if m.Room != chatRoom || m.Binary || json.Unmarshal(m.Data, &in) != nil || in.Text == nil {
		return errNotChat
	}
	text, problem := checkText(*in.Text)
	if problem != "" {
		return a.reply(m, problem)
	}
	frag, err := render("chat-line", struct {
		Text string
		Time time.Time
	}{text, time.Now()})
	if err == nil {
		err = a.h.Publish(ctx, chatRoom, frag)
	}
	if err != nil {
		a.log.Error("htmx: publishing a chat line", "err", err)
		return a.reply(m, "Could not send it; try again.")
	}
	return nil
}

// reply shows problem under the sender's chat box.
func (a *app) reply(m *pubsub.ClientMessage, problem string) error {
	frag, err := render("chat-error", problem)
	if err != nil {
		return err
	}
	return m.Reply(frag)
}

// publishWatching publishes how many connections listen to the feed: on
// every connect and disconnect, so a page that just connected (or
// reconnected) always gets the current count.
func (a *app) publishWatching() {
	a.mu.Lock()
	defer a.mu.Unlock()
	frag, err := render("watching", len(a.h.Connections(feedRoom)))
	if err == nil {
		err = a.h.Publish(context.Background(), watchingRoom, frag)
	}
	if err != nil && !errors.Is(err, pubsub.ErrClosed) { // closed: shutting down
		a.log.Error("htmx: publishing the watcher count", "err", err)
	}
}

// checkText trims a typed line and says what is wrong with it, if
// anything: empty, too long, or not one line of text. Control characters
// are refused, line breaks included: a carriage return would also make the
// event stream send the fragment base64-encoded, as a named event, which
// htmx would not swap.
func checkText(s string) (text, problem string) {
	s = strings.TrimSpace(s)
	switch {
	case s == "":
		return "", "Write something first."
	case !utf8.ValidString(s):
		return "", "That is not valid text."
	case strings.ContainsFunc(s, unicode.IsControl):
		return "", "One line of text, please."
	case utf8.RuneCountInString(s) > maxText:
		return "", fmt.Sprintf("At most %d characters, please (that was %d).", maxText, utf8.RuneCountInString(s))
	}
	return s, ""
}

// render executes one of page.html's templates.
func render(name string, data any) ([]byte, error) {
	var b bytes.Buffer
	if err := templates.ExecuteTemplate(&b, name, data); err != nil {
		return nil, fmt.Errorf("htmx: rendering %s: %w", name, err)
	}
	return b.Bytes(), nil
}

// write answers with a rendered template as HTML.
func (a *app) write(w http.ResponseWriter, status int, name string, data any) {
	b, err := render(name, data)
	if err != nil {
		a.log.Error("htmx: rendering", "err", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

// shutdownTimeout bounds the whole graceful shutdown.
const shutdownTimeout = 10 * time.Second

// serve serves a on ln until ctx ends, then shuts down gracefully and
// returns. It closes a's Handler in every case.
func serve(ctx context.Context, ln net.Listener, a *app) error {
	srv := &http.Server{Handler: a.newMux(), ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	select {
	case err := <-served: // the listener failed
		return errors.Join(err, a.h.Close())
	case <-ctx.Done():
	}

	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	// Both are needed, in this order:
	//  1. srv.Shutdown closes the listener and waits for in-flight plain
	//     HTTP requests (page loads, posts). It does NOT close the
	//     WebSockets and event streams, which the Handler took over from
	//     net/http: they stay open, so what those requests publish still
	//     reaches them.
	//  2. a.h.Shutdown flushes what each connection has queued, ends it
	//     (WebSockets with 1001 "going away", event streams with a
	//     "+close" event), and waits for its goroutines to end.
	err := srv.Shutdown(sctx)
	err = errors.Join(err, a.h.Shutdown(sctx))
	if serr := <-served; !errors.Is(serr, http.ErrServerClosed) {
		err = errors.Join(err, serr)
	}
	return err
}
