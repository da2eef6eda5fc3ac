package bench

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/roomcast/pubsub/benchmarks/internal/impl"
)

// Scenario is one load pattern, run the same way against every
// implementation, each time with fresh client connections.
type Scenario struct {
	Name     string // "A", "B", "C", "D", "E"
	Title    string
	Conns    int
	Messages int     // per room; 0 publishes nothing (a connect storm)
	Rate     float64 // messages per second (per room); 0 publishes as fast as Publish returns
	Size     int     // payload bytes
	// Rooms, when more than 1, spreads the connections over rooms r0…
	// (connection i in room r(i%Rooms)) and publishes Messages into each.
	Rooms int
	// InFlight bounds the dials in progress at once over all client
	// processes; 0 leaves each process's default (32).
	InFlight int
	// Idle measures memory and goroutines per connection once every
	// connection is in the room, before anything is published.
	Idle bool
}

// Scenarios are the issues' five: (A) many idle connections then a slow
// trickle, (B) a steady rate, (C) an unthrottled flood, (D) a chat: many
// small rooms at a modest rate each, and (E) a connect storm.
func Scenarios() []Scenario {
	return []Scenario{
		{Name: "A", Title: "10,000 idle connections, then 100 messages at 5/s", Conns: 10_000, Messages: 100, Rate: 5, Size: 128, Idle: true},
		{Name: "B", Title: "1,000 connections, 1,000 messages at 50/s", Conns: 1_000, Messages: 1_000, Rate: 50, Size: 128},
		{Name: "C", Title: "flood: 2,000 messages unthrottled to 1,000 connections", Conns: 1_000, Messages: 2_000, Rate: 0, Size: 128},
		{Name: "D", Title: "chat: 2,000 rooms of 5 connections, 1 message/s in each room for 20 s", Conns: 10_000, Rooms: 2_000, Messages: 20, Rate: 1, Size: 128},
		{Name: "E", Title: "connect storm: 5,000 connects, 64 in flight", Conns: 5_000, InFlight: 64},
	}
}

// Scale multiplies the scenario's connections, messages and rooms by f
// (rooms keep their size), for a quicker run.
func (sc Scenario) Scale(f float64) Scenario {
	if f == 1 {
		return sc
	}
	sc.Conns = max(1, int(float64(sc.Conns)*f))
	if sc.Messages > 0 {
		sc.Messages = max(1, int(float64(sc.Messages)*f))
	}
	if sc.Rooms > 1 {
		sc.Rooms = max(1, int(float64(sc.Rooms)*f))
	}
	sc.Title += fmt.Sprintf(" (scaled by %g)", f)
	return sc
}

// Config is one comparison run.
type Config struct {
	Self       string // the binary re-executed as servers and clients (see RoleEnv)
	Impls      []impl.Spec
	Scenarios  []Scenario
	PerProcess int           // connections per client process
	Settle     time.Duration // wait between "all in the room" and the idle measurement
	DrainIdle  time.Duration // stop waiting for deliveries after this long without progress
	ProfileDir string        // when set, each server's profiles are written there (last round's)
	Rounds     int           // run every implementation this many times, in turn; reports show medians
	Log        io.Writer     // progress lines
}

// Result is one implementation's numbers in one scenario.
type Result struct {
	Impl     string
	Scenario string
	Round    int
	Err      string // why the scenario did not complete; the numbers may be partial
	// Note says the deliveries stopped short: some connections never got
	// the last message (they lost it), and the wait ended after DrainIdle.
	Note string

	Conns       int           // connections that joined
	ConnectTook time.Duration // dialing them all
	// ConnectCPU is the server's CPU time from before the first dial to
	// every connection in its room: the handshakes (scenario E).
	ConnectCPU time.Duration
	// Idle measurements (scenarios with Idle): deltas from the server's
	// empty state, per connection. RSS after runtime.GC and
	// debug.FreeOSMemory; RSSNoGC before them.
	RSSPerConn        float64
	RSSNoGCPerConn    float64
	HeapPerConn       float64 // HeapInuse
	StackPerConn      float64 // StackInuse
	GoroutinesPerConn float64
	IdleRSS           int64

	Expected    int64 // Messages * Conns
	Published   int
	Delivered   int64
	Lost        int64 // missing on connections still open
	LostClosed  int64 // missing on connections the server (or network) closed
	Reordered   int64
	Disconnects int
	CloseCodes  map[int]int

	CPU            time.Duration // server CPU from the publish to the last delivery
	CPUPerDelivery time.Duration
	UserCPU        time.Duration // the user-space part of CPU
	WriteSyscalls  int64         // the server's write system calls over the same span
	ClientCPU      time.Duration // every client process's CPU over the same span
	PublishTook    time.Duration
	DeliverTook    time.Duration // first publish to last delivery
	Throughput     float64       // deliveries per second over DeliverTook
	P50, P99, Max  time.Duration
	Load           float64 // the machine's 1-minute load average when the scenario ended
	// Counters are the implementation's own counts over the scenario's
	// publish and deliveries (see impl.Counters).
	Counters map[string]uint64
}

