package pubsub_test

import (
	"testing"

	"github.com/roomcast/pubsub"
)

// resetBroker is the memory broker plus a way to report a broken stream,
// as an adapter does when it lost messages it cannot deliver.
type resetBroker struct {
	pubsub.Broker
	deliver func(pubsub.Message)
}

func (b *resetBroker) Bind(deliver func(pubsub.Message)) {
	b.deliver = deliver
	b.Broker.Bind(deliver)
}

func TestBrokerResetClosesTheRoomsSubscribersAfterTheirQueue(t *testing.T) {
	t.Parallel()
	b := &resetBroker{Broker: pubsub.NewMemoryBroker()}
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
	expectClose(t, p.c, pubsub.CloseRoomReset)
	readText(t, raw, "queued before the reset")
	expectClose(t, raw, pubsub.CloseRoomReset)

	// Subscribers of other rooms are not touched.
	if err := h.Publish(testCtx(t), "fine", []byte("still here")); err != nil {
		t.Fatal(err)
	}
	readText(t, other, "still here")
}
