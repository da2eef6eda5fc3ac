package pubsub

import (
	"container/heap"
	"sync"
	"time"
)

// heartbeats runs every connection's heartbeat (conn.heartbeat) from one
// goroutine of the Handler's, at the time each one asked for: a heap of
// connections by that time, and one timer for the earliest. A timer per
// connection (time.AfterFunc) cost about 145 bytes for each, held for the
// connection's life; here a connection holds its time and its place in
// the heap (12 bytes) and a slot of the heap's array.
//
// The goroutine starts with the first schedule and ends at stop, which
// the Handler calls once every connection has ended. A heartbeat that
// finds its connection closing does not schedule again, so the heap
// empties as connections end.
type heartbeats struct {
	mu      sync.Mutex
	due     beatHeap      // guarded by mu, with each connection's beatAt and beatIdx
	wake    chan struct{} // capacity 1: an earlier time was scheduled, or stop
	started bool
	stopped bool
	wg      sync.WaitGroup
}

// schedule sets c's next heartbeat d from now, replacing the one it had.
// After stop it schedules nothing. The caller may hold c.mu (never the
// other way round: run calls heartbeat without holding mu).
func (b *heartbeats) schedule(c *conn, d time.Duration) {
	at := time.Now().Add(d).UnixNano()
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.stopped {
		return
	}
	if !b.started {
		b.started = true
		b.wake = make(chan struct{}, 1)
		b.wg.Go(b.run)
	}
	c.beatAt = at
	if c.beatIdx >= 0 {
		heap.Fix(&b.due, int(c.beatIdx))
	} else {
		heap.Push(&b.due, c)
	}
	if c.beatIdx == 0 {
		b.signalLocked() // the earliest changed
	}
}

// cancel removes c's next heartbeat, if it has one.
func (b *heartbeats) cancel(c *conn) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if c.beatIdx >= 0 {
		heap.Remove(&b.due, int(c.beatIdx))
		b.shrinkLocked()
	}
}

// shrinkLocked lets a burst's array go once the heap is empty.
func (b *heartbeats) shrinkLocked() {
	if len(b.due) == 0 && cap(b.due) > 1024 {
		b.due = nil
	}
}

func (b *heartbeats) signalLocked() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// run is the heartbeats' goroutine: it runs each connection's heartbeat
// when its time comes, one after the other, and sleeps until the next.
func (b *heartbeats) run() {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		b.mu.Lock()
		if b.stopped {
			b.mu.Unlock()
			return
		}
		wait := time.Hour
		var c *conn
		if len(b.due) > 0 {
			if left := time.Duration(b.due[0].beatAt - time.Now().UnixNano()); left > 0 {
				wait = left
			} else {
				c = heap.Pop(&b.due).(*conn)
				b.shrinkLocked()
			}
		}
		b.mu.Unlock()
		if c != nil {
			c.heartbeat() // it schedules the next one, unless closing
			continue
		}
		timer.Reset(wait)
		select {
		case <-timer.C:
		case <-b.wake:
		}
	}
}

// stop ends the goroutine and waits for it; nothing is scheduled after.
func (b *heartbeats) stop() {
	b.mu.Lock()
	b.stopped = true
	if b.started {
		b.signalLocked()
	}
	for _, c := range b.due {
		c.beatIdx = -1
	}
	b.due = nil
	b.mu.Unlock()
	b.wg.Wait()
}

// beatHeap orders connections by their next heartbeat (container/heap),
// keeping each one's index in it.
type beatHeap []*conn

func (h beatHeap) Len() int           { return len(h) }
func (h beatHeap) Less(i, j int) bool { return h[i].beatAt < h[j].beatAt }
func (h beatHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].beatIdx, h[j].beatIdx = int32(i), int32(j)
}

func (h *beatHeap) Push(x any) {
	c := x.(*conn)
	c.beatIdx = int32(len(*h))
	*h = append(*h, c)
}

func (h *beatHeap) Pop() any {
	old := *h
	c := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	c.beatIdx = -1
	return c
}
