package pubsub_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// Presence, end to end: who is in a room, across tabs and anonymous
// connections; join and leave events for the subscribers that ask;
// presence requests and Handler.Presence; the counts-only and off modes.

// events describes join and leave envelopes compactly, for comparison.
func events(es []pubsubtest.Envelope) []string {
	out := make([]string, 0, len(es))
	for _, e := range es {
		out = append(out, strings.TrimSpace(fmt.Sprintf("%s %s %s", e.Type, e.ConnID, e.UserID)))
	}
	return out
}

func event(typ string, p *pubsubtest.Conn) string {
	return strings.TrimSpace(fmt.Sprintf("%s %s %s", typ, p.Welcome.ConnID, p.Welcome.UserID))
}

func compactJSON(t *testing.T, b []byte) string {
	t.Helper()
	if len(b) == 0 {
		return ""
	}
	var out bytes.Buffer
	if err := json.Compact(&out, b); err != nil {
		t.Fatalf("invalid JSON %q: %v", b, err)
	}
	return out.String()
}

func TestPresenceEventsGoOnlyToSubscribersThatAskedForThem(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	const room = "lobby"
	raw := srv.DialRaw("/ws?room=" + room) // a member, never told of others

	watcher := srv.Dial("/ws")
	if f := watcher.SubscribeWith(pubsubtest.Fields{"room": room, "presence": true}); f.Presence != "on" {
		t.Fatalf("ack presence %q, want on", f.Presence)
	}
	quiet := srv.Dial("/ws")
	quiet.SubscribeWith(pubsubtest.Fields{"room": room})
	joiner := srv.Dial("/ws")
	joiner.SubscribeWith(pubsubtest.Fields{"room": room, "presence": true})
	joiner.Ack(pubsubtest.Fields{"type": "unsubscribe", "room": room})

	m := publishMarker(srv, room)
	// The watcher's own join comes first: it is a member too.
	want := []string{event("join", watcher), event("join", quiet), event("join", joiner), event("leave", joiner)}
	if got := events(readUntilMarker(watcher, room, m)); !slices.Equal(got, want) {
		t.Fatalf("watcher got %q, want %q", got, want)
	}
	if got := readUntilMarker(quiet, room, m); len(got) != 0 {
		t.Fatalf("a subscriber that did not ask for presence got %s", got[0])
	}
	raw.ExpectText(m) // raw clients get payloads only

	if p, err := srv.Presence(pubsubtest.Context(t), room); err != nil || p.Count != 3 || p.Connections != 3 {
		t.Fatalf("h.Presence = %+v, %v; want the raw client, the watcher and the quiet one", p, err)
	}
}

