package redisbroker_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/roomcast/pubsub/redisbroker"
)

func TestPublishOnOneNodeReachesSubscribersOnAnotherInOrder(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	a, b := startNode(t, shared.Addr, p, nil), startNode(t, shared.Addr, p, nil)
	ca, cb := dialProto(t, a.url("")), dialProto(t, b.url(""))
	ackA, ackB := ca.subscribe("chat", nil), cb.subscribe("chat", nil)
	if ackA.Epoch == "" || ackA.Epoch != ackB.Epoch || ackA.Seq != 0 || ackB.Seq != 0 {
		t.Fatalf("acks %s and %s: want one epoch at seq 0 on both nodes", ackA.raw, ackB.raw)
	}
	var want []string
	for i := range 10 {
		data := fmt.Sprintf(`{"n":%d}`, i+1)
		want = append(want, data)
		if i%2 == 0 {
			a.publish(t, "chat", data)
		} else if e := cb.request(map[string]any{"type": "publish", "room": "chat", "text": data}); e.Type != "ack" {
			t.Fatalf("client publish on node b: %s", e.raw)
		}
	}
	checkSeqs(t, ca.readMessages("chat", 10), ackA.Epoch, 1, want...)
	checkSeqs(t, cb.readMessages("chat", 10), ackA.Epoch, 1, want...)
}

func TestClientMovingToAnotherNodeRecoversExactlyWhatItMissed(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	a, b := startNode(t, shared.Addr, p, nil), startNode(t, shared.Addr, p, nil)
	c1 := dialProto(t, a.url(""))
	ack := c1.subscribe("room", nil)
	for _, d := range []string{"1", "2", "3"} {
		a.publish(t, "room", d)
	}
	got := c1.readMessages("room", 3)
	checkSeqs(t, got, ack.Epoch, 1, "1", "2", "3")
	c1.c.CloseNow()
	for _, d := range []string{"4", "5", "6"} {
		b.publish(t, "room", d)
	}
	c2 := dialProto(t, b.url(""))
	ack2 := c2.subscribe("room", map[string]any{"since": map[string]any{"epoch": ack.Epoch, "seq": 3}})
	if ack2.Recovered == nil || !*ack2.Recovered || ack2.Missed != 3 || ack2.Seq != 6 {
		t.Fatalf("resubscribe on another node: %s, want recovered with 3 missed at seq 6", ack2.raw)
	}
	a.publish(t, "room", "7") // live, from the node the client left
	checkSeqs(t, c2.readMessages("room", 4), ack.Epoch, 4, "4", "5", "6", "7")
}

func TestPresenceSpansNodes(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	a, b := startNode(t, shared.Addr, p, nil), startNode(t, shared.Addr, p, nil)
	ann := dialProto(t, a.url("ann"))
	ann.subscribe("team", map[string]any{"presence": true})
	bob := dialProto(t, b.url("bob"))
	bob.subscribe("team", map[string]any{"presence": true})
	bob2 := dialProto(t, a.url("bob")) // bob's second tab, on the other node
	bob2.subscribe("team", nil)
	ann.readUntil("her own join", func(e envelope) bool { return e.Type == "join" && e.UserID == "ann" })
	if e := ann.read(); e.Type != "join" || e.UserID != "bob" || e.ConnID != bob.welcome.ConnID {
		t.Fatalf("ann got %s, want bob's join from the other node", e.raw)
	}
	e := ann.request(map[string]any{"type": "presence", "room": "team"})
	users := func(e envelope) []string {
		var out []string
		for _, m := range e.Members {
			out = append(out, fmt.Sprint(m.UserID, "/", len(m.Conns)))
		}
		return out
	}
	if e.Count != 2 || e.Connections != 3 || !slices.Equal(users(e), []string{"ann/1", "bob/2"}) {
		t.Fatalf("presence on node a: %s, want ann and bob (two connections on two nodes)", e.raw)
	}
	if pr, err := b.h.Presence(testCtx(t), "team"); err != nil || pr.Count != 2 || pr.Connections != 3 {
		t.Fatalf("presence read by node b's server API: %+v, %v", pr, err)
	}
	bob.c.CloseNow() // bob keeps his tab on node a: no leave yet
	bob2.c.CloseNow()
	if e := ann.read(); e.Type != "leave" || e.UserID != "bob" {
		t.Fatalf("ann got %s, want bob's leave once his last connection closed", e.raw)
	}
}

func TestKilledNodesMembersExpireAndItsClientsRecoverOnAnotherNode(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	fast := []redisbroker.Option{redisbroker.WithPresenceTTL(600 * time.Millisecond)}
	a, b := startNode(t, shared.Addr, p, fast), startNode(t, shared.Addr, p, fast)
	watcher := dialProto(t, b.url("watcher"))
	watcher.subscribe("room", map[string]any{"presence": true})
	carl := dialProto(t, a.url("carl"))
	ack := carl.subscribe("room", nil)
	watcher.readUntil("its own join", func(e envelope) bool { return e.Type == "join" && e.UserID == "watcher" })
	if e := watcher.read(); e.Type != "join" || e.UserID != "carl" {
		t.Fatalf("watcher got %s, want carl's join", e.raw)
	}
	b.publish(t, "room", "1")
	b.publish(t, "room", "2")
	checkSeqs(t, carl.readMessages("room", 2), ack.Epoch, 1, "1", "2")

	// Kill node a: its broker stops first, so none of its Leaves reach
	// Redis, as if the process died.
	if err := a.b.Close(); err != nil {
		t.Fatal(err)
	}
	a.h.Close()
	b.publish(t, "room", "3")
	b.publish(t, "room", "4")
	start := time.Now()
	leave := watcher.readUntil("carl's leave", func(e envelope) bool { return e.Type == "leave" })
	if leave.UserID != "carl" {
		t.Fatalf("watcher got %s, want carl's leave", leave.raw)
	}
	t.Logf("carl's entry expired %v after the kill", time.Since(start))
	if pr, err := b.h.Presence(testCtx(t), "room"); err != nil || pr.Count != 1 || pr.Members[0].UserID != "watcher" {
		t.Fatalf("presence after the kill: %+v, %v; want the watcher alone", pr, err)
	}
	carl2 := dialProto(t, b.url("carl"))
	ack2 := carl2.subscribe("room", map[string]any{"since": map[string]any{"epoch": ack.Epoch, "seq": 2}})
	if ack2.Recovered == nil || !*ack2.Recovered || ack2.Missed != 2 {
		t.Fatalf("carl's resubscribe on node b: %s, want recovered with 2 missed", ack2.raw)
	}
	checkSeqs(t, carl2.readMessages("room", 2), ack.Epoch, 3, "3", "4")
}
