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
			seqs, err := drainClient(i, a.url(""), b.url(""), subscribed, moved, final)
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
		checkAll(t, r.seqs, last)
	}
}

// checkAll checks that seqs is every seq from 1 to last, once, in order.
func checkAll(t *testing.T, seqs []uint64, last uint64) {
	t.Helper()
	if uint64(len(seqs)) != last {
		t.Fatalf("a client saw %d messages, want all %d", len(seqs), last)
	}
	for i, s := range seqs {
		if s != uint64(i+1) {
			t.Fatalf("a client saw seq %d at position %d: every message once, in order, is the promise", s, i)
		}
	}
}

// drainClient (client i) subscribes on node a, reads until a drains it (1001), then
// resubscribes on node b from its position and reads until the seq it is
// given on final. It returns every seq it saw, in order.
func drainClient(i int, aURL, bURL string, subscribed, moved chan<- struct{}, final <-chan uint64) (_ []uint64, err error) {
	defer func() {
		if err != nil {
			err = fmt.Errorf("client %d: %w", i, err)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d := &drained{ctx: ctx}
	c, err := d.dial(aURL)
	if err != nil {
		return nil, err
	}
	defer c.CloseNow()
	if err := c.Write(ctx, websocket.MessageText, []byte(`{"type":"subscribe","id":"1","room":"drain"}`)); err != nil {
		return nil, err
	}
	ack, err := d.read(c)
	if err != nil || ack["type"] != "ack" {
		return nil, fmt.Errorf("subscribe on node A: %v %v", ack, err)
	}
	// The ack's position is where the client recovers from if node A
	// drains it before it delivered any message (as a real client does).
	d.epoch, _ = ack["epoch"].(string)
	seq0, _ := ack["seq"].(float64)
	subscribed <- struct{}{}
	for {
		if _, err := d.read(c); err != nil {
			if protocol.CloseCode(websocket.CloseStatus(err)) != protocol.CloseGoingAway {
				return nil, fmt.Errorf("on node A: %w, want a 1001 drain", err)
			}
			break
		}
	}

	last := uint64(seq0)
	if len(d.seqs) > 0 {
		last = d.seqs[len(d.seqs)-1]
	}
	b, err := d.resubscribe(bURL, last)
	if err != nil {
		return nil, err
	}
	defer b.CloseNow()
	moved <- struct{}{}
	want := <-final
	for len(d.seqs) == 0 || d.seqs[len(d.seqs)-1] < want {
		if _, err := d.read(b); err != nil {
			return nil, fmt.Errorf("on node B after seq %d of %d: %w", len(d.seqs), want, err)
		}
	}
	return d.seqs, nil
}

// drained is one drainClient's reading: every seq it saw, and the epoch.
type drained struct {
	ctx   context.Context
	seqs  []uint64
	epoch string
}

// read reads one envelope, noting a message's epoch and seq.
func (d *drained) read(c *websocket.Conn) (map[string]any, error) {
	_, b, err := c.Read(d.ctx)
	if err != nil {
		return nil, err
	}
	var e map[string]any
	if err := json.Unmarshal(b, &e); err != nil {
		return nil, err
	}
	if e["type"] == "message" {
		d.epoch = e["epoch"].(string)
		d.seqs = append(d.seqs, uint64(e["seq"].(float64)))
	}
	return e, nil
}

// dial connects in protocol mode and reads the welcome.
func (d *drained) dial(url string) (*websocket.Conn, error) {
	c, _, err := websocket.Dial(d.ctx, url, &websocket.DialOptions{Subprotocols: []string{protocol.Subprotocol}})
	if err != nil {
		return nil, err
	}
	if _, err := d.read(c); err != nil { // welcome
		c.CloseNow()
		return nil, err
	}
	return c, nil
}

// resubscribe subscribes on url from (epoch, last) and reads up to the
// ack, which must say the client recovered.
func (d *drained) resubscribe(url string, last uint64) (*websocket.Conn, error) {
	c, err := d.dial(url)
	if err != nil {
		return nil, err
	}
	sub := `{"type":"subscribe","id":"2","room":"drain"}`
	if d.epoch != "" {
		sub = fmt.Sprintf(`{"type":"subscribe","id":"2","room":"drain","since":{"epoch":%q,"seq":%d}}`, d.epoch, last)
	}
	if err := c.Write(d.ctx, websocket.MessageText, []byte(sub)); err != nil {
		c.CloseNow()
		return nil, err
	}
	for {
		e, err := d.read(c)
		if err != nil {
			c.CloseNow()
			return nil, fmt.Errorf("on node B: %w", err)
		}
		if e["type"] == "ack" {
			if d.epoch != "" && e["recovered"] != true {
				c.CloseNow()
				return nil, fmt.Errorf("resubscribe on node B: %v, want recovered", e)
			}
			return c, nil
		}
	}
}
