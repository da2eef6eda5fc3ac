package bench

import (
	"fmt"
	"io"
	"os/exec"
	"runtime/debug"
	"slices"
	"strings"
	"time"
)

// Header is what the report says about how and where it was made.
type Header struct {
	Command string
	Started time.Time
	Took    time.Duration
	Machine Machine
	// Rev is the roomcast commit the replace directive pointed at when the
	// run started, when the binary was just built: the report is written
	// at the end, and HEAD may have moved since.
	Rev string
}

// NewHeader describes this machine and the roomcast commit; call it as the
// driver starts.
func NewHeader(command string) Header {
	return Header{Command: command, Started: time.Now(), Machine: machine(), Rev: gitRev()}
}

// gitRev names the repository's HEAD, and says so when the tree had
// uncommitted changes.
func gitRev() string {
	b, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return "unknown commit"
	}
	rev := "commit " + strings.TrimSpace(string(b))
	if b, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(b) > 0 {
		rev += " with uncommitted changes"
	}
	return rev
}

// versions lists the compared libraries as built into this binary, and the
// roomcast commit the replace directive pointed at (rev).
func versions(rev string) []string {
	var out []string
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			switch d.Path {
			case "github.com/olahol/melody", "github.com/centrifugal/centrifuge",
				"github.com/gorilla/websocket", "github.com/coder/websocket":
				out = append(out, d.Path+" "+d.Version)
			}
		}
	}
	if rev == "" {
		rev = "unknown commit"
	}
	return append([]string{"github.com/roomcast/pubsub (this repository, " + rev + ")"}, out...)
}

// metric is one row of a scenario's table.
type metric struct {
	name  string
	value func(Result) (float64, bool) // false: not measured
	unit  func(float64) string
	ratio bool // show value / roomcast's value
}

func kib(v float64) string   { return fmt.Sprintf("%.2f KiB", v/1024) }
func count(v float64) string { return fmt.Sprintf("%.0f", v) }
func dur(v float64) string {
	d := time.Duration(v)
	switch {
	case d >= time.Second:
		return fmt.Sprintf("%.2f s", d.Seconds())
	case d >= time.Millisecond:
		return fmt.Sprintf("%.2f ms", float64(d)/1e6)
	default:
		return fmt.Sprintf("%.1f µs", float64(d)/1e3)
	}
}