// Run runs every scenario against every implementation and returns the
// results, implementation by implementation, in cfg's orders. A failed
// scenario is recorded in its Result and the run goes on.
func Run(cfg Config) []Result {
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	var out []Result
	run := int64(0)
	for round := range max(cfg.Rounds, 1) {
		for _, spec := range cfg.Impls {
			if cfg.Rounds > 1 {
				logf(cfg, "round %d of %d: %s", round+1, cfg.Rounds, spec.Name)
			}
			for _, r := range runImpl(cfg, spec, &run) {
				r.Round = round + 1
				out = append(out, r)
			}
		}
	}
	return out
}

func logf(cfg Config, format string, args ...any) {
	fmt.Fprintf(cfg.Log, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
}

func runImpl(cfg Config, spec impl.Spec, run *int64) []Result {
	fail := func(err error) []Result {
		var rs []Result
		for _, sc := range cfg.Scenarios {
			rs = append(rs, Result{Impl: spec.Name, Scenario: sc.Name, Err: err.Error()})
		}
		return rs
	}
	srv, err := startChild(cfg.Self, "server", spec.Name+" server", "-impl", spec.Name)
	if err != nil {
		return fail(err)
	}
	defer func() {
		if err := srv.stop(20 * time.Second); err != nil {
			logf(cfg, "%s", err)
		}
	}()
	var hello struct{ Addr string }
	if err := srv.next(&hello, 30*time.Second); err != nil {
		return fail(err)
	}
	ctl := &control{base: "http://" + hello.Addr}
	var rs []Result
	for _, sc := range cfg.Scenarios {
		*run++
		logf(cfg, "%s: scenario %s: %s", spec.Name, sc.Name, sc.Title)
		r := runScenario(cfg, spec, sc, ctl, hello.Addr, *run)
		if r.Err != "" {
			logf(cfg, "%s: scenario %s failed: %s", spec.Name, sc.Name, r.Err)
		}
		rs = append(rs, r)
		// The next scenario starts from an empty room.
		if err := ctl.waitSubscribers(0, 30*time.Second); err != nil {
			logf(cfg, "%s: after scenario %s: %v", spec.Name, sc.Name, err)
		}
	}
	return rs
}

func runScenario(cfg Config, spec impl.Spec, sc Scenario, ctl *control, addr string, run int64) (r Result) {
	r = Result{Impl: spec.Name, Scenario: sc.Name, Expected: int64(sc.Messages) * int64(sc.Conns)}
	failf := func(format string, args ...any) Result {
		r.Err = fmt.Sprintf(format, args...)
		return r
	}
	base, err := ctl.stats(true)
	if err != nil {
		return failf("stats: %v", err)
	}

	// Connect. A scenario without messages (the connect storm) profiles
	// this phase, the one it measures.
	profileConnect := cfg.ProfileDir != "" && sc.Messages == 0
	if profileConnect {
		if err := ctl.post("/control/cpuprofile/start", nil); err != nil {
			logf(cfg, "%s: profile: %v", spec.Name, err)
		}
	}
	per := max(cfg.PerProcess, 1)
	began := time.Now()
	var clients []*child
	defer func() {
		for _, c := range clients {
			if err := c.send(map[string]string{"cmd": "close"}); err == nil {
				var ev struct{ Event string }
				_ = c.next(&ev, 15*time.Second)
			}
			if err := c.stop(10 * time.Second); err != nil && r.Err == "" {
				r.Err = err.Error()
			}
		}
	}()
	procs := (sc.Conns + per - 1) / per
	for i := 0; i < sc.Conns; i += per {
		n := min(per, sc.Conns-i)
		args := []string{"-url", "ws://" + addr + spec.Path, "-conns", fmt.Sprint(n), "-proto", string(spec.Protocol),
			"-rooms", fmt.Sprint(max(sc.Rooms, 1)), "-first", fmt.Sprint(i)}
		if sc.InFlight > 0 {
			args = append(args, "-dial-parallel", fmt.Sprint(max(1, sc.InFlight/procs)))
		}
		c, err := startChild(cfg.Self, "client", fmt.Sprintf("%s client %d", spec.Name, len(clients)), args...)
		if err != nil {
			return failf("start client: %v", err)
		}
		clients = append(clients, c)
	}
	for _, c := range clients {
		var ready struct {
			Event  string
			Conns  int
			Failed int
			Error  string
		}
		if err := c.next(&ready, 5*time.Minute); err != nil {
			return failf("%v", err)
		}
		r.Conns += ready.Conns
		if ready.Failed > 0 {
			return failf("%s: %d dials failed: %s", c.name, ready.Failed, ready.Error)
		}
	}
	if err := ctl.waitSubscribers(sc.Conns, time.Minute); err != nil {
		return failf("%v", err)
	}
	r.ConnectTook = time.Since(began)
	connected, err := ctl.stats(false)
	if err != nil {
		return failf("stats: %v", err)
	}
	r.ConnectCPU = connected.CPU - base.CPU
	if profileConnect {
		if err := ctl.saveProfile(profilePath(cfg, spec, sc, "cpu.pb.gz")); err != nil {
			logf(cfg, "%s: profile: %v", spec.Name, err)
		}
	}
	logf(cfg, "%s: %d connections in their rooms after %v, %v of server CPU per connection", spec.Name, r.Conns,
		r.ConnectTook.Round(time.Millisecond), (r.ConnectCPU / time.Duration(max(r.Conns, 1))).Round(100*time.Nanosecond))
	if sc.Messages == 0 {
		r.Load = loadAverage()
		return r
	}

	// Idle cost.
	if sc.Idle {
		time.Sleep(cfg.Settle)
		raw, err1 := ctl.stats(false)
		idle, err2 := ctl.stats(true)
		if err1 != nil || err2 != nil {
			return failf("stats: %v %v", err1, err2)
		}
		n := float64(sc.Conns)
		r.IdleRSS = idle.RSS
		r.RSSPerConn = float64(idle.RSS-base.RSS) / n
		r.RSSNoGCPerConn = float64(raw.RSS-base.RSS) / n
		r.HeapPerConn = (float64(idle.HeapInuse) - float64(base.HeapInuse)) / n
		r.StackPerConn = (float64(idle.StackInuse) - float64(base.StackInuse)) / n
		r.GoroutinesPerConn = float64(idle.Goroutines-base.Goroutines) / n
		logf(cfg, "%s: idle: %.1f KiB RSS, %.2f goroutines per connection", spec.Name, r.RSSPerConn/1024, r.GoroutinesPerConn)
		if cfg.ProfileDir != "" {
			for _, p := range []struct{ url, file string }{
				{"/debug/pprof/heap?gc=1", "heap.pb.gz"},
				{"/debug/pprof/goroutine?debug=1", "goroutines.txt"},
			} {
				if err := ctl.save(p.url, profilePath(cfg, spec, sc, p.file)); err != nil {
					logf(cfg, "%s: profile: %v", spec.Name, err)
				}
			}
		}
	}

	// Publish and wait for the deliveries.
	for _, c := range clients {
		if err := c.send(map[string]any{"cmd": "start", "run": run, "count": sc.Messages}); err != nil {
			return failf("%s: %v", c.name, err)
		}
		var ev struct{ Event string }
		if err := c.next(&ev, 30*time.Second); err != nil || ev.Event != "started" {
			return failf("%s: start: %v %q", c.name, err, ev.Event)
		}
	}
	reports0, err := reportAll(clients) // for the clients' CPU time
	if err != nil {
		return failf("%v", err)
	}
	s0, err := ctl.stats(false)
	if err != nil {
		return failf("stats: %v", err)
	}
	if cfg.ProfileDir != "" {
		if err := ctl.post("/control/cpuprofile/start", nil); err != nil {
			logf(cfg, "%s: profile: %v", spec.Name, err)
		}
	}
	var pub PublishResult
	if err := ctl.post(fmt.Sprintf("/control/publish?run=%d&count=%d&rate=%g&size=%d&rooms=%d", run, sc.Messages, sc.Rate, sc.Size, max(sc.Rooms, 1)), &pub); err != nil {
		return failf("publish: %v", err)
	}
	r.Published, r.PublishTook = pub.Sent, pub.Took
	reports, stalled, err := drain(cfg, clients, sc.Conns)
	if err != nil {
		return failf("%v", err)
	}
	s1, err := ctl.stats(false)
	if err != nil {
		return failf("stats: %v", err)
	}
	if cfg.ProfileDir != "" {
		if err := ctl.saveProfile(profilePath(cfg, spec, sc, "cpu.pb.gz")); err != nil {
			logf(cfg, "%s: profile: %v", spec.Name, err)
		}
	}
	var lat Snapshot
	var lastRecv int64
	r.CloseCodes = map[int]int{}
	for _, rep := range reports0 {
		r.ClientCPU -= rep.CPU
	}
	for _, rep := range reports {
		r.ClientCPU += rep.CPU
		r.Delivered += rep.Delivered
		r.Lost += rep.Lost
		r.LostClosed += rep.LostClosed
		r.Reordered += rep.Reordered
		r.Disconnects += rep.Disconnects
		for code, n := range rep.CloseCodes {
			r.CloseCodes[code] += n
		}
		lat.Merge(rep.Latency)
		lastRecv = max(lastRecv, rep.LastRecv)
	}
	r.P50, r.P99, r.Max = lat.Quantile(0.5), lat.Quantile(0.99), lat.Max
	r.CPU = s1.CPU - s0.CPU
	r.UserCPU = s1.UserCPU - s0.UserCPU
	r.WriteSyscalls = s1.WriteSyscalls - s0.WriteSyscalls
	for k, v := range s1.Counters {
		if r.Counters == nil {
			r.Counters = map[string]uint64{}
		}
		r.Counters[k] = v - s0.Counters[k]
	}
	if r.Delivered > 0 {
		r.CPUPerDelivery = r.CPU / time.Duration(r.Delivered)
	}
	if lastRecv > pub.Start {
		r.DeliverTook = time.Duration(lastRecv - pub.Start)
		r.Throughput = float64(r.Delivered) / r.DeliverTook.Seconds()
	}
	if pub.Errors > 0 {
		r.Err = fmt.Sprintf("%d publishes failed", pub.Errors)
	}
	r.Load = loadAverage()
	if stalled > 0 {
		r.Note = fmt.Sprintf("%d connections never got the last message; the wait ended after %v without a delivery", stalled, cfg.DrainIdle)
	}
	logf(cfg, "%s: delivered %d of %d (lost %d, lost on closed %d, disconnects %d), p50 %v p99 %v max %v, %.0f deliveries/s",
		spec.Name, r.Delivered, r.Expected, r.Lost, r.LostClosed, r.Disconnects, r.P50, r.P99, r.Max, r.Throughput)
	return r
}

func reportAll(clients []*child) ([]ClientReport, error) {
	reports := make([]ClientReport, len(clients))
	for i, c := range clients {
		if err := c.send(map[string]string{"cmd": "report"}); err != nil {
			return nil, fmt.Errorf("%s: %v", c.name, err)
		}
		if err := c.next(&reports[i], 30*time.Second); err != nil {
			return nil, err
		}
	}
	return reports, nil
}

// drain polls the clients until every connection has received the run's
// last message or closed, or until nothing has moved for cfg.DrainIdle;
// then stalled is how many connections still wait (they lost messages).
func drain(cfg Config, clients []*child, conns int) (reports []ClientReport, stalled int, err error) {
	var last int64 = -1
	moved := time.Now()
	for {
		reports, err := reportAll(clients)
		if err != nil {
			return nil, 0, err
		}
		done, progress := 0, int64(0)
		for _, r := range reports {
			done += r.Done
			progress += r.Delivered + int64(r.Done)
		}
		if done >= conns {
			return reports, 0, nil
		}
		if progress != last {
			last, moved = progress, time.Now()
		} else if time.Since(moved) > cfg.DrainIdle {
			return reports, conns - done, nil
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func profilePath(cfg Config, spec impl.Spec, sc Scenario, what string) string {
	return filepath.Join(cfg.ProfileDir, spec.Name+"-"+sc.Name+"-"+what)
}

// control talks to a server's control endpoints.
type control struct{ base string }

var httpClient = &http.Client{Timeout: 10 * time.Minute}

func (c *control) stats(gc bool) (ServerStats, error) {
	if gc {
		return c.statsPath("/control/stats?gc=1")
	}
	return c.statsPath("/control/stats")
}

func (c *control) statsPath(path string) (ServerStats, error) {
	var s ServerStats
	u := c.base + path
	resp, err := httpClient.Get(u)
	if err != nil {
		return s, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return s, fmt.Errorf("GET %s: %s", u, resp.Status)
	}
	return s, json.NewDecoder(resp.Body).Decode(&s)
}

func (c *control) post(path string, v any) error {
	resp, err := httpClient.Post(c.base+path, "", nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("POST %s: %s: %s", path, resp.Status, strings.TrimSpace(string(b)))
	}
	if v == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

func (c *control) save(path, file string) error {
	resp, err := httpClient.Get(c.base + path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return os.WriteFile(file, b, 0o644)
}

func (c *control) saveProfile(file string) error {
	resp, err := httpClient.Post(c.base+"/control/cpuprofile/stop", "", nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	if _, err := io.Copy(&b, resp.Body); err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("stop profile: %s", resp.Status)
	}
	return os.WriteFile(file, b.Bytes(), 0o644)
}

// waitSubscribers waits until the rooms have n subscribers. Waiting for 0
// lets a server that never reads (impl.Pruner) find its closed connections.
func (c *control) waitSubscribers(n int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		var s ServerStats
		var err error
		if n == 0 {
			s, err = c.statsPath("/control/stats?prune=1")
		} else {
			s, err = c.stats(false)
		}
		if err == nil && s.Subscribers == n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the room has %d subscribers, not %d, after %v (%v)", s.Subscribers, n, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
