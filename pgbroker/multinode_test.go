package pgbroker_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/client"
	"github.com/roomcast/pubsub/pgbroker"
	"github.com/roomcast/pubsub/pubsubtest"
)

func TestPublishOnOneNodeReachesSubscribersOnAnotherInOrder(t *testing.T) {
	t.Parallel()
	s := uniqueSchema()
	a, b := newNode(t, shared.DSN, s, nil), newNode(t, shared.DSN, s, nil)
	wa, wb := watch(t, a.url(""), "chat", false), watch(t, b.url(""), "chat", false)
	pub, err := client.Dial(pubsubtest.Context(t), b.url("pub"), client.WithLogger(pubsubtest.Logger()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pub.Close() })
	var want []string
	for i := range 20 {
		data := fmt.Sprintf(`{"n":%d}`, i+1)
		want = append(want, data)
		if i%2 == 0 {
			a.Publish("chat", []byte(data))
		} else if _, err := pub.Publish(pubsubtest.Context(t), "chat", []byte(data)); err != nil {
			t.Fatalf("client publish on node b: %v", err)
		}
	}
	ma, mb := wa.waitMessages(20), wb.waitMessages(20)
	checkStream(t, ma, ma[0].Epoch, 1, want...)
	checkStream(t, mb, ma[0].Epoch, 1, want...)
}

// A node killed mid-stream: its clients reconnect (through the load
// balancer) to another node and recover exactly what they missed, while
// publishes go on; the members it had (dave, who does not come back) leave
// the room's presence once their entries expire.
func TestANodeKilledMidStreamLosesNothing(t *testing.T) {
	t.Parallel()
	s := uniqueSchema()
	fast := []pgbroker.Option{pgbroker.WithPresenceTTL(600 * time.Millisecond)}
	// The room keeps what a reconnect takes at the publisher's pace.
	roomy := pubsub.WithHistory(5000, time.Minute)
	a, b := newNode(t, shared.DSN, s, fast, roomy), newNode(t, shared.DSN, s, fast, roomy)
	lb := startFront(t, a)
	watcher := watch(t, b.url("watcher"), "room", true)
	carl := watch(t, lb.url("carl"), "room", false)
	watch(t, a.url("dave"), "room", false) // reconnects to node a, in vain
	watcher.waitUntil("carl's and dave's joins", func(items []item) bool {
		return slices.ContainsFunc(items, func(i item) bool { return i.ev != nil && i.ev.Type == client.EventJoin && i.ev.UserID == "dave" }) &&
			slices.ContainsFunc(items, func(i item) bool { return i.ev != nil && i.ev.Type == client.EventJoin && i.ev.UserID == "carl" })
	})

	// Publish on node b throughout, 500 a second.
	stop := make(chan struct{})
	published := make(chan int, 1)
	go func() {
		n := 0
		defer func() { published <- n }()
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if err := b.Handler.Publish(context.Background(), "room", fmt.Appendf(nil, "%d", n+1)); err != nil {
				t.Errorf("publish %d: %v", n+1, err)
				return
			}
			n++
		}
	}()
	carl.waitMessages(20)
	// The node dies first, then the balancer sends its clients elsewhere:
	// cut first, node a would see carl's connection close and say he left
	// (a leave, then his join on node b), as a live node does.
	a.kill(t)
	lb.point(b)
	carl.waitUntil("a recovery on node b", func(items []item) bool { return len(recoveries(items)) > 0 })
	carl.waitMessages(len(carl.received()) + 20) // live again, on node b
	close(stop)
	n := <-published

	got := carl.waitMessages(n)
	checkStream(t, got, got[0].Epoch, 1, numbered(1, n)...)
	if r := recoveries(carl.received()); len(r) != 1 || !r[0].Recovered {
		t.Fatalf("carl's recoveries %+v, want one, recovered", r)
	}
	leave := watcher.waitUntil("dave's leave", func(items []item) bool {
		return slices.ContainsFunc(items, func(i item) bool { return i.ev != nil && i.ev.Type == client.EventLeave })
	})
	if i := slices.IndexFunc(leave, func(i item) bool { return i.ev != nil && i.ev.Type == client.EventLeave }); leave[i].ev.UserID != "dave" {
		t.Fatalf("watcher got %v, want dave's leave (carl is back on node b: still a member)", leave[i])
	}
	p, err := b.Handler.Presence(pubsubtest.Context(t), "room")
	if err != nil || p.Count != 2 || p.Connections != 2 {
		t.Fatalf("presence after the kill: %+v, %v; want the watcher and carl's new connection", p, err)
	}
	checkStream(t, watcher.waitMessages(n), got[0].Epoch, 1, numbered(1, n)...)
}

func TestPresenceSpansNodes(t *testing.T) {
	t.Parallel()
	s := uniqueSchema()
	a, b := newNode(t, shared.DSN, s, nil), newNode(t, shared.DSN, s, nil)
	ann := watch(t, a.url("ann"), "team", true)
	bob := watch(t, b.url("bob"), "team", true)
	bob2, err := client.Dial(pubsubtest.Context(t), a.url("bob"), client.WithLogger(pubsubtest.Logger())) // bob's second tab, on the other node
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bob2.Subscribe(pubsubtest.Context(t), "team", func(client.Message) {}); err != nil {
		t.Fatal(err)
	}
	joins := func(items []item) (out []string) {
		for _, i := range items {
			if i.ev != nil {
				out = append(out, i.ev.Type.String()+":"+i.ev.UserID)
			}
		}
		return out
	}
	ann.waitUntil("bob's join from the other node", func(items []item) bool {
		return slices.Equal(joins(items), []string{"join:ann", "join:bob"})
	})
	p, err := ann.sub.Presence(pubsubtest.Context(t))
	if err != nil || p.Count != 2 || p.Connections != 3 {
		t.Fatalf("presence on node a: %+v, %v; want ann and bob, three connections on two nodes", p, err)
	}
	bob.c.Close() // bob keeps his tab on node a: no leave yet
	bob2.Close()
	got := ann.waitUntil("bob's leave once his last connection closed", func(items []item) bool { return len(joins(items)) == 3 })
	if j := joins(got); j[2] != "leave:bob" {
		t.Fatalf("ann got %v, want bob's leave last", j)
	}
}

// Several nodes publish into many rooms at once: every node's subscribers
// get every room's messages once, in one gap-free sequence per room.
func TestManyNodesManyRoomsOneSequenceEach(t *testing.T) {
	t.Parallel()
	s := uniqueSchema()
	nodes := []*node{newNode(t, shared.DSN, s, nil), newNode(t, shared.DSN, s, nil), newNode(t, shared.DSN, s, nil)}
	const rooms, each = 8, 25
	var ws [][]*watcher
	for _, n := range nodes {
		var row []*watcher
		for r := range rooms {
			row = append(row, watch(t, n.url(""), fmt.Sprint("room-", r), false))
		}
		ws = append(ws, row)
	}
	var wg sync.WaitGroup
	for i, n := range nodes {
		for r := range rooms {
			wg.Go(func() {
				for k := range each {
					if err := n.Handler.Publish(context.Background(), fmt.Sprint("room-", r), fmt.Appendf(nil, "n%d-%d", i, k)); err != nil {
						t.Errorf("publish: %v", err)
						return
					}
				}
			})
		}
	}
	wg.Wait()
	total := len(nodes) * each
	for r := range rooms {
		first := ws[0][r].waitMessages(total)
		for i := range nodes {
			got := ws[i][r].waitMessages(total)
			checkStream(t, got, first[0].Epoch, 1, payloads(first)...)
		}
	}
}
