package redisbroker_test

import (
	"fmt"
	"sync"
	"testing"

	"github.com/redis/go-redis/v9"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/brokertest"
	"github.com/roomcast/pubsub/internal/faultproxy"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
	"github.com/roomcast/pubsub/redisbroker"
	"github.com/roomcast/pubsub/redisbroker/internal/redistest"
)

// startShards starts n redis-servers of the test's own.
func startShards(t *testing.T, n int) []*redistest.Server {
	t.Helper()
	srvs := make([]*redistest.Server, n)
	for i := range srvs {
		srvs[i] = startRedis(t)
	}
	return srvs
}

// newSharded returns a sharded broker over addrs, with a client per
// shard, closed at cleanup.
func newSharded(t testing.TB, addrs []string, prefix string, opts ...redisbroker.Option) *redisbroker.Sharded {
	t.Helper()
	clients := make([]redis.UniversalClient, len(addrs))
	for i, a := range addrs {
		clients[i] = newClient(t, a)
	}
	return redisbroker.NewSharded(clients, append([]redisbroker.Option{
		redisbroker.WithPrefix(prefix), redisbroker.WithLogger(pubsubtest.Logger()),
	}, opts...)...)
}

func addrs(srvs []*redistest.Server) []string {
	out := make([]string, len(srvs))
	for i, s := range srvs {
		out[i] = s.Addr
	}
	return out
}

func TestShardedConformance(t *testing.T) {
	t.Parallel()
	a := addrs(startShards(t, 3))
	brokertest.Run(t, func(t *testing.T) pubsub.Broker {
		return newSharded(t, a, uniquePrefix())
	})
}

func TestShardedConformanceCluster(t *testing.T) {
	t.Parallel()
	a := addrs(startShards(t, 3))
	prefix := clusterPrefix()
	brokertest.RunCluster(t, func(t *testing.T) pubsub.Broker {
		return newSharded(t, a, prefix(t))
	})
}

// Each node reaches each shard through a proxy of its own; the suite
// cuts all of a node's at once.
func TestShardedConformancePartition(t *testing.T) {
	t.Parallel()
	a := addrs(startShards(t, 3))
	prefix := clusterPrefix()
	brokertest.RunPartition(t, func(t *testing.T) (pubsub.Broker, brokertest.Link) {
		var link links
		var via []string
		for _, addr := range a {
			p := startProxy(t, addr)
			link = append(link, p)
			via = append(via, p.Addr())
		}
		return newSharded(t, via, prefix(t)), link
	})
}

type links []*faultproxy.Proxy

func (l links) Cut() {
	for _, p := range l {
		p.Cut()
	}
}

func (l links) Heal() {
	for _, p := range l {
		p.Heal()
	}
}

func TestShardedSpreadsRoomsOverEveryServer(t *testing.T) {
	t.Parallel()
	srvs := startShards(t, 3)
	prefix := uniquePrefix()
	s := newSharded(t, addrs(srvs), prefix)
	s.Bind(func(pubsub.Message) {})
	t.Cleanup(func() { s.Close() })
	ctx := pubsubtest.Context(t)
	const rooms = 60
	perShard := make([]int, len(srvs))
	for r := range rooms {
		room := fmt.Sprint("room-", r)
		if _, err := s.Publish(ctx, room, []byte("x"), hist); err != nil {
			t.Fatal(err)
		}
		perShard[s.ShardOf(room)]++
	}
	for i, srv := range srvs {
		admin := newClient(t, srv.Addr)
		keys, err := admin.Keys(ctx, prefix+":{*}:m").Result()
		if err != nil {
			t.Fatal(err)
		}
		if len(keys) != perShard[i] || perShard[i] < rooms/len(srvs)/3 {
			t.Fatalf("shard %d holds %d rooms, ShardOf says %d, of %d over %d shards", i, len(keys), perShard[i], rooms, len(srvs))
		}
		for _, k := range keys {
			var room string
			fmt.Sscanf(k[len(prefix)+2:], "%s", &room)
			room = room[:len(room)-len("}:m")]
			if s.ShardOf(room) != i {
				t.Fatalf("room %s is kept on shard %d, ShardOf says %d", room, i, s.ShardOf(room))
			}
		}
	}
	// Adding a shard moves only the rooms that go to it.
	four := newSharded(t, append(addrs(srvs), srvs[0].Addr), prefix)
	moved := 0
	for r := range 1000 {
		room := fmt.Sprint("room-", r)
		if a, b := s.ShardOf(room), four.ShardOf(room); a != b {
			if b != 3 {
				t.Fatalf("room %s moved from shard %d to %d when shard 3 was added", room, a, b)
			}
			moved++
		}
	}
	if moved < 150 || moved > 350 {
		t.Fatalf("%d rooms of 1000 moved to the added shard, want about 250", moved)
	}
}

