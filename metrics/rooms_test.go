package metrics_test

import (
	"bytes"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/metrics"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// roomFamilies are the per-room families, exported only when the host
// opts in.
var roomFamilies = []string{
	"roomcast_room_max_lag_seconds",
	"roomcast_room_max_queued_messages",
	"roomcast_room_messages_dropped_total",
	"roomcast_room_queued_bytes",
	"roomcast_room_queued_messages",
	"roomcast_room_slow_consumers_total",
	"roomcast_room_subscribers",
}

func TestRoomSeriesOnlyWhenTheHostOptsIn(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	srv.DialRaw("/ws?room=lobby")
	srv.DialRaw("/ws?room=lobby")
	srv.Dial("/ws").Subscribe("team-a")

	s := serveMetrics(t, metrics.NewCollector(srv.Handler)).get()
	if got := s.families("roomcast_room_"); len(got) > 0 {
		t.Fatalf("no room opted in, yet the scrape has %q", got)
	}
	if _, ok := s["roomcast_rooms_omitted"]; ok {
		t.Fatal("no room opted in, yet the scrape has roomcast_rooms_omitted")
	}
	s.mustBe(t, 2, "roomcast_rooms")

	// Named rooms: exactly those, and one with no subscriber at zero.
	s = serveMetrics(t, metrics.NewCollector(srv.Handler, metrics.WithRooms("lobby", "empty"))).get()
	if got := s.families("roomcast_room_"); !equal(got, roomFamilies) {
		t.Fatalf("room families %q,\nwant %q", got, roomFamilies)
	}
	for _, name := range roomFamilies {
		if got := s.labelValues(name, "room"); !equal(got, []string{"empty", "lobby"}) {
			t.Fatalf("%s: rooms %q, want only the named empty and lobby", name, got)
		}
	}
	s.mustBe(t, 2, "roomcast_room_subscribers", "room", "lobby")
	s.mustBe(t, 0, "roomcast_room_subscribers", "room", "empty")
	s.mustBe(t, 0, "roomcast_rooms_omitted")
}

func TestRoomFilterIsCappedAndCountsWhatItLeftOut(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	c := srv.Dial("/ws")
	for _, room := range []string{"team-d", "team-c", "team-b", "team-a", "lobby", "other"} {
		c.Subscribe(room)
	}
	e := serveMetrics(t, metrics.NewCollector(srv.Handler,
		metrics.WithRooms("lobby"),
		metrics.WithRoomFilter(func(room string) bool { return strings.HasPrefix(room, "team-") || room == "lobby" }),
		metrics.WithMaxRooms(3)))

	// lobby is named, so it comes first; then the filter's matches in name
	// order, up to three rooms in all; team-c and team-d are left out.
	s := e.get()
	if got, want := s.labelValues("roomcast_room_subscribers", "room"), []string{"lobby", "team-a", "team-b"}; !equal(got, want) {
		t.Fatalf("rooms %q, want %q", got, want)
	}
	s.mustBe(t, 2, "roomcast_rooms_omitted")
	for _, name := range roomFamilies {
		if n := len(s[name].GetMetric()); n != 3 {
			t.Fatalf("%s: %d series, want 3 (the cap)", name, n)
		}
	}

	// The filter sees only rooms with a subscriber on this node.
	c.Ack(pubsubtest.Fields{"type": "unsubscribe", "room": "team-a"})
	s = e.waitFor("team-a gone from the rooms", func(s scrape) bool {
		return equal(s.labelValues("roomcast_room_subscribers", "room"), []string{"lobby", "team-b", "team-c"})
	})
	s.mustBe(t, 1, "roomcast_rooms_omitted")
}

func TestAPanickingRoomFilterFailsTheScrapeNotTheProcess(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	srv.DialRaw("/ws?room=lobby")
	e := serveMetrics(t, metrics.NewCollector(srv.Handler, metrics.WithRoomFilter(func(string) bool { panic("a host bug") })))
	_, status, err := e.tryGet()
	if err != nil {
		t.Fatal(err)
	}
	if status != http.StatusInternalServerError {
		t.Fatalf("scrape with a panicking filter: HTTP %d, want 500", status)
	}
}

// fillSocket publishes big messages into room until cond holds of its
// RoomStats: a subscriber that reads nothing fills its socket's buffers
// first, then its queue. Each publish is read by the readers, which keep
// up.
func fillSocket(t *testing.T, srv *pubsubtest.Server, room string, cond func(pubsub.RoomStats) bool, readers ...*pubsubtest.RawConn) {
	t.Helper()
	msg := bytes.Repeat([]byte("q"), 32<<10)
	for i := 0; !cond(srv.RoomStats(room)); i++ {
		if i == 1000 {
			t.Fatalf("1000 messages of 32 KiB into %s, and still %+v", room, srv.RoomStats(room))
		}
		srv.Publish(room, msg)
		for _, r := range readers {
			r.ExpectText(string(msg))
		}
	}
}

func TestRoomQueueDepthAndLagOfASubscriberThatReadsNothing(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithQueueLimits(10_000, 256<<20), pubsub.WithWriteTimeout(time.Minute))
	e := serveMetrics(t, metrics.NewCollector(srv.Handler, metrics.WithRooms("firehose")))
	srv.DialRaw("/ws?room=firehose") // reads nothing
	fast := srv.DialRaw("/ws?room=firehose")

	// Past what the kernel's socket buffers can take (they grow by
	// themselves on loopback, to several MiB), so that the queue stays
	// deep while the test reads it.
	fillSocket(t, srv, "firehose", func(st pubsub.RoomStats) bool {
		return len(st.Connections) > 0 && st.Connections[0].QueueBytes >= 24<<20 && st.Connections[0].Lag > 0
	}, fast)
	before := srv.RoomStats("firehose").Connections[0]
	s := e.get()
	after := srv.RoomStats("firehose").Connections[0]
	queued, _ := s.value("roomcast_room_queued_messages", "room", "firehose")
	maxQueued, _ := s.value("roomcast_room_max_queued_messages", "room", "firehose")
	queuedBytes, _ := s.value("roomcast_room_queued_bytes", "room", "firehose")
	lag, _ := s.value("roomcast_room_max_lag_seconds", "room", "firehose")
	// Nothing is published meanwhile, so the slow one's queue can only
	// shrink (its socket may still take some): the scrape sees it between
	// what RoomStats saw before and after. The reader keeps up, so the
	// room's sum is the slow one's queue.
	if maxQueued > float64(before.QueueMessages) || maxQueued < float64(after.QueueMessages) || maxQueued < 3 || queued != maxQueued {
		t.Fatalf("queued %v, max %v; RoomStats before the scrape %+v, after %+v", queued, maxQueued, before, after)
	}
	if queuedBytes < maxQueued*(32<<10) {
		t.Fatalf("queued bytes %v for at least %v messages of 32 KiB", queuedBytes, maxQueued)
	}
	if lag <= 0 {
		t.Fatalf("max lag %vs with %v messages queued", lag, maxQueued)
	}
	s.mustBe(t, 2, "roomcast_room_subscribers", "room", "firehose")
}

