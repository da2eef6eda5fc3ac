// Command multinode runs two roomcast nodes (two Handlers on two ports,
// each with its own NATS connection and broker) that share one NATS
// JetStream through natsbroker, and serves the chat of examples/chat on
// each. Open one port in one tab and the other port in another: the
// messages, the history and the member list are the same on both.
//
//	nats-server -js &                              # nats-server 2.11 or later, with JetStream
//	go run ./examples/multinode                    # nodes on :8081 and :8082
//	go run ./examples/multinode -nats nats://127.0.0.1:4222 -ports 8081,8082,8083
//
// (from the natsbroker directory, which is its own Go module). To watch
// recovery, run two copies of the program with one port each and stop
// one: its pages reconnect to it once it is back, or point them at the
// other port, and recover what they missed. Stop nats-server for a moment:
// publishing fails (the page says so) and resumes when it is back; with
// JetStream's file storage (the default) the rooms and their history
// survive its restart.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/examples/chat/chatapp"
	"github.com/roomcast/pubsub/natsbroker"
)

func main() {
	natsURL := flag.String("nats", nats.DefaultURL, "the NATS server (or comma-separated servers of a cluster) every node uses")
	ports := flag.String("ports", "8081,8082", "comma-separated ports, one node each")
	host := flag.String("host", "127.0.0.1", "the interface to listen on")
	flag.Parse()

	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	context.AfterFunc(ctx, stop) // after the first signal, a second one kills at once

	var lns []net.Listener
	for p := range strings.SplitSeq(*ports, ",") {
		ln, err := net.Listen("tcp", net.JoinHostPort(*host, strings.TrimSpace(p)))
		if err != nil {
			logger.Error("multinode: listen", "err", err)
			os.Exit(1)
		}
		lns = append(lns, ln)
		fmt.Printf("node %d: http://%s/?nick=ann\n", len(lns), ln.Addr())
	}
	if err := run(ctx, *natsURL, lns, logger); err != nil {
		logger.Error("multinode", "err", err)
		os.Exit(1)
	}
}

// run serves one node per listener until ctx ends, then shuts them down.
func run(ctx context.Context, natsURL string, lns []net.Listener, logger *slog.Logger) error {
	var (
		nodes []*node
		err   error
	)
	for i := range lns {
		var n *node
		if n, err = newNode(ctx, natsURL, fmt.Sprint("node-", i+1), logger); err != nil {
			break
		}
		nodes = append(nodes, n)
	}
	if err != nil {
		for _, n := range nodes {
			n.close()
		}
		for _, ln := range lns {
			ln.Close()
		}
		return err
	}
	errs := make([]error, len(nodes))
	var wg sync.WaitGroup
	for i, n := range nodes {
		// Serve shuts the node's Handler down (1001 to every client, then
		// its broker closes) when ctx ends.
		wg.Go(func() { errs[i] = chatapp.Serve(ctx, lns[i], n.h) })
	}
	wg.Wait()
	for _, n := range nodes {
		n.close()
	}
	return errors.Join(errs...)
}

// node is one roomcast node: its own NATS connection, broker and Handler,
// as a separate process would have.
type node struct {
	nc *nats.Conn
	h  *pubsub.Handler
}

func newNode(ctx context.Context, url, name string, logger *slog.Logger) (*node, error) {
	nc, err := nats.Connect(url,
		nats.Name("roomcast "+name),
		nats.MaxReconnects(-1),    // keep trying while NATS restarts
		nats.ReconnectBufSize(-1), // a publish while disconnected fails now, never later
		nats.ReconnectWait(500*time.Millisecond),
	)
	if err != nil {
		return nil, fmt.Errorf("NATS is not reachable at %s (start one with `nats-server -js`, or pass -nats): %w", url, err)
	}
	b, err := natsbroker.New(ctx, nc, natsbroker.WithLogger(logger))
	if err != nil {
		nc.Close()
		return nil, err
	}
	h := pubsub.NewHandler(append(chatapp.Options(), pubsub.WithBroker(b), pubsub.WithLogger(logger.With("node", name)))...)
	return &node{nc: nc, h: h}, nil
}

// close closes the Handler (and so its broker), then the connection.
func (n *node) close() {
	n.h.Close()
	n.nc.Close()
}
