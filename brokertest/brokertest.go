// Package brokertest is the conformance suite for pubsub.Broker
// implementations. An adapter's tests call Run against a real server:
//
//	func TestConformance(t *testing.T) {
//		brokertest.Run(t, func(t *testing.T) pubsub.Broker {
//			return mybroker.New(client, mybroker.WithPrefix(unique(t)))
//		})
//	}
//
// A multi-node adapter also calls RunCluster with a factory whose brokers,
// within one test, share one backend: they are the nodes of one cluster;
// and RunPartition with nodes whose link to the backend a test can cut
// (internal/faultproxy is such a link, a TCP proxy).
//
// Every check also holds each node's deliveries to the rule the Handler
// relies on: within a subscription, a room's messages follow one another
// (the same epoch, seq one more than the last) unless a KindReset comes
// first. A broker that cannot deliver what it lost says so before it
// delivers anything past the hole.
//
// Each check is a subtest named after the guarantee it protects, and every
// wait is bounded. The suite uses fresh random room names, so brokers may
// share a backend with other tests; it binds each broker itself and closes
// it at the end of the subtest (the factory may register more cleanup).
package brokertest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/roomcast/pubsub"
)

// waitTimeout bounds every wait of the suite: a delivery, a history poll.
const waitTimeout = 15 * time.Second

// Run checks a single node: newBroker returns a fresh, unbound broker.
func Run(t *testing.T, newBroker func(t *testing.T) pubsub.Broker) {
	runChecks(t, newBroker, []check[func(t *testing.T) pubsub.Broker]{
		{"BindingTwicePanics", testBindTwice},
		{"ConcurrentPublishersGetOneGaplessSequence", testSequence},
		{"DeliveryFollowsInterestInOrderNeverConcurrently", testInterest},
		{"PublishWithNoHistoryAndNoInterestMayDrop", testMayDrop},
		{"HistoryKeepsTheNewestSizeMessages", testHistorySize},
		{"HistoryQuerySinceLimitLatest", testHistoryQuery},
		{"HistoryAgesOutByTTL", testHistoryTTL},
		{"HistoryLimitZeroGivesTheRecoveryPosition", testPosition},
		{"PresenceCountsUsersOnceAcrossConnections", testPresence},
		{"PresenceEventsOnFirstJoinAndLastLeaveOnlyWithEvents", testPresenceEvents},
		{"ClosedBrokerFailsWithErrClosed", testClosed},
		{"AKeyIsSequencedOncePerRoom", testKeyOnce},
		{"ConcurrentPublishesOfOneKeySequenceOnce", testKeyConcurrent},
		{"AKeyIsForgottenAfterKeyTTL", testKeyTTL},
	})
}

// check is one guarantee of the suite: a subtest of that name.
type check[F any] struct {
	name string
	f    func(t *testing.T, factory F)
}

// runChecks runs each check as a parallel subtest with the factory.
func runChecks[F any](t *testing.T, factory F, checks []check[F]) {
	for _, c := range checks {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			c.f(t, factory)
		})
	}
}

// A Link is a node's network path to its backend, which RunPartition cuts
// and heals.
type Link interface {
	// Cut makes the backend unreachable from the node: its connections
	// drop and new ones fail, until Heal.
	Cut()
	// Heal makes the backend reachable again.
	Heal()
}

// RunPartition checks what a node cut off from its cluster does: newNode
// returns a node of one cluster (every node of one test shares a backend)
// and the link between that node and the backend.
func RunPartition(t *testing.T, newNode func(t *testing.T) (pubsub.Broker, Link)) {
	runChecks(t, newNode, []check[func(t *testing.T) (pubsub.Broker, Link)]{
		{"ShortOutageIsFilledFromHistoryInOrder", testShortOutage},
		{"LongOutageResetsBeforeAnythingPastTheHole", testLongOutage},
		{"PublishDuringOutageFails", testPublishDuringOutage},
	})
}

// RunCluster checks several nodes of one cluster: within one test, every
// broker newNode returns shares one backend with the others.
func RunCluster(t *testing.T, newNode func(t *testing.T) pubsub.Broker) {
	runChecks(t, newNode, []check[func(t *testing.T) pubsub.Broker]{
		{"EveryNodeSeesOneSequenceInOrder", testClusterSequence},
		{"OnlyInterestedNodesReceive", testClusterInterest},
		{"HistoryAndPositionAreShared", testClusterHistory},
		{"PresenceAndEventsAreShared", testClusterPresence},
		{"AKeyIsSeenByEveryNode", testClusterKey},
	})
}

// node is a bound broker and what it delivered.
type node struct {
	t   *testing.T
	b   pubsub.Broker
	rec *recorder
}

func newNode(t *testing.T, newBroker func(t *testing.T) pubsub.Broker) *node {
	t.Helper()
	b := newBroker(t)
	if b == nil {
		t.Fatal("the factory returned a nil broker")
	}
	rec := newRecorder()
	b.Bind(rec.deliver)
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if rooms := rec.overlapping(); len(rooms) > 0 {
			t.Errorf("deliver ran concurrently for one room: %v", rooms)
		}
		for _, hole := range rec.holes() {
			t.Errorf("a hole without a KindReset first: %s", hole)
		}
	})
	return &node{t: t, b: b, rec: rec}
}

// recorder is the deliver function of a node under test.
type recorder struct {
	mu       sync.Mutex
	msgs     map[string][]pubsub.Message
	inflight map[string]int
	overlap  map[string]bool
	last     map[string]pubsub.Message // the last message of each room's stream; absent after a subscribe or reset
	hole     []string                  // messages that did not follow the last one, with no reset between
	changed  chan struct{}             // closed on every delivery, then replaced
}