func TestPresenceCountsAUserWithManyTabsAsOneMember(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, headerAuth())
	const room = "doc"
	watcher := srv.Dial("/ws")
	watcher.SubscribeWith(pubsubtest.Fields{"room": room, "presence": true})
	if got := events([]pubsubtest.Envelope{watcher.Next()}); !slices.Equal(got, []string{event("join", watcher)}) {
		t.Fatalf("watcher's first event %q, want its own join", got)
	}

	tab1 := srv.Dial("/ws", asUser("ann"))
	tab1.SubscribeWith(pubsubtest.Fields{"room": room})
	tab2 := srv.Dial("/ws", asUser("ann"))
	tab2.SubscribeWith(pubsubtest.Fields{"room": room})
	m := publishMarker(srv, room)
	if got, want := events(readUntilMarker(watcher, room, m)), []string{event("join", tab1)}; !slices.Equal(got, want) {
		t.Fatalf("after two tabs of ann joined the watcher got %q, want only %q", got, want)
	}

	reply := watcher.Request(pubsubtest.Fields{"type": "presence", "room": room})
	annConns := []string{tab1.Welcome.ConnID, tab2.Welcome.ConnID}
	slices.Sort(annConns)
	if reply.Type != "presence" || reply.Room != room || reply.Count == nil || *reply.Count != 2 || *reply.Connections != 3 || len(reply.Members) != 2 {
		t.Fatalf("presence reply %s: want count 2, connections 3, two members", reply)
	}
	members := reply.Members
	if members[0].UserID != "" || !slices.Equal(members[0].Conns, []string{watcher.Welcome.ConnID}) ||
		members[1].UserID != "ann" || !slices.Equal(members[1].Conns, annConns) {
		t.Fatalf("members %+v: want the anonymous watcher, then ann with conns %v (sorted)", members, annConns)
	}
	p, err := srv.Presence(pubsubtest.Context(t), room)
	if err != nil || p.Count != 2 || p.Connections != 3 || len(p.Members) != 2 ||
		!slices.Equal(p.Members[1].Conns, annConns) || p.Members[1].UserID != "ann" {
		t.Fatalf("h.Presence = %+v, %v; want what the presence reply said", p, err)
	}

	tab1.Ack(pubsubtest.Fields{"type": "unsubscribe", "room": room}) // ann still has tab2
	m = publishMarker(srv, room)
	if got := readUntilMarker(watcher, room, m); len(got) != 0 {
		t.Fatalf("one of ann's two tabs left and the watcher got %s, want nothing", got[0])
	}
	tab2.CloseNow() // the last tab goes away
	leave := watcher.Next()
	if got, want := events([]pubsubtest.Envelope{leave}), []string{event("leave", tab2)}; !slices.Equal(got, want) || leave.Room != room {
		t.Fatalf("after ann's last tab closed the watcher got %s, want %q", leave, want)
	}
	if p, _ := srv.Presence(pubsubtest.Context(t), room); p.Count != 1 || p.Connections != 1 {
		t.Fatalf("h.Presence after ann left = %+v, want 1 member, 1 connection", p)
	}
}

func TestPresenceCountsEachAnonymousConnectionAsItsOwnMember(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	const room = "anon"
	watcher := srv.Dial("/ws")
	watcher.SubscribeWith(pubsubtest.Fields{"room": room, "presence": true})
	a := srv.Dial("/ws")
	a.SubscribeWith(pubsubtest.Fields{"room": room})
	b := srv.Dial("/ws")
	b.SubscribeWith(pubsubtest.Fields{"room": room})
	m := publishMarker(srv, room)
	want := []string{event("join", watcher), event("join", a), event("join", b)}
	if got := events(readUntilMarker(watcher, room, m)); !slices.Equal(got, want) {
		t.Fatalf("watcher got %q, want %q", got, want)
	}
	p, err := srv.Presence(pubsubtest.Context(t), room)
	if err != nil || p.Count != 3 || p.Connections != 3 || len(p.Members) != 3 {
		t.Fatalf("h.Presence = %+v, %v; want 3 members of one connection each", p, err)
	}
	for _, mem := range p.Members {
		if mem.UserID != "" || len(mem.Conns) != 1 {
			t.Fatalf("member %+v: want anonymous with one connection", mem)
		}
	}
}