// One shard's Redis restarts empty: its rooms' subscribers are reset and
// learn that they cannot recover, as with a single Redis; the rooms of the
// other shards go on, their subscribers neither closed nor missing a
// message.
func TestAShardRestartingResetsOnlyItsRooms(t *testing.T) {
	t.Parallel()
	srvs := startShards(t, 3)
	prefix := uniquePrefix()
	a := startNodeWith(t, newSharded(t, addrs(srvs), prefix))
	b := startNodeWith(t, newSharded(t, addrs(srvs), prefix))
	shards := a.b.(*redisbroker.Sharded)
	// A room on each shard.
	rooms := make([]string, len(srvs))
	for r, found := 0, 0; found < len(srvs); r++ {
		room := fmt.Sprint("room-", r)
		if i := shards.ShardOf(room); rooms[i] == "" {
			rooms[i] = room
			found++
		}
	}
	subs := make([]*pubsubtest.Conn, len(rooms))
	acks := make([]pubsubtest.Envelope, len(rooms))
	for i, room := range rooms {
		subs[i] = pubsubtest.Dial(t, b.url(""))
		acks[i] = subs[i].Subscribe(room)
		a.Publish(room, []byte("before"))
		checkSeqs(t, subs[i].Messages(room, 1), acks[i].Epoch, 1, "before")
	}

	const lost = 1
	srvs[lost].Stop()
	if err := srvs[lost].Restart(); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i, room := range rooms {
		if i == lost {
			continue
		}
		wg.Go(func() {
			for n := range 20 {
				a.Publish(room, fmt.Appendf(nil, "%d", n))
			}
		})
	}
	publishWhenBack(t, a, rooms[lost], "after")
	wg.Wait()
	subs[lost].ExpectClose(protocol.CloseRoomReset)
	for i, room := range rooms {
		if i == lost {
			continue
		}
		want := make([]string, 20)
		for n := range want {
			want[n] = fmt.Sprint(n)
		}
		checkSeqs(t, subs[i].Messages(room, 20), acks[i].Epoch, 2, want...)
	}
	// Coming back with its old position, the lost shard's subscriber is
	// told plainly; the others recover exactly, on the other node.
	c := pubsubtest.Dial(t, a.url(""))
	ack := c.SubscribeWith(pubsubtest.Fields{"room": rooms[lost], "since": pubsubtest.Fields{"epoch": acks[lost].Epoch, "seq": 1}})
	if ack.Recovered == nil || *ack.Recovered || ack.Reason != "epoch_changed" {
		t.Fatalf("resubscribe to the restarted shard's room: %s, want recovered false, epoch_changed", ack.Raw)
	}
	for i, room := range rooms {
		if i == lost {
			continue
		}
		ack := c.SubscribeWith(pubsubtest.Fields{"room": room, "since": pubsubtest.Fields{"epoch": acks[i].Epoch, "seq": 11}})
		if ack.Recovered == nil || !*ack.Recovered || ack.Missed == nil || *ack.Missed != 10 || ack.Seq != 21 {
			t.Fatalf("resubscribe to %s on another shard: %s, want recovered with 10 missed at seq 21", room, ack.Raw)
		}
	}
}
