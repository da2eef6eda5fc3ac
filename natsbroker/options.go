package natsbroker

import (
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Defaults of the options.
const (
	DefaultPrefix      = "roomcast"
	DefaultReplicas    = 1
	DefaultPresenceTTL = 30 * time.Second
	DefaultRoomTTL     = time.Hour
)

// Option configures a Broker.
type Option func(*config)

type config struct {
	prefix      string
	replicas    int
	storage     jetstream.StorageType
	maxBytes    int64
	set         struct{ replicas, storage, maxBytes bool } // given as options, not defaults
	presenceTTL time.Duration
	roomTTL     time.Duration
	logger      *slog.Logger
}

// WithPrefix names the broker's JetStream stream and starts every subject
// it uses (prefix.r.>, prefix.k.>, prefix.d.>), so several applications
// can share one NATS account. Every node of one cluster must use the same
// prefix. Default "roomcast"; 1 to 32 ASCII letters, digits, '-' or '_'.
func WithPrefix(p string) Option {
	return func(c *config) { c.prefix = p }
}

// WithReplicas sets the stream's replicas when New creates or updates it:
// 3 keeps every room through the loss of one NATS server of a cluster of
// three or more. Default 1 for a new stream; an existing stream keeps its
// replicas unless this option is given. 1 to 5.
func WithReplicas(n int) Option {
	return func(c *config) { c.replicas, c.set.replicas = n, true }
}

// WithStorage sets the stream's storage when New creates it: file storage
// keeps rooms, history and epochs through a NATS restart; memory storage
// loses them (rooms start new epochs and recovering clients are told
// epoch_changed). Default jetstream.FileStorage for a new stream; an
// existing stream keeps its storage (NATS cannot change it: New fails when
// this option asks for the other one).
func WithStorage(s jetstream.StorageType) Option {
	return func(c *config) { c.storage, c.set.storage = s, true }
}

// WithMaxBytes bounds the stream's size. When full, the stream discards
// its oldest records, whichever room they belong to; a room that loses
// its newest record that way starts a new epoch. Default 0 for a new
// stream: no bound beyond the server's JetStream limits; an existing
// stream keeps its bound unless this option is given. At least 1 MiB, or
// 0.
func WithMaxBytes(n int64) Option {
	return func(c *config) { c.maxBytes, c.set.maxBytes = n, true }
}

// WithPresenceTTL sets how long a connection's presence entry outlives its
// node's last refresh: the time a crashed node's members stay listed. Each
// node refreshes its entries every third of it. Default 30s; at least 3s
// (JetStream's per-message TTLs count whole seconds).
func WithPresenceTTL(d time.Duration) Option {
	return func(c *config) { c.presenceTTL = d }
}

// WithRoomTTL sets how long a room's state (its epoch and sequence)
// outlives its last publish, or its history's TTL when that is longer.
// A node with subscribers in a room keeps it alive. A room whose state
// expired starts a new epoch, and clients that recover from the old one
// are told "epoch_changed". Default 1h; at least 1s.
func WithRoomTTL(d time.Duration) Option {
	return func(c *config) { c.roomTTL = d }
}

// WithLogger sets the logger for failures the broker cannot return to a
// caller: a gap it could not fill, a refresh that failed. Default
// slog.Default().
func WithLogger(l *slog.Logger) Option {
	return func(c *config) { c.logger = l }
}

func (c *config) validate() {
	bad := func(format string, args ...any) {
		panic("natsbroker: " + fmt.Sprintf(format, args...))
	}
	if len(c.prefix) < 1 || len(c.prefix) > 32 || token(c.prefix) != c.prefix {
		bad("WithPrefix(%q): want 1 to 32 ASCII letters, digits, '-' or '_'", c.prefix)
	}
	if c.replicas < 1 || c.replicas > 5 {
		bad("WithReplicas(%d): want 1 to 5", c.replicas)
	}
	if c.storage != jetstream.FileStorage && c.storage != jetstream.MemoryStorage {
		bad("WithStorage(%v): want jetstream.FileStorage or jetstream.MemoryStorage", c.storage)
	}
	if c.maxBytes != 0 && c.maxBytes < 1<<20 {
		bad("WithMaxBytes(%d): want 0 (no bound) or at least 1 MiB", c.maxBytes)
	}
	if c.presenceTTL < 3*time.Second {
		bad("WithPresenceTTL(%v): want at least 3s", c.presenceTTL)
	}
	if c.roomTTL < time.Second {
		bad("WithRoomTTL(%v): want at least 1s", c.roomTTL)
	}
	if c.logger == nil {
		c.logger = slog.Default()
	}
}
