package pubsub_test

import (
	"bytes"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// Slow consumers, end to end: a subscriber whose bounded outbound queue
// (queue.go) fills meets its room's policy. SlowConsumerDisconnect closes
// it with 4002, SlowConsumerDropOldest and SlowConsumerKeepLatest keep it
// with counted gaps; the publisher and the other subscribers never wait.
// The queue's own unit tests are in queue_internal_test.go; a write that
// times out is in writer_test.go; the stats of a stuck subscriber in
// pubsub_test.go.

// bigText is an n-byte text payload starting with tag.
func bigText(tag string, n int) []byte {
	b := bytes.Repeat([]byte{'x'}, n)
	copy(b, tag)
	return b
}

// publishUntil publishes payload(i) into room, i = 1, 2, ..., until done
// holds after a publish; it returns the number published.
func publishUntil(t *testing.T, srv *pubsubtest.Server, room string, limit int, payload func(i int) []byte, done func() bool) int {
	t.Helper()
	for i := 1; i <= limit; i++ {
		srv.Publish(room, payload(i))
		if done() {
			return i
		}
	}
	t.Fatalf("room %q: condition not reached after %d publishes", room, limit)
	return 0
}

// gapReader reads one room's messages, counting what it got and the seqs
// it never saw.
type gapReader struct {
	got, gaps int
	last      uint64
}

func (g *gapReader) add(t *testing.T, e pubsubtest.Envelope) {
	t.Helper()
	if e.Seq <= g.last {
		t.Fatalf("seq %d after %d: out of order or repeated", e.Seq, g.last)
	}
	g.gaps += int(e.Seq - g.last - 1)
	g.last = e.Seq
	g.got++
}

// tickerValue is the number at the start of a ticker payload "v=<n>|...".
func tickerValue(t *testing.T, e pubsubtest.Envelope) int {
	t.Helper()
	if e.Text == nil {
		t.Fatalf("ticker message %s has no text", e)
	}
	s, _, _ := strings.Cut(strings.TrimPrefix(*e.Text, "v="), "|")
	v, err := strconv.Atoi(s)
	if err != nil {
		t.Fatalf("ticker message %.40q: %v", *e.Text, err)
	}
	return v
}

// ---- SlowConsumerDisconnect ----

func TestSlowConsumerIsDisconnectedWhileOthersGetEveryMessageInOrder(t *testing.T) {
	t.Parallel()
	var hooks hookLog
	const (
		queueMessages = 16
		burst         = 8 // below the bound: a subscriber that keeps up never passes it
		maxMessages   = 10000
	)
	// The byte bound is above all that is ever published: only the message
	// bound can disconnect the slow consumer.
	srv := pubsubtest.Start(t, hooks.options(
		pubsub.WithQueueLimits(queueMessages, 64<<20),
		pubsub.WithWriteTimeout(250*time.Millisecond))...)
	slowConn := srv.DialRaw("/ws?room=feed") // does not read until it is gone
	slow := hooks.connected(t, 1)
	healthy := srv.DialRaw("/ws?room=feed")
	hooks.connected(t, 2)
	ctx := pubsubtest.Context(t)
	filler := strings.Repeat("f", 4<<10)

	// The publisher runs on its own goroutine, so that a Publish that
	// blocked would fail the test at its timeout instead of hanging it. It
	// publishes in bursts, each read by the healthy subscriber before the
	// next, until the slow consumer is gone and a few bursts more.
	published := make(chan int)
	read := make(chan struct{})
	pubErr := make(chan error, 1)
	go func() {
		defer close(published)
		pubErr <- func() error {
			after := -1
			for n := 0; n < maxMessages; {
				for range burst {
					if err := srv.Handler.Publish(ctx, "feed", fmt.Appendf(nil, "%06d:%s", n, filler)); err != nil {
						return fmt.Errorf("Publish #%d: %w", n, err)
					}
					n++
				}
				select {
				case published <- n:
				case <-ctx.Done():
					return ctx.Err()
				}
				select {
				case <-read:
				case <-ctx.Done():
					return ctx.Err()
				}
				switch {
				case after < 0 && srv.Stats().SlowConsumers > 0:
					after = 4
				case after == 0:
					return nil
				case after > 0:
					after--
				}
			}
			return fmt.Errorf("no slow consumer after %d messages", maxMessages)
		}()
	}()

	next := 0
	for {
		var total int
		var ok bool
		select {
		case total, ok = <-published:
		case <-ctx.Done():
			t.Fatalf("Publish did not return within the test's timeout (%d messages read)", next)
		}
		if !ok {
			break
		}
		for ; next < total; next++ {
			if binary, b := healthy.Read(); binary || !strings.HasPrefix(string(b), fmt.Sprintf("%06d:", next)) {
				t.Fatalf("healthy subscriber: message %.10q, want #%d", b, next)
			}
		}
		select {
		case read <- struct{}{}:
		case <-ctx.Done():
			t.Fatal("the publisher did not take the read signal")
		}
	}
	if err := <-pubErr; err != nil {
		t.Fatal(err)
	}

	// Reading now lets a close handshake the server began finish at once.
	ended(t, slowConn)
	hooks.disconnectedWith(t, slow.ID, protocol.CloseSlowConsumer)
	if n := srv.Stats().SlowConsumers; n != 1 {
		t.Fatalf("Stats().SlowConsumers = %d, want 1", n)
	}
	if cs := srv.Connections("feed"); len(cs) != 1 || cs[0].ID == slow.ID {
		t.Fatalf("room members after the slow consumer left: %+v, want only the healthy one", cs)
	}
}

func TestSlowConsumerByteBoundAloneDisconnects(t *testing.T) {
	t.Parallel()
	var hooks hookLog
	const maxMessages = 200
	srv := pubsubtest.Start(t, hooks.options(
		pubsub.WithQueueLimits(maxMessages, 64<<10),
		pubsub.WithWriteTimeout(250*time.Millisecond))...)
	slowConn := srv.DialRaw("/ws?room=big") // does not read until it is gone
	slow := hooks.connected(t, 1)

	// One message fits the byte bound, two do not. At most maxMessages
	// are published, so the message bound can never be passed: only the
	// byte bound can disconnect the consumer.
	msg := bytes.Repeat([]byte("z"), 48<<10)
	for i := 0; i < maxMessages && srv.Stats().SlowConsumers == 0; i++ {
		srv.Publish("big", msg)
	}
	if srv.Stats().SlowConsumers == 0 {
		t.Fatalf("%d messages of 48 KiB published with a 64 KiB byte bound, and no slow consumer was counted", maxMessages)
	}
	// Reading now lets a close handshake the server began finish at once.
	ended(t, slowConn)
	hooks.disconnectedWith(t, slow.ID, protocol.CloseSlowConsumer)
	if n := srv.Stats().SlowConsumers; n != 1 {
		t.Fatalf("Stats().SlowConsumers = %d, want 1", n)
	}
}

func TestSlowConsumerInADisconnectRoomIsClosedWith4002AndCounted(t *testing.T) {
	t.Parallel()
	var hooks hookLog
	srv := pubsubtest.Start(t, hooks.options(pubsub.WithQueueLimits(8, 1<<20))...)
	const room = "feed"
	p := srv.Dial("/ws")
	p.Subscribe(room)
	// p reads nothing from here on: socket buffers fill, then its queue.
	payload := bigText("feed", 16<<10)
	publishUntil(t, srv, room, 20_000, func(int) []byte { return payload },
		func() bool { return srv.Stats().SlowConsumers > 0 })
	if got := srv.Stats().SlowConsumers; got != 1 {
		t.Fatalf("Stats().SlowConsumers = %d, want 1", got)
	}
	if got := srv.RoomStats(room).SlowConsumers; got != 1 {
		t.Fatalf("RoomStats(%q).SlowConsumers = %d, want 1", room, got)
	}
	if got := srv.Stats().Dropped; got != 0 {
		t.Fatalf("Stats().Dropped = %d, want 0: a disconnect room never drops", got)
	}
	p.ExpectClose(protocol.CloseSlowConsumer)
	hooks.disconnectedWith(t, p.Welcome.ConnID, protocol.CloseSlowConsumer)
}

// ---- the dropping policies ----

func TestDropOldestRoomKeepsASlowConsumerWithACountedGap(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithQueueLimits(16, 4<<20),
		pubsub.WithRoomOptions(func(room string, o *pubsub.RoomOptions) {
			if room == "feed" {
				o.SlowConsumer = pubsub.SlowConsumerDropOldest
			}
		}))
	const (
		room = "feed"
		n    = 2000 // 32 MB: far more than socket buffers and the queue hold
	)
	p := srv.Dial("/ws", pubsubtest.AllowGaps()) // the gaps are the point, counted below
	p.Subscribe(room)
	id := p.Welcome.ConnID
	for i := 1; i <= n; i++ {
		srv.Publish(room, bigText(strconv.Itoa(i)+":", 16<<10))
		if st, _ := srv.ConnStats(id); st.QueueMessages > 16 {
			t.Fatalf("after publish %d the queue holds %d messages, want at most 16", i, st.QueueMessages)
		}
	}
	st, err := srv.ConnStats(id)
	if err != nil {
		t.Fatal(err)
	}
	if st.Dropped == 0 {
		t.Fatalf("ConnStats.Dropped = 0 after %d unread messages of 16 KiB, want drops", n)
	}
	if rs := srv.RoomStats(room); rs.Dropped != st.Dropped || rs.Options.SlowConsumer != pubsub.SlowConsumerDropOldest || rs.SlowConsumers != 0 {
		t.Fatalf("RoomStats: dropped %d, policy %v, slow consumers %d; want %d, drop-oldest, 0", rs.Dropped, rs.Options.SlowConsumer, rs.SlowConsumers, st.Dropped)
	}
	if s := srv.Stats(); s.Dropped != st.Dropped || s.SlowConsumers != 0 {
		t.Fatalf("Stats: dropped %d, slow consumers %d; want %d, 0", s.Dropped, s.SlowConsumers, st.Dropped)
	}
	var g gapReader
	for g.last < n {
		e := p.NextMessage(room)
		g.add(t, e)
		if want := strconv.FormatUint(e.Seq, 10) + ":"; !strings.HasPrefix(*e.Text, want) {
			t.Fatalf("seq %d carries %.10q, want the payload published as %s", e.Seq, *e.Text, want)
		}
	}
	if uint64(g.gaps) != st.Dropped || g.got+g.gaps != n {
		t.Fatalf("received %d with %d missing seqs, counted %d dropped: want missing = dropped and received + dropped = %d", g.got, g.gaps, st.Dropped, n)
	}
	// Still connected and live, with no more gaps.
	srv.Publish(room, []byte(`{"after":true}`))
	if e := p.NextMessage(room); e.Seq != n+1 {
		t.Fatalf("after catching up got seq %d, want %d", e.Seq, n+1)
	}
	t.Logf("received %d of %d, dropped %d", g.got, n, st.Dropped)
}

