// Command multinode runs two roomcast nodes (two Handlers on two ports)
// that share one Redis through redisbroker, and serves a chat page on
// each. Open one port in one tab and the other port in another: the
// messages, the history and the member list are the same on both, and
// each page says which node it is connected to.
//
//	redis-server --port 6379 &                     # any Redis 6.2 or later
//	go run ./examples/multinode                    # nodes on :8081 and :8082
//	go run ./examples/multinode -redis 127.0.0.1:6379 -ports 8081,8082,8083
//
// (from the redisbroker directory, which is its own Go module). Stop a
// node's process-mates with Ctrl-C; to watch recovery, run two copies of
// the program with one port each and kill one: its pages reconnect to it
// once it is back, or point them at the other port, and recover what
// they missed.
//
// The page uses the browser client the Handler serves at /ws/roomcast.js.
package main

import (
	"context"
	_ "embed"
	"errors"
	"flag"
	"fmt"
	"html/template"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/redisbroker"
)

//go:embed index.html
var indexHTML string

var page = template.Must(template.New("index").Parse(indexHTML))

func main() {
	redisAddr := flag.String("redis", "127.0.0.1:6379", "the Redis address every node uses")
	ports := flag.String("ports", "8081,8082", "comma-separated ports, one node each")
	host := flag.String("host", "127.0.0.1", "the interface to listen on")
	flag.Parse()

	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	rdb := redis.NewClient(&redis.Options{Addr: *redisAddr})
	defer rdb.Close()
	pingCtx, cancel := context.WithTimeout(ctx, 3*time.Second)
	err := rdb.Ping(pingCtx).Err()
	cancel()
	if err != nil {
		logger.Error("multinode: Redis is not reachable; start one (redis-server) or pass -redis", "addr", *redisAddr, "err", err)
		os.Exit(1)
	}

	var addrs []string
	for p := range strings.SplitSeq(*ports, ",") {
		addrs = append(addrs, net.JoinHostPort(*host, strings.TrimSpace(p)))
	}
	if err := run(ctx, rdb, addrs, logger); err != nil {
		logger.Error("multinode", "err", err)
		os.Exit(1)
	}
}

// run serves one node per address until ctx ends, then shuts them down.
func run(ctx context.Context, rdb redis.UniversalClient, addrs []string, logger *slog.Logger) error {
	var (
		nodes []*node
		srvs  []*http.Server
		lns   []net.Listener
	)
	for i, addr := range addrs {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return err
		}
		lns = append(lns, ln)
		n := newNode(rdb, fmt.Sprintf("node %d", i+1), addrs, logger)
		nodes = append(nodes, n)
		srvs = append(srvs, &http.Server{Handler: n, ReadHeaderTimeout: 10 * time.Second})
		fmt.Printf("%s: http://%s\n", n.name, ln.Addr())
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(srvs))
	for i, srv := range srvs {
		wg.Go(func() {
			if err := srv.Serve(lns[i]); !errors.Is(err, http.ErrServerClosed) {
				errs <- err
			}
		})
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errs:
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for i, n := range nodes {
		_ = srvs[i].Shutdown(shutdownCtx) // stops accepting; WebSockets are the Handler's
		_ = n.h.Shutdown(shutdownCtx)     // 1001 to every client, then closes the broker
	}
	wg.Wait()
	return err
}

// node is one roomcast node: a Handler on its own Redis broker, and the
// chat page.
type node struct {
	name  string
	addrs []string // every node's address, for the page's links
	h     *pubsub.Handler
	mux   *http.ServeMux
}

func newNode(rdb redis.UniversalClient, name string, addrs []string, logger *slog.Logger) *node {
	n := &node{name: name, addrs: addrs}
	n.h = pubsub.NewHandler(
		pubsub.WithBroker(redisbroker.New(rdb, redisbroker.WithLogger(logger))),
		pubsub.WithLogger(logger),
		pubsub.WithClientPublish(true),
		pubsub.WithHistory(100, 10*time.Minute),
	)
	n.mux = http.NewServeMux()
	n.mux.Handle("/ws", n.h)
	n.mux.Handle("/ws/", n.h) // the browser client: /ws/roomcast.js
	n.mux.HandleFunc("GET /{$}", n.index)
	return n
}

func (n *node) ServeHTTP(w http.ResponseWriter, r *http.Request) { n.mux.ServeHTTP(w, r) }

func (n *node) index(w http.ResponseWriter, r *http.Request) {
	type link struct{ Name, URL string }
	var others []link
	_, myPort, _ := net.SplitHostPort(r.Host)
	for i, a := range n.addrs {
		_, port, _ := net.SplitHostPort(a)
		if port == myPort {
			continue
		}
		host, _, err := net.SplitHostPort(r.Host)
		if err != nil {
			host = r.Host
		}
		others = append(others, link{fmt.Sprintf("node %d", i+1), "http://" + net.JoinHostPort(host, port) + "/"})
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	if err := page.Execute(w, map[string]any{"Node": n.name, "Others": others}); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
	}
}
