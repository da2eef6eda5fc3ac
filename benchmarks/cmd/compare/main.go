// Command compare runs the issues' scenarios against roomcast, melody,
// centrifuge, a gorilla/websocket hub and the floor (impl.floor), one after the other in one run on
// this machine, and prints a markdown report:
//
//	cd benchmarks && go run ./cmd/compare -out results.md -profiles profiles
//
// For each implementation it starts a server process, then for each
// scenario fresh client processes (-per-process connections each), and
// measures from outside: the server's RSS, goroutines and CPU time through
// its control endpoints, latency, deliveries and losses in the clients.
// Servers and clients are copies of this binary (see bench.RoleEnv).
// Everything listens and dials on 127.0.0.1 and stops by itself.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/roomcast/pubsub/benchmarks/internal/bench"
	"github.com/roomcast/pubsub/benchmarks/internal/impl"
)

func main() {
	bench.RunRole()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "compare:", err)
		os.Exit(1)
	}
}

func run() error {
	impls := flag.String("impls", "roomcast,melody,centrifuge,gorilla,floor", "implementations to run, in order; the first is the reference for ratios")
	scenarios := flag.String("scenarios", "A,B,C,D,E", "scenarios to run: A (idle, then a trickle), B (a rate), C (a flood), D (a chat: many small rooms), E (a connect storm)")
	scale := flag.Float64("scale", 1, "multiply every scenario's connections and messages (for a quick try: 0.1)")
	per := flag.Int("per-process", 2500, "connections per client process")
	settle := flag.Duration("settle", 3*time.Second, "wait before the idle measurement")
	drainIdle := flag.Duration("drain-idle", 10*time.Second, "stop waiting for deliveries after this long without progress")
	profiles := flag.String("profiles", "", "directory for every server's heap and CPU profiles (go tool pprof -top FILE)")
	out := flag.String("out", "", "also write the report to this file")
	rounds := flag.Int("rounds", 1, "run every implementation this many times, in turn, and report medians")
	flag.Parse()

	self, err := os.Executable()
	if err != nil {
		return err
	}
	cfg := bench.Config{Self: self, PerProcess: *per, Settle: *settle, DrainIdle: *drainIdle,
		ProfileDir: *profiles, Rounds: *rounds, Log: os.Stderr}
	for name := range strings.SplitSeq(*impls, ",") {
		spec, err := impl.Lookup(strings.TrimSpace(name))
		if err != nil {
			return err
		}
		cfg.Impls = append(cfg.Impls, spec)
	}
	for _, sc := range bench.Scenarios() {
		if !strings.Contains(*scenarios, sc.Name) {
			continue
		}
		cfg.Scenarios = append(cfg.Scenarios, sc.Scale(*scale))
	}
	if *profiles != "" {
		if err := os.MkdirAll(*profiles, 0o755); err != nil {
			return err
		}
	}

	h := bench.NewHeader("cd benchmarks && go run ./cmd/compare " + strings.Join(os.Args[1:], " "))
	results := bench.Run(cfg)
	h.Took = time.Since(h.Started)

	w := io.Writer(os.Stdout)
	if *out != "" {
		f, err := os.Create(*out)
		if err != nil {
			return err
		}
		defer f.Close()
		w = io.MultiWriter(os.Stdout, f)
	}
	bench.WriteMarkdown(w, h, cfg.Scenarios, results)
	return nil
}
