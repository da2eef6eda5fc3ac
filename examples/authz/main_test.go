package main

import (
	"net/http"
	"strings"
	"testing"

	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// TestMain fails the run if a connection or server outlives the tests.
func TestMain(m *testing.M) { pubsubtest.Main(m) }

// start serves the whole app, as in production, on a loopback port.
func start(t *testing.T) *pubsubtest.Server {
	app, ps := newApp()
	return pubsubtest.Serve(t, ps, app)
}

func TestAClientWithoutAValidTokenIsRefusedBeforeTheUpgrade(t *testing.T) {
	t.Parallel()
	srv := start(t)
	srv.Refused("/ws", http.StatusUnauthorized)
	srv.Refused("/ws?token=mallory", http.StatusUnauthorized)
}

func TestUsersReadAndWriteTheirOwnTeamRoomOnly(t *testing.T) {
	t.Parallel()
	srv := start(t)
	ann, bob, carol := srv.Dial("/ws?token=ann"), srv.Dial("/ws?token=bob"), srv.Dial("/ws?token=carol")
	ann.Subscribe("team:red")
	bob.Subscribe("team:red")
	carol.Error(pubsubtest.Fields{"type": "subscribe", "room": "team:red"}, protocol.CodeForbidden)
	carol.Error(pubsubtest.Fields{"type": "publish", "room": "team:red", "text": "let me in"}, protocol.CodeForbidden)

	ann.Publish("team:red", "hi team")
	for _, c := range []*pubsubtest.Conn{ann, bob} {
		if m := c.NextMessage("team:red"); string(m.Payload()) != "hi team" {
			t.Fatalf("got %s, want ann's message", m)
		}
	}
}

func TestEveryoneReadsTheNewsButOnlyAdminsWriteIt(t *testing.T) {
	t.Parallel()
	srv := start(t)
	ann := srv.Dial("/ws?token=ann")
	ann.Subscribe("news")
	ann.Error(pubsubtest.Fields{"type": "publish", "room": "news", "text": "fake news"}, protocol.CodeForbidden)

	// A raw client (no library, like a bare browser WebSocket) is held to
	// the same rules: it may listen, not publish.
	raw := srv.DialRaw("/ws?room=news&token=bob")
	pubsubtest.WaitFor(t, "both subscribers", func() bool { return len(srv.Connections("news")) == 2 })

	for token, want := range map[string]int{"ann": http.StatusForbidden, "carol": http.StatusNoContent} {
		resp, err := http.Post(srv.URL+"/news?token="+token, "text/plain", strings.NewReader("release at 5"))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Fatalf("POST /news as %s: %d, want %d", token, resp.StatusCode, want)
		}
	}
	if m := ann.NextMessage("news"); string(m.Payload()) != "release at 5" {
		t.Fatalf("ann got %s, want the admin's news", m)
	}
	raw.ExpectText("release at 5")
	raw.Send("me too")
	raw.ExpectClose(protocol.ClosePolicyViolation)
}

func TestARawClientCannotJoinAnotherTeamsRoom(t *testing.T) {
	t.Parallel()
	srv := start(t)
	srv.Refused("/ws?room=team:blue&token=ann", http.StatusForbidden)
}
