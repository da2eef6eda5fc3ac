package metrics_test

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/metrics"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// nodeFamilies are the node-wide families, exported whatever the options.
var nodeFamilies = []string{
	"roomcast_connections",
	"roomcast_connections_accepted_total",
	"roomcast_connections_closed_total",
	"roomcast_connections_refused_total",
	"roomcast_hook_panics_total",
	"roomcast_messages_deduplicated_total",
	"roomcast_messages_dropped_total",
	"roomcast_messages_published_total",
	"roomcast_messages_rate_limited_total",
	"roomcast_messages_received_total",
	"roomcast_messages_sent_total",
	"roomcast_rooms",
	"roomcast_slow_consumers_total",
}

func TestAFreshHandlerExportsEveryNodeFamilyAtZero(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	s := serveMetrics(t, metrics.NewCollector(srv.Handler)).get()

	if got := s.families("roomcast_"); !equal(got, nodeFamilies) {
		t.Fatalf("families %q,\nwant %q", got, nodeFamilies)
	}
	series := 0
	for _, name := range nodeFamilies {
		f := s[name]
		if f.GetHelp() == "" {
			t.Errorf("%s has no help text", name)
		}
		wantCounter := strings.HasSuffix(name, "_total")
		if isCounter := f.GetType().String() == "COUNTER"; isCounter != wantCounter {
			t.Errorf("%s is a %v; a counter's name, and only a counter's, ends in _total", name, f.GetType())
		}
		for _, m := range f.Metric {
			series++
			if v := m.GetCounter().GetValue() + m.GetGauge().GetValue(); v != 0 {
				t.Errorf("%s%v = %v on a fresh Handler, want 0", name, m.Label, v)
			}
		}
	}
	// The documented count: 12 plain series and the close codes' 21.
	if series != 33 {
		t.Errorf("%d series, want the documented 33", series)
	}
}

func TestScrapeCountsConnectionsAndMessages(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithClientPublish(true))
	e := serveMetrics(t, metrics.NewCollector(srv.Handler))

	raw := srv.DialRaw("/ws?room=chat")
	sub := srv.Dial("/ws")
	sub.Subscribe("chat")
	sub.Subscribe("news")
	srv.Refused("/ws?room=", 400) // an invalid room: refused before the upgrade

	// Received: two subscribes so far (protocol-mode requests are
	// messages too; heartbeats are not).
	raw.Send("hello")          // received: 3; published: 1; sent: raw's own copy and sub's
	sub.NextMessage("chat")    //
	raw.ExpectText("hello")    //
	srv.Publish("news", nil)   // published: 2; sent: sub's
	sub.NextMessage("news")    //
	sub.Publish("chat", "hey") // received: 4; published: 3; sent: raw's and sub's own
	raw.ExpectText("hey")
	sub.NextMessage("chat")

	s := e.waitFor("five messages counted as sent", func(s scrape) bool {
		return s.is(5, "roomcast_messages_sent_total")
	})
	s.mustBe(t, 2, "roomcast_connections")
	s.mustBe(t, 2, "roomcast_rooms")
	s.mustBe(t, 2, "roomcast_connections_accepted_total")
	s.mustBe(t, 1, "roomcast_connections_refused_total")
	s.mustBe(t, 4, "roomcast_messages_received_total")
	s.mustBe(t, 3, "roomcast_messages_published_total")
	s.mustBe(t, 0, "roomcast_slow_consumers_total")

	// What a scrape says is what the Handler says.
	st := srv.Stats()
	for name, want := range map[string]float64{
		"roomcast_connections":                 float64(st.Connections),
		"roomcast_rooms":                       float64(st.Rooms),
		"roomcast_connections_accepted_total":  float64(st.Accepted),
		"roomcast_connections_refused_total":   float64(st.Refused),
		"roomcast_messages_received_total":     float64(st.MessagesIn),
		"roomcast_messages_sent_total":         float64(st.MessagesOut),
		"roomcast_messages_published_total":    float64(st.Published),
		"roomcast_messages_deduplicated_total": float64(st.Duplicates),
		"roomcast_messages_dropped_total":      float64(st.Dropped),
		"roomcast_messages_rate_limited_total": float64(st.RateLimited),
		"roomcast_slow_consumers_total":        float64(st.SlowConsumers),
		"roomcast_hook_panics_total":           float64(st.HookPanics),
	} {
		s.mustBe(t, want, name)
	}

	raw.Close(protocol.CloseNormal, "bye")
	s = e.waitFor("the raw client's close counted", func(s scrape) bool {
		return s.is(1, "roomcast_connections_closed_total", "code", "1000", "reason", "normal_closure")
	})
	s.mustBe(t, 1, "roomcast_connections")
	s.mustBe(t, 2, "roomcast_rooms") // sub is still in both
}

