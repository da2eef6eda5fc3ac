package pgbroker

import (
	"fmt"
	"log/slog"
	"regexp"
	"time"

	"github.com/roomcast/pubsub"
)

// Defaults of the options.
const (
	DefaultSchema         = "roomcast"
	DefaultPollInterval   = 5 * time.Second
	DefaultPollOnly       = 100 * time.Millisecond
	DefaultDeliveryWindow = 10 * time.Second
	DefaultPresenceTTL    = 30 * time.Second
	DefaultRoomTTL        = 24 * time.Hour
	DefaultSweepInterval  = time.Second
	DefaultPublishConns   = 1
	DefaultMaxBatch       = 256
)

// Option configures a Broker.
type Option func(*config)

type config struct {
	schema       string
	install      bool
	pollOnly     bool
	poll         time.Duration
	window       time.Duration
	presenceTTL  time.Duration
	roomTTL      time.Duration
	sweep        time.Duration
	publishConns int
	maxBatch     int
	archive      func(room string) bool
	txHistory    *pubsub.HistoryOptions
	logger       *slog.Logger
	pollSet      bool
}

// WithSchema sets the PostgreSQL schema that holds the broker's tables and
// functions, and names the channel its nodes LISTEN on, so several
// applications (or tests) can share one database. Default "roomcast".
// Every node of one cluster must use the same schema. It must be a plain
// lower-case identifier: a letter or '_', then letters, digits or '_', at
// most 40 bytes.
func WithSchema(name string) Option {
	return func(c *config) { c.schema = name }
}

// WithoutSchemaInstall makes New check the schema's version instead of
// installing it: for teams whose migrations own every DDL statement. Run
// the SQL of SchemaSQL (shipped as schema.sql for the default schema)
// first. Default: New installs the schema, or upgrades it, idempotently.
func WithoutSchemaInstall() Option {
	return func(c *config) { c.install = false }
}

// WithPollInterval sets how often a node reads every room it serves from
// the table whether or not a notification woke it (a safety net: nothing
// committed is skipped even if a wake-up was lost), and how often it
// checks that its listening connection still answers. Default 5s; from
// 10ms to the delivery window.
func WithPollInterval(d time.Duration) Option {
	return func(c *config) { c.poll, c.pollSet = d, true }
}

// WithPollOnly turns LISTEN/NOTIFY off: a node reads every room it serves
// from the table every interval, and never holds a session of its own. It
// is the mode for connection poolers that break LISTEN, such as PgBouncer
// in transaction mode. A message then reaches the other nodes within
// about one interval (the publishing node's own subscribers still get it
// at once). Default: off; the interval must be from 10ms to a quarter of
// the delivery window (100ms is a sensible start).
func WithPollOnly(interval time.Duration) Option {
	return func(c *config) { c.pollOnly, c.poll, c.pollSet = true, interval, true }
}

// WithDeliveryWindow sets how long a message outside its room's history
// bounds stays in the table so that every listening node can deliver it
// (a room that keeps no history still needs its messages to reach the
// other nodes). A node that falls further behind than this resets the
// room's subscribers (pubsub.KindReset). Default 10s; at least 100ms, and
// at least four poll intervals.
func WithDeliveryWindow(d time.Duration) Option {
	return func(c *config) { c.window = d }
}

// WithPresenceTTL sets how long a connection's presence entry outlives its
// node's last refresh: the time a crashed node's members stay listed. Each
// node refreshes its entries every third of it. Default 30s; at least
// 300ms.
func WithPresenceTTL(d time.Duration) Option {
	return func(c *config) { c.presenceTTL = d }
}

// WithRoomTTL sets how long the state of a room with no messages left
// (its epoch and sequence) outlives its last publish, presence change or
// subscribed node. The room's next life starts a new epoch, and clients
// that recover from the old one are told "epoch_changed". A room that
// still holds messages is never reclaimed. Default 24h; at least 1s.
func WithRoomTTL(d time.Duration) Option {
	return func(c *config) { c.roomTTL = d }
}

// WithSweepInterval sets how often a node runs the sweep: trimming
// histories to their bounds, reclaiming idle rooms, forgetting expired
// idempotency keys, expiring a crashed node's presence entries. One node
// of the cluster sweeps at a time. Default 1s; from 10ms to 1 minute.
func WithSweepInterval(d time.Duration) Option {
	return func(c *config) { c.sweep = d }
}

