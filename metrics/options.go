package metrics

import "fmt"

// Option configures a Collector.
type Option func(*config)

// Bounds of WithMaxRooms.
const (
	DefaultMaxRooms = 100  // per-room series are exported for at most this many rooms
	MaxRoomsLimit   = 1000 // the hard cap: WithMaxRooms accepts 1 to this
)

type config struct {
	rooms    []string               // WithRooms, deduplicated, in the order given
	named    map[string]bool        // the same rooms, to skip them in the filter's
	filter   func(room string) bool // WithRoomFilter
	maxRooms int
}

// WithRooms exports per-room series for these rooms, on every scrape, with
// zero values while a room has no subscriber on this node, so their series
// are continuous. Use it for the few rooms that matter (a lobby, a
// firehose). Default: none. Together with WithRoomFilter, these rooms come
// first and count toward WithMaxRooms. NewCollector panics on an empty
// name, and on more rooms than WithMaxRooms allows.
func WithRooms(rooms ...string) Option {
	return func(c *config) {
		for _, r := range rooms {
			if !c.named[r] {
				c.named[r] = true
				c.rooms = append(c.rooms, r)
			}
		}
	}
}

// WithRoomFilter exports per-room series for the rooms with at least one
// subscriber on this node for which match returns true, at most
// WithMaxRooms of them: the first in name order, after those of WithRooms.
// The rooms a scrape leaves out are counted in roomcast_rooms_omitted.
// match is called at scrape time, once per room on this node, so it must be
// fast; a panic in it is recovered and fails that scrape. Match rooms whose
// names are stable (not "order:<id>"): the cap bounds the series of one
// scrape, not how many distinct rooms appear over time. Default: none.
func WithRoomFilter(match func(room string) bool) Option {
	return func(c *config) { c.filter = match }
}

// WithMaxRooms caps how many rooms get per-room series in one scrape.
// Default: DefaultMaxRooms (100); 1 to MaxRoomsLimit (1000). Each room
// costs seven series, and its scrape reads every subscriber's queue.
func WithMaxRooms(n int) Option {
	return func(c *config) { c.maxRooms = n }
}

func newConfig(opts []Option) config {
	cfg := config{maxRooms: DefaultMaxRooms, named: make(map[string]bool)}
	for _, o := range opts {
		o(&cfg)
	}
	for _, r := range cfg.rooms {
		if r == "" {
			panic("metrics: WithRooms: empty room name")
		}
	}
	if cfg.maxRooms < 1 || cfg.maxRooms > MaxRoomsLimit {
		panic(fmt.Sprintf("metrics: WithMaxRooms(%d): want 1 to %d", cfg.maxRooms, MaxRoomsLimit))
	}
	if len(cfg.rooms) > cfg.maxRooms {
		panic(fmt.Sprintf("metrics: WithRooms names %d rooms, more than WithMaxRooms allows (%d)", len(cfg.rooms), cfg.maxRooms))
	}
	return cfg
}

// roomsOn reports whether the host opted in to per-room series.
func (c *config) roomsOn() bool { return len(c.rooms) > 0 || c.filter != nil }
