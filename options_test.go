package pubsub_test

import (
	"strings"
	"testing"
	"time"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/pubsubtest"
)

// Options (options.go): NewHandler panics on a value out of range, with a
// "pubsub: " message naming the option, accepts the boundary values, and
// brings RoomOptions into range. The defaults are tested with what they
// bound: the rate limit's burst in ratelimit_test.go, connections per
// user in upgrade_test.go, the welcome's limits in protocol_test.go.

// panicOf runs f and returns the message it panicked with, which must be
// a string (every panic of the package is), or ok false.
func panicOf(t *testing.T, f func()) (msg string, ok bool) {
	t.Helper()
	defer func() {
		if p := recover(); p != nil {
			var isString bool
			if msg, isString = p.(string); !isString {
				t.Errorf("panicked with %T %v, want a string", p, p)
			}
			ok = true
		}
	}()
	f()
	return "", false
}

// expectOptionPanic expects NewHandler(opt) to panic with a "pubsub: "
// message that names option.
func expectOptionPanic(t *testing.T, option string, opt pubsub.Option) {
	t.Helper()
	msg, panicked := panicOf(t, func() { pubsub.NewHandler(pubsub.WithLogger(pubsubtest.Logger()), opt) })
	if !panicked {
		t.Fatalf("%s: NewHandler did not panic", option)
	}
	if !strings.HasPrefix(msg, "pubsub: ") || !strings.Contains(msg, option) {
		t.Errorf("%s: panic %q, want a message starting \"pubsub: \" that names the option", option, msg)
	}
}

func TestNewHandlerPanicsOnEachInvalidOptionValue(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string // the option, which the message must name
		opt  pubsub.Option
	}{
		{`WithPath("ws")`, pubsub.WithPath("ws")},
		{`WithPath("/ws/")`, pubsub.WithPath("/ws/")},
		{`WithPath("/a/../ws")`, pubsub.WithPath("/a/../ws")},
		{"WithMaxMessageBytes(0)", pubsub.WithMaxMessageBytes(0)},
		{"WithMaxMessageBytes(64 MiB + 1)", pubsub.WithMaxMessageBytes(64<<20 + 1)},
		{"WithMaxRooms(0)", pubsub.WithMaxRooms(0)},
		{"WithMaxRooms(1,000,001)", pubsub.WithMaxRooms(1_000_001)},
		{"WithRateLimit(0, 1)", pubsub.WithRateLimit(0, 1)},
		{"WithRateLimit(1, 0)", pubsub.WithRateLimit(1, 0)},
		{"WithWriteTimeout(0)", pubsub.WithWriteTimeout(0)},
		{"WithWriteTimeout(9ms)", pubsub.WithWriteTimeout(9 * time.Millisecond)},
		{"WithHeartbeat(0, 1s)", pubsub.WithHeartbeat(0, time.Second)},
		{"WithHeartbeat(1s, 0)", pubsub.WithHeartbeat(time.Second, 0)},
		{"WithQueueLimits(0, 1)", pubsub.WithQueueLimits(0, 1)},
		{"WithQueueLimits(1, 0)", pubsub.WithQueueLimits(1, 0)},
		{`WithOriginPatterns("[")`, pubsub.WithOriginPatterns("[")},
		{`WithDefaultRoom("no spaces")`, pubsub.WithDefaultRoom("no spaces")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			option, _, _ := strings.Cut(tc.name, "(")
			expectOptionPanic(t, option, tc.opt)
		})
	}
}

func TestNewHandlerRefusesLimitsOutOfRange(t *testing.T) {
	t.Parallel()
	for name, opt := range map[string]pubsub.Option{
		"WithMaxConnections":        pubsub.WithMaxConnections(-1),
		"WithMaxConnectionsPerUser": pubsub.WithMaxConnectionsPerUser(-1),
		"WithIdleTimeout":           pubsub.WithIdleTimeout(time.Millisecond),
		"WithDrain":                 pubsub.WithDrain(0, time.Second),
	} {
		expectOptionPanic(t, name, opt)
	}
}