func TestKeepLatestRoomQueuesOnlyTheNewestValue(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithSlowConsumerPolicy(pubsub.SlowConsumerKeepLatest))
	const (
		room = "ticker"
		n    = 1000 // 32 MB unread: the writer blocks early
	)
	p := srv.Dial("/ws", pubsubtest.AllowGaps()) // values are replaced: gaps, counted below
	p.Subscribe(room)
	id := p.Welcome.ConnID
	for i := 1; i <= n; i++ {
		srv.Publish(room, bigText(fmt.Sprintf("v=%d|", i), 32<<10))
		if st, _ := srv.ConnStats(id); st.QueueMessages > 1 {
			t.Fatalf("after value %d the queue holds %d messages of a keep-latest room, want at most 1", i, st.QueueMessages)
		}
	}
	st, _ := srv.ConnStats(id)
	got, prev := 0, 0
	for prev < n {
		v := tickerValue(t, p.NextMessage(room))
		if v <= prev {
			t.Fatalf("value %d after %d", v, prev)
		}
		prev = v
		got++
	}
	if got+int(st.Dropped) != n || st.Dropped == 0 {
		t.Fatalf("received %d values, %d counted dropped: want both to add up to %d, with drops", got, st.Dropped, n)
	}
	if got > n/2 {
		t.Fatalf("received %d of %d values: a keep-latest room should have collapsed the backlog", got, n)
	}
	if rs := srv.RoomStats(room); rs.Dropped != st.Dropped || rs.SlowConsumers != 0 {
		t.Fatalf("RoomStats dropped %d, slow consumers %d; want %d, 0", rs.Dropped, rs.SlowConsumers, st.Dropped)
	}
	if s := srv.Stats(); s.Dropped != st.Dropped || s.SlowConsumers != 0 {
		t.Fatalf("Stats dropped %d, slow consumers %d; want %d, 0", s.Dropped, s.SlowConsumers, st.Dropped)
	}
	t.Logf("received %d of %d values", got, n)
}

