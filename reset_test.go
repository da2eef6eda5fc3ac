package pubsub_test

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/roomcast/pubsub/protocol"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub"
)

// Room resets: a broker that lost messages it cannot deliver says so with
// KindReset, and the Handler itself refuses to pass a hole in a room's
// stream on to a subscriber, whatever the broker does.

// faultyBroker is the memory broker with the faults of a broker that lost
// its link to the cluster: it can report a reset, and it can lose messages
// on their way to this node (they are still sequenced and kept in history).
type faultyBroker struct {
	pubsub.Broker
	deliver func(pubsub.Message)

	mu   sync.Mutex
	lose map[uint64]bool // seqs of room messages not delivered to this node
}

func newFaultyBroker() *faultyBroker {
	return &faultyBroker{Broker: pubsub.NewMemoryBroker(), lose: make(map[uint64]bool)}
}

func (b *faultyBroker) Bind(deliver func(pubsub.Message)) {
	b.deliver = deliver
	b.Broker.Bind(func(m pubsub.Message) {
		b.mu.Lock()
		lost := m.Kind == pubsub.KindMessage && b.lose[m.Seq]
		b.mu.Unlock()
		if !lost {
			deliver(m)
		}
	})
}

// loseSeqs makes the broker lose the room messages with these seqs.
func (b *faultyBroker) loseSeqs(seqs ...uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, s := range seqs {
		b.lose[s] = true
	}
}

func TestBrokerResetClosesTheRoomsSubscribersAfterTheirQueue(t *testing.T) {
	t.Parallel()
	b := newFaultyBroker()
	h, srv := newServer(t, pubsub.WithBroker(b))
	p := dialProto(t, wsURL(srv, "/ws"))
	p.subscribe("broken")
	raw := dial(t, wsURL(srv, "/ws?room=broken"))
	other := dial(t, wsURL(srv, "/ws?room=fine"))
	waitFor(t, "the subscribers", func() bool { return len(h.Connections("broken")) == 2 })

	if err := h.Publish(testCtx(t), "broken", []byte("queued before the reset")); err != nil {
		t.Fatal(err)
	}
	b.deliver(pubsub.Message{Kind: pubsub.KindReset, Room: "broken"})

	if m := p.readMessage("broken"); m.Text == nil || *m.Text != "queued before the reset" {
		t.Fatalf("got %s first, want the queued message", m.raw)
	}
	expectClose(t, p.c, protocol.CloseRoomReset)
	readText(t, raw, "queued before the reset")
	expectClose(t, raw, protocol.CloseRoomReset)

	// Subscribers of other rooms are not touched.
	if err := h.Publish(testCtx(t), "fine", []byte("still here")); err != nil {
		t.Fatal(err)
	}
	readText(t, other, "still here")
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
			b := newFaultyBroker()
			h, srv := newServer(t, pubsub.WithBroker(b), pubsub.WithHistory(tc.history, time.Hour))
			p := dialProto(t, wsURL(srv, "/ws"))
			ack, _ := subscribeWith(p, map[string]any{"room": "r"})
			raw := dial(t, wsURL(srv, "/ws?room=r"))
			waitFor(t, "both subscribers", func() bool { return len(h.Connections("r")) == 2 })
			publishNumbered(t, h, "r", 1, 3)
			expectSeqs(p, "r", 1, 2, 3)
			for _, want := range []string{`{"n":1}`, `{"n":2}`, `{"n":3}`} {
				readText(t, raw, want)
			}

			b.loseSeqs(4, 5)
			publishNumbered(t, h, "r", 4, 6)
			// Nothing past the hole arrives: the close comes first.
			expectCloseNext(t, p.c, protocol.CloseRoomReset)
			expectCloseNext(t, raw, protocol.CloseRoomReset)

			p2 := dialProto(t, wsURL(srv, "/ws"))
			ack2, f := subscribeWith(p2, map[string]any{"room": "r", "since": since(ack.Epoch, 3)})
			if f.Recovered == nil || *f.Recovered != tc.recovered || ack2.Seq != 6 {
				t.Fatalf("resubscribe from seq 3: %s, want recovered %v at seq 6", ack2.raw, tc.recovered)
			}
			if tc.recovered {
				expectSeqs(p2, "r", 4, 5, 6)
			} else if f.Reason == nil || *f.Reason != tc.reason {
				t.Fatalf("resubscribe from seq 3: %s, want reason %s", ack2.raw, tc.reason)
			}
			// The stream goes on for subscribers that came after the hole.
			publishNumbered(t, h, "r", 7, 7)
			expectSeqs(p2, "r", 7)
		})
	}
}

// A subscription that caught up from history to seq N takes N+1 as its
// first live message; a live stream that starts past it (the room's first
// live message on this node, so the room has no earlier one to compare
// with) closes the subscriber with 4006 rather than skip the hole.
func TestAHoleBetweenCatchUpAndTheLiveStreamClosesTheSubscriber(t *testing.T) {
	t.Parallel()
	b := newFaultyBroker()
	h, srv := newServer(t, pubsub.WithBroker(b), pubsub.WithHistory(10, time.Hour))
	publishNumbered(t, h, "r", 1, 2) // kept, delivered to no one
	p := dialProto(t, wsURL(srv, "/ws"))
	ack, _ := subscribeWith(p, map[string]any{"room": "r", "history": 10})
	if ack.Seq != 2 {
		t.Fatalf("ack %s, want seq 2", ack.raw)
	}
	expectSeqs(p, "r", 1, 2)
	b.loseSeqs(3)
	publishNumbered(t, h, "r", 3, 4)
	expectCloseNext(t, p.c, protocol.CloseRoomReset)
}

// expectCloseNext expects the next thing on c to be a close with code: no
// data frame first.
func expectCloseNext(t *testing.T, c *websocket.Conn, code protocol.CloseCode) {
	t.Helper()
	for {
		typ, b, err := c.Read(testCtx(t))
		if err == nil {
			if typ == websocket.MessageText && string(b) == `{"type":"ping"}` {
				continue
			}
			t.Fatalf("got %s, want the connection closed with %d first", b, code)
		}
		var ce websocket.CloseError
		if !errors.As(err, &ce) || protocol.CloseCode(ce.Code) != code {
			t.Fatalf("connection ended with %v, want close code %d", err, code)
		}
		return
	}
}

// Live messages that repeat what a subscription caught up on are dropped,
// not treated as a hole: only a message past the next one is.
func TestRepeatsAfterCatchUpAreDroppedNotReset(t *testing.T) {
	t.Parallel()
	b := newFaultyBroker()
	h, srv := newServer(t, pubsub.WithBroker(b), pubsub.WithHistory(10, time.Hour))
	p := dialProto(t, wsURL(srv, "/ws"))
	ack, _ := subscribeWith(p, map[string]any{"room": "r"})
	publishNumbered(t, h, "r", 1, 3)
	expectSeqs(p, "r", 1, 2, 3)
	// The broker repeats messages 2 and 3, as a lagging live stream does
	// after a history read: each subscriber still gets them once.
	res, err := b.History(testCtx(t), "r", pubsub.HistoryQuery{Since: 1, Limit: 2})
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range res.Messages {
		b.deliver(m)
	}
	publishNumbered(t, h, "r", 4, 4)
	expectSeqs(p, "r", 4)
	if ack.Epoch == "" {
		t.Fatal("no epoch in the ack")
	}
}