func TestRoomDropsAndSlowConsumersArePerRoom(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t,
		pubsub.WithQueueLimits(4, 1<<20),
		pubsub.WithWriteTimeout(time.Minute),
		pubsub.WithRoomOptions(func(room string, o *pubsub.RoomOptions) {
			if room == "ticker" {
				o.SlowConsumer = pubsub.SlowConsumerDropOldest
			}
		}))
	e := serveMetrics(t, metrics.NewCollector(srv.Handler, metrics.WithRoomFilter(func(string) bool { return true })))

	srv.DialRaw("/ws?room=ticker") // reads nothing: its messages are dropped, it stays
	fillSocket(t, srv, "ticker", func(st pubsub.RoomStats) bool { return st.Dropped >= 3 })
	slow := srv.DialRaw("/ws?room=orders") // reads nothing: it is closed as a slow consumer
	reader := srv.DialRaw("/ws?room=orders")
	fillSocket(t, srv, "orders", func(st pubsub.RoomStats) bool { return st.SlowConsumers > 0 }, reader)
	slow.ExpectClose(protocol.CloseSlowConsumer) // reading lets the close handshake finish

	s := e.waitFor("the slow consumer gone from orders", func(s scrape) bool {
		return s.is(1, "roomcast_room_subscribers", "room", "orders")
	})
	s.mustBe(t, 1, "roomcast_room_slow_consumers_total", "room", "orders")
	s.mustBe(t, 0, "roomcast_room_messages_dropped_total", "room", "orders")
	dropped, _ := s.value("roomcast_room_messages_dropped_total", "room", "ticker")
	if dropped < 3 {
		t.Fatalf("ticker dropped %v, want at least 3", dropped)
	}
	if total, _ := s.value("roomcast_messages_dropped_total"); total != dropped {
		t.Fatalf("%v dropped in all, %v in ticker, the only dropping room", total, dropped)
	}
	s.mustBe(t, 1, "roomcast_room_subscribers", "room", "ticker")
	s.mustBe(t, 0, "roomcast_room_slow_consumers_total", "room", "ticker")
	s.mustBe(t, 1, "roomcast_slow_consumers_total")
}
