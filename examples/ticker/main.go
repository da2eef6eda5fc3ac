// Command ticker pushes live prices to browsers: a backend goroutine moves
// each symbol's price on a random walk and publishes every change into the
// symbol's room ("ticker:BTC", "ticker:ETH", …); a one-file web page
// subscribes to them with the browser client the Handler serves
// (/ws/roomcast.js) and shows a table that updates live.
//
//	go run ./examples/ticker              # listens on 127.0.0.1:8080
//	go run ./examples/ticker -addr :9000  # or anywhere else
//
// Clients only listen here: they may not publish (the default). The rooms
// use the SlowConsumerKeepLatest policy: a subscriber that falls behind
// (a phone on a bad network, a background tab) is not disconnected, and is
// not sent a backlog of stale prices either; each room keeps at most one
// message waiting per subscriber, the newest. Each room also keeps its
// last price, so a page that subscribes with history 1 shows every symbol
// at once instead of waiting for its next change.
//
// Raw-mode clients can watch one symbol with no library:
//
//	npx wscat -c 'ws://127.0.0.1:8080/ws?room=ticker:BTC&history=1'
//
// Ctrl-C (SIGINT) or SIGTERM stops the price feed first, then shuts the
// server down gracefully (close code 1001 "going away").
package main

import (
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/roomcast/pubsub"
)

//go:embed index.html
var indexHTML []byte

// roomPrefix names the rooms of the feed: roomPrefix + symbol.
const roomPrefix = "ticker:"

// symbol is one instrument of the feed and where its price starts.
type symbol struct {
	Name  string
	Start float64
}

// symbols is the feed, in the order the page lists it.
var symbols = []symbol{
	{"BTC", 64250}, {"ETH", 3420}, {"SOL", 148.5}, {"BNB", 585},
	{"XRP", 0.5240}, {"ADA", 0.4480}, {"DOGE", 0.1235}, {"DOT", 6.84},
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "address to listen on (port 0 picks a free one)")
	flag.Parse()

	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	context.AfterFunc(ctx, stop) // after the first signal, a second one kills at once

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		logger.Error("ticker: listen", "err", err)
		os.Exit(1)
	}
	// The first line names the address actually bound (useful with port
	// 0); scripts may parse it.
	host := displayHost(ln)
	fmt.Printf("ticker server listening on http://%s\n", host)
	fmt.Printf("open http://%s to watch %d symbols update live\n", host, len(symbols))
	fmt.Printf("or watch one from a terminal: wscat -c 'ws://%s/ws?room=%sBTC&history=1'\n", host, roomPrefix)

	if err := serve(ctx, ln, newHandler(logger)); err != nil {
		logger.Error("ticker: serve", "err", err)
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

// newHandler returns the ticker Handler. Clients may not publish (the
// default: only the feed does). The feed's rooms keep only the newest
// price waiting for a slow subscriber, keep the last price for new ones,
// and track no members: nobody needs to know who else is watching.
func newHandler(logger *slog.Logger) *pubsub.Handler {
	return pubsub.NewHandler(
		pubsub.WithLogger(logger),
		pubsub.WithRoomOptions(func(room string, o *pubsub.RoomOptions) {
			if strings.HasPrefix(room, roomPrefix) {
				o.SlowConsumer = pubsub.SlowConsumerKeepLatest
				o.HistorySize, o.HistoryTTL = 1, time.Hour
				o.Presence = pubsub.PresenceOff
			}
		}),
	)
}

// newMux serves the page at /, the list of symbols at /api/symbols, the
// WebSocket endpoint at /ws and the browser client at /ws/roomcast.js
// (the Handler is mounted below /ws/ too for that).
func newMux(h *pubsub.Handler) *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("/ws", h)
	mux.Handle("/ws/", h)
	mux.HandleFunc("GET /{$}", servePage)
	mux.HandleFunc("GET /api/symbols", serveSymbols)
	return mux
}

func servePage(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	_, _ = w.Write(indexHTML)
}

