package redisbroker_test

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/client"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
	"github.com/roomcast/pubsub/redisbroker"
)

// A node cut off from Redis while the room goes on: its subscribers either
// get every message they missed, in order, on the same subscription, or
// are closed with 4006 before anything past the hole, and told on their
// resubscribe what they cannot recover. Never a silent gap.
//
// Three nodes share one Redis; node C reaches it through a proxy that the
// test cuts (connections dropped), or blackholes (bytes lost while the
// connections stay open, found out by go-redis's health checks), while
// nodes A and B publish. Every room keeps 100 messages.
func TestANodeCutOffFromRedisNeverSkipsSilently(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name     string
		missed   int
		drop     bool // blackhole instead of cutting the connections
		recovers bool
	}{
		{"cut for fewer messages than history keeps", 40, false, true},
		{"cut for more messages than history keeps", 150, false, false},
		{"blackholed for more messages than history keeps", 150, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := uniquePrefix()
			a := startNode(t, shared.Addr, p, nil)
			b := startNode(t, shared.Addr, p, nil)
			proxy := startProxy(t, shared.Addr)
			c := startNode(t, proxy.Addr(), p, nil)

			sub := pubsubtest.Dial(t, c.url(""))
			ack := sub.Subscribe("room")
			publishAlternately(t, "room", 1, 46, a, b)
			checkSeqs(t, sub.Messages("room", 46), ack.Epoch, 1, numbered(1, 46)...)

			if tc.drop {
				proxy.Drop()
			} else {
				proxy.Cut()
			}
			publishAlternately(t, "room", 47, 46+tc.missed, a, b)
			proxy.Heal()
			last := 46 + tc.missed + 1
			a.Publish("room", []byte(fmt.Sprint(last)))

			if tc.recovers {
				// The same subscription goes on, with every missed message.
				checkSeqs(t, sub.Messages("room", last-46), ack.Epoch, 47, numbered(47, last)...)
				return
			}
			// The close comes before any message past the hole: the
			// subscriber's last position stays 46.
			sub.ExpectCloseNext(protocol.CloseRoomReset)
			again := pubsubtest.Dial(t, c.url(""))
			ack2 := again.SubscribeWith(pubsubtest.Fields{"room": "room", "since": pubsubtest.Fields{"epoch": ack.Epoch, "seq": 46}})
			if ack2.Recovered == nil || *ack2.Recovered || ack2.Reason != protocol.ReasonHistoryTooShort {
				t.Fatalf("resubscribe from seq 46 after %d were published and 100 are kept: %s, want recovered false, reason history_too_short", tc.missed, ack2.Raw)
			}
			a.Publish("room", []byte("next"))
			if got := again.Messages("room", 1)[0]; string(got.Payload()) != "next" || got.Seq != ack2.Seq+1 {
				t.Fatalf("after the reset the resubscribed client got %s, want the next message", got.Raw)
			}
		})
	}
}

// A node whose link to Redis lags (the proxy holds every byte for a while)
// delivers late but whole: its subscriber gets every message on the same
// subscription, and a client that subscribes on it during the lag, whose
// history read overtakes the lagging live stream, gets history then live
// with no gap and no repeat.
func TestANodeWhoseRedisLinkLagsDeliversEverythingOnce(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	a := startNode(t, shared.Addr, p, nil)
	proxy := startProxy(t, shared.Addr)
	c := startNode(t, proxy.Addr(), p, nil)
	sub := pubsubtest.Dial(t, c.url(""))
	ack := sub.Subscribe("room")
	publishAlternately(t, "room", 1, 10, a)
	checkSeqs(t, sub.Messages("room", 10), ack.Epoch, 1, numbered(1, 10)...)

	proxy.Stall()
	publishAlternately(t, "room", 11, 160, a)
	late := pubsubtest.Dial(t, c.url(""))
	late.Send(pubsubtest.Fields{"type": "subscribe", "room": "room", "history": 100, "id": "during the lag"})
	proxy.Heal()
	ack2 := late.Reply("during the lag")
	if ack2.Type != "ack" || ack2.Seq != 160 || ack2.Missed == nil || *ack2.Missed != 100 {
		t.Fatalf("subscribe with history 100 during the lag: %s, want seq 160 and 100 missed", ack2.Raw)
	}
	a.Publish("room", []byte("161"))
	checkSeqs(t, sub.Messages("room", 151), ack.Epoch, 11, numbered(11, 161)...)
	checkSeqs(t, late.Messages("room", 101), ack.Epoch, 61, numbered(61, 161)...)
}

// publishAlternately publishes the numbers from..to into room, in turn on
// each node.
func publishAlternately(t *testing.T, room string, from, to int, nodes ...*node) {
	t.Helper()
	for i := from; i <= to; i++ {
		nodes[i%len(nodes)].Publish(room, []byte(fmt.Sprint(i)))
	}
}

func numbered(from, to int) []string {
	var out []string
	for i := from; i <= to; i++ {
		out = append(out, fmt.Sprint(i))
	}
	return out
}

// hookedBroker runs after each keyed publish of the Redis broker, before
// the Handler can acknowledge it.
type hookedBroker struct {
	*redisbroker.Broker
	after func(attempt int)
	n     atomic.Int32
}

func (b *hookedBroker) Publish(ctx context.Context, room string, data []byte, o pubsub.PublishOptions) (pubsub.PublishResult, error) {
	res, err := b.Broker.Publish(ctx, room, data, o)
	if err == nil && o.Key != "" && b.after != nil {
		b.after(int(b.n.Add(1)))
	}
	return res, err
}

// A Go client's publish is sequenced on node A, whose connection drops
// before the ack; the client reconnects through the load balancer to
// node B and sends it again with the same key: Redis recognises the key,
// the message appears once, and the client learns its position.
func TestAResendThatLandsOnAnotherNodeIsStillPublishedOnce(t *testing.T) {
	t.Parallel()
	prefix := uniquePrefix()
	hooked := &hookedBroker{Broker: newBroker(t, shared.Addr, prefix)}
	a := startNodeWith(t, hooked)
	b := startNode(t, shared.Addr, prefix, nil)
	watcher := pubsubtest.Dial(t, b.url(""))
	watcher.Subscribe("room")
	lb := startProxy(t, strings.TrimPrefix(a.URL, "http://"))
	hooked.after = func(attempt int) {
		if attempt == 1 {
			lb.SetTarget(strings.TrimPrefix(b.URL, "http://"))
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
	firstNode := c.ConnID()
	pub, err := c.Publish(pubsubtest.Context(t), "room", []byte("once"))
	if err != nil {
		t.Fatal(err)
	}
	if !pub.Duplicate || pub.Seq != 1 {
		t.Fatalf("Publish = %+v, want the first attempt's seq 1, recognised as a duplicate on the other node", pub)
	}
	if c.ConnID() == firstNode {
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
