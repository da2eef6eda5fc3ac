// Command redisbench compares the publish path of roomcast's redisbroker
// with centrifuge's RedisBroker on one redis-server, in one run:
//
//	cd benchmarks && go run ./cmd/redisbench
//	go run ./cmd/redisbench -duration 3s -rounds 1 -publishers 16   # a quick try
//	go run ./cmd/redisbench -redis 127.0.0.1:6379                   # measure yours (it is FLUSHALLed)
//
// Unless -redis is given it starts its own redis-server (no persistence, on
// a free loopback port) and stops it at the end. For each number of
// concurrent publishers it runs the implementations in turn, -rounds times
// (A B A B), so that noise from the rest of the machine hits both. Each
// run makes a fresh broker with a fresh Redis client, subscribes it to
// every room (so every publish is fanned out to one listening node),
// publishes for -warmup, then for -duration: each publisher publishes
// -size bytes to the next of -rooms rooms, one after the other, with
// history kept (-history messages, -history-ttl). It reports publishes
// per second, the publish call's p50 and p99, Redis's CPU per publish
// (used_cpu_sys + used_cpu_user from INFO cpu), Redis's time in scripts
// per publish (INFO commandstats' usec of EVALSHA and EVAL, which both
// implementations publish with), Redis's calls per publish (INFO
// commandstats, scripts' inner calls included), and this process's CPU
// per publish. The database is flushed between runs.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/centrifugal/centrifuge"
	"github.com/redis/go-redis/v9"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/redisbroker"
)

type config struct {
	addr       string
	duration   time.Duration
	warmup     time.Duration
	rounds     int
	publishers []int
	rooms      int
	size       int
	history    int
	historyTTL time.Duration
	impls      []string
	batches    int
}

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "redisbench:", err)
		os.Exit(1)
	}
}

func run(args []string, stdout, stderr io.Writer) error {
	c, out, cpuprofile, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	started := time.Now()
	if c.addr == "" {
		srv, err := startRedis()
		if err != nil {
			return err
		}
		defer srv.stop()
		c.addr = srv.addr
	}
	admin := redis.NewClient(&redis.Options{Addr: c.addr})
	defer admin.Close()
	ctx := context.Background()
	version, _ := infoField(ctx, admin, "server", "redis_version")
	loadBefore := uptime()

	var results []result
	for _, p := range c.publishers {
		for round := 1; round <= c.rounds; round++ {
			for _, name := range c.impls {
				r, err := measure(ctx, admin, c, name, p)
				if err != nil {
					return fmt.Errorf("%s, %d publishers: %w", name, p, err)
				}
				r.round = round
				fmt.Fprintf(stderr, "%-12s publishers=%-3d round %d: %8.0f publishes/s  p50 %-8v p99 %-8v redis %5.1f µs/publish  load %s\n",
					name, p, round, r.rate(), r.p50, r.p99, r.redisCPU(), r.load)
				results = append(results, r)
			}
		}
	}

	var b strings.Builder
	report(&b, c, results, version, loadBefore, uptime(), started)
	if _, err := io.WriteString(stdout, b.String()); err != nil {
		return err
	}
	if *out != "" {
		return os.WriteFile(*out, []byte(b.String()), 0o644)
	}
	return nil
}

