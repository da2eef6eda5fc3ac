package pubsub

import "time"

// queue is one connection's outbound queue: the frames waiting for a
// writer, bounded in messages and bytes (WithQueueLimits). When a frame
// does not fit, the policy of the frame's room decides, each a method:
// pushDisconnect, pushDropOldest and pushKeepLatest. Direct messages and
// protocol replies follow SlowConsumerDisconnect. A queue is guarded by its
// connection's mu; its writer takes the frames out with take.
type queue struct {
	frames []*frame      // oldest first; may hold nils: frames a drop policy removed
	spare  []*frame      // a written batch's backing array, for the next take
	n      int           // frames queued, nils aside
	bytes  int           // their size
	latest map[*room]int // SlowConsumerKeepLatest rooms: the index of the room's frame in frames
}

// queueLimits bound a queue (WithQueueLimits).
type queueLimits struct{ messages, bytes int }

// dropCounter counts a frame of room r that a drop policy discarded; the
// connection implements it, counting for itself, the room and the Handler.
type dropCounter interface{ countDrop(r *room) }

// pushOutcome is what push did with a frame.
type pushOutcome uint8

const (
	queued   pushOutcome = iota // queued (perhaps replacing its room's older frame)
	dropped                     // discarded by its room's policy, and counted
	overflow                    // does not fit under SlowConsumerDisconnect: close the connection as a slow consumer
)

// push queues f under its room's policy. A full queue first discards the
// oldest queued frame of a SlowConsumerDropOldest room, counted against its
// own room, whatever room f is from; only when none is queued does f's
// room's policy apply.
func (q *queue) push(f *frame, lim queueLimits, drops dropCounter) pushOutcome {
	switch f.policy() {
	case SlowConsumerKeepLatest:
		return q.pushKeepLatest(f, lim, drops)
	case SlowConsumerDropOldest:
		return q.pushDropOldest(f, lim, drops)
	}
	return q.pushDisconnect(f, lim, drops)
}

// pushDisconnect queues f, or reports an overflow when it does not fit.
func (q *queue) pushDisconnect(f *frame, lim queueLimits, drops dropCounter) pushOutcome {
	if !q.makeRoom(f, lim, drops) {
		return overflow
	}
	q.append(f)
	return queued
}

// pushDropOldest queues f, or discards it when it does not fit: no older
// frame of its room may go, it is the oldest droppable one.
func (q *queue) pushDropOldest(f *frame, lim queueLimits, drops dropCounter) pushOutcome {
	if !q.makeRoom(f, lim, drops) {
		drops.countDrop(f.room)
		return dropped
	}
	q.append(f)
	return queued
}

// pushKeepLatest replaces the room's frame still queued, full queue or
// not; otherwise it queues f even past the bound: at most one frame per
// SlowConsumerKeepLatest room is ever queued, so the excess is bounded by
// the rooms joined. A replayed frame (history after a subscribe) is
// queued like any other and never replaced: the ack announced it.
func (q *queue) pushKeepLatest(f *frame, lim queueLimits, drops dropCounter) pushOutcome {
	if f.replay {
		q.makeRoom(f, lim, drops)
		q.append(f)
		return queued
	}
	if i, ok := q.latest[f.room]; ok {
		old := q.frames[i]
		q.frames[i] = f
		q.bytes += f.size - old.size
		drops.countDrop(old.room)
		return queued
	}
	q.makeRoom(f, lim, drops)
	q.append(f)
	if q.latest == nil {
		q.latest = make(map[*room]int)
	}
	q.latest[f.room] = len(q.frames) - 1
	return queued
}

// pushIfRoom queues f only when it fits without discarding anything: a
// heartbeat that finds the queue full is skipped (the queue itself shows
// the client's life, or overflows).
func (q *queue) pushIfRoom(f *frame, lim queueLimits) bool {
	if q.full(f, lim) {
		return false
	}
	q.append(f)
	return true
}

func (q *queue) full(f *frame, lim queueLimits) bool {
	return q.n >= lim.messages || q.bytes+f.size > lim.bytes
}

// makeRoom discards the oldest frames of SlowConsumerDropOldest rooms until
// f fits, and reports whether it does.
func (q *queue) makeRoom(f *frame, lim queueLimits, drops dropCounter) bool {
	for q.full(f, lim) {
		evicted := q.dropOldest(lim)
		if evicted == nil {
			return false
		}
		drops.countDrop(evicted.room)
	}
	return true
}

func (q *queue) append(f *frame) {
	q.frames = append(q.frames, f)
	q.n++
	q.bytes += f.size
}

// dropOldest removes the oldest queued frame of a SlowConsumerDropOldest
// room and returns it, or nil when none is queued. It leaves a nil in its
// place, so the SlowConsumerKeepLatest indexes stay valid, and compacts the
// queue when nils pile up.
func (q *queue) dropOldest(lim queueLimits) *frame {
	for i, f := range q.frames {
		if f == nil || f.policy() != SlowConsumerDropOldest {
			continue
		}
		q.frames[i] = nil
		q.n--
		q.bytes -= f.size
		if len(q.frames) > 2*lim.messages {
			q.compact()
		}
		return f
	}
	return nil
}

func (q *queue) compact() {
	kept := q.frames[:0]
	for _, f := range q.frames {
		if f != nil {
			kept = append(kept, f)
		}
	}
	clear(q.frames[len(kept):])
	q.frames = kept
	clear(q.latest)
	for i, f := range q.frames {
		if f.policy() == SlowConsumerKeepLatest && !f.replay {
			q.latest[f.room] = i
		}
	}
}

// take removes and returns everything queued, for a writer.
func (q *queue) take() []*frame {
	batch := q.frames
	q.frames, q.spare = q.spare[:0], nil
	q.n, q.bytes = 0, 0
	clear(q.latest)
	return batch
}

// recycle keeps a written batch's backing array for the next take, unless
// one is kept already or it grew past twice the bound. The writer clears
// the batch first, outside the connection's lock.
func (q *queue) recycle(batch []*frame, lim queueLimits) {
	if q.spare == nil && cap(batch) <= 2*lim.messages {
		q.spare = batch[:0]
	}
}

// len is the number of frames queued.
func (q *queue) len() int { return q.n }

// size is the bytes queued.
func (q *queue) size() int { return q.bytes }

// lag is the age of the oldest queued frame that has one (room and direct
// messages), 0 when none waits.
func (q *queue) lag(now time.Time) time.Duration {
	for _, f := range q.frames {
		if f != nil && !f.at.IsZero() {
			return now.Sub(f.at)
		}
	}
	return 0
}
