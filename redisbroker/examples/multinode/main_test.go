package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/redis/go-redis/v9"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/redisbroker/internal/redistest"
)

var redisAddr string

func TestMain(m *testing.M) {
	srv, err := redistest.Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, "the multinode example's tests need a real Redis:", err)
		os.Exit(1)
	}
	redisAddr = srv.Addr
	code := m.Run()
	srv.Close()
	os.Exit(code)
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// twoNodes starts the example's two nodes on Redis database db: the
// example uses the default key prefix, so each test takes a database of
// its own.
func twoNodes(t *testing.T, db int) (*httptest.Server, *httptest.Server) {
	t.Helper()
	rdb := redis.NewClient(&redis.Options{Addr: redisAddr, DB: db})
	t.Cleanup(func() { rdb.Close() })
	var srvs []*httptest.Server
	var nodes []*node
	for i := range 2 {
		n := newNode(rdb, fmt.Sprintf("node %d", i+1), nil, quiet)
		nodes = append(nodes, n)
		srvs = append(srvs, httptest.NewServer(n))
	}
	for i, n := range nodes {
		n.addrs = []string{srvs[0].Listener.Addr().String(), srvs[1].Listener.Addr().String()}
		t.Cleanup(func() { n.h.Close(); srvs[i].Close() })
	}
	return srvs[0], srvs[1]
}

func TestPageSaysWhichNodeItIsOnAndLinksTheOthers(t *testing.T) {
	t.Parallel()
	_, n2 := twoNodes(t, 1)
	resp, err := http.Get(n2.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{"You are on node 2", ">open node 1<", `from "/ws/roomcast.js"`, `const NODE = "node 2"`} {
		if !strings.Contains(string(body), want) {
			t.Errorf("the page lacks %q", want)
		}
	}
}

func TestNodesShareTheLobbyAndItsMembers(t *testing.T) {
	t.Parallel()
	n1, n2 := twoNodes(t, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dial := func(srv *httptest.Server) *websocket.Conn {
		c, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http")+"/ws", &websocket.DialOptions{Subprotocols: []string{protocol.Subprotocol}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.CloseNow() })
		return c
	}
	send := func(c *websocket.Conn, v string) {
		if err := c.Write(ctx, websocket.MessageText, []byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	// next reads envelopes until one of type typ arrives.
	next := func(c *websocket.Conn, typ string) map[string]any {
		for {
			_, b, err := c.Read(ctx)
			if err != nil {
				t.Fatalf("waiting for %s: %v", typ, err)
			}
			var e map[string]any
			if err := json.Unmarshal(b, &e); err != nil {
				t.Fatal(err)
			}
			if e["type"] == typ {
				return e
			}
		}
	}
	ann, bob := dial(n1), dial(n2)
	send(ann, `{"type":"subscribe","id":"1","room":"lobby","presence":true,"info":{"name":"ann"}}`)
	next(ann, "ack")
	send(bob, `{"type":"subscribe","id":"1","room":"lobby","info":{"name":"bob"}}`)
	next(bob, "ack")
	send(bob, `{"type":"publish","id":"2","room":"lobby","data":{"name":"bob","text":"hi from node 2"}}`)
	if m := next(ann, "message"); m["data"].(map[string]any)["text"] != "hi from node 2" {
		t.Fatalf("ann on node 1 got %v", m)
	}
	send(ann, `{"type":"presence","id":"3","room":"lobby"}`)
	if p := next(ann, "presence"); p["count"] != float64(2) {
		t.Fatalf("presence on node 1: %v, want ann and bob", p)
	}
}

func TestRunServesUntilCancelledThenShutsDown(t *testing.T) {
	t.Parallel()
	rdb := redis.NewClient(&redis.Options{Addr: redisAddr, DB: 3})
	defer rdb.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, rdb, []string{"127.0.0.1:0", "127.0.0.1:0"}, quiet) }()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run did not return after its context ended")
	}
}
