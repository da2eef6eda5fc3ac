package natsbroker_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/client"
	"github.com/roomcast/pubsub/natsbroker"
	"github.com/roomcast/pubsub/natsbroker/internal/natstest"
	"github.com/roomcast/pubsub/pubsubtest"
)

// A three-server NATS cluster keeps the rooms' stream with three replicas.
// Mid-stream one server is stopped: the stream's leader, which the
// subscribing node is connected to, or the server the publishing node is
// connected to. Node A goes on publishing, retrying what fails; node B
// serves a Go client that reconnects and recovers by itself. Nothing a
// reconnecting client could recover is lost: the client ends with every
// publish NATS acknowledged, once, in one gapless sequence, and the room's
// history holds them all.
func TestClusterLosesAServerMidStreamAndNothingRecoverableIsLost(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		stop func(cluster *natstest.Cluster, leader, publisher *natstest.Server) *natstest.Server
	}{
		{"the stream leader, the subscribing node's server", func(_ *natstest.Cluster, leader, _ *natstest.Server) *natstest.Server { return leader }},
		{"the publishing node's server", func(_ *natstest.Cluster, _, publisher *natstest.Server) *natstest.Server { return publisher }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cluster, err := natstest.StartCluster(3)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(cluster.Close)
			testServerLoss(t, cluster, tc.stop)
		})
	}
}

func testServerLoss(t *testing.T, cluster *natstest.Cluster, stop func(cluster *natstest.Cluster, leader, publisher *natstest.Server) *natstest.Server) {
	p := uniquePrefix()
	r3 := []natsbroker.Option{natsbroker.WithReplicas(3)}
	history := pubsub.WithHistory(10_000, time.Hour)
	// Node A creates the stream; node B prefers the server that leads it,
	// node A another. Each fails over to the others.
	// The cluster has just formed: its first replicated stream elects a
	// leader of its own, which on a loaded machine (-race, the other
	// subtest's cluster beside it) has taken longer than one call's test
	// timeout; give it a minute.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	first, err := natsbroker.New(ctx, connect(t, cluster.URLs()), append([]natsbroker.Option{
		natsbroker.WithPrefix(p), natsbroker.WithLogger(pubsubtest.Logger()),
	}, r3...)...)
	if err != nil {
		t.Fatal(err)
	}
	leader := cluster.StreamLeader(p)
	if leader == nil {
		t.Fatal("the stream has no leader")
	}
	first.Close()
	li := slices.Index(cluster.Servers, leader)
	ai := (li + 1) % len(cluster.Servers)
	a := startNodeOn(t, connect(t, clusterURLs(cluster, ai), nats.DontRandomize()), p, r3, history)
	b := startNodeOn(t, connect(t, clusterURLs(cluster, li), nats.DontRandomize()), p, r3, history)

	got := newReceived()
	cl, err := client.Dial(pubsubtest.Context(t), b.WS("/ws"), client.WithReconnect(20*time.Millisecond, 200*time.Millisecond), client.WithLogger(pubsubtest.Logger()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	if _, err := cl.Subscribe(pubsubtest.Context(t), "room", got.add, client.OnRecover(got.recovery)); err != nil {
		t.Fatal(err)
	}

	// Publish 1, 2, 3… from node A; a failed publish is retried with the
	// same payload until NATS acknowledges one (it may then be stored
	// twice: a publish whose answer was lost may have succeeded).
	var acked []string
	retry := time.NewTicker(20 * time.Millisecond)
	defer retry.Stop()
	publish := func(n int) {
		data := fmt.Sprint(n)
		deadline := time.Now().Add(30 * time.Second)
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			err := a.Handler.Publish(ctx, "room", []byte(data))
			cancel()
			if err == nil {
				acked = append(acked, data)
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("publish %s kept failing: %v", data, err)
			}
			<-retry.C // NATS is electing a leader or reconnecting: do not spin
		}
	}
	for n := 1; n <= 50; n++ {
		publish(n)
	}
	victim := stop(cluster, leader, cluster.Servers[ai])
	t.Logf("stopping %s (the stream's leader is %s)", victim.Name(), leader.Name())
	stopped := time.Now()
	victim.Stop()
	for n := 51; n <= 200; n++ {
		publish(n)
	}
	t.Logf("150 publishes acknowledged %v after the stop", time.Since(stopped))

	// The client gets every acknowledged publish, once, in order.
	got.waitFor(t, acked[len(acked)-1], 60*time.Second)
	msgs, recoveries := got.snapshot()
	seen := make(map[string]int)
	for i, m := range msgs {
		if i > 0 && (m.Epoch != msgs[0].Epoch || m.Seq != msgs[i-1].Seq+1) {
			t.Fatalf("the client got %s/%d after %s/%d: a hole or a repeat", m.Epoch, m.Seq, msgs[i-1].Epoch, msgs[i-1].Seq)
		}
		seen[string(m.Data)]++
	}
	for _, data := range acked {
		if seen[data] == 0 {
			t.Fatalf("acknowledged publish %s never reached the client (got %d messages, recoveries %+v)", data, len(msgs), recoveries)
		}
	}
	for _, r := range recoveries {
		if !r.Recovered {
			t.Fatalf("a resubscription did not recover: %+v", r)
		}
	}
	t.Logf("the client got %d messages for %d acknowledged publishes, with %d recoveries", len(msgs), len(acked), len(recoveries))

	// The history, read through node B, holds them all too.
	hist, err := b.Handler.History(pubsubtest.Context(t), "room", 10_000)
	if err != nil {
		t.Fatal(err)
	}
	if len(hist) != len(msgs) {
		t.Fatalf("history holds %d messages, the client got %d", len(hist), len(msgs))
	}
	for i, m := range hist {
		if m.Seq != msgs[i].Seq || string(m.Data) != string(msgs[i].Data) {
			t.Fatalf("history message %d is %d:%s, the client got %d:%s", i, m.Seq, m.Data, msgs[i].Seq, msgs[i].Data)
		}
	}
}