// WithPublishConns sets how many batches of publishes a node has in flight
// at once, each on a pooled connection. Concurrent publishes share a
// batch: one function call, one transaction, one commit; while a batch
// commits the next one gathers, so a busy node sends fewer, larger
// batches. More than one helps when commits wait on a slow disk rather
// than on CPU. Default 1; from 1 to 64.
func WithPublishConns(n int) Option {
	return func(c *config) { c.publishConns = n }
}

// WithMaxBatch bounds the publishes one batch carries (it also carries at
// most 8 MiB of payload). Default 256; from 1 to 10,000.
func WithMaxBatch(n int) Option {
	return func(c *config) { c.maxBatch = n }
}

// WithArchive keeps every message of the rooms f selects in the table
// forever, for a chat archive the host searches, exports or moderates with
// SQL. History and recovery still serve only what the room's history
// bounds keep; the sweep just never deletes these rooms' messages. Every
// node of one cluster should use the same f. Default: no room is archived.
func WithArchive(f func(room string) bool) Option {
	return func(c *config) { c.archive = f }
}

// WithTxHistory sets the history bounds PublishTx applies: the room's last
// size messages, each for at most ttl (0: no age bound). Default: the room
// keeps the bounds its last publish applied (the Handler's, for that
// room), and a room that was never published keeps none.
func WithTxHistory(size int, ttl time.Duration) Option {
	return func(c *config) { c.txHistory = &pubsub.HistoryOptions{Size: size, TTL: ttl} }
}

// WithLogger sets the logger for failures the broker cannot return to a
// caller: a listening connection lost, a room reset, a sweep that failed.
// Default slog.Default().
func WithLogger(l *slog.Logger) Option {
	return func(c *config) { c.logger = l }
}

var schemaName = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,39}$`)

func defaultConfig() config {
	return config{
		schema:       DefaultSchema,
		install:      true,
		poll:         DefaultPollInterval,
		window:       DefaultDeliveryWindow,
		presenceTTL:  DefaultPresenceTTL,
		roomTTL:      DefaultRoomTTL,
		sweep:        DefaultSweepInterval,
		publishConns: DefaultPublishConns,
		maxBatch:     DefaultMaxBatch,
	}
}

func (c *config) validate() {
	bad := func(format string, args ...any) {
		panic("pgbroker: " + fmt.Sprintf(format, args...))
	}
	if !schemaName.MatchString(c.schema) {
		bad("WithSchema(%q): want a lower-case identifier of at most 40 bytes ([a-z_][a-z0-9_]*)", c.schema)
	}
	if c.pollOnly && !c.pollSet {
		c.poll = DefaultPollOnly
	}
	if c.poll < 10*time.Millisecond || c.poll > c.window {
		bad("poll interval %v: want from 10ms to the delivery window (%v)", c.poll, c.window)
	}
	if c.window < 100*time.Millisecond {
		bad("WithDeliveryWindow(%v): want at least 100ms", c.window)
	}
	if c.pollOnly && 4*c.poll > c.window {
		bad("WithPollOnly(%v): want at most a quarter of the delivery window (%v)", c.poll, c.window)
	}
	if c.presenceTTL < 300*time.Millisecond {
		bad("WithPresenceTTL(%v): want at least 300ms", c.presenceTTL)
	}
	if c.roomTTL < time.Second {
		bad("WithRoomTTL(%v): want at least 1s", c.roomTTL)
	}
	if c.sweep < 10*time.Millisecond || c.sweep > time.Minute {
		bad("WithSweepInterval(%v): want from 10ms to 1m", c.sweep)
	}
	if c.publishConns < 1 || c.publishConns > 64 {
		bad("WithPublishConns(%d): want from 1 to 64", c.publishConns)
	}
	if c.maxBatch < 1 || c.maxBatch > 10_000 {
		bad("WithMaxBatch(%d): want from 1 to 10000", c.maxBatch)
	}
	if h := c.txHistory; h != nil && (h.Size < 0 || h.Size > maxHistorySize || h.TTL < 0) {
		bad("WithTxHistory(%d, %v): want a size from 0 to %d and a ttl of 0 (no age bound) or more", h.Size, h.TTL, maxHistorySize)
	}
	if c.logger == nil {
		c.logger = slog.Default()
	}
}

// maxHistorySize bounds a room's history size, as the Handler does.
const maxHistorySize = 100_000