// serveSymbols answers the feed's symbols and their rooms, in order:
// [{"symbol":"BTC","room":"ticker:BTC"}, …].
func serveSymbols(w http.ResponseWriter, r *http.Request) {
	type entry struct {
		Symbol string `json:"symbol"`
		Room   string `json:"room"`
	}
	out := make([]entry, len(symbols))
	for i, s := range symbols {
		out[i] = entry{s.Name, roomPrefix + s.Name}
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(out)
}

// quote is what the feed publishes into a symbol's room, as JSON.
type quote struct {
	Symbol string  `json:"symbol"`
	Price  float64 `json:"price"`
	Open   float64 `json:"open"` // the price the feed started at, for the change
	Time   int64   `json:"time"` // milliseconds since the Unix epoch
}

// feed moves prices on a random walk and publishes them.
type feed struct {
	h       *pubsub.Handler
	rng     *rand.Rand
	minGap  time.Duration // between two rounds of changes, at least
	maxGap  time.Duration // and at most
	prices  []float64     // by index in symbols
	onRound func()        // called after each round; for tests
}

func newFeed(h *pubsub.Handler, seed uint64) *feed {
	f := &feed{
		h:      h,
		rng:    rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
		minGap: 50 * time.Millisecond,
		maxGap: 200 * time.Millisecond,
		prices: make([]float64, len(symbols)),
	}
	for i, s := range symbols {
		f.prices[i] = s.Start
	}
	return f
}

// run publishes until ctx ends: every 50 to 200 ms, about half of the
// symbols move by a small random step, and each move is published to the
// symbol's room. It returns when ctx ends, or with the first Publish
// error other than one caused by the ending (the Handler closing).
func (f *feed) run(ctx context.Context) error {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		for i, s := range symbols {
			if f.rng.IntN(2) == 0 {
				continue
			}
			f.prices[i] = step(f.prices[i], f.rng.NormFloat64())
			b, _ := json.Marshal(quote{Symbol: s.Name, Price: f.prices[i], Open: s.Start, Time: time.Now().UnixMilli()})
			if err := f.h.Publish(ctx, roomPrefix+s.Name, b); err != nil {
				if ctx.Err() != nil || errors.Is(err, pubsub.ErrClosed) {
					return nil
				}
				return err
			}
		}
		if f.onRound != nil {
			f.onRound()
		}
		t.Reset(f.minGap + time.Duration(f.rng.Int64N(int64(f.maxGap-f.minGap)+1)))
	}
}

// step moves price by a geometric random step of about 0.04% (z is a
// standard normal draw) and rounds it to 4 significant decimals below 10,
// 2 above: it never reaches zero or goes negative.
func step(price, z float64) float64 {
	p := price * math.Exp(0.0004*z)
	scale := 100.0
	if p < 10 {
		scale = 10000
	}
	if r := math.Round(p*scale) / scale; r > 0 {
		return r
	}
	return p
}

// shutdownTimeout bounds the whole graceful shutdown.
const shutdownTimeout = 10 * time.Second

// serve runs the price feed and serves h on ln until ctx ends, then stops
// the feed, shuts down gracefully and returns. It closes h in every case,
// and returns only once the feed's goroutine has ended. A feed that fails
// (Publish refused its quotes) ends the server too: a ticker whose prices
// froze is worse than one that is visibly down.
func serve(ctx context.Context, ln net.Listener, h *pubsub.Handler) error {
	feedCtx, stopFeed := context.WithCancel(ctx)
	defer stopFeed()
	var wg sync.WaitGroup
	fed := make(chan error, 1)
	wg.Go(func() { fed <- newFeed(h, uint64(time.Now().UnixNano())).run(feedCtx) })

	srv := &http.Server{Handler: newMux(h), ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	var err error
	select {
	case err = <-served: // the listener failed
		stopFeed()
		wg.Wait()
		return errors.Join(err, h.Close())
	case ferr := <-fed: // nil when ctx ended: then so did ctx.Done
		if ferr != nil {
			err = fmt.Errorf("ticker: the price feed failed: %w", ferr)
		}
	case <-ctx.Done():
	}

	// The feed first: nothing is published once the Handler shuts down.
	stopFeed()
	wg.Wait()
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	// Both are needed, in this order:
	//  1. srv.Shutdown closes the listener and waits for in-flight plain
	//     HTTP requests (page loads). It does NOT close hijacked
	//     connections, and every WebSocket is one: they stay open.
	//  2. h.Shutdown flushes what each connection has queued, closes it
	//     with 1001 "going away", and waits for its goroutines to end.
	err = errors.Join(err, srv.Shutdown(sctx), h.Shutdown(sctx))
	if serr := <-served; !errors.Is(serr, http.ErrServerClosed) {
		err = errors.Join(err, serr)
	}
	return err
}