func TestKeepLatestAndDisconnectRoomsOnOneConnectionEachApplyTheirOwnPolicy(t *testing.T) {
	t.Parallel()
	var hooks hookLog
	srv := pubsubtest.Start(t, hooks.options(pubsub.WithQueueLimits(8, 4<<20),
		pubsub.WithRoomOptions(func(room string, o *pubsub.RoomOptions) {
			if room == "ticker" {
				o.SlowConsumer = pubsub.SlowConsumerKeepLatest
			}
		}))...)
	p := srv.Dial("/ws")
	p.Subscribe("ticker")
	p.Subscribe("feed")
	// Nothing is read: ticker values collapse, feed messages pile up until
	// the queue overflows on one of them.
	payload := bigText("feed", 16<<10)
	ticks := 0
	for i := 1; srv.Stats().SlowConsumers == 0; i++ {
		if i > 20_000 {
			t.Fatal("no slow consumer after 20000 feed messages")
		}
		ticks++
		srv.Publish("ticker", fmt.Appendf(nil, "v=%d|", ticks))
		srv.Publish("feed", payload)
	}
	ticker, feed := srv.RoomStats("ticker"), srv.RoomStats("feed")
	if feed.SlowConsumers != 1 || ticker.SlowConsumers != 0 {
		t.Fatalf("slow consumers: feed %d, ticker %d; want the feed room to count the disconnect", feed.SlowConsumers, ticker.SlowConsumers)
	}
	if ticker.Dropped == 0 || feed.Dropped != 0 {
		t.Fatalf("dropped: ticker %d, feed %d; want ticker values replaced, no feed message dropped", ticker.Dropped, feed.Dropped)
	}
	p.ExpectClose(protocol.CloseSlowConsumer)
	hooks.disconnectedWith(t, p.Welcome.ConnID, protocol.CloseSlowConsumer)
}

