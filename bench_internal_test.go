package pubsub

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/roomcast/pubsub/internal/wire"
)

// benchPayloads are the payload shapes a publish classifies and encodes:
// a JSON object, plain text with characters JSON must escape, and bytes
// that are not UTF-8, each 128 B and 4 KiB.
func benchPayloads() []struct {
	name string
	data []byte
} {
	jsonOf := func(n int) []byte {
		head := `{"type":"tick","seq":123456,"at":1732190000123,"pad":"`
		return []byte(head + strings.Repeat("x", n-len(head)-2) + `"}`)
	}
	textOf := func(n int) []byte {
		line := "Ann said: \"hello\"\tthere, café ☕\n" // quotes, tab, newline, multi-byte runes
		return []byte(strings.Repeat(line, n/len(line)+1)[:n-1] + ".")
	}
	binOf := func(n int) []byte {
		r := rand.New(rand.NewPCG(1, 2))
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		b[0] = 0xff // never valid UTF-8
		return b
	}
	var out []struct {
		name string
		data []byte
	}
	for _, size := range []struct {
		name string
		n    int
	}{{"128B", 128}, {"4KiB", 4096}} {
		out = append(out,
			struct {
				name string
				data []byte
			}{"json/" + size.name, jsonOf(size.n)},
			struct {
				name string
				data []byte
			}{"text/" + size.name, textOf(size.n)},
			struct {
				name string
				data []byte
			}{"binary/" + size.name, binOf(size.n)},
		)
	}
	return out
}

func benchHandler(opts ...Option) *Handler {
	return NewHandler(append([]Option{WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil)))}, opts...)...)
}

// benchMembers joins n raw-mode connections without sockets to room, as
// ServeHTTP does for raw clients. Their writers never run: the benchmark
// drains their queues itself. Each queue and its spare start with room for
// a drain interval, as after a writer's first two batches, so that slice
// growth (a warm-up cost) stays out of the timed loop.
func benchMembers(b *testing.B, h *Handler, room string, n int) []*conn {
	b.Helper()
	cs := make([]*conn, n)
	for i := range cs {
		c := newConn(h, Client{ID: fmt.Sprintf("conn-%08d", i), Mode: ModeRaw})
		c.q.frames = make([]*frame, 0, benchDrainEvery)
		c.q.spare = make([]*frame, 0, benchDrainEvery)
		if _, err := c.subscribe(room, nil, 0, false, nil, nil); err != nil {
			b.Fatal(err)
		}
		cs[i] = c
	}
	return cs
}

// benchDrainEvery is how many publishes the fan-out benchmarks let
// queue up between drains: far below the default queue bound.
const benchDrainEvery = 256

// drainQueues does what each writer would: take the queue and hand the
// batch back for reuse. (These connections have no socket, so enqueue
// starts no writer.)
func drainQueues(cs []*conn) {
	for _, c := range cs {
		c.mu.Lock()
		batch := c.q.take()
		c.mu.Unlock()
		c.recycle(batch)
	}
}

// BenchmarkFanOut measures a server-side Handler.Publish into a room of n
// subscribers on this node, through the memory broker, up to the point
// where the frame is in every subscriber's queue: validation, the copy,
// sequencing, classifying the payload and one enqueue per subscriber. No
// socket is written. Queues are drained (timer stopped) every
// benchDrainEvery publishes.
//
//	go test -run '^$' -bench FanOut -benchmem .
func BenchmarkFanOut(b *testing.B) {
	for _, n := range []int{1, 100, 10_000} {
		b.Run(fmt.Sprintf("subscribers=%d", n), func(b *testing.B) {
			h := benchHandler()
			defer h.Close()
			cs := benchMembers(b, h, "bench", n)
			payload := benchPayloads()[0].data // JSON, 128 B
			ctx := context.Background()
			drainQueues(cs)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if i > 0 && i%benchDrainEvery == 0 {
					b.StopTimer()
					drainQueues(cs)
					b.StartTimer()
				}
				if err := h.Publish(ctx, "bench", payload); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/enqueue")
			if st := h.Stats(); st.SlowConsumers != 0 {
				b.Fatalf("%d slow consumers: the benchmark overflowed queues", st.SlowConsumers)
			}
			// Drains ran before publishes 256, 512, ...: the rest is queued.
			if want := b.N - benchDrainEvery*((b.N-1)/benchDrainEvery); cs[n-1].q.len() != want {
				b.Fatalf("the last subscriber has %d queued, want %d: every publish since the last drain", cs[n-1].q.len(), want)
			}
			drainQueues(cs)
			for _, c := range cs {
				c.leaveAll()
			}
		})
	}
}

