package redisbroker_test

import (
	"sync"
	"testing"

	"github.com/redis/go-redis/v9"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/brokertest"
	"github.com/roomcast/pubsub/pubsubtest"
	"github.com/roomcast/pubsub/redisbroker"
	"github.com/roomcast/pubsub/redisbroker/internal/redistest"
)

func TestConformance(t *testing.T) {
	t.Parallel()
	brokertest.Run(t, func(t *testing.T) pubsub.Broker {
		return newBroker(t, shared.Addr, uniquePrefix())
	})
}

// Within one test every node shares one prefix: they are one cluster.
func TestConformanceCluster(t *testing.T) {
	t.Parallel()
	prefix := clusterPrefix()
	brokertest.RunCluster(t, func(t *testing.T) pubsub.Broker {
		return newBroker(t, shared.Addr, prefix(t))
	})
}

// Each node reaches Redis through a proxy of its own, which the suite cuts.
func TestConformancePartition(t *testing.T) {
	t.Parallel()
	prefix := clusterPrefix()
	brokertest.RunPartition(t, func(t *testing.T) (pubsub.Broker, brokertest.Link) {
		proxy := startProxy(t, shared.Addr)
		return newBroker(t, proxy.Addr(), prefix(t)), proxy
	})
}

// clusterPrefix gives each test a prefix of its own, the same for every
// node the test makes: the nodes of one test are one cluster.
func clusterPrefix() func(t *testing.T) string {
	var mu sync.Mutex
	prefixes := make(map[*testing.T]string)
	return func(t *testing.T) string {
		mu.Lock()
		defer mu.Unlock()
		p, ok := prefixes[t]
		if !ok {
			p = uniquePrefix()
			prefixes[t] = p
		}
		return p
	}
}

// On a Redis Cluster of three masters, where a script may touch one slot
// only: a batch holds one room (its keys share the room's hash tag).
func TestConformanceRedisCluster(t *testing.T) {
	t.Parallel()
	c, err := redistest.StartCluster(3)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	newCluster := func(t *testing.T, prefix string) *redisbroker.Broker {
		cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: c.Addrs})
		t.Cleanup(func() { cc.Close() })
		return redisbroker.New(cc, redisbroker.WithPrefix(prefix), redisbroker.WithLogger(pubsubtest.Logger()))
	}
	t.Run("Run", func(t *testing.T) {
		brokertest.Run(t, func(t *testing.T) pubsub.Broker { return newCluster(t, uniquePrefix()) })
	})
	t.Run("RunCluster", func(t *testing.T) {
		prefix := clusterPrefix()
		brokertest.RunCluster(t, func(t *testing.T) pubsub.Broker { return newCluster(t, prefix(t)) })
	})
}
