package main

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub"
)

// lines collects what the cli prints, a line at a time.
type lines chan string

func (l lines) Write(p []byte) (int, error) {
	for _, s := range strings.Split(strings.TrimRight(string(p), "\n"), "\n") {
		l <- s
	}
	return len(p), nil
}

// expect waits for a printed line containing want.
func (l lines) expect(t *testing.T, want string) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case s := <-l:
			if strings.Contains(s, want) {
				return
			}
		case <-timeout:
			t.Fatalf("the cli never printed %q", want)
		}
	}
}

func server(t *testing.T, opts ...pubsub.Option) (*pubsub.Handler, string) {
	t.Helper()
	h := pubsub.NewHandler(append([]pubsub.Option{pubsub.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil)))}, opts...)...)
	srv := httptest.NewServer(h)
	t.Cleanup(func() { h.Close(); srv.Close() })
	return h, "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws"
}

// start runs the cli until stdin closes; it returns stdin, the printed
// lines, and a channel with run's result.
func start(t *testing.T, cfg config) (*io.PipeWriter, lines, <-chan error) {
	t.Helper()
	in, stdin := io.Pipe()
	out := make(lines, 100)
	done := make(chan error, 1)
	go func() { done <- run(context.Background(), cfg, in, out) }()
	t.Cleanup(func() { stdin.Close() })
	return stdin, out, done
}

func TestRawModeSendsTypedLinesAndPrintsTheRoom(t *testing.T) {
	h, url := server(t, pubsub.WithClientPublish(true))
	stdin, out, done := start(t, config{url: url, room: "lobby", nick: "ann"})
	out.expect(t, "joined lobby in raw mode")

	other, _, err := websocket.Dial(context.Background(), url+"?room=lobby", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer other.CloseNow()
	waitFor(t, "both clients in the room", func() bool { return len(h.Connections("lobby")) == 2 })
	io.WriteString(stdin, "hello\n")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, b, err := other.Read(ctx); err != nil || string(b) != "ann: hello" {
		t.Fatalf("the room got %q, %v; want the typed line with the nick", b, err)
	}
	other.Write(ctx, websocket.MessageText, []byte("bob: hi ann"))
	out.expect(t, "bob: hi ann")

	stdin.Close()
	if err := <-done; err != nil {
		t.Fatalf("run after stdin closed: %v", err)
	}
}

func TestProtocolModeShowsHistoryPublishesJSONAndReportsRefusals(t *testing.T) {
	h, url := server(t, pubsub.WithClientPublish(true), pubsub.WithHistory(10, time.Minute))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Something to show first: the history is kept while nobody listens.
	if err := h.Publish(ctx, "lobby", []byte(`{"nick":"zoe","text":"earlier"}`)); err != nil {
		t.Fatal(err)
	}
	stdin, out, done := start(t, config{url: url, room: "lobby", nick: "ann", protocol: true, history: 5})
	out.expect(t, "zoe: earlier") // the history, shown first (the "joined" line may come before it)

	io.WriteString(stdin, "hello\n")
	out.expect(t, "ann: hello") // the room's copy of it, as everyone sees it
	msgs, err := h.History(ctx, "lobby", 1)
	if err != nil || len(msgs) != 1 {
		t.Fatalf("history %v, %v", msgs, err)
	}
	var got map[string]string
	if err := json.Unmarshal(msgs[0].Data, &got); err != nil || got["nick"] != "ann" || got["text"] != "hello" {
		t.Fatalf("published %s, want {nick, text} as the chat example expects", msgs[0].Data)
	}
	stdin.Close()
	if err := <-done; err != nil {
		t.Fatalf("run after stdin closed: %v", err)
	}
}

func TestProtocolModePrintsWhyAPublishWasRefused(t *testing.T) {
	_, url := server(t) // clients may not publish, like the ticker
	stdin, out, done := start(t, config{url: url, room: "ticker:BTC", protocol: true})
	out.expect(t, "joined ticker:BTC in protocol mode")
	io.WriteString(stdin, "buy\n")
	out.expect(t, "forbidden")
	stdin.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// waitFor polls server-side state that has no event to wait on.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	timeout := time.After(10 * time.Second)
	for !cond() {
		select {
		case <-tick.C:
		case <-timeout:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

var _ http.Handler = (*pubsub.Handler)(nil)