func TestPresenceInfoComesFromTheClientUnlessTheServerSetsIt(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, headerAuth())
	const room = "info"
	watcher := srv.Dial("/ws")
	watcher.SubscribeWith(pubsubtest.Fields{"room": room, "presence": true, "info": map[string]string{"name": "watcher"}})
	ann := srv.Dial("/ws", pubsubtest.Header(http.Header{"X-User": {"ann"}, "X-Info": {`{"name": "Ann"}`}}))
	ann.SubscribeWith(pubsubtest.Fields{"room": room, "info": map[string]string{"name": "Mallory"}})
	bob := srv.Dial("/ws", asUser("bob"))
	bob.SubscribeWith(pubsubtest.Fields{"room": room, "info": map[string]string{"name": "Bob"}})

	m := publishMarker(srv, room)
	evs := readUntilMarker(watcher, room, m)
	if len(evs) != 3 {
		t.Fatalf("watcher got %d events, want 3 joins", len(evs))
	}
	for i, want := range []string{`{"name":"watcher"}`, `{"name":"Ann"}`, `{"name":"Bob"}`} {
		if got := compactJSON(t, evs[i].Info); got != want {
			t.Errorf("join %d (%s) carries info %s, want %s", i, evs[i], got, want)
		}
	}

	reply := watcher.Request(pubsubtest.Fields{"type": "presence", "room": room})
	members := reply.Members
	wantInfo := map[string]string{"": `{"name":"watcher"}`, "ann": `{"name":"Ann"}`, "bob": `{"name":"Bob"}`}
	if len(members) != 3 {
		t.Fatalf("presence reply %s: want 3 members", reply)
	}
	for _, mem := range members {
		if got := compactJSON(t, mem.Info); got != wantInfo[mem.UserID] {
			t.Errorf("member %q has info %s, want %s", mem.UserID, got, wantInfo[mem.UserID])
		}
	}
	p, _ := srv.Presence(pubsubtest.Context(t), room)
	for _, mem := range p.Members {
		if got := compactJSON(t, mem.Info); got != wantInfo[mem.UserID] {
			t.Errorf("h.Presence member %q has info %s, want %s", mem.UserID, got, wantInfo[mem.UserID])
		}
	}
}

func TestPresenceCountsRoomSendsNoEventsAndListsOnlyCounts(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithRoomOptions(func(room string, o *pubsub.RoomOptions) {
		if room == "stadium" {
			o.Presence = pubsub.PresenceCounts
		}
	}))
	const room = "stadium"
	a := srv.Dial("/ws")
	if f := a.SubscribeWith(pubsubtest.Fields{"room": room, "presence": true}); f.Presence != "counts" {
		t.Fatalf("ack presence %q, want counts", f.Presence)
	}
	b := srv.Dial("/ws")
	b.SubscribeWith(pubsubtest.Fields{"room": room, "presence": true})
	b.Ack(pubsubtest.Fields{"type": "unsubscribe", "room": room})
	c := srv.Dial("/ws")
	c.SubscribeWith(pubsubtest.Fields{"room": room})
	m := publishMarker(srv, room)
	if got := readUntilMarker(a, room, m); len(got) != 0 {
		t.Fatalf("a counts-only room sent %s", got[0])
	}
	reply := a.Request(pubsubtest.Fields{"type": "presence", "room": room})
	if reply.Type != "presence" || reply.Count == nil || *reply.Count != 2 || reply.Connections == nil || *reply.Connections != 2 || reply.Members != nil {
		t.Fatalf("presence reply %s: want count 2, connections 2 and no members", reply)
	}
	if p, err := srv.Presence(pubsubtest.Context(t), room); err != nil || p.Count != 2 || p.Connections != 2 || p.Members != nil {
		t.Fatalf("h.Presence = %+v, %v; want counts 2/2 and no members", p, err)
	}
}

func TestPresenceOffRoomTracksNothing(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithPresence(pubsub.PresenceOff))
	const room = "dark"
	a := srv.Dial("/ws")
	if f := a.SubscribeWith(pubsubtest.Fields{"room": room, "presence": true}); f.Presence != "off" {
		t.Fatalf("ack presence %q, want off", f.Presence)
	}
	b := srv.Dial("/ws")
	b.SubscribeWith(pubsubtest.Fields{"room": room})
	m := publishMarker(srv, room)
	if got := readUntilMarker(a, room, m); len(got) != 0 {
		t.Fatalf("a presence-off room sent %s", got[0])
	}
	a.Error(pubsubtest.Fields{"type": "presence", "room": room}, protocol.CodeNotSupported)
	if p, err := srv.Presence(pubsubtest.Context(t), room); err != nil || p.Count != 0 || p.Connections != 0 || p.Members != nil {
		t.Fatalf("h.Presence = %+v, %v; want the zero Presence", p, err)
	}
}

func TestPresenceRequestNeedsASubscription(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	a := srv.Dial("/ws")
	b := srv.Dial("/ws")
	b.Subscribe("room")
	a.Error(pubsubtest.Fields{"type": "presence", "room": "room"}, protocol.CodeNotSubscribed)
}