func newRecorder() *recorder {
	return &recorder{
		msgs:     make(map[string][]pubsub.Message),
		inflight: make(map[string]int),
		overlap:  make(map[string]bool),
		last:     make(map[string]pubsub.Message),
		changed:  make(chan struct{}),
	}
}

func (r *recorder) deliver(m pubsub.Message) {
	r.mu.Lock()
	r.inflight[m.Room]++
	if r.inflight[m.Room] > 1 {
		r.overlap[m.Room] = true
	}
	r.mu.Unlock()
	runtime.Gosched() // widen the window in which an overlapping delivery shows
	r.mu.Lock()
	r.inflight[m.Room]--
	r.msgs[m.Room] = append(r.msgs[m.Room], m)
	r.follow(m)
	close(r.changed)
	r.changed = make(chan struct{})
	r.mu.Unlock()
}

// follow checks that m continues its room's stream, as the Handler needs:
// the next seq of the same epoch, a repeat (which the Handler drops), or
// anything at all after a reset or a new subscription.
func (r *recorder) follow(m pubsub.Message) {
	switch m.Kind {
	case pubsub.KindReset:
		delete(r.last, m.Room)
	case pubsub.KindMessage:
		last, ok := r.last[m.Room]
		switch {
		case !ok:
		case m.Epoch == last.Epoch && m.Seq <= last.Seq:
			return // a repeat
		case m.Epoch != last.Epoch || m.Seq != last.Seq+1:
			r.hole = append(r.hole, fmt.Sprintf("room %s: %s/%d after %s/%d", m.Room, m.Epoch, m.Seq, last.Epoch, last.Seq))
		}
		r.last[m.Room] = m
	}
}

// restart forgets room's stream: a new subscription may start anywhere.
func (r *recorder) restart(room string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.last, room)
}

func (r *recorder) holes() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.hole)
}

func (r *recorder) overlapping() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for room := range r.overlap {
		out = append(out, room)
	}
	return out
}

// got returns a copy of what was delivered for room.
func (r *recorder) got(room string) []pubsub.Message {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.msgs[room])
}

// waitFor waits until cond holds for room's deliveries and returns them.
func (r *recorder) waitFor(t *testing.T, room, what string, cond func([]pubsub.Message) bool) []pubsub.Message {
	t.Helper()
	deadline := time.NewTimer(waitTimeout)
	defer deadline.Stop()
	for {
		r.mu.Lock()
		msgs := slices.Clone(r.msgs[room])
		changed := r.changed
		r.mu.Unlock()
		if cond(msgs) {
			return msgs
		}
		select {
		case <-changed:
		case <-deadline.C:
			t.Fatalf("room %s: timed out waiting for %s; delivered so far: %s", room, what, describe(msgs))
		}
	}
}

// waitData waits until a message with data was delivered for room.
func (r *recorder) waitData(t *testing.T, room string, data []byte) []pubsub.Message {
	t.Helper()
	return r.waitFor(t, room, fmt.Sprintf("the message %q", data), func(ms []pubsub.Message) bool {
		return slices.ContainsFunc(ms, func(m pubsub.Message) bool {
			return m.Kind == pubsub.KindMessage && bytes.Equal(m.Data, data)
		})
	})
}

func describe(ms []pubsub.Message) string {
	var b bytes.Buffer
	b.WriteByte('[')
	for i, m := range ms {
		if i > 0 {
			b.WriteString(", ")
		}
		switch m.Kind {
		case pubsub.KindJoin:
			fmt.Fprintf(&b, "join(%s/%s)", m.Member.UserID, m.Member.ConnID)
		case pubsub.KindLeave:
			fmt.Fprintf(&b, "leave(%s/%s)", m.Member.UserID, m.Member.ConnID)
		default:
			fmt.Fprintf(&b, "%d:%q", m.Seq, m.Data)
		}
	}
	b.WriteByte(']')
	return b.String()
}

func ctx(t *testing.T) context.Context {
	t.Helper()
	c, cancel := context.WithTimeout(context.Background(), waitTimeout)
	t.Cleanup(cancel)
	return c
}

// room returns a fresh room name no other test uses.
func room(t *testing.T) string {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return "conformance-" + hex.EncodeToString(b[:])
}

// keep is a history bound that keeps everything a check publishes.
var keep = pubsub.HistoryOptions{Size: 1000, TTL: time.Minute}

func (n *node) subscribe(room string) {
	n.t.Helper()
	n.rec.restart(room)
	if err := n.b.Subscribe(ctx(n.t), room); err != nil {
		n.t.Fatalf("Subscribe(%s): %v", room, err)
	}
}

func (n *node) unsubscribe(room string) {
	n.t.Helper()
	if err := n.b.Unsubscribe(ctx(n.t), room); err != nil {
		n.t.Fatalf("Unsubscribe(%s): %v", room, err)
	}
}

func (n *node) publish(room, data string, h pubsub.HistoryOptions) pubsub.Message {
	n.t.Helper()
	res, err := n.b.Publish(ctx(n.t), room, []byte(data), pubsub.PublishOptions{History: h})
	if err != nil {
		n.t.Fatalf("Publish(%s, %q): %v", room, data, err)
	}
	if res.Duplicate {
		n.t.Fatalf("Publish(%s, %q) with no key returned Duplicate", room, data)
	}
	return res.Message
}

