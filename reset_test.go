package pubsub_test

import (
	"testing"
	"time"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// Room resets: a broker that lost messages it cannot deliver says so with
// KindReset, and the Handler itself refuses to pass a hole in a room's
// stream on to a subscriber, whatever the broker does. testBroker
// (broker_test.go) loses the messages, or delivers the reset.

func TestBrokerResetClosesTheRoomsSubscribersAfterTheirQueue(t *testing.T) {
	t.Parallel()
	b := newTestBroker()
	srv := pubsubtest.Start(t, pubsub.WithBroker(b))
	p := srv.Dial("/ws")
	p.Subscribe("broken")
	raw := srv.DialRaw("/ws?room=broken")
	other := srv.DialRaw("/ws?room=fine")
	pubsubtest.WaitFor(t, "the subscribers", func() bool { return len(srv.Connections("broken")) == 2 })

	srv.Publish("broken", []byte("queued before the reset"))
	b.deliver(pubsub.Message{Kind: pubsub.KindReset, Room: "broken"})

	if m := p.NextMessage("broken"); m.Text == nil || *m.Text != "queued before the reset" {
		t.Fatalf("got %s first, want the queued message", m)
	}
	p.ExpectClose(protocol.CloseRoomReset)
	raw.ExpectText("queued before the reset")
	raw.ExpectClose(protocol.CloseRoomReset)

	// Subscribers of other rooms are not touched.
	srv.Publish("fine", []byte("still here"))
	other.ExpectText("still here")
}

// A broker that skips messages without a reset (a bug, or a link that lost
// them) never makes a subscriber see a hole: every subscriber of the room
// is closed with 4006 before the first message past it, so its last
// position is the one before the hole, and a resubscribe from there is
// answered truthfully.
func TestAHoleInTheStreamClosesSubscribersBeforeAnythingPastIt(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name      string
		history   int // the room keeps this many messages
		recovered bool
		reason    protocol.Reason
	}{
		{"history still holds the hole", 10, true, ""},
		{"history no longer holds it", 2, false, protocol.ReasonHistoryTooShort},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := newTestBroker()
			srv := pubsubtest.Start(t, pubsub.WithBroker(b), pubsub.WithHistory(tc.history, time.Hour))
			p := srv.Dial("/ws")
			ack := p.Subscribe("r")
			raw := srv.DialRaw("/ws?room=r")
			pubsubtest.WaitFor(t, "both subscribers", func() bool { return len(srv.Connections("r")) == 2 })
			publishNumbered(srv, "r", 1, 3)
			expectSeqs(t, p, "r", 1, 2, 3)
			for _, want := range []string{`{"n":1}`, `{"n":2}`, `{"n":3}`} {
				raw.ExpectText(want)
			}

			b.loseSeqs(4, 5)
			publishNumbered(srv, "r", 4, 6)
			// Nothing past the hole arrives: the close comes first.
			p.ExpectCloseNext(protocol.CloseRoomReset)
			raw.ExpectCloseNext(protocol.CloseRoomReset)

			p2 := srv.Dial("/ws")
			ack2 := p2.SubscribeWith(pubsubtest.Fields{"room": "r", "since": since(ack.Epoch, 3)})
			if ack2.Recovered == nil || *ack2.Recovered != tc.recovered || ack2.Seq != 6 {
				t.Fatalf("resubscribe from seq 3: %s, want recovered %v at seq 6", ack2, tc.recovered)
			}
			if tc.recovered {
				expectSeqs(t, p2, "r", 4, 5, 6)
			} else if ack2.Reason != tc.reason {
				t.Fatalf("resubscribe from seq 3: %s, want reason %s", ack2, tc.reason)
			}
			// The stream goes on for subscribers that came after the hole.
			publishNumbered(srv, "r", 7, 7)
			expectSeqs(t, p2, "r", 7)
		})
	}
}

// A subscription that caught up from history to seq N takes N+1 as its
// first live message; a live stream that starts past it (the room's first
// live message on this node, so the room has no earlier one to compare
// with) closes the subscriber with 4006 rather than skip the hole.
func TestAHoleBetweenCatchUpAndTheLiveStreamClosesTheSubscriber(t *testing.T) {
	t.Parallel()
	b := newTestBroker()
	srv := pubsubtest.Start(t, pubsub.WithBroker(b), pubsub.WithHistory(10, time.Hour))
	publishNumbered(srv, "r", 1, 2) // kept, delivered to no one
	p := srv.Dial("/ws")
	if ack := p.SubscribeWith(pubsubtest.Fields{"room": "r", "history": 10}); ack.Seq != 2 {
		t.Fatalf("ack %s, want seq 2", ack)
	}
	expectSeqs(t, p, "r", 1, 2)
	b.loseSeqs(3)
	publishNumbered(srv, "r", 3, 4)
	p.ExpectCloseNext(protocol.CloseRoomReset)
}

// Live messages that repeat what a subscription caught up on are dropped,
// not treated as a hole: only a message past the next one is.
func TestRepeatsAfterCatchUpAreDroppedNotReset(t *testing.T) {
	t.Parallel()
	b := newTestBroker()
	srv := pubsubtest.Start(t, pubsub.WithBroker(b), pubsub.WithHistory(10, time.Hour))
	p := srv.Dial("/ws")
	ack := p.Subscribe("r")
	publishNumbered(srv, "r", 1, 3)
	expectSeqs(t, p, "r", 1, 2, 3)
	// The broker repeats messages 2 and 3, as a lagging live stream does
	// after a history read: each subscriber still gets them once.
	res, err := b.History(pubsubtest.Context(t), "r", pubsub.HistoryQuery{Since: 1, Limit: 2})
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range res.Messages {
		b.deliver(m)
	}
	publishNumbered(srv, "r", 4, 4)
	expectSeqs(t, p, "r", 4)
	if ack.Epoch == "" {
		t.Fatal("no epoch in the ack")
	}
}
