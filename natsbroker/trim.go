package natsbroker

import (
	"context"
	"errors"
	"sync"
	"time"
)

// trimQueue holds the rooms whose logs are due for trimming, each with the
// bounds of the publish that asked for it; a room waits once however often
// it is asked.
type trimQueue struct {
	mu     sync.Mutex
	rooms  map[string]trimBounds
	signal chan struct{}
}

type trimBounds struct {
	keep int
	age  time.Duration
}

// maxTrimBacklog bounds the rooms waiting for the trimmer; past it a
// request is dropped (the room's next due publish asks again, and its
// records expire with their TTL anyway).
const maxTrimBacklog = 10_000

func (q *trimQueue) init() {
	q.rooms = make(map[string]trimBounds)
	q.signal = make(chan struct{}, 1)
}

// trimEvery is how many publishes apart a room's log is trimmed: a quarter
// of its size, between 8 and 256, so the log holds at most that many
// records past the size.
func trimEvery(keep int) uint64 {
	return uint64(min(max(keep/4, 8), 256))
}

// maybe asks for the room to be trimmed when rec's seq is due, or when the
// room has an age bound and this node last asked more than half of it ago
// (so that a quiet room sheds its old messages too). lg is the room's
// append state, locked.
func (q *trimQueue) maybe(room string, rec record, lg *roomLog) {
	due := rec.seq%trimEvery(rec.keep) == 0
	if !due && rec.age > 0 && time.Since(lg.trimmed) > rec.age/2 {
		due = !lg.trimmed.IsZero() // a node's first publish to a room just starts the clock
		if !due {
			lg.trimmed = time.Now()
		}
	}
	if !due {
		return
	}
	lg.trimmed = time.Now()
	q.mu.Lock()
	if _, ok := q.rooms[room]; ok || len(q.rooms) < maxTrimBacklog {
		q.rooms[room] = trimBounds{rec.keep, rec.age}
	}
	q.mu.Unlock()
	select {
	case q.signal <- struct{}{}:
	default:
	}
}

func (q *trimQueue) take() map[string]trimBounds {
	q.mu.Lock()
	defer q.mu.Unlock()
	rooms := q.rooms
	q.rooms = make(map[string]trimBounds)
	return rooms
}

// trimLoop is the trimmer: it trims the rooms publishes asked for, one at
// a time, until Close.
func (b *Broker) trimLoop() {
	for {
		select {
		case <-b.ctx.Done():
			return
		case <-b.trims.signal:
		}
		for room, bounds := range b.trims.take() {
			if b.ctx.Err() != nil {
				return
			}
			ctx, cancel := context.WithTimeout(b.ctx, 5*time.Second)
			if err := b.trim(ctx, room, bounds); err != nil && b.ctx.Err() == nil {
				b.log.Debug("natsbroker: trimming a room's history failed; the next publish tries again", "room", room, "err", err)
			}
			cancel()
		}
	}
}

// trim drops what the room's history no longer keeps from its log: all
// but the newest records past its size (with a margin of two for control
// records; reads apply the bound exactly), and the records older than its
// age bound. The head always stays.
func (b *Broker) trim(ctx context.Context, room string, t trimBounds) error {
	s := b.subjects(room)
	keep := uint64(1)
	if t.keep > 0 {
		keep = uint64(t.keep) + 2
	}
	if err := b.purge(ctx, s.log, keep); err != nil {
		return err
	}
	if t.age <= 0 {
		return nil
	}
	// Most often the oldest record kept by size is young enough: one read
	// tells, and nothing more is done.
	since := time.Now().Add(-t.age).UTC()
	var oldest time.Time
	_, err := b.direct(ctx, map[string]any{"seq": 1, "next_by_subj": s.log}, func(m stored) bool {
		oldest = m.time
		return false
	})
	if err != nil || !oldest.Before(since) {
		return err
	}
	var first uint64
	_, err = b.direct(ctx, map[string]any{"start_time": since, "next_by_subj": s.log}, func(m stored) bool {
		first = m.sseq
		return false
	})
	switch {
	case errors.Is(err, errNotFound):
		// All older than the bound: all but the head (as it is now; a
		// record appended meanwhile is young).
		head, err := b.getLast(ctx, s.log)
		if err != nil {
			return err
		}
		return b.purgeBefore(ctx, s.log, head.sseq)
	case err != nil:
		return err
	case first > 0:
		return b.purgeBefore(ctx, s.log, first)
	}
	return nil
}
