package main

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/examples/chat/chatapp"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

func TestMain(m *testing.M) { pubsubtest.Main(m) }

func newChat() *pubsub.Handler {
	return pubsub.NewHandler(append(chatapp.Options(), pubsub.WithLogger(pubsubtest.Logger()))...)
}

// get fetches path and returns the body, failing the test on anything but
// a 200.
func get(t *testing.T, client *http.Client, url string) string {
	t.Helper()
	resp, err := client.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: HTTP %d %s", url, resp.StatusCode, b)
	}
	return string(b)
}

func TestTheChatServesMetricsBesideTheWebSocketEndpoint(t *testing.T) {
	t.Parallel()
	h := newChat()
	srv := pubsubtest.Serve(t, h, newMux(h))
	client := &http.Client{Timeout: pubsubtest.Timeout}
	t.Cleanup(client.CloseIdleConnections)

	ann := srv.DialRaw("/ws") // the tutorial's first step: the lobby
	ann.Send("hi")
	ann.ExpectText("hi")
	srv.Dial("/ws").Subscribe("games")

	var body string
	pubsubtest.WaitFor(t, "the message counted as sent", func() bool {
		body = get(t, client, srv.URL+"/metrics")
		return strings.Contains(body, "\nroomcast_messages_sent_total 1\n")
	})
	for _, want := range []string{
		"roomcast_connections 2",
		"roomcast_messages_published_total 1",
		`roomcast_room_subscribers{room="lobby"} 1`,
		`roomcast_room_subscribers{room="games"} 1`,
		"roomcast_rooms_omitted 0",
		"go_goroutines ",
		"process_resident_memory_bytes ",
	} {
		if !strings.Contains(body, "\n"+want) {
			t.Errorf("/metrics has no line %q", want)
		}
	}
	// The chat itself is still there.
	if page := get(t, client, srv.URL+"/"); !strings.Contains(page, "<html") {
		t.Fatalf("GET /: %.80q, want the chat page", page)
	}
}

func TestServeClosesWebSocketsWithGoingAwayWhenItsContextEnds(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(pubsubtest.Context(t))
	served := make(chan error, 1)
	go func() { served <- serve(ctx, ln, newChat()) }()

	c := pubsubtest.DialRaw(t, "ws://"+ln.Addr().String()+"/ws?room=lobby")
	stop() // what SIGINT does in main
	c.ExpectClose(protocol.CloseGoingAway)
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("serve returned %v, want nil after a graceful shutdown", err)
		}
	case <-pubsubtest.Context(t).Done():
		t.Fatal("serve did not return after its context ended")
	}
}