// publishKey publishes data with an idempotency key remembered for ttl.
func (n *node) publishKey(room, data, key string, ttl time.Duration) pubsub.PublishResult {
	n.t.Helper()
	res, err := n.b.Publish(ctx(n.t), room, []byte(data), pubsub.PublishOptions{History: keep, Key: key, KeyTTL: ttl})
	if err != nil {
		n.t.Fatalf("Publish(%s, %q, key %q): %v", room, data, key, err)
	}
	return res
}

// checkDuplicate checks that res is a duplicate of first: the first
// publish's position and no new message.
func checkDuplicate(t *testing.T, what string, res pubsub.PublishResult, first pubsub.Message) {
	t.Helper()
	if !res.Duplicate || res.Kind != pubsub.KindMessage || res.Room != first.Room || res.ID != first.ID ||
		res.Epoch != first.Epoch || res.Seq != first.Seq || !res.Time.Equal(first.Time) {
		t.Fatalf("%s: %+v, want Duplicate with the first publish's position %s/%d id %s", what, res, first.Epoch, first.Seq, first.ID)
	}
}

func (n *node) history(room string, q pubsub.HistoryQuery) pubsub.HistoryResult {
	n.t.Helper()
	res, err := n.b.History(ctx(n.t), room, q)
	if err != nil {
		n.t.Fatalf("History(%s, %+v): %v", room, q, err)
	}
	return res
}

func (n *node) join(room string, m pubsub.Member, events bool) {
	n.t.Helper()
	if err := n.b.Join(ctx(n.t), room, m, events); err != nil {
		n.t.Fatalf("Join(%s, %+v): %v", room, m, err)
	}
}

func (n *node) leave(room string, m pubsub.Member, events bool) {
	n.t.Helper()
	if err := n.b.Leave(ctx(n.t), room, m, events); err != nil {
		n.t.Fatalf("Leave(%s, %+v): %v", room, m, err)
	}
}

func (n *node) presence(room string, countsOnly bool) pubsub.Presence {
	n.t.Helper()
	p, err := n.b.Presence(ctx(n.t), room, countsOnly)
	if err != nil {
		n.t.Fatalf("Presence(%s): %v", room, err)
	}
	return p
}

// seqs lists the Seq of each message, presence events as 0.
func seqs(ms []pubsub.Message) []uint64 {
	out := make([]uint64, len(ms))
	for i, m := range ms {
		out[i] = m.Seq
	}
	return out
}

func span(from, to uint64) []uint64 {
	var out []uint64
	for s := from; s <= to; s++ {
		out = append(out, s)
	}
	return out
}

// checkMessages compares history or deliveries with what Publish returned.
func checkMessages(t *testing.T, what string, got []pubsub.Message, want []pubsub.Message) {
	t.Helper()
	if !slices.Equal(seqs(got), seqs(want)) {
		t.Fatalf("%s: seqs %v, want %v", what, seqs(got), seqs(want))
	}
	for i := range got {
		g, w := got[i], want[i]
		if g.Kind != pubsub.KindMessage || g.Room != w.Room || g.ID != w.ID || g.Epoch != w.Epoch ||
			!bytes.Equal(g.Data, w.Data) || !g.Time.Equal(w.Time) {
			t.Fatalf("%s: message %d is %+v, want %+v", what, i, g, w)
		}
	}
}

func testBindTwice(t *testing.T, newBroker func(t *testing.T) pubsub.Broker) {
	n := newNode(t, newBroker)
	defer func() {
		if recover() == nil {
			t.Fatal("a second Bind did not panic: two Handlers would silently share one broker's deliveries")
		}
	}()
	n.b.Bind(func(pubsub.Message) {})
}

