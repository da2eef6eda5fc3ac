package redisbroker

import (
	"context"
	"errors"
	"hash/fnv"

	"github.com/redis/go-redis/v9"
	"github.com/roomcast/pubsub"
)

// Sharded is a pubsub.Broker that spreads rooms over several Redis
// servers (shards), so that capacity grows with the servers: each room
// lives wholly on one shard, chosen by jump consistent hashing of its
// name, and everything about it (sequence, history, presence, fan-out,
// the recovery of a node's gaps, a reset when its Redis lost its state)
// works there exactly as with New on that server alone. Create it with
// NewSharded.
//
// Every node of a cluster must list the same servers in the same order:
// the order names the shards. Adding a server at the end moves about one
// room in n+1 (n the servers before) to it, and removing the last one
// moves its rooms back; a moved room starts a new life (a new epoch) on
// its new shard, so its clients are told they cannot recover across the
// move, as after a Redis that lost its data. Its state on the old shard
// expires with WithRoomTTL.
type Sharded struct {
	shards []*Broker
}

var _ pubsub.Broker = (*Sharded)(nil)

// NewSharded returns a broker over the Redis servers the clients point
// to, one shard each (each client as New accepts it: one server, a
// Sentinel failover client, or a Redis Cluster). The options apply to
// every shard. It panics with a "redisbroker: " message when there is no
// client or on a bad option. As with New, the host owns the clients and
// closes them after the Handler; Close does not close them.
func NewSharded(clients []redis.UniversalClient, opts ...Option) *Sharded {
	if len(clients) == 0 {
		panic("redisbroker: NewSharded with no client: want one Redis client per shard")
	}
	s := &Sharded{shards: make([]*Broker, len(clients))}
	for i, c := range clients {
		if c == nil {
			panic("redisbroker: NewSharded: a nil client")
		}
		s.shards[i] = New(c, opts...)
	}
	return s
}

// ShardOf returns the index, in NewSharded's clients, of the shard that
// keeps room.
func (s *Sharded) ShardOf(room string) int {
	h := fnv.New64a()
	h.Write([]byte(room))
	return jump(h.Sum64(), len(s.shards))
}

func (s *Sharded) shard(room string) *Broker { return s.shards[s.ShardOf(room)] }

// jump is Lamping and Veach's jump consistent hash: the bucket in [0, n)
// of key, moving only 1/n of the keys when n grows by one.
func jump(key uint64, n int) int {
	b, j := int64(-1), int64(0)
	for j < int64(n) {
		b = j
		key = key*2862933555777941757 + 1
		j = int64(float64(b+1) * (float64(int64(1)<<31) / float64((key>>33)+1)))
	}
	return int(b)
}

// Bind binds every shard to deliver. Each shard delivers its rooms from
// its own goroutine, so one room's messages are in order and never
// concurrent, while rooms of different shards are delivered concurrently.
func (s *Sharded) Bind(deliver func(pubsub.Message)) {
	for _, b := range s.shards {
		b.Bind(deliver)
	}
}

// Close closes every shard's broker.
func (s *Sharded) Close() error {
	var errs []error
	for _, b := range s.shards {
		errs = append(errs, b.Close())
	}
	return errors.Join(errs...)
}

// Publish publishes on the room's shard; see Broker.Publish.
func (s *Sharded) Publish(ctx context.Context, room string, data []byte, o pubsub.PublishOptions) (pubsub.PublishResult, error) {
	return s.shard(room).Publish(ctx, room, data, o)
}

// History reads the room's history on its shard; see Broker.History.
func (s *Sharded) History(ctx context.Context, room string, q pubsub.HistoryQuery) (pubsub.HistoryResult, error) {
	return s.shard(room).History(ctx, room, q)
}

// Subscribe subscribes to the room on its shard; see Broker.Subscribe.
func (s *Sharded) Subscribe(ctx context.Context, room string) error {
	return s.shard(room).Subscribe(ctx, room)
}

// Unsubscribe unsubscribes from the room on its shard.
func (s *Sharded) Unsubscribe(ctx context.Context, room string) error {
	return s.shard(room).Unsubscribe(ctx, room)
}

// Join adds m to the room's presence on its shard; see Broker.Join.
func (s *Sharded) Join(ctx context.Context, room string, m pubsub.Member, events bool) error {
	return s.shard(room).Join(ctx, room, m, events)
}

// Leave removes m from the room's presence on its shard.
func (s *Sharded) Leave(ctx context.Context, room string, m pubsub.Member, events bool) error {
	return s.shard(room).Leave(ctx, room, m, events)
}

// Presence lists the room's members from its shard.
func (s *Sharded) Presence(ctx context.Context, room string, countsOnly bool) (pubsub.Presence, error) {
	return s.shard(room).Presence(ctx, room, countsOnly)
}
