package redisbroker_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/roomcast/pubsub/pubsubtest"
	"github.com/roomcast/pubsub/redisbroker"
)

func TestPublishOnOneNodeReachesSubscribersOnAnotherInOrder(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	a, b := startNode(t, shared.Addr, p, nil), startNode(t, shared.Addr, p, nil)
	ca, cb := pubsubtest.Dial(t, a.url("")), pubsubtest.Dial(t, b.url(""))
	ackA, ackB := ca.Subscribe("chat"), cb.Subscribe("chat")
	if ackA.Epoch == "" || ackA.Epoch != ackB.Epoch || ackA.Seq != 0 || ackB.Seq != 0 {
		t.Fatalf("acks %s and %s: want one epoch at seq 0 on both nodes", ackA.Raw, ackB.Raw)
	}
	var want []string
	for i := range 10 {
		data := fmt.Sprintf(`{"n":%d}`, i+1)
		want = append(want, data)
		if i%2 == 0 {
			a.Publish("chat", []byte(data))
		} else if e := cb.Request(pubsubtest.Fields{"type": "publish", "room": "chat", "text": data}); e.Type != "ack" {
			t.Fatalf("client publish on node b: %s", e.Raw)
		}
	}
	checkSeqs(t, ca.Messages("chat", 10), ackA.Epoch, 1, want...)
	checkSeqs(t, cb.Messages("chat", 10), ackA.Epoch, 1, want...)
}

func TestClientMovingToAnotherNodeRecoversExactlyWhatItMissed(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	a, b := startNode(t, shared.Addr, p, nil), startNode(t, shared.Addr, p, nil)
	c1 := pubsubtest.Dial(t, a.url(""))
	ack := c1.Subscribe("room")
	for _, d := range []string{"1", "2", "3"} {
		a.Publish("room", []byte(d))
	}
	got := c1.Messages("room", 3)
	checkSeqs(t, got, ack.Epoch, 1, "1", "2", "3")
	c1.CloseNow()
	for _, d := range []string{"4", "5", "6"} {
		b.Publish("room", []byte(d))
	}
	c2 := pubsubtest.Dial(t, b.url(""))
	ack2 := c2.SubscribeWith(pubsubtest.Fields{"room": "room", "since": pubsubtest.Fields{"epoch": ack.Epoch, "seq": 3}})
	if ack2.Recovered == nil || !*ack2.Recovered || ack2.Missed == nil || *ack2.Missed != 3 || ack2.Seq != 6 {
		t.Fatalf("resubscribe on another node: %s, want recovered with 3 missed at seq 6", ack2.Raw)
	}
	a.Publish("room", []byte("7")) // live, from the node the client left
	checkSeqs(t, c2.Messages("room", 4), ack.Epoch, 4, "4", "5", "6", "7")
}

func TestPresenceSpansNodes(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	a, b := startNode(t, shared.Addr, p, nil), startNode(t, shared.Addr, p, nil)
	ann := pubsubtest.Dial(t, a.url("ann"))
	ann.SubscribeWith(pubsubtest.Fields{"room": "team", "presence": true})
	bob := pubsubtest.Dial(t, b.url("bob"))
	bob.SubscribeWith(pubsubtest.Fields{"room": "team", "presence": true})
	bob2 := pubsubtest.Dial(t, a.url("bob")) // bob's second tab, on the other node
	bob2.Subscribe("team")
	ann.Await("her own join", func(e pubsubtest.Envelope) bool { return e.Type == "join" && e.UserID == "ann" })
	if e := ann.Next(); e.Type != "join" || e.UserID != "bob" || e.ConnID != bob.Welcome.ConnID {
		t.Fatalf("ann got %s, want bob's join from the other node", e.Raw)
	}
	e := ann.Request(pubsubtest.Fields{"type": "presence", "room": "team"})
	users := func(e pubsubtest.Envelope) []string {
		var out []string
		for _, m := range e.Members {
			out = append(out, fmt.Sprint(m.UserID, "/", len(m.Conns)))
		}
		return out
	}
	if e.Count == nil || *e.Count != 2 || *e.Connections != 3 || !slices.Equal(users(e), []string{"ann/1", "bob/2"}) {
		t.Fatalf("presence on node a: %s, want ann and bob (two connections on two nodes)", e.Raw)
	}
	if pr, err := b.Handler.Presence(pubsubtest.Context(t), "team"); err != nil || pr.Count != 2 || pr.Connections != 3 {
		t.Fatalf("presence read by node b's server API: %+v, %v", pr, err)
	}
	bob.CloseNow() // bob keeps his tab on node a: no leave yet
	bob2.CloseNow()
	if e := ann.Next(); e.Type != "leave" || e.UserID != "bob" {
		t.Fatalf("ann got %s, want bob's leave once his last connection closed", e.Raw)
	}
}

func TestKilledNodesMembersExpireAndItsClientsRecoverOnAnotherNode(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	fast := []redisbroker.Option{redisbroker.WithPresenceTTL(600 * time.Millisecond)}
	a, b := startNode(t, shared.Addr, p, fast), startNode(t, shared.Addr, p, fast)
	watcher := pubsubtest.Dial(t, b.url("watcher"))
	watcher.SubscribeWith(pubsubtest.Fields{"room": "room", "presence": true})
	carl := pubsubtest.Dial(t, a.url("carl"))
	ack := carl.Subscribe("room")
	watcher.Await("its own join", func(e pubsubtest.Envelope) bool { return e.Type == "join" && e.UserID == "watcher" })
	if e := watcher.Next(); e.Type != "join" || e.UserID != "carl" {
		t.Fatalf("watcher got %s, want carl's join", e.Raw)
	}
	b.Publish("room", []byte("1"))
	b.Publish("room", []byte("2"))
	checkSeqs(t, carl.Messages("room", 2), ack.Epoch, 1, "1", "2")

	// Kill node a: its broker stops first, so none of its Leaves reach
	// Redis, as if the process died.
	if err := a.b.Close(); err != nil {
		t.Fatal(err)
	}
	a.Handler.Close()
	b.Publish("room", []byte("3"))
	b.Publish("room", []byte("4"))
	start := time.Now()
	leave := watcher.Await("carl's leave", func(e pubsubtest.Envelope) bool { return e.Type == "leave" })
	if leave.UserID != "carl" {
		t.Fatalf("watcher got %s, want carl's leave", leave.Raw)
	}
	t.Logf("carl's entry expired %v after the kill", time.Since(start))
	if pr, err := b.Handler.Presence(pubsubtest.Context(t), "room"); err != nil || pr.Count != 1 || pr.Members[0].UserID != "watcher" {
		t.Fatalf("presence after the kill: %+v, %v; want the watcher alone", pr, err)
	}
	carl2 := pubsubtest.Dial(t, b.url("carl"))
	ack2 := carl2.SubscribeWith(pubsubtest.Fields{"room": "room", "since": pubsubtest.Fields{"epoch": ack.Epoch, "seq": 2}})
	if ack2.Recovered == nil || !*ack2.Recovered || ack2.Missed == nil || *ack2.Missed != 2 {
		t.Fatalf("carl's resubscribe on node b: %s, want recovered with 2 missed", ack2.Raw)
	}
	checkSeqs(t, carl2.Messages("room", 2), ack.Epoch, 3, "3", "4")
}
