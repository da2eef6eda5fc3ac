package natsbroker_test

import (
	"fmt"
	"testing"

	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// A node cut off from NATS while the room goes on: its subscribers either
// get every message they missed, in order, on the same subscription, or
// are closed with 4006 before anything past the hole, and told on their
// resubscribe what they cannot recover. Never a silent gap.
//
// Three nodes share one NATS; node C reaches it through a proxy that the
// test cuts (connections dropped), or blackholes (bytes lost while the
// connections stay open, found out by the client's pings), while nodes A
// and B publish. Every room keeps 100 messages.
func TestANodeCutOffFromNATSNeverSkipsSilently(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name     string
		missed   int
		drop     bool // blackhole instead of cutting the connections
		recovers bool
	}{
		{"cut for fewer messages than history keeps", 40, false, true},
		{"cut for more messages than history keeps", 150, false, false},
		{"blackholed for fewer messages than history keeps", 40, true, true},
		{"blackholed for more messages than history keeps", 150, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := uniquePrefix()
			a := startNode(t, shared.URL, p, nil)
			b := startNode(t, shared.URL, p, nil)
			proxy := startProxy(t, shared.Addr)
			c := startNodeOn(t, proxied(t, proxy), p, nil)

			sub := c.Dial(as(""))
			ack := sub.Subscribe("room")
			publishAlternately(t, "room", 1, 46, a, b)
			checkSeqs(t, sub.Messages("room", 46), ack.Epoch, 1, numbered(1, 46)...)

			if tc.drop {
				proxy.Drop()
			} else {
				proxy.Cut()
			}
			publishAlternately(t, "room", 47, 46+tc.missed, a, b)
			proxy.Heal()
			last := 46 + tc.missed + 1
			a.Publish("room", fmt.Append(nil, last))

			if tc.recovers {
				// The same subscription goes on, with every missed message.
				checkSeqs(t, sub.Messages("room", last-46), ack.Epoch, 47, numbered(47, last)...)
				return
			}
			// The close comes before any message past the hole: the
			// subscriber's last position stays 46.
			sub.ExpectCloseNext(protocol.CloseRoomReset)
			again := c.Dial(as(""))
			ack2 := again.SubscribeWith(pubsubtest.Fields{"room": "room", "since": since(ack.Epoch, 46)})
			if ack2.Recovered == nil || *ack2.Recovered || ack2.Reason != protocol.ReasonHistoryTooShort {
				t.Fatalf("resubscribe from seq 46 after %d were published and 100 are kept: %s, want recovered false, reason history_too_short", tc.missed, ack2.Raw)
			}
			a.Publish("room", []byte("next"))
			if got := again.NextMessage("room"); string(got.Payload()) != "next" || got.Seq != ack2.Seq+1 {
				t.Fatalf("after the reset the resubscribed client got %s, want the next message", got.Raw)
			}
		})
	}
}

// A node whose link to NATS lags (the proxy holds every byte for a while)
// delivers late but whole: its subscriber gets every message on the same
// subscription, and a client that subscribes on it during the lag, whose
// history read overtakes the lagging live stream, gets history then live
// with no gap and no repeat.
func TestANodeWhoseNATSLinkLagsDeliversEverythingOnce(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	a := startNode(t, shared.URL, p, nil)
	proxy := startProxy(t, shared.Addr)
	c := startNodeOn(t, proxied(t, proxy), p, nil)
	sub := c.Dial(as(""))
	ack := sub.Subscribe("room")
	publishAlternately(t, "room", 1, 10, a)
	checkSeqs(t, sub.Messages("room", 10), ack.Epoch, 1, numbered(1, 10)...)

	proxy.Stall()
	publishAlternately(t, "room", 11, 160, a)
	late := c.Dial(as(""))
	late.Send(pubsubtest.Fields{"type": "subscribe", "id": "late", "room": "room", "history": 100})
	proxy.Heal()
	ack2 := late.Reply("late")
	if ack2.Type != "ack" || ack2.Seq != 160 || *ack2.Missed != 100 {
		t.Fatalf("subscribe with history 100 during the lag: %s, want seq 160 and 100 missed", ack2.Raw)
	}
	a.Publish("room", []byte("161"))
	checkSeqs(t, sub.Messages("room", 151), ack.Epoch, 11, numbered(11, 161)...)
	checkSeqs(t, late.Messages("room", 101), ack.Epoch, 61, numbered(61, 161)...)
}

// publishAlternately publishes the numbers from..to into room, in turn on
// each node.
func publishAlternately(t *testing.T, room string, from, to int, nodes ...*node) {
	t.Helper()
	for i := from; i <= to; i++ {
		nodes[i%len(nodes)].Publish(room, fmt.Append(nil, i))
	}
}

// Presence changes a node missed while cut off are announced once it is
// back: it reads the room's entries again and tells its subscribers who
// joined and who left meanwhile.
func TestPresenceChangesMissedDuringACutAreAnnouncedAfter(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	a := startNode(t, shared.URL, p, nil)
	proxy := startProxy(t, shared.Addr)
	c := startNodeOn(t, proxied(t, proxy), p, nil)
	watcher := c.Dial(as("watcher"))
	watcher.SubscribeWith(pubsubtest.Fields{"room": "team", "presence": true})
	watcher.Await("its own join", func(e pubsubtest.Envelope) bool { return e.Type == "join" && e.UserID == "watcher" })
	bob := a.Dial(as("bob"))
	bob.Subscribe("team")
	watcher.Await("bob's join", func(e pubsubtest.Envelope) bool { return e.Type == "join" && e.UserID == "bob" })

	proxy.Cut()
	ann := a.Dial(as("ann"))
	ann.Subscribe("team")
	bob.CloseNow()
	pubsubtest.WaitFor(t, "bob to leave and ann to join", func() bool {
		pr, err := a.Handler.Presence(pubsubtest.Context(t), "team")
		return err == nil && pr.Count == 2 && pr.Members[0].UserID == "ann"
	})
	proxy.Heal()
	events := map[string]string{}
	for len(events) < 2 {
		e := watcher.Next()
		if e.Type == "join" || e.Type == "leave" {
			events[e.UserID] = e.Type
		}
	}
	if events["ann"] != "join" || events["bob"] != "leave" {
		t.Fatalf("after the cut the watcher got %v, want ann's join and bob's leave", events)
	}
}
