package redisbroker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub"
)

// A node drained by Shutdown sends its clients away in paced batches; each
// reconnects to another node with its position and recovers: every message
// published during the drain reaches every client exactly once, in order.
func TestDrainedClientsRecoverOnAnotherNodeWithZeroLoss(t *testing.T) {
	t.Parallel()
	prefix := uniquePrefix()
	// The publisher is unthrottled: history and queues hold all it can
	// send during the drain, so every client can recover everything.
	roomy := []pubsub.Option{pubsub.WithHistory(100_000, time.Minute), pubsub.WithQueueLimits(100_000, 256<<20)}
	a := startNode(t, shared.Addr, prefix, nil, append(roomy, pubsub.WithDrain(2, 100*time.Millisecond))...)
	b := startNode(t, shared.Addr, prefix, nil, roomy...)
	const clients = 6

	subscribed := make(chan struct{}, clients)
	moved := make(chan struct{}, clients)
	final := make(chan uint64) // closed after the last message's seq is sent to every client
	type result struct {
		seqs []uint64
		err  error
	}
	results := make(chan result, clients)
	for i := range clients {
		go func() {
			seqs, err := drainClient(a.url(""), b.url(""), subscribed, moved, final)
			if err != nil {
				err = fmt.Errorf("client %d: %w", i, err)
			}
			results <- result{seqs, err}
		}()
	}
	for range clients {
		<-subscribed
	}

	// Publish on B throughout: before, during and after A's drain.
	stop := make(chan struct{})
	pubDone := make(chan uint64, 1)
	pubErr := make(chan error, 1)
	twenty := make(chan struct{})
	go func() {
		var n uint64
		defer func() { pubDone <- n }()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := b.Handler.Publish(pubsubtest.Context(t), "drain", fmt.Appendf(nil, "%d", n+1)); err != nil {
				pubErr <- err
				return
			}
			if n++; n == 20 {
				close(twenty)
			}
		}
	}()
	<-twenty
	if err := a.Handler.Shutdown(pubsubtest.Context(t)); err != nil {
		t.Fatal(err)
	}
	for range clients {
		select {
		case <-moved:
		case r := <-results:
			t.Fatal(r.err)
		}
	}
	close(stop)
	last := <-pubDone
	select {
	case err := <-pubErr:
		t.Fatal(err)
	default:
	}
	for range clients {
		final <- last
	}
	for range clients {
		r := <-results
		if r.err != nil {
			t.Fatal(r.err)
		}
		if uint64(len(r.seqs)) != last {
			t.Fatalf("a client saw %d messages, want all %d", len(r.seqs), last)
		}
		for i, s := range r.seqs {
			if s != uint64(i+1) {
				t.Fatalf("a client saw seq %d at position %d: every message once, in order, is the promise", s, i)
			}
		}
	}
}

// drainClient subscribes on node a, reads until a drains it (1001), then
// resubscribes on node b from its position and reads until the seq it is
// given on final. It returns every seq it saw, in order.
func drainClient(aURL, bURL string, subscribed, moved chan<- struct{}, final <-chan uint64) ([]uint64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var seqs []uint64
	var epoch string
	read := func(c *websocket.Conn) (map[string]any, error) {
		_, b, err := c.Read(ctx)
		if err != nil {
			return nil, err
		}
		var e map[string]any
		if err := json.Unmarshal(b, &e); err != nil {
			return nil, err
		}
		if e["type"] == "message" {
			epoch = e["epoch"].(string)
			seqs = append(seqs, uint64(e["seq"].(float64)))
		}
		return e, nil
	}
	dial := func(url string) (*websocket.Conn, error) {
		c, _, err := websocket.Dial(ctx, url, &websocket.DialOptions{Subprotocols: []string{protocol.Subprotocol}})
		if err != nil {
			return nil, err
		}
		if _, err := read(c); err != nil { // welcome
			c.CloseNow()
			return nil, err
		}
		return c, nil
	}

	c, err := dial(aURL)
	if err != nil {
		return nil, err
	}
	defer c.CloseNow()
	if err := c.Write(ctx, websocket.MessageText, []byte(`{"type":"subscribe","id":"1","room":"drain"}`)); err != nil {
		return nil, err
	}
	ack, err := read(c)
	if err != nil || ack["type"] != "ack" {
		return nil, fmt.Errorf("subscribe on node A: %v %v", ack, err)
	}
	// The ack's position is where the client recovers from if node A
	// drains it before it delivered any message (as a real client does).
	epoch, _ = ack["epoch"].(string)
	seq0, _ := ack["seq"].(float64)
	subscribed <- struct{}{}
	for {
		if _, err := read(c); err != nil {
			if protocol.CloseCode(websocket.CloseStatus(err)) != protocol.CloseGoingAway {
				return nil, fmt.Errorf("on node A: %w, want a 1001 drain", err)
			}
			break
		}
	}

	d, err := dial(bURL)
	if err != nil {
		return nil, err
	}
	defer d.CloseNow()
	last := uint64(seq0)
	if len(seqs) > 0 {
		last = seqs[len(seqs)-1]
	}
	sub := `{"type":"subscribe","id":"2","room":"drain"}`
	if epoch != "" {
		sub = fmt.Sprintf(`{"type":"subscribe","id":"2","room":"drain","since":{"epoch":%q,"seq":%d}}`, epoch, last)
	}
	if err := d.Write(ctx, websocket.MessageText, []byte(sub)); err != nil {
		return nil, err
	}
	for {
		e, err := read(d)
		if err != nil {
			return nil, fmt.Errorf("on node B: %w", err)
		}
		if e["type"] == "ack" {
			if epoch != "" && e["recovered"] != true {
				return nil, fmt.Errorf("resubscribe on node B: %v, want recovered", e)
			}
			break
		}
	}
	moved <- struct{}{}
	want := <-final
	for len(seqs) == 0 || seqs[len(seqs)-1] < want {
		if _, err := read(d); err != nil {
			return nil, fmt.Errorf("on node B after seq %d of %d: %w", len(seqs), want, err)
		}
	}
	return seqs, nil
}
