//go:build unix

package metrics_test

import (
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/roomcast/pubsub/metrics"
	"github.com/roomcast/pubsub/pubsubtest"
)

// BenchmarkScrape measures what one scrape costs the host: a registry's
// Gather of the Collector (what promhttp encodes), on a Handler with 1,000
// real connections in 100 rooms, with no room opted in, and with all 100.
// Beside the wall time per scrape it reports cpu-ns/op, the process's CPU
// time (all goroutines, GC included) per scrape: on shared cores, the
// wall time also counts waiting for a core.
func BenchmarkScrape(b *testing.B) {
	srv := pubsubtest.Start(b)
	const conns, rooms = 1000, 100
	for i := range conns {
		srv.DialRaw(fmt.Sprintf("/ws?room=room%03d", i%rooms))
	}
	pubsubtest.WaitFor(b, "every connection registered", func() bool { return srv.Stats().Connections == conns })
	for _, bc := range []struct {
		name string
		opts []metrics.Option
	}{
		{"node", nil},
		{"100rooms", []metrics.Option{metrics.WithRoomFilter(func(string) bool { return true })}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			reg := prometheus.NewRegistry()
			reg.MustRegister(metrics.NewCollector(srv.Handler, bc.opts...))
			b.ReportAllocs()
			cpu0 := cpuTime(b)
			for b.Loop() {
				if _, err := reg.Gather(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(cpuTime(b)-cpu0)/float64(b.N), "cpu-ns/op")
		})
	}
}

// cpuTime is the CPU time the process has used, user and system.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
