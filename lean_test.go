package pubsub_test

import (
	"net/http"
	"runtime"
	"sync/atomic"
	"testing"

	"github.com/roomcast/pubsub/pubsubtest"
)

// What a connection costs (doc.go, "Memory"): ServeHTTP returns at the
// upgrade, and an idle connection holds no goroutine on Linux (it parks
// with the Handler's poller, one goroutine for all) and one elsewhere.

// Not parallel: it counts the process's goroutines, so it runs while the
// parallel tests are paused.
func TestAnIdleConnectionCostsNoGoroutineOnLinuxAndOneElsewhere(t *testing.T) {
	for _, mode := range []string{"raw", "protocol"} {
		t.Run(mode, func(t *testing.T) {
			srv := pubsubtest.Start(t)
			before := runtime.NumGoroutine()
			const n = 50
			for range n {
				if mode == "raw" {
					srv.DialRaw("/ws?room=idle") // the test never reads: no client goroutine
				} else {
					srv.Dial("/ws")
				}
			}
			pubsubtest.WaitFor(t, "connections registered", func() bool { return srv.Stats().Connections == n })
			// A writer that ran (the welcome) must have ended by itself.
			perConn := 1
			if runtime.GOOS == "linux" {
				perConn = 0 // and one poller goroutine for them all
			}
			pubsubtest.WaitFor(t, "goroutines to settle", func() bool {
				return runtime.NumGoroutine()-before <= perConn*n+2
			})
		})
	}
}

func TestServeHTTPReturnsRightAfterTheUpgrade(t *testing.T) {
	t.Parallel()
	h := quietHandler()
	var returned atomic.Int32
	srv := pubsubtest.Serve(t, h, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.ServeHTTP(w, r)
		returned.Add(1)
	}))

	c := srv.DialRaw("/ws?room=r")
	pubsubtest.WaitFor(t, "ServeHTTP to return while the connection is open", func() bool { return returned.Load() == 1 })
	srv.Publish("r", []byte("still served"))
	c.ExpectText("still served")
}
