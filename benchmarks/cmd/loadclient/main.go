// Command loadclient opens WebSocket connections to a benchserver and
// counts and times what they receive, for running the comparison by hand
// (cmd/compare starts its clients itself):
//
//	go run ./cmd/loadclient -url 'ws://127.0.0.1:8080/ws?room=bench' -conns 1000
//
// It prints {"event":"ready",...} once connected and then follows commands
// on its standard input, one JSON object a line: {"cmd":"start","run":1,"count":100},
// {"cmd":"report"}, {"cmd":"close"} (see internal/bench/client.go).
package main

import (
	"fmt"
	"os"

	"github.com/roomcast/pubsub/benchmarks/internal/bench"
)

func main() {
	if err := bench.ClientMain(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "loadclient:", err)
		os.Exit(1)
	}
}
