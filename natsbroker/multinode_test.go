package natsbroker_test

import (
	"fmt"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/natsbroker"
	"github.com/roomcast/pubsub/pubsubtest"
)

// node is one Handler with its own NATS connection and broker, served on
// a loopback port: one node of a cluster.
type node struct {
	*pubsubtest.Server
	b  pubsub.Broker
	nc *nats.Conn
}

// startNode starts a node whose broker connects to url. Clients name their
// user with ?user=. Cleanup closes the Handler (and so the broker), the
// server, then the connection.
func startNode(t *testing.T, url, prefix string, bopts []natsbroker.Option, hopts ...pubsub.Option) *node {
	t.Helper()
	return startNodeOn(t, connect(t, url), prefix, bopts, hopts...)
}

// startNodeOn starts a node on the connection nc.
func startNodeOn(t *testing.T, nc *nats.Conn, prefix string, bopts []natsbroker.Option, hopts ...pubsub.Option) *node {
	t.Helper()
	n := startNodeWith(t, newBrokerOn(t, nc, prefix, bopts...), hopts...)
	n.nc = nc
	return n
}

// startNodeWith starts a node on the broker b.
func startNodeWith(t *testing.T, b pubsub.Broker, hopts ...pubsub.Option) *node {
	t.Helper()
	srv := pubsubtest.Start(t, append([]pubsub.Option{
		pubsub.WithBroker(b),
		pubsub.WithClientPublish(true),
		pubsub.WithHistory(100, time.Minute),
		pubsub.WithAuthenticate(func(r *http.Request) (pubsub.Identity, error) {
			return pubsub.Identity{UserID: r.URL.Query().Get("user")}, nil
		}),
	}, hopts...)...)
	return &node{Server: srv, b: b}
}

// as is the path of a protocol client of user.
func as(user string) string {
	if user == "" {
		return "/ws"
	}
	return "/ws?user=" + user
}

// since is a subscribe's "since" field.
func since(epoch string, seq uint64) map[string]any {
	return map[string]any{"epoch": epoch, "seq": seq}
}

// checkSeqs checks the messages' payloads and consecutive seqs of one epoch.
func checkSeqs(t *testing.T, got []pubsubtest.Envelope, epoch string, firstSeq uint64, payloads ...string) {
	t.Helper()
	for i, e := range got {
		if e.Epoch != epoch || e.Seq != firstSeq+uint64(i) || string(e.Payload()) != payloads[i] {
			t.Fatalf("message %d is %s, want epoch %s seq %d payload %s", i, e.Raw, epoch, firstSeq+uint64(i), payloads[i])
		}
	}
}

func numbered(from, to int) []string {
	var out []string
	for i := from; i <= to; i++ {
		out = append(out, fmt.Sprint(i))
	}
	return out
}

func TestPublishOnOneNodeReachesSubscribersOnAnotherInOrder(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	a, b := startNode(t, shared.URL, p, nil), startNode(t, shared.URL, p, nil)
	ca, cb := a.Dial(as("")), b.Dial(as(""))
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
		} else {
			cb.Publish("chat", data)
		}
	}
	checkSeqs(t, ca.Messages("chat", 10), ackA.Epoch, 1, want...)
	checkSeqs(t, cb.Messages("chat", 10), ackA.Epoch, 1, want...)
}