func TestDuplicatesRateLimitsAndHookPanicsAreCounted(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t,
		pubsub.WithClientPublish(true),
		pubsub.WithRateLimit(1, 1),
		pubsub.WithOnConnect(func(pubsub.ConnectEvent) { panic("a host bug") })) // recovered: the connection goes on
	e := serveMetrics(t, metrics.NewCollector(srv.Handler))

	raw := srv.DialRaw("/ws?room=orders")
	ctx := pubsubtest.Context(t)
	for range 2 { // the second publishes nothing
		if err := srv.Handler.Publish(ctx, "orders", []byte("x"), pubsub.IdempotencyKey("k1")); err != nil {
			t.Fatal(err)
		}
	}
	raw.ExpectText("x")
	raw.Send("one")
	raw.ExpectText("one")
	raw.Send("two") // past the burst of 1: closed with 4004
	raw.ExpectClose(protocol.CloseRateLimited)

	s := e.waitFor("the rate-limited close counted", func(s scrape) bool {
		return s.is(1, "roomcast_connections_closed_total", "code", "4004", "reason", "rate_limited")
	})
	s.mustBe(t, 1, "roomcast_messages_deduplicated_total")
	s.mustBe(t, 1, "roomcast_messages_rate_limited_total")
	s.mustBe(t, 2, "roomcast_messages_published_total") // "x" and "one"
	s.mustBe(t, 1, "roomcast_hook_panics_total")
}

func TestSlowConsumerIsCountedUnder4002(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t,
		pubsub.WithQueueLimits(200, 64<<10),
		pubsub.WithWriteTimeout(250*time.Millisecond))
	e := serveMetrics(t, metrics.NewCollector(srv.Handler, metrics.WithRooms("big")))
	slow := srv.DialRaw("/ws?room=big") // reads nothing until it is gone

	// One 48 KiB message fits the 64 KiB queue, two do not: once the
	// socket's buffers are full, the queue overflows.
	msg := bytes.Repeat([]byte("z"), 48<<10)
	for i := 0; srv.Stats().SlowConsumers == 0; i++ {
		if i == 400 {
			t.Fatal("400 messages of 48 KiB to a client that reads nothing, and no slow consumer")
		}
		srv.Publish("big", msg)
	}
	slow.ExpectClose(protocol.CloseSlowConsumer) // reading lets the close handshake finish

	s := e.waitFor("the slow consumer's close counted", func(s scrape) bool {
		return s.is(1, "roomcast_connections_closed_total", "code", "4002", "reason", "slow_consumer")
	})
	s.mustBe(t, 1, "roomcast_slow_consumers_total")
	s.mustBe(t, 0, "roomcast_connections")
	s.mustBe(t, 0, "roomcast_room_subscribers", "room", "big")
}

func TestCloseCodesAreCountedUnderAFixedSetOfLabels(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	e := serveMetrics(t, metrics.NewCollector(srv.Handler))

	kicked := srv.Dial("/ws")
	if err := srv.Disconnect(kicked.Welcome.ConnID, "kicked"); err != nil {
		t.Fatal(err)
	}
	kicked.ExpectClose(protocol.CloseDisconnected)

	srv.DialRaw("/ws?room=a").Close(protocol.CloseGoingAway, "tab closed")
	srv.DialRaw("/ws?room=a").Close(1005, "") // a close frame with no code, as a browser's ws.close() sends
	srv.DialRaw("/ws?room=a").CloseNow()      // lost: 1006
	// Codes a client picks itself: each is "other", not a series of its own.
	for _, code := range []protocol.CloseCode{3000, 3999, 4000, 4100, 4999} {
		srv.DialRaw("/ws?room=a").Close(code, "mine")
	}

	s := e.waitFor("nine connections' ends counted", func(s scrape) bool {
		var sum float64
		for _, m := range s["roomcast_connections_closed_total"].GetMetric() {
			sum += m.GetCounter().GetValue()
		}
		return sum == 9
	})
	closed := "roomcast_connections_closed_total"
	s.mustBe(t, 1, closed, "code", "4003", "reason", "disconnected")
	s.mustBe(t, 1, closed, "code", "1001", "reason", "going_away")
	s.mustBe(t, 1, closed, "code", "1005", "reason", "no_status_received")
	s.mustBe(t, 1, closed, "code", "1006", "reason", "abnormal_closure")
	s.mustBe(t, 5, closed, "code", "other", "reason", "other")
	s.mustBe(t, 0, closed, "code", "4002", "reason", "slow_consumer")

	// The label set is fixed: every code roomcast names, the five other
	// codes of RFC 6455 a peer may send, and "other"; whatever the clients
	// did, and from the first scrape on.
	var want []string
	for _, c := range protocol.CloseCodes() {
		want = append(want, fmt.Sprint(int(c)))
	}
	want = append(want, "1002", "1005", "1010", "1012", "1014", "other")
	slices.Sort(want)
	if got := s.labelValues(closed, "code"); !equal(got, want) {
		t.Fatalf("code label values %q,\nwant %q", got, want)
	}
	if n := len(s[closed].GetMetric()); n != 21 {
		t.Fatalf("%d series of %s, want the documented 21", n, closed)
	}
	for _, m := range s[closed].Metric {
		if len(m.Label) != 2 {
			t.Fatalf("%s%v: want exactly the labels code and reason", closed, m.Label)
		}
	}
}

