package pubsub

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// The Handler's heartbeats run each connection's heartbeat when its time
// comes, earliest first, whatever the order they were scheduled in; a
// cancelled one never runs, a rescheduled one runs at its new time; stop
// ends the goroutine, and nothing is scheduled after it.
func TestHeartbeatsRunEachWhenDueAndStop(t *testing.T) {
	h := benchHandler()
	defer h.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	b := &heartbeats{}
	cs := make([]*conn, 5)
	for i := range cs {
		cs[i] = newConn(h, Client{ID: fmt.Sprint("conn-", i)})
		cs[i].closing = true // its heartbeat returns at once and schedules nothing
	}
	b.schedule(cs[0], time.Hour)
	b.schedule(cs[1], 30*time.Millisecond)
	b.schedule(cs[2], 10*time.Millisecond)
	b.schedule(cs[3], 20*time.Millisecond)
	b.cancel(cs[3])
	b.schedule(cs[4], time.Hour)
	b.schedule(cs[4], 20*time.Millisecond) // earlier than it was: wakes the goroutine

	pending := func() []*conn {
		b.mu.Lock()
		defer b.mu.Unlock()
		return append([]*conn(nil), b.due...)
	}
	if got := len(pending()); got != 4 {
		t.Fatalf("%d heartbeats pending, want 4 (one was cancelled)", got)
	}
	waitUntil(t, ctx, "the three due heartbeats run", func() bool { return len(pending()) == 1 })
	if p := pending(); p[0] != cs[0] || cs[0].beatIdx != 0 {
		t.Fatalf("left pending: %s (index %d), want conn-0, due in an hour", p[0].client.ID, cs[0].beatIdx)
	}
	for _, c := range cs[1:] {
		if c.beatIdx != -1 {
			t.Errorf("%s still has a place in the heap (%d)", c.client.ID, c.beatIdx)
		}
	}

	b.stop() // returns once the goroutine ended
	if cs[0].beatIdx != -1 || len(pending()) != 0 {
		t.Fatalf("after stop: %d pending, conn-0 at %d", len(pending()), cs[0].beatIdx)
	}
	b.schedule(cs[1], time.Millisecond)
	b.cancel(cs[0]) // no place: nothing to remove
	if len(pending()) != 0 {
		t.Fatal("a heartbeat was scheduled after stop")
	}
}

// The heap keeps every connection's index right through pushes, fixes,
// removals and pops, and pops them by time.
func TestBeatHeapOrdersByTimeAndKeepsIndexes(t *testing.T) {
	h := benchHandler()
	defer h.Close()
	b := &heartbeats{started: true, wake: make(chan struct{}, 1)} // no goroutine: driven by hand
	cs := make([]*conn, 50)
	for i := range cs {
		cs[i] = newConn(h, Client{ID: fmt.Sprint(i)})
		b.schedule(cs[i], time.Duration((i*37)%50)*time.Minute)
	}
	for i := 0; i < len(cs); i += 3 {
		b.cancel(cs[i])
	}
	for i := 1; i < len(cs); i += 5 {
		b.schedule(cs[i], time.Duration(i)*time.Second)
	}
	check := func() {
		for i, c := range b.due {
			if int(c.beatIdx) != i {
				t.Fatalf("%s at %d says %d", c.client.ID, i, c.beatIdx)
			}
		}
	}
	check()
	last := int64(0)
	for len(b.due) > 0 {
		b.mu.Lock()
		c := b.due[0]
		b.mu.Unlock()
		b.cancel(c)
		check()
		if c.beatAt < last {
			t.Fatalf("%s came out at %d, after %d", c.client.ID, c.beatAt, last)
		}
		last = c.beatAt
	}
}
