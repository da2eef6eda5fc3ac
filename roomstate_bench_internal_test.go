package pubsub

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"testing"
)

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
	h := NewHandler(WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))), WithPresence(mode))
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
