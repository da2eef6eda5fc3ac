package natsbroker_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/client"
	"github.com/roomcast/pubsub/pubsubtest"
)

// A node drained by Shutdown sends its clients away in paced batches; a
// load balancer sends each to the other node, where it resubscribes from
// its position and recovers: every message published during the drain
// reaches every client exactly once, in order.
func TestDrainedClientsRecoverOnAnotherNodeWithZeroLoss(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	roomy := []pubsub.Option{pubsub.WithHistory(100_000, time.Minute), pubsub.WithQueueLimits(100_000, 256<<20)}
	a := startNode(t, shared.URL, p, nil, append(roomy, pubsub.WithDrain(2, 100*time.Millisecond))...)
	b := startNode(t, shared.URL, p, nil, roomy...)
	lb := startProxy(t, hostOf(a)) // the load balancer: node A, until it drains

	const clients = 6
	var got []*received
	for range clients {
		r := newReceived()
		c, err := client.Dial(pubsubtest.Context(t), "ws://"+lb.Addr()+"/ws", client.WithReconnect(20*time.Millisecond, 100*time.Millisecond), client.WithLogger(pubsubtest.Logger()))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if _, err := c.Subscribe(pubsubtest.Context(t), "drain", r.add, client.OnRecover(r.recovery)); err != nil {
			t.Fatal(err)
		}
		got = append(got, r)
	}

	// Publish on B throughout: before, during and after A's drain.
	stop := make(chan struct{})
	published := make(chan int, 1)
	twenty := make(chan struct{})
	go func() {
		n := 0
		defer func() { published <- n }()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := b.Handler.Publish(context.Background(), "drain", fmt.Append(nil, n+1)); err != nil {
				t.Error(err)
				return
			}
			if n++; n == 20 {
				close(twenty)
			}
		}
	}()
	<-twenty
	lb.SetTarget(hostOf(b)) // new connections go to B from now on
	if err := a.Handler.Shutdown(pubsubtest.Context(t)); err != nil {
		t.Fatal(err)
	}
	for _, r := range got {
		r.waitRecovered(t)
	}
	close(stop)
	last := <-published
	for i, r := range got {
		r.waitFor(t, fmt.Sprint(last), 30*time.Second)
		msgs, recoveries := r.snapshot()
		if len(msgs) != last {
			t.Fatalf("client %d saw %d messages, want all %d (recoveries %+v)", i, len(msgs), last, recoveries)
		}
		for j, m := range msgs {
			if m.Seq != uint64(j+1) || string(m.Data) != fmt.Sprint(j+1) {
				t.Fatalf("client %d saw %d:%s at position %d: every message once, in order, is the promise", i, m.Seq, m.Data, j)
			}
		}
	}
}

// hostOf is a node's host:port, for a proxy in front of it.
func hostOf(n *node) string { return strings.TrimPrefix(n.URL, "http://") }