// parseFlags reads the command line: the run's config, the -out file
// and the -cpuprofile file.
func parseFlags(args []string, stderr io.Writer) (c config, out, cpuprofile *string, err error) {
	fs := flag.NewFlagSet("redisbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.addr, "redis", "", "measure this Redis (host:port; it is flushed) instead of starting one")
	fs.DurationVar(&c.duration, "duration", 5*time.Second, "measured time per run")
	fs.DurationVar(&c.warmup, "warmup", time.Second, "unmeasured publishing before each run")
	fs.IntVar(&c.rounds, "rounds", 2, "runs of each implementation per publisher count, alternating")
	pubs := fs.String("publishers", "1,16", "concurrent publishers, comma-separated")
	fs.IntVar(&c.rooms, "rooms", 100, "rooms published to in turn")
	fs.IntVar(&c.size, "size", 128, "payload bytes")
	fs.IntVar(&c.history, "history", 100, "messages kept per room")
	fs.DurationVar(&c.historyTTL, "history-ttl", 10*time.Minute, "how long messages are kept")
	fs.IntVar(&c.batches, "batches", redisbroker.DefaultPublishBatches, "roomcast's WithPublishBatches")
	impls := fs.String("impls", "roomcast,centrifuge", "implementations, in the order of each round")
	out = fs.String("out", "", "also write the report to this file")
	cpuprofile = fs.String("cpuprofile", "", "write this process's CPU profile of the whole run here")
	if err := fs.Parse(args); err != nil {
		return c, nil, nil, err
	}
	for p := range strings.SplitSeq(*pubs, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(p))
		if err != nil || n < 1 {
			return c, nil, nil, fmt.Errorf("-publishers %q: want positive numbers", *pubs)
		}
		c.publishers = append(c.publishers, n)
	}
	for name := range strings.SplitSeq(*impls, ",") {
		name = strings.TrimSpace(name)
		if _, ok := implementations[name]; !ok {
			return c, nil, nil, fmt.Errorf("-impls: unknown %q", name)
		}
		c.impls = append(c.impls, name)
	}
	if c.rounds < 1 || c.rooms < 1 || c.size < 1 || c.history < 1 {
		return c, nil, nil, errors.New("-rounds, -rooms, -size and -history must be positive")
	}
	return c, out, cpuprofile, nil
}

// publisher is one implementation's broker, subscribed to the rooms.
type publisher interface {
	publish(ctx context.Context, room string, data []byte) error
	close()
}

var implementations = map[string]func(ctx context.Context, c config, addr string, rooms []string) (publisher, error){
	"roomcast":   newRoomcast,
	"centrifuge": newCentrifuge,
}

type roomcastPub struct {
	client *redis.Client
	b      *redisbroker.Broker
	opts   pubsub.PublishOptions
}

func newRoomcast(ctx context.Context, c config, addr string, rooms []string) (publisher, error) {
	client := redis.NewClient(&redis.Options{Addr: addr})
	b := redisbroker.New(client, redisbroker.WithLogger(slog.New(slog.DiscardHandler)), redisbroker.WithPublishBatches(c.batches))
	b.Bind(func(pubsub.Message) {})
	p := &roomcastPub{client: client, b: b,
		opts: pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: c.history, TTL: c.historyTTL}}}
	for _, r := range rooms {
		if err := b.Subscribe(ctx, r); err != nil {
			p.close()
			return nil, err
		}
	}
	return p, nil
}

func (p *roomcastPub) publish(ctx context.Context, room string, data []byte) error {
	_, err := p.b.Publish(ctx, room, data, p.opts)
	return err
}

func (p *roomcastPub) close() {
	p.b.Close()
	p.client.Close()
}

type centrifugePub struct {
	node  *centrifuge.Node
	b     *centrifuge.RedisBroker
	shard *centrifuge.RedisShard
	opts  centrifuge.PublishOptions
}

// newCentrifuge is centrifuge's RedisBroker on one shard with its default
// settings (rueidis, pipelining every command), registered to a handler of
// its own instead of a running Node, so only the broker works.
func newCentrifuge(_ context.Context, c config, addr string, rooms []string) (publisher, error) {
	node, err := centrifuge.New(centrifuge.Config{LogLevel: centrifuge.LogLevelNone})
	if err != nil {
		return nil, err
	}
	shard, err := centrifuge.NewRedisShard(node, centrifuge.RedisShardConfig{Address: addr})
	if err != nil {
		return nil, err
	}
	b, err := centrifuge.NewRedisBroker(node, centrifuge.RedisBrokerConfig{Shards: []*centrifuge.RedisShard{shard}})
	if err != nil {
		shard.Close()
		return nil, err
	}
	p := &centrifugePub{node: node, b: b, shard: shard,
		opts: centrifuge.PublishOptions{HistorySize: c.history, HistoryTTL: c.historyTTL}}
	if err := b.RegisterBrokerEventHandler(discard{}); err != nil {
		p.close()
		return nil, err
	}
	for _, r := range rooms {
		if err := b.Subscribe(r); err != nil {
			p.close()
			return nil, err
		}
	}
	return p, nil
}