func metrics(sc Scenario) []metric {
	var ms []metric
	if sc.Messages == 0 { // a connect storm
		return []metric{
			{"server CPU per handshake (lower is better)", func(r Result) (float64, bool) {
				return float64(r.ConnectCPU) / float64(r.Conns), r.Conns > 0 && r.ConnectCPU > 0
			}, dur, true},
			{"connecting took (all of them)", func(r Result) (float64, bool) { return float64(r.ConnectTook), r.Conns > 0 }, dur, true},
			{"connections", func(r Result) (float64, bool) { return float64(r.Conns), true }, count, false},
			{"machine load (1-min average) at the end", func(r Result) (float64, bool) { return r.Load, r.Load >= 0 && r.Conns > 0 },
				func(v float64) string { return fmt.Sprintf("%.1f", v) }, false},
		}
	}
	if sc.Idle {
		ms = append(ms,
			metric{"memory per connection, RSS after GC (lower is better)", func(r Result) (float64, bool) { return r.RSSPerConn, r.Conns > 0 }, kib, true},
			metric{"memory per connection, RSS before GC", func(r Result) (float64, bool) { return r.RSSNoGCPerConn, r.Conns > 0 }, kib, true},
			metric{"Go heap in use per connection", func(r Result) (float64, bool) { return r.HeapPerConn, r.Conns > 0 }, kib, true},
			metric{"goroutine stacks per connection", func(r Result) (float64, bool) { return r.StackPerConn, r.Conns > 0 }, kib, true},
			metric{"goroutines per connection", func(r Result) (float64, bool) { return r.GoroutinesPerConn, r.Conns > 0 },
				func(v float64) string { return fmt.Sprintf("%.2f", v) }, true},
		)
	}
	if sc.Rooms > 1 {
		ms = append(ms, metric{"server CPU per publish (lower is better)", func(r Result) (float64, bool) {
			return float64(r.CPU) / float64(r.Published), r.Published > 0 && r.CPU > 0
		}, dur, true})
	}
	ms = append(ms,
		metric{"server CPU per delivery (lower is better)", func(r Result) (float64, bool) { return float64(r.CPUPerDelivery), r.Delivered > 0 }, dur, true},
		metric{"of which user space (the kernel's work aside)", func(r Result) (float64, bool) {
			return float64(r.UserCPU) / float64(r.Delivered), r.Delivered > 0 && r.UserCPU >= 0
		}, dur, true},
		metric{"server write syscalls per delivery", func(r Result) (float64, bool) {
			return float64(r.WriteSyscalls) / float64(r.Delivered), r.Delivered > 0 && r.WriteSyscalls > 0
		}, func(v float64) string { return fmt.Sprintf("%.3f", v) }, true},
		metric{"client CPU per delivery (all client processes)", func(r Result) (float64, bool) {
			return float64(r.ClientCPU) / float64(r.Delivered), r.Delivered > 0 && r.ClientCPU > 0
		}, dur, true},
		metric{"latency p50", func(r Result) (float64, bool) { return float64(r.P50), r.Delivered > 0 }, dur, true},
		metric{"latency p99", func(r Result) (float64, bool) { return float64(r.P99), r.Delivered > 0 }, dur, true},
		metric{"latency max", func(r Result) (float64, bool) { return float64(r.Max), r.Delivered > 0 }, dur, true},
	)
	if sc.Rate == 0 {
		ms = append(ms,
			metric{"deliveries per second (higher is better)", func(r Result) (float64, bool) { return r.Throughput, r.Throughput > 0 },
				func(v float64) string { return fmt.Sprintf("%.0f", v) }, true},
			metric{"publish loop took", func(r Result) (float64, bool) { return float64(r.PublishTook), r.Published > 0 }, dur, true},
		)
	}
	ms = append(ms,
		metric{"delivered", func(r Result) (float64, bool) { return float64(r.Delivered), true },
			func(v float64) string { return fmt.Sprintf("%.0f of %d", v, int64(sc.Conns)*int64(sc.Messages)) }, false},
		metric{"machine load (1-min average) at the end", func(r Result) (float64, bool) { return r.Load, r.Load >= 0 && r.Delivered > 0 },
			func(v float64) string { return fmt.Sprintf("%.1f", v) }, false},
		metric{"lost on open connections", func(r Result) (float64, bool) { return float64(r.Lost), true }, count, false},
		metric{"lost on disconnected connections", func(r Result) (float64, bool) { return float64(r.LostClosed), true }, count, false},
		metric{"disconnects", func(r Result) (float64, bool) { return float64(r.Disconnects), true }, count, false},
	)
	return ms
}

// median is the metric's median over the rounds that measured it (the
// mean of the middle two for an even count).
func median(mt metric, rs []Result) (float64, bool) {
	var vs []float64
	for _, r := range rs {
		if v, ok := mt.value(r); ok {
			vs = append(vs, v)
		}
	}
	if len(vs) == 0 {
		return 0, false
	}
	slices.Sort(vs)
	return (vs[(len(vs)-1)/2] + vs[len(vs)/2]) / 2, true
}

// each is the metric's value in every round, in round order, joined by
// " / ": for counts (deliveries, losses, disconnects), where a median would
// mix rounds.
func each(mt metric, rs []Result) (string, bool) {
	var out []string
	for _, r := range rs {
		if v, ok := mt.value(r); ok {
			out = append(out, mt.unit(v))
		}
	}
	return strings.Join(out, " / "), len(out) > 0
}

// Describe is the run's start, machine and roomcast commit, in one line.
func (h Header) Describe() string {
	m := h.Machine
	return fmt.Sprintf("started %s on %d CPUs (%s), %s memory, Linux %s, %s; roomcast at %s",
		h.Started.UTC().Format(time.RFC3339), m.CPUs, m.CPUModel, m.Memory, m.Kernel, m.Go, h.Rev)
}

