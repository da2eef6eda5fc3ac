package redisbroker_test

import (
	"net/http"
	"testing"
	"time"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/pubsubtest"
	"github.com/roomcast/pubsub/redisbroker"
)

// node is one Handler with its own Redis broker, served on a loopback
// port by the test kit: one node of a cluster.
type node struct {
	*pubsubtest.Server
	b pubsub.Broker
}

// startNode starts a node on addr. Clients name their user with ?user=.
// Cleanup closes the handler (and so the broker), then the server.
func startNode(t *testing.T, addr, prefix string, bopts []redisbroker.Option, hopts ...pubsub.Option) *node {
	t.Helper()
	return startNodeWith(t, newBroker(t, addr, prefix, bopts...), hopts...)
}

// startNodeWith starts a node on broker b.
func startNodeWith(t *testing.T, b pubsub.Broker, hopts ...pubsub.Option) *node {
	t.Helper()
	srv := pubsubtest.Start(t, append([]pubsub.Option{
		pubsub.WithBroker(b),
		pubsub.WithClientPublish(true),
		pubsub.WithHistory(100, time.Minute),
		pubsub.WithAuthenticate(func(r *http.Request) (pubsub.Identity, error) {
			return pubsub.Identity{UserID: r.URL.Query().Get("user")}, nil
		}),
	}, hopts...)...)
	return &node{Server: srv, b: b}
}

// url is the node's endpoint for user ("" for an anonymous client).
func (n *node) url(user string) string {
	u := n.WS("/ws")
	if user != "" {
		u += "?user=" + user
	}
	return u
}

// checkSeqs checks the messages' payloads and consecutive seqs of one epoch.
func checkSeqs(t *testing.T, got []pubsubtest.Envelope, epoch string, firstSeq uint64, payloads ...string) {
	t.Helper()
	for i, e := range got {
		if e.Epoch != epoch || e.Seq != firstSeq+uint64(i) || string(e.Payload()) != payloads[i] {
			t.Fatalf("message %d is %s, want epoch %s seq %d payload %s", i, e.Raw, epoch, firstSeq+uint64(i), payloads[i])
		}
	}
}