func testSequence(t *testing.T, newBroker func(t *testing.T) pubsub.Broker) {
	n := newNode(t, newBroker)
	r := room(t)
	n.subscribe(r)
	const publishers, each = 4, 40
	start := time.Now()
	results := make([][]pubsub.Message, publishers)
	var wg sync.WaitGroup
	for g := range publishers {
		wg.Go(func() {
			for i := range each {
				res, err := n.b.Publish(ctx(t), r, fmt.Appendf(nil, "p%d-%d", g, i), pubsub.PublishOptions{History: keep})
				if err != nil {
					t.Errorf("Publish: %v", err)
					return
				}
				results[g] = append(results[g], res.Message)
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	all := slices.Concat(results...)
	slices.SortFunc(all, func(a, b pubsub.Message) int { return int(a.Seq) - int(b.Seq) })
	if !slices.Equal(seqs(all), span(1, publishers*each)) {
		t.Fatalf("Publish returned seqs %v, want 1 to %d each once", seqs(all), publishers*each)
	}
	ids := make(map[string]bool)
	for _, m := range all {
		if m.Kind != pubsub.KindMessage || m.Room != r {
			t.Fatalf("Publish returned %+v: wrong kind or room", m)
		}
		if m.Epoch == "" || m.Epoch != all[0].Epoch {
			t.Fatalf("epoch %q, want one non-empty epoch (first %q)", m.Epoch, all[0].Epoch)
		}
		if m.ID == "" || ids[m.ID] {
			t.Fatalf("message ID %q is empty or repeated", m.ID)
		}
		ids[m.ID] = true
		if m.Time.IsZero() || m.Time.Before(start.Add(-time.Hour)) || m.Time.After(time.Now().Add(time.Hour)) {
			t.Fatalf("message Time %v is not when it was sequenced (about %v)", m.Time, start)
		}
	}
	// Within one publisher, later publishes get greater seqs.
	for g, ms := range results {
		for i := 1; i < len(ms); i++ {
			if ms[i].Seq <= ms[i-1].Seq {
				t.Fatalf("publisher %d: seq %d after %d", g, ms[i].Seq, ms[i-1].Seq)
			}
		}
	}
	got := n.rec.waitFor(t, r, "every message", func(ms []pubsub.Message) bool { return len(ms) >= len(all) })
	checkMessages(t, "deliveries", got, all)
	res := n.history(r, pubsub.HistoryQuery{Limit: 0})
	if res.Epoch != all[0].Epoch || res.Top != uint64(len(all)) {
		t.Fatalf("position %s/%d, want %s/%d", res.Epoch, res.Top, all[0].Epoch, len(all))
	}
}

func testInterest(t *testing.T, newBroker func(t *testing.T) pubsub.Broker) {
	n := newNode(t, newBroker)
	x, other := room(t), room(t)
	n.publish(x, "before subscribe", pubsub.HistoryOptions{})
	n.publish(other, "never subscribed", keep)
	n.subscribe(x)
	m1 := n.publish(x, "m1", pubsub.HistoryOptions{})
	n.rec.waitData(t, x, []byte("m1"))
	n.unsubscribe(x)
	n.publish(x, "while unsubscribed", keep)
	n.subscribe(x)
	m3 := n.publish(x, "m3", keep)
	got := n.rec.waitData(t, x, []byte("m3"))
	checkMessages(t, "deliveries of a room subscribed, unsubscribed and subscribed again", got, []pubsub.Message{m1, m3})
	if got := n.rec.got(other); len(got) > 0 {
		t.Fatalf("a room this node never subscribed to was delivered: %s", describe(got))
	}
}

func testMayDrop(t *testing.T, newBroker func(t *testing.T) pubsub.Broker) {
	n := newNode(t, newBroker)
	r := room(t)
	m := n.publish(r, "nobody listens", pubsub.HistoryOptions{})
	if m.ID != "" && (m.Seq == 0 || m.Epoch == "" || m.Room != r) {
		t.Fatalf("Publish returned %+v: neither the zero Message (dropped) nor a sequenced one", m)
	}
	if res := n.history(r, pubsub.HistoryQuery{Limit: 10}); len(res.Messages) > 0 {
		t.Fatalf("a room that keeps no history returned %s", describe(res.Messages))
	}
	if got := n.rec.got(r); len(got) > 0 {
		t.Fatalf("a room with no interest was delivered: %s", describe(got))
	}
}

func testHistorySize(t *testing.T, newBroker func(t *testing.T) pubsub.Broker) {
	n := newNode(t, newBroker)
	r := room(t)
	n.subscribe(r)
	var all []pubsub.Message
	for i := range 10 {
		all = append(all, n.publish(r, fmt.Sprint("m", i+1), pubsub.HistoryOptions{Size: 3, TTL: time.Minute}))
	}
	res := n.history(r, pubsub.HistoryQuery{Limit: 10})
	checkMessages(t, "history of a room keeping 3", res.Messages, all[7:])
	if res.Top != 10 || res.Epoch != all[0].Epoch {
		t.Fatalf("position %s/%d, want %s/10", res.Epoch, res.Top, all[0].Epoch)
	}
	// A publish that keeps nothing empties the history; the sequence goes on.
	m := n.publish(r, "m11", pubsub.HistoryOptions{})
	if m.ID != "" && m.Seq != 11 {
		t.Fatalf("seq %d after a change of history bound, want 11", m.Seq)
	}
	res = n.history(r, pubsub.HistoryQuery{Limit: 10})
	if len(res.Messages) > 0 || res.Top != 11 {
		t.Fatalf("after a publish keeping nothing: %s top %d, want none and top 11", describe(res.Messages), res.Top)
	}
}

func testHistoryQuery(t *testing.T, newBroker func(t *testing.T) pubsub.Broker) {
	n := newNode(t, newBroker)
	r := room(t)
	n.subscribe(r)
	var all []pubsub.Message
	for i := range 10 {
		all = append(all, n.publish(r, fmt.Sprint("m", i+1), keep))
	}
	for _, c := range []struct {
		q        pubsub.HistoryQuery
		from, to int // want all[from:to]
	}{
		{pubsub.HistoryQuery{Limit: 0}, 0, 0},
		{pubsub.HistoryQuery{Limit: 4}, 0, 4},
		{pubsub.HistoryQuery{Since: 3, Limit: 4}, 3, 7},
		{pubsub.HistoryQuery{Since: 3, Limit: 4, Latest: true}, 6, 10},
		{pubsub.HistoryQuery{Since: 8, Limit: 10}, 8, 10},
		{pubsub.HistoryQuery{Since: 8, Limit: 10, Latest: true}, 8, 10},
		{pubsub.HistoryQuery{Since: 10, Limit: 5}, 0, 0},
		{pubsub.HistoryQuery{Since: 10, Limit: 5, Latest: true}, 0, 0},
		{pubsub.HistoryQuery{Limit: 100, Latest: true}, 0, 10},
		{pubsub.HistoryQuery{Limit: 2, Latest: true}, 8, 10},
	} {
		res := n.history(r, c.q)
		checkMessages(t, fmt.Sprintf("History%+v", c.q), res.Messages, all[c.from:c.to])
		if res.Epoch != all[0].Epoch || res.Top != 10 {
			t.Fatalf("History%+v: position %s/%d, want %s/10", c.q, res.Epoch, res.Top, all[0].Epoch)
		}
	}
}

func testHistoryTTL(t *testing.T, newBroker func(t *testing.T) pubsub.Broker) {
	n := newNode(t, newBroker)
	r := room(t)
	n.subscribe(r) // interest keeps the room's state; only its messages age
	h := pubsub.HistoryOptions{Size: 100, TTL: 2 * time.Second}
	m1 := n.publish(r, "old", h)
	// Publish the second message a second later: the history must then
	// hold it alone for about a second, once the first has aged out.
	n.pollHistory(r, "a second to pass", func(pubsub.HistoryResult) bool { return time.Since(m1.Time) >= time.Second })
	m2 := n.publish(r, "young", h)
	res := n.pollHistory(r, "the first message to age out", func(res pubsub.HistoryResult) bool {
		return !slices.ContainsFunc(res.Messages, func(m pubsub.Message) bool { return m.ID == m1.ID })
	})
	checkMessages(t, "history once the older message aged out", res.Messages, []pubsub.Message{m2})
	res = n.pollHistory(r, "every message to age out", func(res pubsub.HistoryResult) bool { return len(res.Messages) == 0 })
	if res.Epoch != m1.Epoch || res.Top != 2 {
		t.Fatalf("a subscribed room's position changed when its messages aged: %s/%d, want %s/2", res.Epoch, res.Top, m1.Epoch)
	}
	if m := n.publish(r, "next", h); m.Epoch != m1.Epoch || m.Seq != 3 {
		t.Fatalf("next message %s/%d, want %s/3", m.Epoch, m.Seq, m1.Epoch)
	}
}

// pollHistory reads the room's whole history until cond holds.
func (n *node) pollHistory(room, what string, cond func(pubsub.HistoryResult) bool) pubsub.HistoryResult {
	n.t.Helper()
	deadline := time.Now().Add(waitTimeout)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		res := n.history(room, pubsub.HistoryQuery{Limit: 1000})
		if cond(res) {
			return res
		}
		if time.Now().After(deadline) {
			n.t.Fatalf("room %s: timed out waiting for %s; history %s", room, what, describe(res.Messages))
		}
		<-tick.C
	}
}

func testPosition(t *testing.T, newBroker func(t *testing.T) pubsub.Broker) {
	n := newNode(t, newBroker)
	r := room(t)
	n.subscribe(r)
	first := n.history(r, pubsub.HistoryQuery{Limit: 0})
	if first.Epoch == "" || first.Top != 0 || len(first.Messages) > 0 {
		t.Fatalf("a new room's position is %q/%d with %d messages, want an epoch, 0 and none", first.Epoch, first.Top, len(first.Messages))
	}
	if again := n.history(r, pubsub.HistoryQuery{Limit: 0}); again.Epoch != first.Epoch {
		t.Fatalf("epoch %q then %q: a client's position must stay valid", first.Epoch, again.Epoch)
	}
	m := n.publish(r, "first", pubsub.HistoryOptions{})
	if m.Epoch != first.Epoch || m.Seq != 1 {
		t.Fatalf("first message %q/%d, want %q/1: the epoch a client learned must stay", m.Epoch, m.Seq, first.Epoch)
	}
	res := n.history(r, pubsub.HistoryQuery{Limit: 0})
	if res.Epoch != first.Epoch || res.Top != 1 || len(res.Messages) > 0 {
		t.Fatalf("position %q/%d with %d messages, want %q/1 and none", res.Epoch, res.Top, len(res.Messages), first.Epoch)
	}
}

func member(conn, user, info string) pubsub.Member {
	m := pubsub.Member{ConnID: conn, UserID: user}
	if info != "" {
		m.Info = json.RawMessage(info)
	}
	return m
}

func checkPresence(t *testing.T, what string, got, want pubsub.Presence) {
	t.Helper()
	norm := func(p pubsub.Presence) string {
		for i := range p.Members {
			if len(p.Members[i].Info) == 0 {
				p.Members[i].Info = nil
			}
		}
		if p.Members != nil && len(p.Members) == 0 {
			p.Members = nil
		}
		b, _ := json.Marshal(p)
		return string(b)
	}
	if norm(got) != norm(want) {
		t.Fatalf("%s: presence %s, want %s", what, norm(got), norm(want))
	}
}

func testPresence(t *testing.T, newBroker func(t *testing.T) pubsub.Broker) {
	n := newNode(t, newBroker)
	r := room(t)
	n.subscribe(r)
	checkPresence(t, "an empty room", n.presence(r, true), pubsub.Presence{})
	ann1, ann2, anon := member("c1", "ann", `{"n":1}`), member("c2", "ann", `{"n":2}`), member("c3", "", "")
	n.join(r, ann2, false)
	n.join(r, ann1, false)
	n.join(r, anon, false)
	n.join(r, anon, false) // a repeated join changes nothing
	checkPresence(t, "two conns of ann and one anonymous", n.presence(r, false), pubsub.Presence{
		Count: 2, Connections: 3,
		Members: []pubsub.PresenceMember{
			{Conns: []string{"c3"}},
			{UserID: "ann", Conns: []string{"c1", "c2"}, Info: json.RawMessage(`{"n":1}`)},
		},
	})
	checkPresence(t, "counts only", n.presence(r, true), pubsub.Presence{Count: 2, Connections: 3})
	n.leave(r, ann1, false)
	n.leave(r, member("c9", "ann", ""), false) // never joined: nothing happens
	checkPresence(t, "after ann's first conn left", n.presence(r, false), pubsub.Presence{
		Count: 2, Connections: 2,
		Members: []pubsub.PresenceMember{
			{Conns: []string{"c3"}},
			{UserID: "ann", Conns: []string{"c2"}, Info: json.RawMessage(`{"n":2}`)},
		},
	})
	n.leave(r, ann2, false)
	n.leave(r, anon, false)
	checkPresence(t, "after everyone left", n.presence(r, false), pubsub.Presence{})
}

func testPresenceEvents(t *testing.T, newBroker func(t *testing.T) pubsub.Broker) {
	n := newNode(t, newBroker)
	r := room(t)
	n.subscribe(r)
	ann1, ann2, bob := member("c1", "ann", `{"n":1}`), member("c2", "ann", `{"n":2}`), member("c3", "bob", "")
	n.join(r, ann1, true)  // ann's first connection: join
	n.join(r, ann2, true)  // not her first: nothing
	n.leave(r, ann1, true) // not her last: nothing
	n.leave(r, ann2, true) // her last: leave
	n.join(r, bob, false)  // no events asked
	n.leave(r, bob, false)
	n.publish(r, "marker", pubsub.HistoryOptions{})
	got := n.rec.waitData(t, r, []byte("marker"))
	if len(got) != 3 || got[0].Kind != pubsub.KindJoin || got[1].Kind != pubsub.KindLeave || got[2].Kind != pubsub.KindMessage {
		t.Fatalf("deliveries %s, want join(ann/c1), leave(ann/c2), the marker", describe(got))
	}
	if m := got[0].Member; m.ConnID != "c1" || m.UserID != "ann" || string(m.Info) != `{"n":1}` || got[0].Room != r {
		t.Fatalf("join event %+v, want ann's connection c1 with its info", got[0])
	}
	if m := got[1].Member; m.ConnID != "c2" || m.UserID != "ann" || got[1].Room != r {
		t.Fatalf("leave event %+v, want ann's last connection c2", got[1])
	}
}

func testClosed(t *testing.T, newBroker func(t *testing.T) pubsub.Broker) {
	b := newBroker(t)
	b.Bind(func(pubsub.Message) {})
	if err := b.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if _, err := b.Publish(ctx(t), room(t), []byte("x"), pubsub.PublishOptions{History: keep}); !errors.Is(err, pubsub.ErrClosed) {
		t.Fatalf("Publish after Close: %v, want an error wrapping pubsub.ErrClosed", err)
	}
}

func testClusterSequence(t *testing.T, newBroker func(t *testing.T) pubsub.Broker) {
	a, b := newNode(t, newBroker), newNode(t, newBroker)
	r := room(t)
	a.subscribe(r)
	b.subscribe(r)
	const perNode, each = 2, 30
	var (
		mu  sync.Mutex
		all []pubsub.Message
		wg  sync.WaitGroup
	)
	for _, n := range []*node{a, b} {
		for g := range perNode {
			wg.Go(func() {
				for i := range each {
					res, err := n.b.Publish(ctx(t), r, fmt.Appendf(nil, "%p-%d-%d", n, g, i), pubsub.PublishOptions{History: keep})
					if err != nil {
						t.Errorf("Publish: %v", err)
						return
					}
					mu.Lock()
					all = append(all, res.Message)
					mu.Unlock()
				}
			})
		}
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	slices.SortFunc(all, func(x, y pubsub.Message) int { return int(x.Seq) - int(y.Seq) })
	total := 2 * perNode * each
	if !slices.Equal(seqs(all), span(1, uint64(total))) {
		t.Fatalf("publishes on two nodes got seqs %v, want 1 to %d each once", seqs(all), total)
	}
	for _, n := range []*node{a, b} {
		got := n.rec.waitFor(t, r, "every message", func(ms []pubsub.Message) bool { return len(ms) >= total })
		checkMessages(t, "deliveries on one node", got, all)
	}
}

func testClusterInterest(t *testing.T, newBroker func(t *testing.T) pubsub.Broker) {
	a, b := newNode(t, newBroker), newNode(t, newBroker)
	x, y := room(t), room(t)
	a.subscribe(x)
	m1 := b.publish(x, "from b to a", keep)
	checkMessages(t, "node a's deliveries", a.rec.waitData(t, x, []byte("from b to a")), []pubsub.Message{m1})
	b.subscribe(y)
	a.publish(y, "marker", keep)
	b.rec.waitData(t, y, []byte("marker"))
	if got := b.rec.got(x); len(got) > 0 {
		t.Fatalf("node b never subscribed to the room but got %s", describe(got))
	}
	b.subscribe(x)
	m2 := a.publish(x, "both", keep)
	b.rec.waitData(t, x, []byte("both"))
	b.unsubscribe(x)
	a.publish(x, "a only", keep)
	a.rec.waitData(t, x, []byte("a only"))
	b.subscribe(x)
	m4 := a.publish(x, "both again", keep)
	got := b.rec.waitData(t, x, []byte("both again"))
	checkMessages(t, "node b's deliveries around its unsubscribe", got, []pubsub.Message{m2, m4})
}

func testClusterHistory(t *testing.T, newBroker func(t *testing.T) pubsub.Broker) {
	a, b := newNode(t, newBroker), newNode(t, newBroker)
	r := room(t)
	a.subscribe(r)
	b.subscribe(r)
	pa, pb := a.history(r, pubsub.HistoryQuery{}), b.history(r, pubsub.HistoryQuery{})
	if pa.Epoch == "" || pa.Epoch != pb.Epoch || pa.Top != 0 || pb.Top != 0 {
		t.Fatalf("positions %s/%d and %s/%d, want one epoch at 0", pa.Epoch, pa.Top, pb.Epoch, pb.Top)
	}
	var all []pubsub.Message
	for i := range 6 {
		n := a
		if i%2 == 1 {
			n = b
		}
		all = append(all, n.publish(r, fmt.Sprint("m", i+1), pubsub.HistoryOptions{Size: 4, TTL: time.Minute}))
	}
	if all[0].Epoch != pa.Epoch {
		t.Fatalf("first message's epoch %s, want the position's %s", all[0].Epoch, pa.Epoch)
	}
	for _, n := range []*node{a, b} {
		res := n.history(r, pubsub.HistoryQuery{Since: 3, Limit: 10})
		checkMessages(t, "history since 3", res.Messages, all[3:])
		if res.Top != 6 || res.Epoch != pa.Epoch {
			t.Fatalf("position %s/%d, want %s/6", res.Epoch, res.Top, pa.Epoch)
		}
	}
}

func testClusterPresence(t *testing.T, newBroker func(t *testing.T) pubsub.Broker) {
	a, b := newNode(t, newBroker), newNode(t, newBroker)
	r := room(t)
	a.subscribe(r)
	b.subscribe(r)
	ann1, ann2, bob := member("c1", "ann", `{"n":1}`), member("c2", "ann", ""), member("c3", "bob", "")
	a.join(r, ann1, true)
	b.join(r, ann2, true)
	b.join(r, bob, true)
	want := pubsub.Presence{Count: 2, Connections: 3, Members: []pubsub.PresenceMember{
		{UserID: "ann", Conns: []string{"c1", "c2"}, Info: json.RawMessage(`{"n":1}`)},
		{UserID: "bob", Conns: []string{"c3"}},
	}}
	checkPresence(t, "presence read on node a", a.presence(r, false), want)
	checkPresence(t, "presence read on node b", b.presence(r, false), want)
	a.leave(r, ann1, true) // ann stays through c2 on node b
	b.leave(r, ann2, true)
	a.publish(r, "marker", keep)
	for _, n := range []*node{a, b} {
		got := n.rec.waitData(t, r, []byte("marker"))
		if len(got) != 4 || got[0].Kind != pubsub.KindJoin || got[0].Member.ConnID != "c1" ||
			got[1].Kind != pubsub.KindJoin || got[1].Member.ConnID != "c3" ||
			got[2].Kind != pubsub.KindLeave || got[2].Member.ConnID != "c2" {
			t.Fatalf("deliveries %s, want join(ann/c1), join(bob/c3), leave(ann/c2), the marker", describe(got))
		}
	}
	checkPresence(t, "after ann left on both nodes", b.presence(r, true), pubsub.Presence{Count: 1, Connections: 1})
}

// partitionNode is a node of RunPartition with its link to the backend.
func partitionNode(t *testing.T, newBroker func(t *testing.T) (pubsub.Broker, Link)) (*node, Link) {
	t.Helper()
	var link Link
	n := newNode(t, func(t *testing.T) pubsub.Broker {
		b, l := newBroker(t)
		link = l
		return b
	})
	if link == nil {
		t.Fatal("the factory returned a nil Link")
	}
	return n, link
}

// outage publishes on node a before and during an outage of node b's link,
// then heals it and returns b and what a's publishes returned, in order.
func outage(t *testing.T, newBroker func(t *testing.T) (pubsub.Broker, Link), r string, h pubsub.HistoryOptions, during int) (b, a *node, all []pubsub.Message) {
	a, _ = partitionNode(t, newBroker)
	b, link := partitionNode(t, newBroker)
	b.subscribe(r)
	for i := range 3 {
		all = append(all, a.publish(r, fmt.Sprint("before ", i), h))
	}
	b.rec.waitFor(t, r, "the messages before the outage", func(ms []pubsub.Message) bool { return len(ms) >= 3 })
	link.Cut()
	for i := range during {
		all = append(all, a.publish(r, fmt.Sprint("during ", i), h))
	}
	link.Heal()
	return b, a, all
}

func testShortOutage(t *testing.T, newBroker func(t *testing.T) (pubsub.Broker, Link)) {
	r := room(t)
	h := pubsub.HistoryOptions{Size: 100, TTL: time.Minute}
	b, a, all := outage(t, newBroker, r, h, 40)
	all = append(all, a.publish(r, "after", h))
	got := b.rec.waitData(t, r, []byte("after"))
	checkMessages(t, "deliveries on the node that was cut off, its history holding what it missed", got, all)
}

func testLongOutage(t *testing.T, newBroker func(t *testing.T) (pubsub.Broker, Link)) {
	r := room(t)
	h := pubsub.HistoryOptions{Size: 10, TTL: time.Minute}
	b, a, all := outage(t, newBroker, r, h, 40)
	isReset := func(m pubsub.Message) bool { return m.Kind == pubsub.KindReset }
	got := b.rec.waitFor(t, r, "a KindReset: the node missed 40 messages and the room keeps 10", func(ms []pubsub.Message) bool {
		return slices.ContainsFunc(ms, isReset)
	})
	// Before the reset: the messages before the outage, then perhaps some
	// that follow on with no hole (the recorder checks that), never one
	// past the hole.
	if reset := slices.IndexFunc(got, isReset); reset < 3 {
		t.Fatalf("a KindReset before the messages published before the outage: %s", describe(got))
	}
	checkMessages(t, "deliveries before the outage", got[:3], all[:3])
	// After the reset the node's stream of the room goes on.
	next := a.publish(r, "after the reset", h)
	got = b.rec.waitData(t, r, []byte("after the reset"))
	if last := got[len(got)-1]; last.ID != next.ID {
		t.Fatalf("the node delivered %s after the message published after the reset", describe(got))
	}
}

func testPublishDuringOutage(t *testing.T, newBroker func(t *testing.T) (pubsub.Broker, Link)) {
	n, link := partitionNode(t, newBroker)
	r := room(t)
	n.publish(r, "before", keep)
	link.Cut()
	c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if m, err := n.b.Publish(c, r, []byte("during"), pubsub.PublishOptions{History: keep}); err == nil {
		t.Fatalf("Publish on a node cut off from its backend returned %+v and no error: the caller believes it published", m)
	}
	link.Heal()
	// Once the node reaches its backend again, publishing works.
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(waitTimeout)
	for {
		c, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := n.b.Publish(c, r, []byte("after"), pubsub.PublishOptions{History: keep})
		cancel()
		if err == nil {
			return
		}
		select {
		case <-tick.C:
		case <-deadline:
			t.Fatalf("Publish after the link healed: %v", err)
		}
	}
}

// keyTTL is long enough that no check's key expires while it runs.
const keyTTL = time.Minute

func testKeyOnce(t *testing.T, newBroker func(t *testing.T) pubsub.Broker) {
	n := newNode(t, newBroker)
	r, other := room(t), room(t)
	n.subscribe(r)
	first := n.publishKey(r, "first", "k1", keyTTL)
	if first.Duplicate || first.Seq != 1 {
		t.Fatalf("the first publish of a key: %+v, want seq 1, not a duplicate", first)
	}
	checkDuplicate(t, "the same key again, with other data", n.publishKey(r, "again", "k1", keyTTL), first.Message)
	second := n.publishKey(r, "second", "k2", keyTTL)
	if second.Duplicate || second.Seq != 2 {
		t.Fatalf("another key: %+v, want seq 2", second)
	}
	if res := n.publishKey(other, "other room", "k1", keyTTL); res.Duplicate {
		t.Fatalf("key k1 in another room: %+v, want it sequenced (keys are per room)", res)
	}
	noKey := n.publish(r, "no key", keep)
	got := n.rec.waitData(t, r, []byte("no key"))
	checkMessages(t, "deliveries: a duplicate is never delivered", got, []pubsub.Message{first.Message, second.Message, noKey})
	res := n.history(r, pubsub.HistoryQuery{Limit: 10})
	checkMessages(t, "history: a duplicate is never kept", res.Messages, []pubsub.Message{first.Message, second.Message, noKey})
}

func testKeyConcurrent(t *testing.T, newBroker func(t *testing.T) pubsub.Broker) {
	n := newNode(t, newBroker)
	r := room(t)
	n.subscribe(r)
	const publishers = 8
	results := make([]pubsub.PublishResult, publishers)
	var wg sync.WaitGroup
	for g := range publishers {
		wg.Go(func() {
			res, err := n.b.Publish(ctx(t), r, fmt.Appendf(nil, "attempt %d", g), pubsub.PublishOptions{History: keep, Key: "k", KeyTTL: keyTTL})
			if err != nil {
				t.Errorf("Publish: %v", err)
			}
			results[g] = res
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	firsts := slices.DeleteFunc(slices.Clone(results), func(res pubsub.PublishResult) bool { return res.Duplicate })
	if len(firsts) != 1 {
		t.Fatalf("%d concurrent publishes of one key: %d were sequenced, want exactly 1", publishers, len(firsts))
	}
	for _, res := range results {
		if res.Duplicate {
			checkDuplicate(t, "a concurrent publish of the key", res, firsts[0].Message)
		}
	}
	n.publish(r, "marker", keep)
	if got := n.rec.waitData(t, r, []byte("marker")); len(got) != 2 {
		t.Fatalf("deliveries %s, want the one message and the marker", describe(got))
	}
}

func testKeyTTL(t *testing.T, newBroker func(t *testing.T) pubsub.Broker) {
	n := newNode(t, newBroker)
	r := room(t)
	n.subscribe(r)
	const ttl = 300 * time.Millisecond
	first := n.publishKey(r, "first", "k", ttl)
	checkDuplicate(t, "the key again at once", n.publishKey(r, "again", "k", ttl), first.Message)
	// Once ttl passed the key is forgotten: the same key sequences anew.
	var res pubsub.PublishResult
	n.pollHistory(r, "the key to be forgotten", func(pubsub.HistoryResult) bool {
		res = n.publishKey(r, "after ttl", "k", ttl)
		return !res.Duplicate
	})
	if res.Seq != 2 || res.Epoch != first.Epoch {
		t.Fatalf("the key after its ttl: %+v, want seq 2 of epoch %s", res, first.Epoch)
	}
	if since := time.Since(first.Time); since < ttl-50*time.Millisecond {
		// Compared with the broker's own clock (first.Time), loosely.
		t.Fatalf("the key was forgotten %v after its publish, before its ttl of %v", since, ttl)
	}
}

func testClusterKey(t *testing.T, newBroker func(t *testing.T) pubsub.Broker) {
	a, b := newNode(t, newBroker), newNode(t, newBroker)
	r := room(t)
	a.subscribe(r)
	b.subscribe(r)
	first := a.publishKey(r, "on a", "k", keyTTL)
	// A client whose publish got through on node a resends it on node b.
	checkDuplicate(t, "the key on node b", b.publishKey(r, "on b", "k", keyTTL), first.Message)
	marker := b.publish(r, "marker", keep)
	for _, n := range []*node{a, b} {
		checkMessages(t, "deliveries", n.rec.waitData(t, r, []byte("marker")), []pubsub.Message{first.Message, marker})
	}
}