// clusterURLs lists the cluster's servers starting at the first-th.
func clusterURLs(c *natstest.Cluster, first int) string {
	var urls []string
	for i := range c.Servers {
		urls = append(urls, c.Servers[(first+i)%len(c.Servers)].URL)
	}
	return strings.Join(urls, ",")
}

// received collects what a Go client's subscription delivered.
type received struct {
	mu         sync.Mutex
	msgs       []client.Message
	recoveries []client.Recovery
	changed    chan struct{} // closed on every delivery, then replaced
}

func newReceived() *received { return &received{changed: make(chan struct{})} }

func (r *received) add(m client.Message) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, m)
	close(r.changed)
	r.changed = make(chan struct{})
}

func (r *received) recovery(rc client.Recovery) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.recoveries = append(r.recoveries, rc)
	close(r.changed)
	r.changed = make(chan struct{})
}

func (r *received) snapshot() ([]client.Message, []client.Recovery) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]client.Message(nil), r.msgs...), append([]client.Recovery(nil), r.recoveries...)
}

// waitRecovered waits until the subscription resumed after a reconnect,
// and fails when it did not recover.
func (r *received) waitRecovered(t *testing.T) {
	t.Helper()
	r.await(t, "a recovery", 30*time.Second, func() bool { return len(r.recoveries) > 0 })
	r.mu.Lock()
	defer r.mu.Unlock()
	if rc := r.recoveries[0]; !rc.Recovered {
		t.Fatalf("the resubscription did not recover: %+v", rc)
	}
}

// await waits until cond, called with r.mu held, holds.
func (r *received) await(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		r.mu.Lock()
		ch, ok, n := r.changed, cond(), len(r.msgs)
		r.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-ch:
		case <-deadline.C:
			t.Fatalf("timed out waiting for %s; the client got %d messages", what, n)
		}
	}
}

// waitFor waits until a message with data arrived.
func (r *received) waitFor(t *testing.T, data string, timeout time.Duration) {
	t.Helper()
	r.await(t, "message "+data, timeout, func() bool {
		return slices.ContainsFunc(r.msgs, func(m client.Message) bool { return string(m.Data) == data })
	})
}
