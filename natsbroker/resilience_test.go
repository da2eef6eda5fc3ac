package natsbroker_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/roomcast/pubsub/natsbroker"
	"github.com/roomcast/pubsub/natsbroker/internal/natstest"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// startNATS starts a nats-server of the test's own, for tests that stop or
// restart it. It is stopped after everything the test registers later.
func startNATS(t *testing.T) *natstest.Server {
	t.Helper()
	srv, err := natstest.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	return srv
}

// publishWhenBack publishes once NATS answers again (the first attempts
// fail while the connection is re-established).
func publishWhenBack(t *testing.T, n *node, room, data string) {
	t.Helper()
	var last error
	pubsubtest.WaitFor(t, "a publish to succeed after NATS came back", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		last = n.Handler.Publish(ctx, room, []byte(data))
		return last == nil
	})
}

// A NATS restart with file storage keeps the rooms: the epoch stays, and
// the subscription goes on where it was.
func TestNATSRestartKeepsRoomsAndSubscriptionsGoOn(t *testing.T) {
	t.Parallel()
	srv := startNATS(t)
	a := startNode(t, srv.URL, uniquePrefix(), nil)
	c := a.Dial(as("ann"))
	ack := c.Subscribe("room")
	for _, d := range []string{"1", "2", "3"} {
		a.Publish("room", []byte(d))
	}
	checkSeqs(t, c.Messages("room", 3), ack.Epoch, 1, "1", "2", "3")

	srv.Stop()
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	publishWhenBack(t, a, "room", "4")
	checkSeqs(t, c.Messages("room", 1), ack.Epoch, 4, "4")
	c2 := a.Dial(as("bob"))
	ack2 := c2.SubscribeWith(pubsubtest.Fields{"room": "room", "since": since(ack.Epoch, 2)})
	if ack2.Recovered == nil || !*ack2.Recovered || *ack2.Missed != 2 || ack2.Seq != 4 {
		t.Fatalf("resubscribe after the restart: %s, want recovered with 2 missed at seq 4", ack2.Raw)
	}
	checkSeqs(t, c2.Messages("room", 2), ack.Epoch, 3, "3", "4")
}

// A NATS that comes back without its data (its storage lost, or memory
// storage): the broker creates its stream again, rooms start new epochs,
// and subscribers are closed (4006) rather than left in a silently new
// stream; coming back with their position, they are told epoch_changed.
func TestNATSRestartThatLostItsDataChangesTheEpoch(t *testing.T) {
	t.Parallel()
	srv := startNATS(t)
	a := startNode(t, srv.URL, uniquePrefix(), []natsbroker.Option{natsbroker.WithPresenceTTL(3 * time.Second)})
	c := a.Dial(as("ann"))
	ack := c.Subscribe("room")
	for _, d := range []string{"1", "2", "3"} {
		a.Publish("room", []byte(d))
	}
	checkSeqs(t, c.Messages("room", 3), ack.Epoch, 1, "1", "2", "3")

	srv.Stop()
	if err := srv.Wipe(); err != nil {
		t.Fatal(err)
	}
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	publishWhenBack(t, a, "room", "after")
	c.ExpectClose(protocol.CloseRoomReset)
	c2 := a.Dial(as("ann"))
	ack2 := c2.SubscribeWith(pubsubtest.Fields{"room": "room", "since": since(ack.Epoch, 3)})
	if ack2.Recovered == nil || *ack2.Recovered || ack2.Reason != protocol.ReasonEpochChanged || ack2.Epoch == ack.Epoch || ack2.Seq != 1 {
		t.Fatalf("resubscribe with the old position: %s, want recovered false, reason epoch_changed, the new epoch at seq 1", ack2.Raw)
	}
	// Presence lives in the new stream again (the refresher rewrites it).
	pubsubtest.WaitFor(t, "ann's presence to be restored", func() bool {
		p, err := a.Handler.Presence(pubsubtest.Context(t), "room")
		return err == nil && p.Count == 1 && p.Connections == 1
	})
}

func TestPublishFailsWhileNATSIsDownAndSubscriptionsResume(t *testing.T) {
	t.Parallel()
	srv := startNATS(t)
	a := startNode(t, srv.URL, uniquePrefix(), nil)
	c := a.Dial(as(""))
	ack := c.Subscribe("live")
	a.Publish("live", []byte("before"))
	c.Messages("live", 1)

	srv.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	err := a.Handler.Publish(ctx, "live", []byte("during"))
	if err == nil || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Publish while NATS is down: %v after %v, want a connection error before the deadline", err, time.Since(start))
	}
	if !errors.Is(err, natsbroker.ErrDisconnected) {
		t.Fatalf("Publish while NATS is down: %v, want natsbroker.ErrDisconnected", err)
	}
	t.Logf("Publish failed after %v: %v", time.Since(start), err)
	if e := c.Request(pubsubtest.Fields{"type": "publish", "room": "live", "text": "x"}); e.Type != "error" || e.Code != protocol.CodeUnavailable {
		t.Fatalf("client publish while NATS is down: %s, want error unavailable", e.Raw)
	}

	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	// File storage: the room is still there; the subscription goes on.
	publishWhenBack(t, a, "live", "after")
	checkSeqs(t, c.Messages("live", 1), ack.Epoch, 2, "after")
}

func TestCloseReturnsWhileNATSIsDown(t *testing.T) {
	t.Parallel()
	srv := startNATS(t)
	a := startNode(t, srv.URL, uniquePrefix(), []natsbroker.Option{natsbroker.WithPresenceTTL(3 * time.Second)})
	c := a.Dial(as("ann"))
	c.Subscribe("room")
	srv.Stop()
	done := make(chan struct{})
	go func() {
		a.Handler.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("Close did not return while NATS was down")
	}
}

// A stream deleted under running nodes (an operator's mistake) comes back:
// the next publishes create it again, in a new epoch.
func TestDeletedStreamIsCreatedAgain(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	a := startNode(t, shared.URL, p, nil)
	c := a.Dial(as(""))
	ack := c.Subscribe("room")
	a.Publish("room", []byte("1"))
	c.Messages("room", 1)
	js, err := jetstream.New(a.nc)
	if err != nil {
		t.Fatal(err)
	}
	if err := js.DeleteStream(pubsubtest.Context(t), p); err != nil {
		t.Fatal(err)
	}
	publishWhenBack(t, a, "room", "2")
	c.ExpectClose(protocol.CloseRoomReset)
	c2 := a.Dial(as(""))
	if ack2 := c2.Subscribe("room"); ack2.Epoch == ack.Epoch || ack2.Seq != 1 {
		t.Fatalf("subscribe after the stream came back: %s, want a new epoch at seq 1", ack2.Raw)
	}
}
