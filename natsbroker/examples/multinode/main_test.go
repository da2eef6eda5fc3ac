package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/roomcast/pubsub/internal/leaktest"
	"github.com/roomcast/pubsub/natsbroker/internal/natstest"
	"github.com/roomcast/pubsub/pubsubtest"
)

var natsURL string

// TestMain runs the tests against an embedded nats-server with JetStream.
func TestMain(m *testing.M) {
	srv, err := natstest.Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, "the multinode example's tests need an embedded nats-server:", err)
		os.Exit(1)
	}
	natsURL = srv.URL
	code := m.Run()
	srv.Close()
	os.Exit(leaktest.After(code, "nats-io/nats.go", "nats-io/nats-server"))
}

// serve runs the example's nodes on free ports until the test ends, and
// returns their base URLs.
func serve(t *testing.T, nodes int) []string {
	t.Helper()
	var lns []net.Listener
	var urls []string
	for range nodes {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns = append(lns, ln)
		urls = append(urls, "http://"+ln.Addr().String())
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, natsURL, lns, pubsubtest.Logger()) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("run: %v", err)
			}
		case <-time.After(15 * time.Second):
			t.Error("run did not return after its context ended")
		}
	})
	return urls
}

func ws(base, path string) string { return "ws" + strings.TrimPrefix(base, "http") + path }

func TestNodesShareARoomItsHistoryAndItsMembers(t *testing.T) {
	nodes := serve(t, 2)
	// The example keeps its rooms in the default stream, which outlives a
	// run of the test (-count): a room of the run's own.
	room := fmt.Sprint("lobby-", time.Now().UnixNano())
	ann := pubsubtest.Dial(t, ws(nodes[0], "/ws"))
	ann.SubscribeWith(pubsubtest.Fields{"room": room, "presence": true, "info": map[string]string{"name": "ann"}})
	bob := pubsubtest.Dial(t, ws(nodes[1], "/ws"))
	bob.SubscribeWith(pubsubtest.Fields{"room": room, "info": map[string]string{"name": "bob"}})
	bob.Ack(pubsubtest.Fields{"type": "publish", "room": room, "data": map[string]string{"nick": "bob", "text": "hi from node 2"}})
	m := ann.Await("bob's message", func(e pubsubtest.Envelope) bool { return e.Type == "message" })
	if !strings.Contains(string(m.Data), "hi from node 2") || m.Seq != 1 {
		t.Fatalf("ann on node 1 got %s", m.Raw)
	}
	if p := ann.Request(pubsubtest.Fields{"type": "presence", "room": room}); p.Count == nil || *p.Count != 2 {
		t.Fatalf("presence on node 1: %s, want ann and bob", p.Raw)
	}
	// The history endpoint of either node serves the room's messages.
	resp, err := http.Get(nodes[0] + "/api/history?room=" + room)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var hist struct {
		Messages []struct {
			Seq  uint64          `json:"seq"`
			Data json.RawMessage `json:"data"`
		} `json:"messages"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&hist); err != nil {
		t.Fatal(err)
	}
	if len(hist.Messages) != 1 || !strings.Contains(string(hist.Messages[0].Data), "hi from node 2") {
		t.Fatalf("history on node 1: %+v", hist)
	}
	page, err := http.Get(nodes[1] + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(page.Body)
	page.Body.Close()
	if !strings.Contains(string(body), "/ws/roomcast.js") {
		t.Fatal("node 2 does not serve the chat page")
	}
}

func TestRunFailsWhenNATSIsNotThere(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	nobody, err := net.Listen("tcp", "127.0.0.1:0") // a port where no NATS answers
	if err != nil {
		t.Fatal(err)
	}
	addr := nobody.Addr().String()
	nobody.Close()
	err = run(context.Background(), "nats://"+addr, []net.Listener{ln}, pubsubtest.Logger())
	if err == nil || !strings.Contains(err.Error(), "nats-server -js") {
		t.Fatalf("run with no NATS: %v, want an error saying how to start one", err)
	}
}