// BenchmarkDeliver isolates the registry's fan-out from the broker: one
// deliver of a sequenced message to a room of n subscribers (one shared
// frame, n enqueues).
func BenchmarkDeliver(b *testing.B) {
	for _, n := range []int{1, 100, 10_000} {
		b.Run(fmt.Sprintf("subscribers=%d", n), func(b *testing.B) {
			h := benchHandler()
			defer h.Close()
			cs := benchMembers(b, h, "bench", n)
			m := Message{Kind: KindMessage, Room: "bench", ID: "0b0e9a3c-0d5e-4d5f-9a57-8d8e3f7d6c1b",
				Epoch: "e1", Time: time.Now(), Data: benchPayloads()[0].data}
			drainQueues(cs)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if i > 0 && i%benchDrainEvery == 0 {
					b.StopTimer()
					drainQueues(cs)
					b.StartTimer()
				}
				m.Seq = uint64(i + 1)
				h.rooms.deliver(m)
			}
			b.StopTimer()
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/enqueue")
			drainQueues(cs)
			for _, c := range cs {
				c.leaveAll()
			}
		})
	}
}

// BenchmarkEncodeMessage measures the protocol-mode envelope of a room
// message, built once per publish, for each payload kind and size.
func BenchmarkEncodeMessage(b *testing.B) {
	for _, p := range benchPayloads() {
		b.Run(p.name, func(b *testing.B) {
			m := Message{Kind: KindMessage, Room: "orders:42", ID: "0b0e9a3c-0d5e-4d5f-9a57-8d8e3f7d6c1b",
				Epoch: "6f1c2e0a", Seq: 123456, Time: time.Now(), Data: p.data}
			kind := wire.Classify(p.data)
			b.ReportAllocs()
			b.SetBytes(int64(len(p.data)))
			for i := 0; i < b.N; i++ {
				if len(encodeMessage(m, kind)) == 0 {
					b.Fatal("empty envelope")
				}
			}
		})
	}
}

// BenchmarkClassify measures the per-publish payload classification
// (UTF-8 and JSON validity).
func BenchmarkClassify(b *testing.B) {
	for _, p := range benchPayloads() {
		b.Run(p.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(p.data)))
			for i := 0; i < b.N; i++ {
				wire.Classify(p.data)
			}
		})
	}
}

// BenchmarkAppendJSONString measures JSON string escaping into a reused
// buffer: plain ASCII, text with escapes and multi-byte runes, and
// invalid UTF-8.
func BenchmarkAppendJSONString(b *testing.B) {
	for _, p := range benchPayloads() {
		b.Run(p.name, func(b *testing.B) {
			buf := make([]byte, 0, 4*len(p.data)+2)
			b.ReportAllocs()
			b.SetBytes(int64(len(p.data)))
			for i := 0; i < b.N; i++ {
				buf = wire.AppendString(buf[:0], p.data)
			}
		})
	}
}

// BenchmarkEnqueueTake measures one connection's queue: batch enqueues of
// a shared frame, then the writer's take and recycle. ns/op is per
// enqueued frame, the take amortized over the batch.
func BenchmarkEnqueueTake(b *testing.B) {
	for _, batch := range []int{1, 16, 256} {
		b.Run(fmt.Sprintf("batch=%d", batch), func(b *testing.B) {
			h := benchHandler()
			defer h.Close()
			c := newConn(h, Client{ID: "c", Mode: ModeRaw})
			f := newRoomFrame(Message{Kind: KindMessage, Room: "bench", Seq: 1, Time: time.Now(),
				Data: benchPayloads()[0].data}, nil)
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				if !c.enqueue(f) {
					b.Fatal("enqueue refused")
				}
				if (i+1)%batch == 0 {
					drainQueues([]*conn{c})
				}
			}
		})
	}
}

// BenchmarkPublishManyRooms measures server-side publishes from parallel
// goroutines (as many as -cpu says) into 1,000 rooms of one subscriber
// each, through the memory broker: what the room registry's shards and
// the broker's locks cost when publishes to different rooms meet. Each
// publish is followed by its subscriber's take, as its writer would do, so
// queues stay short.
//
//	go test -run '^$' -bench PublishManyRooms -benchmem -cpu 1,2 .
func BenchmarkPublishManyRooms(b *testing.B) {
	const rooms = 1000
	h := benchHandler()
	defer h.Close()
	names := make([]string, rooms)
	subs := make([]*conn, rooms)
	for i := range names {
		names[i] = fmt.Sprintf("room-%04d", i)
		subs[i] = benchMembers(b, h, names[i], 1)[0]
	}
	payload := benchPayloads()[0].data
	ctx := context.Background()
	var next atomic.Uint32
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := int(next.Add(397)) // each goroutine starts elsewhere in the rooms
		for pb.Next() {
			i = (i + 1) % rooms
			if err := h.Publish(ctx, names[i], payload); err != nil {
				b.Error(err)
				return
			}
			drainQueues(subs[i : i+1])
		}
	})
	b.StopTimer()
	if st := h.Stats(); st.SlowConsumers != 0 {
		b.Fatalf("%d slow consumers: the benchmark overflowed queues", st.SlowConsumers)
	}
	for _, c := range subs {
		c.leaveAll()
	}
}

