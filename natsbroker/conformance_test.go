package natsbroker_test

import (
	"sync"
	"testing"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/brokertest"
)

func TestConformance(t *testing.T) {
	t.Parallel()
	brokertest.Run(t, func(t *testing.T) pubsub.Broker {
		return newBroker(t, shared.URL, uniquePrefix())
	})
}

// Within one test every node shares one prefix: they are one cluster.
func TestConformanceCluster(t *testing.T) {
	t.Parallel()
	prefix := clusterPrefix()
	brokertest.RunCluster(t, func(t *testing.T) pubsub.Broker {
		return newBroker(t, shared.URL, prefix(t))
	})
}

// Each node reaches NATS through a proxy of its own, which the suite cuts.
func TestConformancePartition(t *testing.T) {
	t.Parallel()
	prefix := clusterPrefix()
	brokertest.RunPartition(t, func(t *testing.T) (pubsub.Broker, brokertest.Link) {
		proxy := startProxy(t, shared.Addr)
		return newBrokerOn(t, proxied(t, proxy), prefix(t)), proxy
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
