package pubsub

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"
)

// These tests drive the memory broker directly with a fake clock, so age
// eviction and reclamation are tested without sleeping.

// fakeClock is a settable time source for memoryBroker.now.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// newClockedBroker returns a memory broker on a fake clock, bound to a
// deliver func that records what it delivers.
func newClockedBroker(t *testing.T) (*memoryBroker, *fakeClock, func() []Message) {
	t.Helper()
	clock := &fakeClock{t: time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)}
	b := NewMemoryBroker().(*memoryBroker)
	b.now = clock.Now
	var mu sync.Mutex
	var got []Message
	b.Bind(func(m Message) {
		mu.Lock()
		got = append(got, m)
		mu.Unlock()
	})
	t.Cleanup(func() { b.Close() })
	return b, clock, func() []Message {
		mu.Lock()
		defer mu.Unlock()
		return append([]Message(nil), got...)
	}
}

// roomCount is the number of rooms whose state the broker holds.
func (b *memoryBroker) roomCount() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.rooms)
}

func (b *memoryBroker) idleCount() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.idle)
}

func mustPublish(t *testing.T, b *memoryBroker, room, data string, h HistoryOptions) Message {
	t.Helper()
	res, err := b.Publish(context.Background(), room, []byte(data), PublishOptions{History: h})
	if err != nil {
		t.Fatalf("Publish(%q): %v", room, err)
	}
	return res.Message
}

func mustHistory(t *testing.T, b *memoryBroker, room string, q HistoryQuery) HistoryResult {
	t.Helper()
	res, err := b.History(context.Background(), room, q)
	if err != nil {
		t.Fatalf("History(%q): %v", room, err)
	}
	return res
}

func seqsOf(ms []Message) []uint64 {
	out := make([]uint64, len(ms))
	for i, m := range ms {
		out[i] = m.Seq
	}
	return out
}