func (p *centrifugePub) publish(_ context.Context, room string, data []byte) error {
	_, _, err := p.b.Publish(room, data, p.opts)
	return err
}

func (p *centrifugePub) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = p.b.Close(ctx)
	p.shard.Close()
}

type discard struct{}

func (discard) HandlePublication(string, *centrifuge.Publication, centrifuge.StreamPosition, bool, *centrifuge.Publication) error {
	return nil
}
func (discard) HandleJoin(string, *centrifuge.ClientInfo) error  { return nil }
func (discard) HandleLeave(string, *centrifuge.ClientInfo) error { return nil }

type result struct {
	impl       string
	publishers int
	round      int
	n          int64
	took       time.Duration
	p50, p99   time.Duration
	redisCPU_  time.Duration
	goCPU      time.Duration
	calls      map[string]int64
	scriptTime time.Duration // Redis's own time in EVALSHA and EVAL, their inner calls included
	load       string
}

func (r result) rate() float64 { return float64(r.n) / r.took.Seconds() }
func (r result) redisCPU() float64 {
	return float64(r.redisCPU_.Microseconds()) / float64(max(r.n, 1))
}
func (r result) goCPUPer() float64 { return float64(r.goCPU.Microseconds()) / float64(max(r.n, 1)) }
func (r result) scriptPer() float64 {
	return float64(r.scriptTime.Nanoseconds()) / 1e3 / float64(max(r.n, 1))
}
func (r result) callsPer() float64 {
	var total int64
	for _, v := range r.calls {
		total += v
	}
	return float64(total) / float64(max(r.n, 1))
}

// measure runs one implementation with p publishers.
func measure(ctx context.Context, admin *redis.Client, c config, name string, p int) (result, error) {
	if err := admin.FlushAll(ctx).Err(); err != nil {
		return result{}, err
	}
	rooms := make([]string, c.rooms)
	for i := range rooms {
		rooms[i] = fmt.Sprintf("room-%d", i)
	}
	pub, err := implementations[name](ctx, c, admin.Options().Addr, rooms)
	if err != nil {
		return result{}, err
	}
	defer pub.close()

	data := make([]byte, c.size)
	for i := range data {
		data[i] = 'a' + byte(i%26)
	}
	var (
		next     atomic.Int64
		measured atomic.Bool
		stop     atomic.Bool
		failed   atomic.Pointer[error]
		wg       sync.WaitGroup
	)
	lats := make([][]time.Duration, p)
	for i := range p {
		lats[i] = make([]time.Duration, 0, 1<<16)
		wg.Go(func() {
			for !stop.Load() {
				room := rooms[next.Add(1)%int64(len(rooms))]
				t := time.Now()
				if err := pub.publish(ctx, room, data); err != nil {
					failed.CompareAndSwap(nil, &err)
					return
				}
				if measured.Load() {
					lats[i] = append(lats[i], time.Since(t))
				}
			}
		})
	}
	time.Sleep(c.warmup) // publishing, unmeasured
	if err := admin.ConfigResetStat(ctx).Err(); err != nil {
		stop.Store(true)
		wg.Wait()
		return result{}, err
	}
	cpu0, err := redisCPU(ctx, admin)
	if err != nil {
		stop.Store(true)
		wg.Wait()
		return result{}, err
	}
	go0 := processCPU()
	start := time.Now()
	measured.Store(true)
	time.Sleep(c.duration)
	measured.Store(false)
	took := time.Since(start)
	cpu1, err1 := redisCPU(ctx, admin)
	go1 := processCPU()
	calls, scriptTime, err2 := commandStats(ctx, admin)
	stop.Store(true)
	wg.Wait()
	if e := failed.Load(); e != nil {
		return result{}, *e
	}
	if err := errors.Join(err1, err2); err != nil {
		return result{}, err
	}
	all := slices.Concat(lats...)
	if len(all) == 0 {
		return result{}, errors.New("no publish completed")
	}
	slices.Sort(all)
	return result{impl: name, publishers: p, n: int64(len(all)), took: took,
		p50: all[len(all)/2], p99: all[len(all)*99/100],
		redisCPU_: cpu1 - cpu0, goCPU: go1 - go0, calls: calls, scriptTime: scriptTime, load: uptime()}, nil
}