// WriteMarkdown writes the results as one table per scenario, each value
// with its ratio to roomcast's, followed by notes on failures.
func WriteMarkdown(w io.Writer, h Header, scenarios []Scenario, results []Result) {
	m := h.Machine
	fmt.Fprintf(w, "# roomcast compared with melody, centrifuge and a gorilla/websocket hub\n\n")
	fmt.Fprintf(w, "- command: `%s`\n", h.Command)
	fmt.Fprintf(w, "- started %s, took %v\n", h.Started.UTC().Format(time.RFC3339), h.Took.Round(time.Second))
	fmt.Fprintf(w, "- machine: %d CPUs (%s), %s memory, Linux %s, %s\n", m.CPUs, m.CPUModel, m.Memory, m.Kernel, m.Go)
	fmt.Fprintf(w, "- versions: %s\n", strings.Join(versions(h.Rev), ", "))
	fmt.Fprintf(w, "- servers, clients and driver share the machine; everything is on 127.0.0.1\n")

	var impls []string
	byKey := map[[2]string][]Result{}
	rounds := 0
	for _, r := range results {
		if !slices.Contains(impls, r.Impl) {
			impls = append(impls, r.Impl)
		}
		k := [2]string{r.Impl, r.Scenario}
		byKey[k] = append(byKey[k], r)
		rounds = max(rounds, len(byKey[k]))
	}
	if rounds > 1 {
		fmt.Fprintf(w, "- every implementation ran %d times, in turn; a cell with a ratio is the median of its rounds, counts show every round\n", rounds)
	}
	for _, sc := range scenarios {
		rate := "unthrottled"
		if sc.Rate > 0 {
			rate = fmt.Sprintf("%g/s", sc.Rate)
		}
		switch {
		case sc.Messages == 0:
			fmt.Fprintf(w, "\n## %s: %s\n\n%d connections, %d dials in flight. Ratios are to %s.\n\n",
				sc.Name, sc.Title, sc.Conns, sc.InFlight, impls[0])
		case sc.Rooms > 1:
			fmt.Fprintf(w, "\n## %s: %s\n\n%d connections in %d rooms, %d messages of %d B into each room, %s per room. Ratios are to %s.\n\n",
				sc.Name, sc.Title, sc.Conns, sc.Rooms, sc.Messages, sc.Size, rate, impls[0])
		default:
			fmt.Fprintf(w, "\n## %s: %s\n\n%d connections, %d messages of %d B, %s. Ratios are to %s.\n\n",
				sc.Name, sc.Title, sc.Conns, sc.Messages, sc.Size, rate, impls[0])
		}
		fmt.Fprintf(w, "| metric | %s |\n|---|%s\n", strings.Join(impls, " | "), strings.Repeat("---:|", len(impls)))
		for _, mt := range metrics(sc) {
			ref, refOK := median(mt, byKey[[2]string{impls[0], sc.Name}])
			cells := make([]string, len(impls))
			for i, name := range impls {
				rs := byKey[[2]string{name, sc.Name}]
				v, ok := median(mt, rs)
				switch {
				case !ok:
					cells[i] = "–"
				case !mt.ratio:
					cells[i], _ = each(mt, rs)
				case i > 0 && refOK && ref != 0:
					cells[i] = fmt.Sprintf("%s (%.2f×)", mt.unit(v), v/ref)
				default:
					cells[i] = mt.unit(v)
				}
			}
			fmt.Fprintf(w, "| %s | %s |\n", mt.name, strings.Join(cells, " | "))
		}
		for _, name := range impls {
			for _, r := range byKey[[2]string{name, sc.Name}] {
				who := name
				if rounds > 1 {
					who = fmt.Sprintf("%s (round %d)", name, r.Round)
				}
				if r.Err != "" {
					fmt.Fprintf(w, "\n- %s did not complete: %s\n", who, r.Err)
				}
				if r.Note != "" {
					fmt.Fprintf(w, "\n- %s: %s\n", who, r.Note)
				}
				if len(r.CloseCodes) > 0 {
					fmt.Fprintf(w, "\n- %s close codes: %v\n", who, r.CloseCodes)
					if len(r.Counters) > 0 {
						fmt.Fprintf(w, "\n- %s server counters over the run: %v\n", who, r.Counters)
					}
				}
			}
		}
	}
}
