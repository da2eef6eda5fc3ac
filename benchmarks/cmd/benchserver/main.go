// Command benchserver runs one implementation under test, for running the
// comparison by hand (cmd/compare starts its servers itself):
//
//	go run ./cmd/benchserver -impl melody -addr 127.0.0.1:8080 -stdin-exit=false
//
// It serves WebSocket clients at /ws, control endpoints under /control/
// and net/http/pprof under /debug/pprof/ (see internal/bench/server.go).
package main

import (
	"fmt"
	"os"

	"github.com/roomcast/pubsub/benchmarks/internal/bench"
)

func main() {
	if err := bench.ServerMain(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "benchserver:", err)
		os.Exit(1)
	}
}