func TestRoomStateOptionsOutOfRangePanicAtNewHandler(t *testing.T) {
	t.Parallel()
	for name, opt := range map[string]pubsub.Option{
		"history size without ttl": pubsub.WithHistory(5, 0),
		"negative history size":    pubsub.WithHistory(-1, time.Minute),
		"history size too big":     pubsub.WithHistory(100_000+1, time.Minute),
		"negative history ttl":     pubsub.WithHistory(0, -time.Second),
		"unknown presence mode":    pubsub.WithPresence(9),
		"unknown policy":           pubsub.WithSlowConsumerPolicy(9),
		"negative max info":        pubsub.WithMaxInfoBytes(-1),
		"max info too big":         pubsub.WithMaxInfoBytes(64<<10 + 1),
	} {
		msg, panicked := panicOf(t, func() { pubsub.NewHandler(pubsub.WithLogger(pubsubtest.Logger()), opt) })
		if !panicked || !strings.HasPrefix(msg, "pubsub: ") {
			t.Errorf("%s: NewHandler panicked %v with %q, want a panic with a \"pubsub: \" message", name, panicked, msg)
		}
	}
}

func TestNewHandlerAcceptsTheBoundaryValues(t *testing.T) {
	t.Parallel()
	h := quietHandler(
		pubsub.WithPath("/"),
		pubsub.WithMaxMessageBytes(1), pubsub.WithMaxMessageBytes(64<<20),
		pubsub.WithMaxRooms(1), pubsub.WithMaxRooms(1_000_000),
		pubsub.WithRateLimit(0.001, 1),
		pubsub.WithWriteTimeout(10*time.Millisecond),
		pubsub.WithHeartbeat(10*time.Millisecond, 10*time.Millisecond),
		pubsub.WithQueueLimits(1, 1),
		pubsub.WithOriginPatterns("*.example.com", "https://app.example.com"),
	)
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestRoomOptionsAreBroughtIntoRange(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithRoomOptions(func(room string, o *pubsub.RoomOptions) {
		switch room {
		case "size-no-ttl":
			o.HistorySize = 5
		case "negative-size":
			o.HistorySize, o.HistoryTTL = -4, time.Minute
		case "huge-size":
			o.HistorySize, o.HistoryTTL = 100_000+1, time.Minute
		case "ttl-no-size":
			o.HistoryTTL = time.Minute
		case "bad-modes":
			o.Presence, o.SlowConsumer = 42, 42
		case "keep-latest":
			o.Presence, o.SlowConsumer = pubsub.PresenceCounts, pubsub.SlowConsumerKeepLatest
		}
	}))
	for room, want := range map[string]pubsub.RoomOptions{
		"size-no-ttl":   {HistorySize: 5, HistoryTTL: 10 * time.Minute},
		"negative-size": {},
		"huge-size":     {HistorySize: 100_000, HistoryTTL: time.Minute},
		"ttl-no-size":   {},
		"bad-modes":     {Presence: pubsub.PresenceOn, SlowConsumer: pubsub.SlowConsumerDisconnect},
		"keep-latest":   {Presence: pubsub.PresenceCounts, SlowConsumer: pubsub.SlowConsumerKeepLatest},
	} {
		if got := srv.RoomStats(room).Options; got != want {
			t.Errorf("room %q: options %+v, want %+v", room, got, want)
		}
	}
	// The normalized values are the ones applied, not only reported.
	publishNumbered(srv, "size-no-ttl", 1, 7)
	publishNumbered(srv, "negative-size", 1, 7)
	if ms, _ := srv.History(pubsubtest.Context(t), "size-no-ttl", 100); len(ms) != 5 {
		t.Errorf("size-no-ttl keeps %d messages, want 5 (a size with no TTL gets DefaultHistoryTTL, not nothing)", len(ms))
	}
	if ms, _ := srv.History(pubsubtest.Context(t), "negative-size", 100); len(ms) != 0 {
		t.Errorf("negative-size keeps %d messages, want 0", len(ms))
	}
}
