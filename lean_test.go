package pubsub_test

import (
	"net/http"
	"net/http/httptest"
	"runtime"
	"sync/atomic"
	"testing"

	"github.com/roomcast/pubsub"
)

// Not parallel: it counts the process's goroutines, so it runs while the
// parallel tests are paused.
func TestAnIdleConnectionCostsOneGoroutine(t *testing.T) {
	for _, mode := range []string{"raw", "protocol"} {
		t.Run(mode, func(t *testing.T) {
			h, srv := newServer(t)
			before := runtime.NumGoroutine()
			const n = 50
			for range n {
				if mode == "raw" {
					dial(t, wsURL(srv, "/ws?room=idle")) // the test never reads: no client goroutine
				} else {
					dialProto(t, wsURL(srv, "/ws"))
				}
			}
			waitFor(t, "connections registered", func() bool { return h.Stats().Connections == n })
			// A writer that ran (the welcome) must have ended by itself.
			waitFor(t, "goroutines to settle at one per connection", func() bool {
				return runtime.NumGoroutine()-before <= n+2
			})
		})
	}
}

func TestServeHTTPReturnsRightAfterTheUpgrade(t *testing.T) {
	t.Parallel()
	h := pubsub.NewHandler(pubsub.WithLogger(quietLogger()))
	var returned atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.ServeHTTP(w, r)
		returned.Add(1)
	}))
	t.Cleanup(func() { h.Close(); srv.Close() })

	c := dial(t, wsURL(srv, "/ws?room=r"))
	waitFor(t, "ServeHTTP to return while the connection is open", func() bool { return returned.Load() == 1 })
	if err := h.Publish(testCtx(t), "r", []byte("still served")); err != nil {
		t.Fatal(err)
	}
	readText(t, c, "still served")
}