func infoField(ctx context.Context, c *redis.Client, section, key string) (string, error) {
	s, err := c.Info(ctx, section).Result()
	if err != nil {
		return "", err
	}
	for line := range strings.SplitSeq(s, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), key+":"); ok {
			return v, nil
		}
	}
	return "", fmt.Errorf("INFO %s has no %s", section, key)
}

// redisCPU is the server's used_cpu_sys + used_cpu_user.
func redisCPU(ctx context.Context, c *redis.Client) (time.Duration, error) {
	var total float64
	for _, k := range []string{"used_cpu_sys", "used_cpu_user"} {
		v, err := infoField(ctx, c, "cpu", k)
		if err != nil {
			return 0, err
		}
		f, err := strconv.ParseFloat(v, 64)
		if err != nil {
			return 0, err
		}
		total += f
	}
	return time.Duration(total * float64(time.Second)), nil
}

// commandStats is INFO commandstats' calls per command, without the
// benchmark's own INFO and CONFIG, and the time Redis spent running
// scripts (usec of evalsha and eval: the scripts' own work, without the
// event loop and the sockets, which is much steadier than used_cpu on a
// busy machine).
func commandStats(ctx context.Context, c *redis.Client) (map[string]int64, time.Duration, error) {
	s, err := c.Info(ctx, "commandstats").Result()
	if err != nil {
		return nil, 0, err
	}
	out := make(map[string]int64)
	var scripts time.Duration
	for line := range strings.SplitSeq(s, "\n") {
		rest, ok := strings.CutPrefix(strings.TrimSpace(line), "cmdstat_")
		if !ok {
			continue
		}
		name, stats, _ := strings.Cut(rest, ":")
		if name == "info" || strings.HasPrefix(name, "config") {
			continue
		}
		for kv := range strings.SplitSeq(stats, ",") {
			if v, ok := strings.CutPrefix(kv, "calls="); ok {
				out[name], _ = strconv.ParseInt(v, 10, 64)
			}
			if v, ok := strings.CutPrefix(kv, "usec="); ok && (name == "evalsha" || name == "eval") {
				us, _ := strconv.ParseInt(v, 10, 64)
				scripts += time.Duration(us) * time.Microsecond
			}
		}
	}
	return out, scripts, nil
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// uptime is the load averages, as uptime prints them.
func uptime() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func report(w io.Writer, c config, rs []result, version, load0, load1 string, started time.Time) {
	fmt.Fprintf(w, "redisbench: %s UTC, redis-server %s, %d rooms, %d-byte payloads, history %d messages / %v, %v per run after %v warm-up, %d rounds, roomcast with %d publish batches in flight\n",
		started.UTC().Format("2006-01-02 15:04"), version, c.rooms, c.size, c.history, c.historyTTL, c.duration, c.warmup, c.rounds, c.batches)
	fmt.Fprintf(w, "load average (1, 5, 15 min): %s before, %s after; took %v\n\n", load0, load1, time.Since(started).Round(time.Second))
	fmt.Fprintln(w, "| implementation | publishers | round | publishes/s | p50 | p99 | Redis CPU µs/publish | Redis script µs/publish | Redis calls/publish | Go CPU µs/publish | load |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
	for _, r := range rs {
		fmt.Fprintf(w, "| %s | %d | %d | %.0f | %v | %v | %.1f | %.1f | %.1f | %.1f | %s |\n",
			r.impl, r.publishers, r.round, r.rate(), r.p50.Round(time.Microsecond), r.p99.Round(time.Microsecond),
			r.redisCPU(), r.scriptPer(), r.callsPer(), r.goCPUPer(), r.load)
	}
	if len(c.impls) < 2 {
		return
	}
	ref := c.impls[len(c.impls)-1]
	fmt.Fprintf(w, "\nMedians over the rounds, and ratios to %s:\n\n", ref)
	fmt.Fprintln(w, "| implementation | publishers | publishes/s | × rate | p50 | p99 | Redis CPU µs/publish | × Redis CPU | Redis script µs/publish | × script |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	for _, p := range c.publishers {
		med := func(name string, f func(result) float64) float64 {
			var xs []float64
			for _, r := range rs {
				if r.impl == name && r.publishers == p {
					xs = append(xs, f(r))
				}
			}
			return median(xs)
		}
		refRate, refCPU, refScript := med(ref, result.rate), med(ref, result.redisCPU), med(ref, result.scriptPer)
		for _, name := range c.impls {
			rate, cpu, script := med(name, result.rate), med(name, result.redisCPU), med(name, result.scriptPer)
			p50 := time.Duration(med(name, func(r result) float64 { return float64(r.p50) }))
			p99 := time.Duration(med(name, func(r result) float64 { return float64(r.p99) }))
			fmt.Fprintf(w, "| %s | %d | %.0f | %.2f× | %v | %v | %.1f | %.2f× | %.1f | %.2f× |\n",
				name, p, rate, rate/refRate, p50.Round(time.Microsecond), p99.Round(time.Microsecond), cpu, cpu/refCPU, script, script/refScript)
		}
	}
	fmt.Fprintln(w, "\nRedis calls per publish, by command (last round):")
	fmt.Fprintln(w)
	for _, p := range c.publishers {
		for _, name := range c.impls {
			var last result
			for _, r := range rs {
				if r.impl == name && r.publishers == p {
					last = r
				}
			}
			keys := make([]string, 0, len(last.calls))
			for k := range last.calls {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			var parts []string
			for _, k := range keys {
				parts = append(parts, fmt.Sprintf("%s %.2f", k, float64(last.calls[k])/float64(max(last.n, 1))))
			}
			fmt.Fprintf(w, "- %s, %d publishers: %s\n", name, p, strings.Join(parts, ", "))
		}
	}
}

// redisServer is the redis-server this command started.
type redisServer struct {
	addr string
	dir  string
	cmd  *exec.Cmd
}

func startRedis() (*redisServer, error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return nil, errors.New("redis-server not found in PATH (apt-get install redis-server), or pass -redis")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	dir, err := os.MkdirTemp("", "redisbench-")
	if err != nil {
		return nil, err
	}
	s := &redisServer{addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), dir: dir}
	s.cmd = exec.Command(bin, "--bind", "127.0.0.1", "--port", strconv.Itoa(port),
		"--save", "", "--appendonly", "no", "--daemonize", "no",
		"--dir", dir, "--logfile", filepath.Join(dir, "redis.log"))
	if err := s.cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := ping(s.addr)
		if err == nil {
			return s, nil
		}
		if time.Now().After(deadline) {
			s.stop()
			return nil, fmt.Errorf("redis-server on %s did not answer: %w", s.addr, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (s *redisServer) stop() {
	_ = s.cmd.Process.Kill()
	_ = s.cmd.Wait()
	os.RemoveAll(s.dir)
}

func ping(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "+PONG") {
		return fmt.Errorf("PING answered %q", line)
	}
	return nil
}