// BenchmarkJoinLargeRoom measures one more join (local registry plus the
// memory broker's Join) in a room that already has 10,000 members, all of
// which asked for presence events. With PresenceOn the join is announced
// to every member (one shared frame, one enqueue each); with
// PresenceCounts it is only counted.
//
//	go test -run '^$' -bench JoinLargeRoom -benchtime 2000x .
func BenchmarkJoinLargeRoom(b *testing.B) {
	for _, mode := range []PresenceMode{PresenceOn, PresenceCounts} {
		b.Run(mode.String(), func(b *testing.B) { benchmarkJoin(b, mode, 10_000) })
	}
}

func benchmarkJoin(b *testing.B, mode PresenceMode, members int) {
	h := benchHandler(WithPresence(mode))
	defer h.Close()
	ctx := context.Background()
	const room = "big"
	member := func(i int) (*conn, *sub) {
		c := newConn(h, Client{ID: fmt.Sprintf("conn-%08d", i), Mode: ModeProtocol})
		c.q.frames = make([]*frame, 0, 512) // a steady-state queue: no growth inside the timer
		return c, &sub{presence: true, member: Member{ConnID: c.client.ID}}
	}
	all := make([]*conn, 0, members+b.N)
	// drain empties every queue, keeping its capacity, as writers would.
	drain := func() {
		for _, c := range all {
			c.mu.Lock()
			batch := c.q.take()
			clear(batch)
			c.q.recycle(batch, h.cfg.queue)
			c.mu.Unlock()
		}
	}
	// The members join without asking for events (so the setup is not
	// quadratic), then all ask for them.
	existing := make([]*sub, 0, members)
	for i := range members {
		c, s := member(i)
		s.presence = false
		if _, err := h.rooms.join(ctx, room, c, s); err != nil {
			b.Fatal(err)
		}
		all = append(all, c)
		existing = append(existing, s)
	}
	for _, s := range existing {
		s.presence = true
	}
	joiners := make([]*conn, b.N)
	subs := make([]*sub, b.N)
	for i := range joiners {
		joiners[i], subs[i] = member(members + i)
	}
	drain()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if i > 0 && i%256 == 0 { // stay far below the queue bound
			b.StopTimer()
			drain()
			b.StartTimer()
		}
		if _, err := h.rooms.join(ctx, room, joiners[i], subs[i]); err != nil {
			b.Fatal(err)
		}
		all = append(all, joiners[i])
	}
	b.StopTimer()
	if st := h.Stats(); st.SlowConsumers != 0 {
		b.Fatalf("%d slow consumers: the benchmark overflowed queues", st.SlowConsumers)
	}
	p, err := h.cfg.broker.Presence(ctx, room, true)
	if err != nil || p.Count != members+b.N {
		b.Fatalf("presence %+v, %v; want %d members", p, err, members+b.N)
	}
}

// BenchmarkMemoryBrokerPresenceJoin: what the built-in broker keeps per
// connection in a room's presence (retained heap after a collection, per
// join, into one room), for anonymous connections and for connections
// of distinct users.
func BenchmarkMemoryBrokerPresenceJoin(b *testing.B) {
	for _, user := range []bool{false, true} {
		name := map[bool]string{false: "anonymous", true: "users"}[user]
		b.Run(name, func(b *testing.B) {
			mb := NewMemoryBroker().(*memoryBroker)
			mb.Bind(func(Message) {})
			members := make([]Member, b.N)
			for i := range members {
				members[i].ConnID = fmt.Sprintf("%036d", i)
				if user {
					members[i].UserID = fmt.Sprintf("user-%d", i)
				}
			}
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			b.ResetTimer()
			for i := range b.N {
				if err := mb.Join(context.Background(), "room", members[i], false); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			runtime.GC()
			runtime.ReadMemStats(&after)
			b.ReportMetric(float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/float64(b.N), "retained-B/join")
			runtime.KeepAlive(members)
			runtime.KeepAlive(mb)
		})
	}
}