func equalSeqs(a, b []uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// poke makes n cheap broker calls on an unrelated room; each one sweeps.
func poke(t *testing.T, b *memoryBroker, n int) {
	t.Helper()
	for range n {
		if _, err := b.Presence(context.Background(), "poke", false); err != nil {
			t.Fatal(err)
		}
	}
}

func TestMemoryBrokerSequencesEachRoomFromOneWithUniqueIDs(t *testing.T) {
	t.Parallel()
	b, clock, delivered := newClockedBroker(t)
	ctx := context.Background()
	for _, room := range []string{"a", "b"} {
		if err := b.Subscribe(ctx, room); err != nil {
			t.Fatal(err)
		}
	}
	ids := map[string]bool{}
	for i := range 5 {
		for _, room := range []string{"a", "b"} {
			m := mustPublish(t, b, room, fmt.Sprint(i), HistoryOptions{})
			if m.Seq != uint64(i+1) || m.Room != room || m.Epoch == "" || m.ID == "" || !m.Time.Equal(clock.Now()) || m.Kind != KindMessage {
				t.Fatalf("publish %d to %q: got %+v, want seq %d, an epoch, an id and the broker's time", i, room, m, i+1)
			}
			if ids[m.ID] {
				t.Fatalf("message id %q used twice", m.ID)
			}
			ids[m.ID] = true
		}
		clock.Advance(time.Second)
	}
	if got := len(delivered()); got != 10 {
		t.Fatalf("delivered %d messages to the subscribed node, want 10", got)
	}
}

func TestMemoryBrokerDropsMessagesNobodyListensToOrKeeps(t *testing.T) {
	t.Parallel()
	b, _, delivered := newClockedBroker(t)
	m := mustPublish(t, b, "void", "x", HistoryOptions{})
	if m.Seq != 0 || m.ID != "" {
		t.Fatalf("publish with no interest and no history returned %+v, want the zero Message", m)
	}
	if n := b.roomCount(); n != 0 {
		t.Fatalf("broker holds %d rooms after a publish nobody keeps, want 0", n)
	}
	if n := len(delivered()); n != 0 {
		t.Fatalf("delivered %d messages with no interest, want 0", n)
	}
}

func TestMemoryBrokerHistoryKeepsOnlyTheLastSizeMessages(t *testing.T) {
	t.Parallel()
	b, _, _ := newClockedBroker(t)
	h := HistoryOptions{Size: 3, TTL: time.Hour}
	for i := range 5 {
		mustPublish(t, b, "r", fmt.Sprint(i+1), h)
	}
	tests := []struct {
		name string
		q    HistoryQuery
		want []uint64
	}{
		{"all kept", HistoryQuery{Limit: 10}, []uint64{3, 4, 5}},
		{"oldest two", HistoryQuery{Limit: 2}, []uint64{3, 4}},
		{"newest two", HistoryQuery{Limit: 2, Latest: true}, []uint64{4, 5}},
		{"since 3", HistoryQuery{Since: 3, Limit: 10}, []uint64{4, 5}},
		{"since top", HistoryQuery{Since: 5, Limit: 10}, []uint64{}},
		{"position only", HistoryQuery{Limit: 0}, []uint64{}},
	}
	var epoch string
	for _, tt := range tests {
		res := mustHistory(t, b, "r", tt.q)
		if got := seqsOf(res.Messages); !equalSeqs(got, tt.want) {
			t.Errorf("%s: history %v, want %v", tt.name, got, tt.want)
		}
		if res.Top != 5 {
			t.Errorf("%s: top %d, want 5", tt.name, res.Top)
		}
		if epoch == "" {
			epoch = res.Epoch
		}
		if res.Epoch == "" || res.Epoch != epoch {
			t.Errorf("%s: epoch %q, want the room's stable epoch %q", tt.name, res.Epoch, epoch)
		}
	}
	for _, m := range mustHistory(t, b, "r", HistoryQuery{Limit: 10}).Messages {
		if string(m.Data) != fmt.Sprint(m.Seq) {
			t.Errorf("seq %d carries %q, want %q", m.Seq, m.Data, fmt.Sprint(m.Seq))
		}
	}
}

func TestMemoryBrokerHistoryDropsMessagesOlderThanTTL(t *testing.T) {
	t.Parallel()
	b, clock, _ := newClockedBroker(t)
	if err := b.Subscribe(context.Background(), "r"); err != nil { // keeps the room alive
		t.Fatal(err)
	}
	h := HistoryOptions{Size: 100, TTL: 10 * time.Second}
	epoch := mustPublish(t, b, "r", "1", h).Epoch // t=0
	clock.Advance(4 * time.Second)
	mustPublish(t, b, "r", "2", h) // t=4
	clock.Advance(4 * time.Second)
	mustPublish(t, b, "r", "3", h) // t=8
	steps := []struct {
		at   time.Duration // since the first publish
		want []uint64
	}{
		{9 * time.Second, []uint64{1, 2, 3}},
		{12 * time.Second, []uint64{2, 3}},
		{15 * time.Second, []uint64{3}},
		{19 * time.Second, []uint64{}},
	}
	elapsed := 8 * time.Second
	for _, s := range steps {
		clock.Advance(s.at - elapsed)
		elapsed = s.at
		res := mustHistory(t, b, "r", HistoryQuery{Limit: 100})
		if got := seqsOf(res.Messages); !equalSeqs(got, s.want) {
			t.Errorf("at +%v: history %v, want %v", s.at, got, s.want)
		}
		if res.Top != 3 || res.Epoch != epoch {
			t.Errorf("at +%v: position (%q, %d), want (%q, 3): aging out messages must not lose the sequence", s.at, res.Epoch, res.Top, epoch)
		}
	}
	// A publish after everything aged out continues the sequence.
	if m := mustPublish(t, b, "r", "4", h); m.Seq != 4 || m.Epoch != epoch {
		t.Fatalf("publish after the history aged out: (%q, %d), want (%q, 4)", m.Epoch, m.Seq, epoch)
	}
}

func TestMemoryBrokerKeepsASubscribedRoomWhateverItsTTL(t *testing.T) {
	t.Parallel()
	b, clock, _ := newClockedBroker(t)
	ctx := context.Background()
	if err := b.Subscribe(ctx, "live"); err != nil {
		t.Fatal(err)
	}
	epoch := mustPublish(t, b, "live", "x", HistoryOptions{Size: 5, TTL: time.Second}).Epoch
	clock.Advance(time.Hour)
	poke(t, b, 100)
	res := mustHistory(t, b, "live", HistoryQuery{Limit: 5})
	if res.Epoch != epoch || res.Top != 1 {
		t.Fatalf("subscribed room after an hour: (%q, %d), want (%q, 1)", res.Epoch, res.Top, epoch)
	}
	// Unsubscribing a room whose history already expired keeps its state
	// for the grace only.
	if err := b.Unsubscribe(ctx, "live"); err != nil {
		t.Fatal(err)
	}
	poke(t, b, 1) // History trims what expired; the room now keeps nothing
	clock.Advance(idleRoomGrace + time.Millisecond)
	poke(t, b, 4)
	if n := b.roomCount(); n != 0 {
		t.Fatalf("broker holds %d rooms after the last interest left a room with expired history and the grace passed, want 0", n)
	}
}

func TestMemoryBrokerReclaimsIdleRoomsOnceTheirHistoryExpires(t *testing.T) {
	t.Parallel()
	b, clock, _ := newClockedBroker(t)
	const rooms = 1000
	h := HistoryOptions{Size: 2, TTL: time.Minute}
	for i := range rooms {
		mustPublish(t, b, fmt.Sprint("room-", i), "x", h)
	}
	if n := b.roomCount(); n != rooms {
		t.Fatalf("broker holds %d rooms, want %d (each keeps a message)", n, rooms)
	}
	// Not yet expired: calls must not reclaim anything.
	clock.Advance(time.Minute - time.Millisecond)
	poke(t, b, rooms/sweepBatch+10)
	if n := b.roomCount(); n != rooms {
		t.Fatalf("broker holds %d rooms before their TTL passed, want %d", n, rooms)
	}
	// Expired: reclamation is lazy and bounded, sweepBatch rooms per call.
	clock.Advance(2 * time.Millisecond)
	poke(t, b, 1)
	if n := b.roomCount(); n < rooms-sweepBatch {
		t.Fatalf("one call reclaimed %d rooms, want at most %d (bounded work per call)", rooms-n, sweepBatch)
	}
	poke(t, b, rooms/sweepBatch+1)
	if n, idle := b.roomCount(), b.idleCount(); n != 0 || idle != 0 {
		t.Fatalf("after the TTL and %d calls the broker holds %d rooms and %d idle entries, want 0 and 0", rooms/sweepBatch+2, n, idle)
	}
}

func TestMemoryBrokerStaysBoundedOverManyDistinctRooms(t *testing.T) {
	t.Parallel()
	b, clock, _ := newClockedBroker(t)
	const (
		rooms = 100_000
		step  = time.Millisecond
		ttl   = time.Second
	)
	window := int(ttl / step) // rooms whose history is still live at any moment
	h := HistoryOptions{Size: 1, TTL: ttl}
	most := 0
	for i := range rooms {
		mustPublish(t, b, fmt.Sprint("r", i), "x", h)
		clock.Advance(step)
		if n := b.roomCount(); n > most {
			most = n
		}
	}
	if limit := window + sweepBatch; most > limit {
		t.Fatalf("the broker held up to %d rooms, want at most the live window %d (+%d): idle rooms are not reclaimed", most, window, sweepBatch)
	}
	clock.Advance(ttl)
	poke(t, b, window/sweepBatch+2)
	if n := b.roomCount(); n != 0 {
		t.Fatalf("broker holds %d rooms after every TTL passed, want 0", n)
	}
}

func TestMemoryBrokerPublishToAnIdleRoomPostponesItsReclamation(t *testing.T) {
	t.Parallel()
	b, clock, _ := newClockedBroker(t)
	h := HistoryOptions{Size: 5, TTL: 10 * time.Second}
	epoch := mustPublish(t, b, "r", "1", h).Epoch // expires at +10s
	clock.Advance(8 * time.Second)
	mustPublish(t, b, "r", "2", h) // now expires at +18s
	clock.Advance(4 * time.Second) // +12s: past the first expiry
	poke(t, b, 4)
	if res := mustHistory(t, b, "r", HistoryQuery{Limit: 5}); res.Epoch != epoch || !equalSeqs(seqsOf(res.Messages), []uint64{2}) {
		t.Fatalf("at +12s: epoch %q, history %v; want epoch %q, history [2]", res.Epoch, seqsOf(res.Messages), epoch)
	}
	clock.Advance(6*time.Second + time.Millisecond) // past +18s
	poke(t, b, 4)
	if n := b.roomCount(); n != 0 {
		t.Fatalf("broker holds %d rooms after the last message's TTL, want 0", n)
	}
}

func TestMemoryBrokerStartsANewEpochAfterReclamation(t *testing.T) {
	t.Parallel()
	ctx := context.Background()

	t.Run("history expired", func(t *testing.T) {
		t.Parallel()
		b, clock, _ := newClockedBroker(t)
		h := HistoryOptions{Size: 5, TTL: time.Second}
		m1 := mustPublish(t, b, "r", "a", h)
		mustPublish(t, b, "r", "b", h)
		clock.Advance(2 * time.Second)
		res := mustHistory(t, b, "r", HistoryQuery{Limit: 5})
		if res.Epoch == m1.Epoch || res.Top != 0 || len(res.Messages) != 0 {
			t.Fatalf("reclaimed room: (%q, top %d, %d messages), want a new epoch (not %q), top 0, none", res.Epoch, res.Top, len(res.Messages), m1.Epoch)
		}
		// (An empty room read by History is reclaimed again at once, so
		// the next publish may start yet another epoch: only compare
		// against the lost one.)
		m := mustPublish(t, b, "r", "c", h)
		if m.Epoch == m1.Epoch || m.Seq != 1 {
			t.Fatalf("first publish of the new life: (%q, %d), want a new epoch (not %q) and seq 1", m.Epoch, m.Seq, m1.Epoch)
		}
	})

	t.Run("no history, last interest left", func(t *testing.T) {
		t.Parallel()
		b, clock, _ := newClockedBroker(t)
		if err := b.Subscribe(ctx, "r"); err != nil {
			t.Fatal(err)
		}
		m1 := mustPublish(t, b, "r", "a", HistoryOptions{})
		if err := b.Unsubscribe(ctx, "r"); err != nil {
			t.Fatal(err)
		}
		// Within the grace the room resumes where it was.
		clock.Advance(idleRoomGrace - time.Millisecond)
		if res := mustHistory(t, b, "r", HistoryQuery{}); res.Epoch != m1.Epoch || res.Top != 1 {
			t.Fatalf("within the grace: (%q, %d), want (%q, 1)", res.Epoch, res.Top, m1.Epoch)
		}
		clock.Advance(idleRoomGrace + time.Millisecond)
		poke(t, b, 4)
		if n := b.roomCount(); n != 0 {
			t.Fatalf("a room that keeps nothing outlived its grace: %d rooms held", n)
		}
		if err := b.Subscribe(ctx, "r"); err != nil {
			t.Fatal(err)
		}
		m2 := mustPublish(t, b, "r", "b", HistoryOptions{})
		if m2.Epoch == m1.Epoch || m2.Seq != 1 {
			t.Fatalf("next life: (%q, %d), want a new epoch (not %q) and seq 1", m2.Epoch, m2.Seq, m1.Epoch)
		}
	})
}

func TestMemoryBrokerPresenceCountsAUserOnceAndAnnouncesFirstAndLast(t *testing.T) {
	t.Parallel()
	b, _, delivered := newClockedBroker(t)
	ctx := context.Background()
	if err := b.Subscribe(ctx, "r"); err != nil {
		t.Fatal(err)
	}
	tab1 := Member{ConnID: "c2", UserID: "ann"}
	tab2 := Member{ConnID: "c1", UserID: "ann"}
	anon := Member{ConnID: "c3"}
	for _, m := range []Member{tab1, tab2, anon} {
		if err := b.Join(ctx, "r", m, true); err != nil {
			t.Fatal(err)
		}
	}
	p, err := b.Presence(ctx, "r", false)
	if err != nil {
		t.Fatal(err)
	}
	if p.Count != 2 || p.Connections != 3 || len(p.Members) != 2 {
		t.Fatalf("presence %+v, want 2 members with 3 connections", p)
	}
	if m := p.Members[1]; m.UserID != "ann" || len(m.Conns) != 2 || m.Conns[0] != "c1" || m.Conns[1] != "c2" {
		t.Fatalf("member %+v, want ann with conns [c1 c2]", m)
	}
	for _, m := range []Member{tab1, tab2, anon} {
		if err := b.Leave(ctx, "r", m, true); err != nil {
			t.Fatal(err)
		}
	}
	var events []string
	for _, m := range delivered() {
		events = append(events, fmt.Sprint(m.Kind, ":", m.Member.ConnID))
	}
	want := fmt.Sprint([]string{
		fmt.Sprint(KindJoin, ":c2"), fmt.Sprint(KindJoin, ":c3"),
		fmt.Sprint(KindLeave, ":c1"), fmt.Sprint(KindLeave, ":c3"),
	})
	if fmt.Sprint(events) != want {
		t.Fatalf("presence events %v, want %v", events, want)
	}
}

func mustPublishKey(t *testing.T, b *memoryBroker, room, key string, ttl time.Duration) PublishResult {
	t.Helper()
	res, err := b.Publish(context.Background(), room, []byte(key), PublishOptions{Key: key, KeyTTL: ttl})
	if err != nil {
		t.Fatalf("Publish(%q, key %q): %v", room, key, err)
	}
	return res
}

// A room remembers at most memoryKeysPerRoom keys: past it the oldest is
// forgotten early, so memory stays bounded however fast keys come.
func TestMemoryBrokerRemembersAtMostMemoryKeysPerRoom(t *testing.T) {
	t.Parallel()
	b, _, _ := newClockedBroker(t)
	if err := b.Subscribe(context.Background(), "r"); err != nil {
		t.Fatal(err)
	}
	for i := range memoryKeysPerRoom + 1 {
		mustPublishKey(t, b, "r", fmt.Sprint("k", i), time.Hour)
	}
	if res := mustPublishKey(t, b, "r", "k1", time.Hour); !res.Duplicate {
		t.Fatalf("key k1, the oldest still within the bound: %+v, want a duplicate", res)
	}
	if res := mustPublishKey(t, b, "r", "k0", time.Hour); res.Duplicate {
		t.Fatalf("key k0, past the bound: %+v, want it forgotten", res)
	}
	b.mu.Lock()
	r := b.rooms["r"]
	b.mu.Unlock()
	r.mu.Lock()
	n, order := len(r.keys), len(r.keyOrder)
	r.mu.Unlock()
	if n != memoryKeysPerRoom || order != memoryKeysPerRoom {
		t.Fatalf("the room holds %d keys (%d in order), want %d", n, order, memoryKeysPerRoom)
	}
}

// A room's state lives as long as it remembers a key, even when it keeps
// no history: a resend within the key's TTL is recognised after the room
// went idle, not sequenced in a new epoch.
func TestMemoryBrokerKeepsAnIdleRoomWhileItRemembersAKey(t *testing.T) {
	t.Parallel()
	b, clock, _ := newClockedBroker(t)
	ctx := context.Background()
	if err := b.Subscribe(ctx, "r"); err != nil {
		t.Fatal(err)
	}
	first := mustPublishKey(t, b, "r", "k", 10*time.Minute)
	if err := b.Unsubscribe(ctx, "r"); err != nil {
		t.Fatal(err)
	}
	clock.Advance(idleRoomGrace + time.Minute)
	if res := mustPublishKey(t, b, "r", "k", 10*time.Minute); !res.Duplicate || res.Epoch != first.Epoch || res.Seq != first.Seq {
		t.Fatalf("the key after the room was idle past its grace: %+v, want the first publish's position", res)
	}
	clock.Advance(10 * time.Minute)
	mustPublish(t, b, "other", "sweep", HistoryOptions{Size: 1, TTL: time.Second}) // calls reclaim lazily
	if n := b.roomCount(); n != 1 {
		t.Fatalf("%d rooms held after the key expired, want only the other room", n)
	}
}