// A drop policy may discard a queued message of another room to make room
// (DropOldest takes the oldest droppable message of any room). Each room's
// Dropped counter must count the messages that room lost, so that a
// subscriber's gap in a room matches that room's counter.
func TestDropsAreCountedAgainstTheRoomThatLostTheMessage(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithQueueLimits(8, 4<<20), pubsub.WithSlowConsumerPolicy(pubsub.SlowConsumerDropOldest))
	p := srv.Dial("/ws", pubsubtest.AllowGaps()) // the gaps are the point, counted below
	p.Subscribe("busy")
	p.Subscribe("quiet")
	id := p.Welcome.ConnID
	payload := bigText("busy", 16<<10)
	busyTop := publishUntil(t, srv, "busy", 20_000, func(int) []byte { return payload }, func() bool {
		st, _ := srv.ConnStats(id)
		return st.Dropped >= 8 // the queue is full and has turned over
	})
	publishNumbered(srv, "quiet", 1, 4) // lands in the full queue
	gaps := map[string]*gapReader{"busy": {}, "quiet": {}}
	for gaps["quiet"].last < 4 {
		e := p.Next()
		g := gaps[e.Room]
		if e.Type != "message" || g == nil {
			t.Fatalf("unexpected %s", e)
		}
		g.add(t, e)
	}
	if gaps["busy"].last != uint64(busyTop) {
		t.Fatalf("busy: last seq %d, want %d (the newest is never dropped first)", gaps["busy"].last, busyTop)
	}
	for room, g := range gaps {
		if got := srv.RoomStats(room).Dropped; got != uint64(g.gaps) {
			t.Errorf("room %q: the subscriber misses %d seqs, RoomStats.Dropped = %d; want them equal", room, g.gaps, got)
		}
	}
}

