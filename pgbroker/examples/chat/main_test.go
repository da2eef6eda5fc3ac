package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/roomcast/pubsub/examples/chat/chatapp"
	"github.com/roomcast/pubsub/internal/leaktest"
	"github.com/roomcast/pubsub/pgbroker/internal/pgtest"
	"github.com/roomcast/pubsub/pubsubtest"
)

var db *pgtest.Server

var schemas atomic.Int64

// schema names a schema of the test's own, across -count runs too.
func schema(name string) string { return fmt.Sprintf("%s_%d", name, schemas.Add(1)) }

func TestMain(m *testing.M) {
	srv, err := pgtest.Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, "the chat's tests need a real PostgreSQL:", err)
		os.Exit(1)
	}
	db = srv
	code := m.Run()
	srv.Close()
	os.Exit(leaktest.After(code, "jackc/pgx", "jackc/puddle"))
}

// startChat serves the chat on schema of the test database, as main does;
// it is closed at cleanup, the pool after the Handler.
func startChat(t *testing.T, schema string) *pubsubtest.Server {
	t.Helper()
	h, pool, err := newHandler(pubsubtest.Context(t), pubsubtest.Logger(), db.DSN, schema, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pubsubtest.Serve(t, h, chatapp.Mux(h))
}

// Two chat servers on one database are one chat: a line said on one
// reaches the raw-mode clients of both.
func TestTwoServersOnOneDatabaseAreOneChat(t *testing.T) {
	t.Parallel()
	s := schema("two_servers")
	a, b := startChat(t, s), startChat(t, s)
	ann, bob := a.DialRaw("/ws?room=lobby"), b.DialRaw("/ws?room=lobby")
	a.Publish("lobby", []byte("warm-up")) // both are subscribed once they hear it
	ann.ExpectText("warm-up")
	bob.ExpectText("warm-up")
	ann.Send("hello from server a")
	bob.ExpectText("hello from server a")
	ann.ExpectText("hello from server a")
}

// The chat server restarts: a client that comes back with its position
// recovers exactly what it missed, and the history endpoint still has the
// room's messages; the database keeps every one of them.
func TestRestartedServerRecoversExactly(t *testing.T) {
	t.Parallel()
	s := schema("restarted")
	first := startChat(t, s)
	c := first.Dial("/ws")
	ack := c.Subscribe("lobby")
	for _, line := range []string{"one", "two", "three"} {
		first.Publish("lobby", []byte(line))
	}
	c.Messages("lobby", 3)
	c.CloseNow()
	if err := first.Shutdown(pubsubtest.Context(t)); err != nil {
		t.Fatal(err)
	}

	second := startChat(t, s)
	second.Publish("lobby", []byte("four"))
	second.Publish("lobby", []byte("five"))
	again := second.Dial("/ws")
	ack2 := again.SubscribeWith(pubsubtest.Fields{"room": "lobby", "since": pubsubtest.Fields{"epoch": ack.Epoch, "seq": 3}})
	if ack2.Recovered == nil || !*ack2.Recovered || ack2.Missed == nil || *ack2.Missed != 2 || ack2.Epoch != ack.Epoch {
		t.Fatalf("resubscribe after the restart: %s, want recovered with 2 missed in epoch %s", ack2.Raw, ack.Epoch)
	}
	for i, want := range []string{"four", "five"} {
		if m := again.NextMessage("lobby"); string(m.Payload()) != want || m.Seq != uint64(4+i) {
			t.Fatalf("recovered %s, want %q at seq %d", m.Raw, want, 4+i)
		}
	}

	resp, err := http.Get(second.URL + "/api/history?room=lobby")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var hist struct {
		Messages []struct {
			Seq  uint64  `json:"seq"`
			Text *string `json:"text"`
		} `json:"messages"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&hist); err != nil || len(hist.Messages) != 5 || *hist.Messages[4].Text != "five" {
		t.Fatalf("GET /api/history after the restart: %+v, %v; want the 5 messages", hist, err)
	}

	pool, err := pgxpool.New(context.Background(), db.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	var kept int
	if err := pool.QueryRow(pubsubtest.Context(t), `SELECT count(*) FROM `+s+`.history WHERE room = 'lobby'`).Scan(&kept); err != nil || kept != 5 {
		t.Fatalf("the archive holds %d messages, %v; want 5", kept, err)
	}
}
