package pgbroker_test

import (
	"sync"
	"testing"
	"time"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/brokertest"
	"github.com/roomcast/pubsub/pgbroker"
)

func TestConformance(t *testing.T) {
	t.Parallel()
	brokertest.Run(t, func(t *testing.T) pubsub.Broker {
		return newBroker(t, shared.DSN, uniqueSchema())
	})
}

// Within one test every node shares one schema: they are one cluster.
func TestConformanceCluster(t *testing.T) {
	t.Parallel()
	schema := clusterSchema()
	brokertest.RunCluster(t, func(t *testing.T) pubsub.Broker {
		return newBroker(t, shared.DSN, schema(t))
	})
}

// Each node reaches PostgreSQL through a proxy of its own, which the suite
// cuts.
func TestConformancePartition(t *testing.T) {
	t.Parallel()
	schema := clusterSchema()
	brokertest.RunPartition(t, func(t *testing.T) (pubsub.Broker, brokertest.Link) {
		proxy := startProxy(t, addr(shared))
		return newBroker(t, viaProxy(shared, proxy), schema(t)), proxy
	})
}

// The same suite with every room archived: the table keeps every message,
// and History and recovery still keep to the rooms' bounds.
func TestConformanceArchive(t *testing.T) {
	t.Parallel()
	all := func(string) bool { return true }
	brokertest.Run(t, func(t *testing.T) pubsub.Broker {
		return newBroker(t, shared.DSN, uniqueSchema(), pgbroker.WithArchive(all))
	})
}

// The same suites polling only, as behind PgBouncer in transaction mode.
func TestConformancePollOnly(t *testing.T) {
	t.Parallel()
	t.Run("Run", func(t *testing.T) {
		t.Parallel()
		brokertest.Run(t, func(t *testing.T) pubsub.Broker {
			return newBroker(t, shared.DSN, uniqueSchema(), pgbroker.WithPollOnly(pollEvery))
		})
	})
	t.Run("Cluster", func(t *testing.T) {
		t.Parallel()
		schema := clusterSchema()
		brokertest.RunCluster(t, func(t *testing.T) pubsub.Broker {
			return newBroker(t, shared.DSN, schema(t), pgbroker.WithPollOnly(pollEvery))
		})
	})
	t.Run("Partition", func(t *testing.T) {
		t.Parallel()
		schema := clusterSchema()
		brokertest.RunPartition(t, func(t *testing.T) (pubsub.Broker, brokertest.Link) {
			proxy := startProxy(t, addr(shared))
			return newBroker(t, viaProxy(shared, proxy), schema(t), pgbroker.WithPollOnly(pollEvery)), proxy
		})
	})
}

// pollEvery is the poll-only tests' interval.
const pollEvery = 50 * time.Millisecond

// clusterSchema gives each test a schema of its own, the same for every
// node the test makes: the nodes of one test are one cluster.
func clusterSchema() func(t *testing.T) string {
	var mu sync.Mutex
	schemas := make(map[*testing.T]string)
	return func(t *testing.T) string {
		mu.Lock()
		defer mu.Unlock()
		s, ok := schemas[t]
		if !ok {
			s = uniqueSchema()
			schemas[t] = s
		}
		return s
	}
}