// "keep-latest: the newest value always arrives" (PROTOCOL.md 3.9), or the
// connection is closed as a slow consumer; the newest value must not be
// discarded while the connection stays open. Two ways it is lost today:
// the queue is full of a disconnect room's messages when the value comes
// (the value itself is dropped), or a drop-oldest room's message evicts
// it (it is the oldest droppable frame).
func TestKeepLatestNewestValueIsNotLostBehindAFullQueue(t *testing.T) {
	t.Parallel()
	newClient := func(t *testing.T, other pubsub.SlowConsumerPolicy, dial ...pubsubtest.DialOption) (*pubsubtest.Server, *pubsubtest.Conn) {
		srv := pubsubtest.Start(t, pubsub.WithQueueLimits(4, 4<<20),
			pubsub.WithRoomOptions(func(room string, o *pubsub.RoomOptions) {
				switch room {
				case "ticker":
					o.SlowConsumer = pubsub.SlowConsumerKeepLatest
				case "other":
					o.SlowConsumer = other
				}
			}))
		p := srv.Dial("/ws", dial...)
		p.Subscribe("ticker")
		p.Subscribe("other")
		return srv, p
	}
	payload := bigText("other", 16<<10)

	t.Run("queue full of a disconnect room", func(t *testing.T) {
		t.Parallel()
		srv, p := newClient(t, pubsub.SlowConsumerDisconnect)
		// Fill the socket and then the queue, stopping exactly at the
		// bound (one more would close the connection).
		top := 0
		for {
			st, err := srv.ConnStats(p.Welcome.ConnID)
			if err != nil {
				t.Fatal(err)
			}
			if st.QueueMessages >= 4 {
				break
			}
			if top++; top > 20_000 {
				t.Fatal("the queue never filled")
			}
			srv.Publish("other", payload)
		}
		srv.Publish("ticker", []byte("v=1|newest"))
		expectTickerValue(t, srv, p, top)
	})

	t.Run("evicted by a drop-oldest room", func(t *testing.T) {
		t.Parallel()
		srv, p := newClient(t, pubsub.SlowConsumerDropOldest, pubsubtest.AllowGaps()) // "other" drops
		top := publishUntil(t, srv, "other", 20_000, func(int) []byte { return payload }, func() bool {
			st, _ := srv.ConnStats(p.Welcome.ConnID)
			return st.Dropped >= 64 // the queue has turned over many times: the writer is stuck
		})
		srv.Publish("ticker", []byte("v=1|newest"))
		for range 4 { // each evicts the oldest droppable frame
			srv.Publish("other", payload)
			top++
		}
		expectTickerValue(t, srv, p, top)
	})
}

// expectTickerValue reads p until room "other" reaches seq top and then a
// marker, and expects a "ticker" message among them, or a 4002 close.
func expectTickerValue(t *testing.T, srv *pubsubtest.Server, p *pubsubtest.Conn, top int) {
	t.Helper()
	sawTicker, marker := false, ""
	for {
		e, err := p.TryNext()
		if code, _, ok := pubsubtest.CloseOf(err); ok && code == protocol.CloseSlowConsumer {
			return // closed, not silently stale: acceptable
		}
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case e.Type == "message" && e.Room == "ticker":
			sawTicker = true
		case e.Type == "message" && e.Room == "other" && e.Seq == uint64(top):
			marker = publishMarker(srv, "other") // the queue is drained by now
		case marker != "" && string(e.Data) == marker:
			if !sawTicker {
				st, _ := srv.ConnStats(p.Welcome.ConnID)
				t.Fatalf("the connection is open and caught up, but the ticker's newest value never came (dropped %d)", st.Dropped)
			}
			return
		}
	}
}
