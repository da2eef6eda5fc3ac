package natsbroker_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/client"
	"github.com/roomcast/pubsub/natsbroker"
	"github.com/roomcast/pubsub/pubsubtest"
)

func publishKey(t *testing.T, b *natsbroker.Broker, room, data, key string, ttl time.Duration) pubsub.PublishResult {
	t.Helper()
	res, err := b.Publish(pubsubtest.Context(t), room, []byte(data), pubsub.PublishOptions{
		History: pubsub.HistoryOptions{Size: 100, TTL: time.Minute}, Key: key, KeyTTL: ttl,
	})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func sameMessage(t *testing.T, what string, res pubsub.PublishResult, first pubsub.Message) {
	t.Helper()
	if !res.Duplicate || res.ID != first.ID || res.Seq != first.Seq || res.Epoch != first.Epoch || !res.Time.Equal(first.Time) {
		t.Fatalf("%s: %+v, want a duplicate of %s/%d id %s", what, res, first.Epoch, first.Seq, first.ID)
	}
}

// A node that stores a keyed message and dies before writing the key's
// record leaves the key findable: while its message is the room's head the
// head itself says so, and the next append on the room, from any node,
// writes the record first.
func TestAKeyWhoseRecordWasNeverWrittenIsStillSeenOnce(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	dying, other := bound(t, p), bound(t, p)
	natsbroker.SkipKeyRecords(dying)
	first := publishKey(t, dying, "room", "first", "k", time.Minute)
	if first.Duplicate || first.Seq != 1 {
		t.Fatalf("first publish: %+v", first)
	}
	sameMessage(t, "the key again on another node, the message still the head", publishKey(t, other, "room", "again", "k", time.Minute), first.Message)
	if _, err := other.Publish(pubsubtest.Context(t), "room", []byte("unkeyed"), pubsub.PublishOptions{}); err != nil {
		t.Fatal(err)
	}
	// The append wrote the key's record before going past the message.
	js, err := jetstream.New(connect(t, shared.URL))
	if err != nil {
		t.Fatal(err)
	}
	st, err := js.Stream(pubsubtest.Context(t), p)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := st.GetLastMsgForSubject(pubsubtest.Context(t), p+".k.room."+natsbroker.KeyHash("k"))
	if err != nil || rec.Header.Get("Rc-Id") != first.ID {
		t.Fatalf("the key's record: %+v, %v; want one naming message %s", rec, err, first.ID)
	}
	sameMessage(t, "the key again, past the head", publishKey(t, other, "room", "again", "k", time.Minute), first.Message)
	sameMessage(t, "the key again on the first node", publishKey(t, dying, "room", "again", "k", time.Minute), first.Message)
}

// A key's record expires in the stream after its TTL (whole seconds), and
// the server leaves a delete marker for a second: a publish of the key then
// is new, and its record replaces the marker.
func TestAKeyIsNewAgainAfterItsRecordExpired(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	b := bound(t, p)
	first := publishKey(t, b, "room", "first", "k", 300*time.Millisecond)
	js, err := jetstream.New(connect(t, shared.URL))
	if err != nil {
		t.Fatal(err)
	}
	st, err := js.Stream(pubsubtest.Context(t), p)
	if err != nil {
		t.Fatal(err)
	}
	subject := p + ".k.room." + natsbroker.KeyHash("k")
	pubsubtest.WaitFor(t, "the key's record to expire into a marker", func() bool {
		rec, err := st.GetLastMsgForSubject(pubsubtest.Context(t), subject)
		return err == nil && rec.Header.Get("Nats-Marker-Reason") != ""
	})
	second := publishKey(t, b, "room", "second", "k", time.Minute)
	if second.Duplicate || second.Seq != 2 || second.Epoch != first.Epoch {
		t.Fatalf("the key after its record expired: %+v, want seq 2", second)
	}
	sameMessage(t, "the key once more", publishKey(t, b, "room", "third", "k", time.Minute), second.Message)
}

// afterKeyed is a node's broker that runs a hook after each keyed publish
// it stored, before the Handler can acknowledge it.
type afterKeyed struct {
	*natsbroker.Broker
	after func(attempt int)
	n     atomic.Int32
}

func (b *afterKeyed) Publish(ctx context.Context, room string, data []byte, o pubsub.PublishOptions) (pubsub.PublishResult, error) {
	res, err := b.Broker.Publish(ctx, room, data, o)
	if err == nil && o.Key != "" && b.after != nil {
		b.after(int(b.n.Add(1)))
	}
	return res, err
}

// A Go client's publish is stored through node A, whose connection drops
// before the ack; the client reconnects through the load balancer to
// node B and sends it again with the same key: the key's record (or the
// room's head) recognises it, the message appears once, and the client
// learns its position.
func TestAResendThatLandsOnAnotherNodeIsStillPublishedOnce(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	hooked := &afterKeyed{Broker: newBroker(t, shared.URL, p)}
	a := startNodeWith(t, hooked)
	b := startNode(t, shared.URL, p, nil)
	watcher := b.Dial(as(""))
	watcher.Subscribe("room")
	lb := startProxy(t, hostOf(a))
	hooked.after = func(attempt int) {
		if attempt == 1 {
			lb.SetTarget(hostOf(b))
			lb.Cut()
			lb.Heal()
		}
	}
	c, err := client.Dial(pubsubtest.Context(t), "ws://"+lb.Addr()+"/ws",
		client.WithLogger(pubsubtest.Logger()), client.WithReconnect(5*time.Millisecond, 50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	firstConn := c.ConnID()
	pub, err := c.Publish(pubsubtest.Context(t), "room", []byte("once"))
	if err != nil {
		t.Fatal(err)
	}
	if !pub.Duplicate || pub.Seq != 1 {
		t.Fatalf("Publish = %+v, want the first attempt's seq 1, recognised as a duplicate on the other node", pub)
	}
	if c.ConnID() == firstConn {
		t.Fatal("the client did not reconnect")
	}
	m := watcher.NextMessage("room")
	if string(m.Payload()) != "once" || m.Seq != pub.Seq || m.MessageID != pub.MessageID {
		t.Fatalf("the subscriber saw %s, Publish said %+v", m.Raw, pub)
	}
	b.Publish("room", []byte("marker"))
	if m := watcher.NextMessage("room"); string(m.Payload()) != "marker" {
		t.Fatalf("got %s, want the marker: the message appeared twice", m.Raw)
	}
}