// Several Handlers on one NATS, each with its own subscribers, publishing
// at once: every subscriber sees the one sequence, whole and in order.
func TestManyNodesPublishingAtOnceShareOneSequence(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	const nodes, each = 4, 25
	var ns []*node
	var clients []*pubsubtest.Conn
	var epoch string
	for range nodes {
		n := startNode(t, shared.URL, p, nil)
		ns = append(ns, n)
		c := n.Dial(as(""))
		ack := c.Subscribe("busy")
		if epoch == "" {
			epoch = ack.Epoch
		}
		if ack.Epoch != epoch {
			t.Fatalf("ack %s: want the room's one epoch %s", ack.Raw, epoch)
		}
		clients = append(clients, c)
	}
	errs := make(chan error, nodes)
	for i, n := range ns {
		go func() {
			for j := range each {
				if err := n.Handler.Publish(pubsubtest.Context(t), "busy", fmt.Appendf(nil, "%d-%d", i, j)); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range nodes {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	var first []string
	for i, c := range clients {
		msgs := c.Messages("busy", nodes*each) // pubsubtest checks seq follows seq
		var got []string
		for _, m := range msgs {
			got = append(got, string(m.Payload()))
		}
		if msgs[0].Seq != 1 || msgs[len(msgs)-1].Seq != nodes*each {
			t.Fatalf("client %d: seqs %d to %d, want 1 to %d", i, msgs[0].Seq, msgs[len(msgs)-1].Seq, nodes*each)
		}
		if first == nil {
			first = got
		} else if !slices.Equal(got, first) {
			t.Fatalf("client %d saw another order than client 0", i)
		}
	}
}

func TestClientMovingToAnotherNodeRecoversExactlyWhatItMissed(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	a, b := startNode(t, shared.URL, p, nil), startNode(t, shared.URL, p, nil)
	c1 := a.Dial(as(""))
	ack := c1.Subscribe("room")
	for _, d := range []string{"1", "2", "3"} {
		a.Publish("room", []byte(d))
	}
	checkSeqs(t, c1.Messages("room", 3), ack.Epoch, 1, "1", "2", "3")
	c1.CloseNow()
	for _, d := range []string{"4", "5", "6"} {
		b.Publish("room", []byte(d))
	}
	c2 := b.Dial(as(""))
	ack2 := c2.SubscribeWith(pubsubtest.Fields{"room": "room", "since": since(ack.Epoch, 3)})
	if ack2.Recovered == nil || !*ack2.Recovered || ack2.Missed == nil || *ack2.Missed != 3 || ack2.Seq != 6 {
		t.Fatalf("resubscribe on another node: %s, want recovered with 3 missed at seq 6", ack2.Raw)
	}
	a.Publish("room", []byte("7")) // live, from the node the client left
	checkSeqs(t, c2.Messages("room", 4), ack.Epoch, 4, "4", "5", "6", "7")
}

func TestPresenceSpansNodes(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	a, b := startNode(t, shared.URL, p, nil), startNode(t, shared.URL, p, nil)
	ann := a.Dial(as("ann"))
	ann.SubscribeWith(pubsubtest.Fields{"room": "team", "presence": true})
	bob := b.Dial(as("bob"))
	bob.SubscribeWith(pubsubtest.Fields{"room": "team", "presence": true})
	bob2 := a.Dial(as("bob")) // bob's second tab, on the other node
	bob2.Subscribe("team")
	ann.Await("her own join", func(e pubsubtest.Envelope) bool { return e.Type == "join" && e.UserID == "ann" })
	if e := ann.Next(); e.Type != "join" || e.UserID != "bob" || e.ConnID != bob.Welcome.ConnID {
		t.Fatalf("ann got %s, want bob's join from the other node", e.Raw)
	}
	e := ann.Request(pubsubtest.Fields{"type": "presence", "room": "team"})
	var users []string
	for _, m := range e.Members {
		users = append(users, fmt.Sprint(m.UserID, "/", len(m.Conns)))
	}
	if *e.Count != 2 || *e.Connections != 3 || !slices.Equal(users, []string{"ann/1", "bob/2"}) {
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

// A Handler node killed mid-stream: its broker stops without a word (no
// leave, no unsubscribe). Its members expire and leave, and its clients
// recover exactly what they missed on another node.
func TestKilledNodesMembersExpireAndItsClientsRecoverOnAnotherNode(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	fast := []natsbroker.Option{natsbroker.WithPresenceTTL(3 * time.Second)}
	a, b := startNode(t, shared.URL, p, fast), startNode(t, shared.URL, p, fast)
	watcher := b.Dial(as("watcher"))
	watcher.SubscribeWith(pubsubtest.Fields{"room": "room", "presence": true})
	carl := a.Dial(as("carl"))
	ack := carl.Subscribe("room")
	watcher.Await("its own join", func(e pubsubtest.Envelope) bool { return e.Type == "join" && e.UserID == "watcher" })
	if e := watcher.Next(); e.Type != "join" || e.UserID != "carl" {
		t.Fatalf("watcher got %s, want carl's join", e.Raw)
	}
	b.Publish("room", []byte("1"))
	b.Publish("room", []byte("2"))
	checkSeqs(t, carl.Messages("room", 2), ack.Epoch, 1, "1", "2")

	// Kill node a mid-stream: its broker stops first, so none of its
	// leaves reach NATS, as if the process died. Node b goes on
	// publishing, paced so the room's history (100) holds it all.
	stop := make(chan struct{})
	published := make(chan int)
	go func() {
		n := 2
		defer func() { published <- n }()
		pace := time.NewTicker(40 * time.Millisecond)
		defer pace.Stop()
		for n < 90 {
			select {
			case <-stop:
				return
			case <-pace.C:
			}
			if err := b.Handler.Publish(pubsubtest.Context(t), "room", fmt.Append(nil, n+1)); err != nil {
				t.Error(err)
				return
			}
			n++
		}
	}()
	if err := a.b.Close(); err != nil {
		t.Fatal(err)
	}
	a.Handler.Close()
	start := time.Now()
	leave := watcher.Await("carl's leave", func(e pubsubtest.Envelope) bool { return e.Type == "leave" })
	close(stop)
	last := <-published
	if leave.UserID != "carl" {
		t.Fatalf("watcher got %s, want carl's leave", leave.Raw)
	}
	t.Logf("carl's entry expired %v after the kill; %d messages published meanwhile", time.Since(start), last-2)
	if pr, err := b.Handler.Presence(pubsubtest.Context(t), "room"); err != nil || pr.Count != 1 || pr.Members[0].UserID != "watcher" {
		t.Fatalf("presence after the kill: %+v, %v; want the watcher alone", pr, err)
	}
	carl2 := b.Dial(as("carl"))
	ack2 := carl2.SubscribeWith(pubsubtest.Fields{"room": "room", "since": since(ack.Epoch, 2)})
	if ack2.Recovered == nil || !*ack2.Recovered || *ack2.Missed != last-2 {
		t.Fatalf("carl's resubscribe on node b: %s, want recovered with %d missed", ack2.Raw, last-2)
	}
	checkSeqs(t, carl2.Messages("room", last-2), ack.Epoch, 3, numbered(3, last)...)
}