func TestTheExportedMetricsFollowPrometheusNamingRules(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	srv.DialRaw("/ws?room=lobby")
	c := metrics.NewCollector(srv.Handler, metrics.WithRooms("lobby"), metrics.WithRoomFilter(func(string) bool { return true }))
	problems, err := testutil.CollectAndLint(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
}

func TestRegister(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	reg := prometheus.NewRegistry()
	c, err := metrics.Register(reg, srv.Handler)
	if err != nil {
		t.Fatal(err)
	}
	_, err = metrics.Register(reg, srv.Handler)
	if are := (prometheus.AlreadyRegisteredError{}); !errors.As(err, &are) {
		t.Fatalf("registering twice: %v, want an AlreadyRegisteredError", err)
	}
	if !reg.Unregister(c) {
		t.Fatal("Unregister the returned Collector: not registered")
	}

	// Two Handlers in one registry, told apart by a constant label.
	reg = prometheus.NewRegistry()
	other := pubsubtest.Start(t)
	for name, h := range map[string]*pubsub.Handler{"chat": srv.Handler, "feed": other.Handler} {
		wrapped := prometheus.WrapRegistererWith(prometheus.Labels{"handler": name}, reg)
		if _, err := metrics.Register(wrapped, h); err != nil {
			t.Fatalf("register handler %s: %v", name, err)
		}
	}
	other.DialRaw("/ws?room=a")
	// A raw client's upgrade completes a moment before the Handler
	// registers the connection.
	pubsubtest.WaitFor(t, "the connection registered", func() bool { return other.Stats().Connections == 1 })
	want := `
# HELP roomcast_connections Connections open on this node: WebSockets and event streams.
# TYPE roomcast_connections gauge
roomcast_connections{handler="chat"} 0
roomcast_connections{handler="feed"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "roomcast_connections"); err != nil {
		t.Fatal(err)
	}
}

func TestOptionsAreValidatedOnce(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	many := make([]string, 101)
	for i := range many {
		many[i] = fmt.Sprint("room", i)
	}
	for name, f := range map[string]func(){
		"nil Handler":        func() { metrics.NewCollector(nil) },
		"WithMaxRooms(0)":    func() { metrics.NewCollector(srv.Handler, metrics.WithMaxRooms(0)) },
		"WithMaxRooms(1001)": func() { metrics.NewCollector(srv.Handler, metrics.WithMaxRooms(metrics.MaxRoomsLimit+1)) },
		"101 named rooms":    func() { metrics.NewCollector(srv.Handler, metrics.WithRooms(many...)) },
		"3 rooms over 2":     func() { metrics.NewCollector(srv.Handler, metrics.WithMaxRooms(2), metrics.WithRooms("a", "b", "c")) },
		"an empty room":      func() { metrics.NewCollector(srv.Handler, metrics.WithRooms("")) },
	} {
		func() {
			defer func() {
				if v := recover(); v == nil || !strings.HasPrefix(fmt.Sprint(v), "metrics: ") {
					t.Errorf("%s: recovered %v, want a panic with a \"metrics: \" message", name, v)
				}
			}()
			f()
		}()
	}
	// In range: no panic. Named twice counts once.
	metrics.NewCollector(srv.Handler, metrics.WithMaxRooms(metrics.MaxRoomsLimit))
	metrics.NewCollector(srv.Handler, metrics.WithMaxRooms(2), metrics.WithRooms("a", "b", "a"), metrics.WithRooms("b"))
}

func equal(a, b []string) bool { return slices.Equal(a, b) }

func TestEventStreamsAreCountedLikeWebSockets(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	e := serveMetrics(t, metrics.NewCollector(srv.Handler, metrics.WithRooms("news")))

	kept := srv.Listen("/ws?room=news")
	kicked := srv.Listen("/ws?room=news")
	pubsubtest.WaitFor(t, "the listeners", func() bool { return len(srv.Connections("news")) == 2 })
	srv.Publish("news", []byte("hi"))
	kept.Expect("news", "hi")
	kicked.Expect("news", "hi")
	s := e.waitFor("two events counted as sent", func(s scrape) bool { return s.is(2, "roomcast_messages_sent_total") })
	s.mustBe(t, 2, "roomcast_connections")
	s.mustBe(t, 2, "roomcast_connections_accepted_total")
	s.mustBe(t, 2, "roomcast_room_subscribers", "room", "news")

	// The server ends one stream with a +close event (which one does not
	// matter); the client drops the other.
	if err := srv.Disconnect(srv.Connections("news")[0].ID, "kicked"); err != nil {
		t.Fatal(err)
	}
	e.waitFor("the kicked stream counted under 4003", func(s scrape) bool {
		return s.is(1, "roomcast_connections_closed_total", "code", "4003", "reason", "disconnected")
	})
	kept.Close()
	kicked.Close()
	s = e.waitFor("a dropped stream counted as lost (1006)", func(s scrape) bool {
		return s.is(1, "roomcast_connections_closed_total", "code", "1006", "reason", "abnormal_closure")
	})
	s.mustBe(t, 0, "roomcast_connections")
}
