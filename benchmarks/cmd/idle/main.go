// Command idle measures what an idle connection costs the roomcast server,
// for each kind of connection it serves: a raw WebSocket in a room, a
// protocol-mode WebSocket subscribed to a room, an event stream
// (Server-Sent Events) of a room, and a raw WebSocket whose client sent one
// ping of its own (raw-ping: Python's websockets pings every 20 s). It
// prints a markdown table:
//
//	cd benchmarks && go run ./cmd/idle -conns 5000 -rounds 3
//
// Each kind, in each round, gets a fresh server process (a copy of this
// binary, see bench.RoleEnv); this process opens the connections and
// answers heartbeats. The figures are the server's, after a garbage
// collection, minus the same measured before any connection, divided by
// the connections; each cell is the median of the rounds. Everything runs
// on 127.0.0.1 and stops by itself.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/roomcast/pubsub/benchmarks/internal/bench"
)

func main() {
	bench.RunRole()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "idle:", err)
		os.Exit(1)
	}
}

func run() error {
	kinds := flag.String("kinds", strings.Join(bench.IdleKinds, ","), "kinds of connection, in order")
	conns := flag.Int("conns", 5000, "idle connections per kind (this process holds them all: keep it under the open-file limit)")
	rounds := flag.Int("rounds", 1, "measure every kind this many times, in turn, and report medians")
	settle := flag.Duration("settle", 3*time.Second, "wait before each measurement")
	out := flag.String("out", "", "also write the report to this file")
	flag.Parse()

	h := bench.NewHeader(strings.Join(os.Args, " "))
	self, err := os.Executable()
	if err != nil {
		return err
	}
	results := map[string][]bench.IdleResult{}
	ks := strings.Split(*kinds, ",")
	for round := range *rounds {
		for _, k := range ks {
			fmt.Fprintf(os.Stderr, "round %d: %d idle %s connections\n", round+1, *conns, k)
			r, err := bench.RunIdle(self, k, *conns, *settle)
			if err != nil {
				return err
			}
			results[k] = append(results[k], r)
		}
	}

	w := io.Writer(os.Stdout)
	if *out != "" {
		f, err := os.Create(*out)
		if err != nil {
			return err
		}
		defer f.Close()
		w = io.MultiWriter(os.Stdout, f)
	}
	fmt.Fprintf(w, "# What an idle connection costs the roomcast server\n\n")
	fmt.Fprintf(w, "- command: `%s`\n", strings.Join(append([]string{"go run ./cmd/idle"}, os.Args[1:]...), " "))
	fmt.Fprintf(w, "- %s, %d idle connections per kind, median of %d round(s)\n\n", h.Describe(), *conns, *rounds)
	fmt.Fprintln(w, "| kind | RSS per connection after GC | Go heap in use | goroutine stacks | goroutines | load (1 min) |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---|")
	for _, k := range ks {
		rs := results[k]
		med := func(f func(bench.IdleResult) float64) float64 {
			v := make([]float64, len(rs))
			for i, r := range rs {
				v[i] = f(r)
			}
			slices.Sort(v)
			return v[len(v)/2]
		}
		var loads []string
		for _, r := range rs {
			loads = append(loads, fmt.Sprintf("%.1f", r.Load))
		}
		fmt.Fprintf(w, "| %s | %.2f KiB | %.2f KiB | %.2f KiB | %.2f | %s |\n", k,
			med(func(r bench.IdleResult) float64 { return r.RSS })/1024,
			med(func(r bench.IdleResult) float64 { return r.Heap })/1024,
			med(func(r bench.IdleResult) float64 { return r.Stack })/1024,
			med(func(r bench.IdleResult) float64 { return r.Goroutines }),
			strings.Join(loads, " / "))
	}
	return nil
}
