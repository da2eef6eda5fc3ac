package redisbroker_test

import (
	"sync"
	"testing"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/brokertest"
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
	var mu sync.Mutex
	prefixes := make(map[*testing.T]string)
	brokertest.RunCluster(t, func(t *testing.T) pubsub.Broker {
		mu.Lock()
		p, ok := prefixes[t]
		if !ok {
			p = uniquePrefix()
			prefixes[t] = p
		}
		mu.Unlock()
		return newBroker(t, shared.Addr, p)
	})
}
