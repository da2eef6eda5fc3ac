package natsbroker_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync/atomic"
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
	lb := balancer(t, a, b)

	const clients = 6
	var got []*received
	for range clients {
		r := newReceived()
		c, err := client.Dial(pubsubtest.Context(t), lb.to("/ws"), client.WithReconnect(20*time.Millisecond, 100*time.Millisecond), client.WithLogger(pubsubtest.Logger()))
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
	lb.target.Store(b.URL) // new connections go to B from now on
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

// lb is a load balancer in front of the nodes: it passes each WebSocket
// upgrade to the node its target names.
type lb struct {
	srv    *httptest.Server
	target atomic.Value // the base URL (http://…) of the node new connections go to
}

func balancer(t *testing.T, first *node, _ ...*node) *lb {
	t.Helper()
	l := &lb{}
	l.target.Store(first.URL)
	proxy := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			u, _ := url.Parse(l.target.Load().(string))
			r.SetURL(u)
			r.Out.Host = r.In.Host // the nodes check the Origin against the Host
		},
		ErrorLog: log.New(io.Discard, "", 0),
	}
	l.srv = httptest.NewServer(proxy)
	t.Cleanup(l.srv.Close)
	return l
}

// to is the ws:// URL of path on the balancer.
func (l *lb) to(path string) string {
	return "ws" + strings.TrimPrefix(l.srv.URL, "http") + path
}
