package natsbroker_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/roomcast/pubsub/natsbroker"
	"github.com/roomcast/pubsub/pubsubtest"
)

func TestBadOptionsPanicWithTheirName(t *testing.T) {
	t.Parallel()
	nc := connect(t, shared.URL)
	for _, tc := range []struct {
		name string
		opt  natsbroker.Option
	}{
		{"WithPrefix", natsbroker.WithPrefix("a.b")},
		{"WithPrefix", natsbroker.WithPrefix("")},
		{"WithReplicas", natsbroker.WithReplicas(0)},
		{"WithReplicas", natsbroker.WithReplicas(6)},
		{"WithStorage", natsbroker.WithStorage(jetstream.StorageType(7))},
		{"WithMaxBytes", natsbroker.WithMaxBytes(10)},
		{"WithPresenceTTL", natsbroker.WithPresenceTTL(time.Second)},
		{"WithRoomTTL", natsbroker.WithRoomTTL(time.Millisecond)},
	} {
		func() {
			defer func() {
				msg, _ := recover().(string)
				if !strings.HasPrefix(msg, "natsbroker: "+tc.name+"(") {
					t.Errorf("%s: panic %q, want one naming the option", tc.name, msg)
				}
			}()
			natsbroker.New(pubsubtest.Context(t), nc, tc.opt)
		}()
	}
}

// New creates the stream the options describe, and brings an existing one
// to them.
func TestNewCreatesOrUpdatesTheStream(t *testing.T) {
	t.Parallel()
	p := uniquePrefix()
	nc := connect(t, shared.URL)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	// A bounded memory stream holds its bound of the server's memory:
	// delete it once the brokers (registered later) are closed.
	t.Cleanup(func() { js.DeleteStream(context.Background(), p) })
	newBrokerOn(t, nc, p, natsbroker.WithStorage(jetstream.MemoryStorage))
	info := func() jetstream.StreamConfig {
		st, err := js.Stream(pubsubtest.Context(t), p)
		if err != nil {
			t.Fatal(err)
		}
		i, err := st.Info(pubsubtest.Context(t))
		if err != nil {
			t.Fatal(err)
		}
		return i.Config
	}
	cfg := info()
	if cfg.Storage != jetstream.MemoryStorage || !cfg.AllowMsgTTL || !cfg.AllowDirect || !cfg.AllowRollup ||
		cfg.RePublish == nil || cfg.RePublish.Destination != p+".d.>" || cfg.MaxBytes != -1 {
		t.Fatalf("stream config %+v", cfg)
	}
	newBrokerOn(t, nc, p, natsbroker.WithMaxBytes(2<<20))
	if cfg := info(); cfg.MaxBytes != 2<<20 || cfg.Storage != jetstream.MemoryStorage {
		t.Fatalf("after New with WithMaxBytes(2 MiB) alone: MaxBytes %d, storage %v", cfg.MaxBytes, cfg.Storage)
	}
	// An operator's choices stay when a node starts with the defaults.
	newBrokerOn(t, nc, p)
	if cfg := info(); cfg.MaxBytes != 2<<20 || cfg.Storage != jetstream.MemoryStorage {
		t.Fatalf("after New with no options: MaxBytes %d, storage %v; want the stream's own kept", cfg.MaxBytes, cfg.Storage)
	}
	if _, err := natsbroker.New(pubsubtest.Context(t), nc, natsbroker.WithPrefix(p), natsbroker.WithStorage(jetstream.FileStorage)); err == nil {
		t.Fatal("New with file storage on a memory stream: no error; NATS cannot change a stream's storage")
	}
}
