package brokertest_test

import (
	"testing"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/brokertest"
)

// The memory broker is the reference implementation: single node, so Run
// only.
func TestMemoryBrokerConformance(t *testing.T) {
	t.Parallel()
	brokertest.Run(t, func(*testing.T) pubsub.Broker { return pubsub.NewMemoryBroker() })
}
