package redisbroker

import (
	"fmt"
	"log/slog"
	"strings"
	"time"
)

// Defaults of the options.
const (
	DefaultPrefix      = "roomcast"
	DefaultPresenceTTL = 30 * time.Second
	DefaultRoomTTL     = time.Hour
	// DefaultPublishBatches is WithPublishBatches' default.
	DefaultPublishBatches = 2
)

// Option configures a Broker.
type Option func(*config)

type config struct {
	prefix      string
	presenceTTL time.Duration
	roomTTL     time.Duration
	logger      *slog.Logger
	batches     int
}

// WithPrefix sets the prefix of every key and channel the broker uses, so
// several applications can share one Redis. Default "roomcast". Every node
// of one cluster must use the same prefix. It must be non-empty and hold
// no '{' or '}' (they delimit the hash tag).
func WithPrefix(p string) Option {
	return func(c *config) { c.prefix = p }
}

// WithPresenceTTL sets how long a connection's presence entry outlives its
// node's last refresh: the time a crashed node's members stay listed. Each
// node refreshes its entries every third of it. Default 30s; at least 30ms.
func WithPresenceTTL(d time.Duration) Option {
	return func(c *config) { c.presenceTTL = d }
}

// WithRoomTTL sets how long a room's state (its epoch and sequence)
// outlives its last publish, join or subscriber, or its history's TTL when
// that is longer. A room whose state expired starts a new epoch, and
// clients that recover from the old one are told "epoch_changed". Default
// 1h; at least 10ms.
func WithRoomTTL(d time.Duration) Option {
	return func(c *config) { c.roomTTL = d }
}

// WithPublishBatches sets how many batches of publishes may be in flight
// to Redis at once (each on a connection of the client's pool while it
// runs). Publishes that arrive while they all are wait for the next
// batch, which carries all of them in one script run. Default 2; at least
// 1.
func WithPublishBatches(n int) Option {
	return func(c *config) { c.batches = n }
}

// WithLogger sets the logger for failures the broker cannot return to a
// caller: a gap it could not fill, a refresh that failed. Default
// slog.Default().
func WithLogger(l *slog.Logger) Option {
	return func(c *config) { c.logger = l }
}

func (c *config) validate() {
	bad := func(format string, args ...any) {
		panic("redisbroker: " + fmt.Sprintf(format, args...))
	}
	if c.prefix == "" || strings.ContainsAny(c.prefix, "{}") {
		bad("WithPrefix(%q): want a non-empty prefix without { or }", c.prefix)
	}
	if c.presenceTTL < 30*time.Millisecond {
		bad("WithPresenceTTL(%v): want at least 30ms", c.presenceTTL)
	}
	if c.roomTTL < 10*time.Millisecond {
		bad("WithRoomTTL(%v): want at least 10ms", c.roomTTL)
	}
	if c.batches < 1 {
		bad("WithPublishBatches(%d): want at least 1", c.batches)
	}
	if c.logger == nil {
		c.logger = slog.Default()
	}
}
