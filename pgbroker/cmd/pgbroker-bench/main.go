// Command pgbroker-bench measures the PostgreSQL broker's publish path side
// by side with the bare floor of the same server, in one run: single-row
// INSERT transactions (autocommit: INSERT; COMMIT) at the same concurrency.
//
//	cd pgbroker && go run ./cmd/pgbroker-bench                  # a throwaway server (durable settings)
//	cd pgbroker && go run ./cmd/pgbroker-bench -postgres 'postgres://…'
//
// Scenarios, each after a warm-up, over 100 rooms with 64-byte payloads:
//
//   - floor: P goroutines, each on its own pooled connection, insert one
//     row per transaction into a plain table; publishes/s is commits/s,
//     and the latency is the INSERT's round trip.
//   - roomcast: P goroutines call Publish on node A (history 100 per room);
//     node B, a second broker on the same database subscribed to every
//     room, delivers; the latency is from the call to Publish to node B's
//     delivery (the payload carries the time it was published).
//   - roomcast at a fixed rate: publishes spread evenly at -rate per
//     second; the latency's p99 is what matters.
//   - the sweep: rows a sweep call deletes per second, trimming 100 rooms
//     with -trim messages beyond their bounds each.
//
// With no -postgres it starts its own server with pgtest.Durable settings
// (fsync and synchronous_commit on, like a production server) and removes
// it afterwards. The host's load matters: run it on a quiet machine.
package main

import (
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"log/slog"
	"math"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/pgbroker"
	"github.com/roomcast/pubsub/pgbroker/internal/pgtest"
)

const (
	rooms       = 100
	payloadSize = 64
)

func main() {
	dsn := flag.String("postgres", "", "PostgreSQL URL; empty starts a throwaway server")
	dur := flag.Duration("d", 5*time.Second, "how long each scenario measures")
	warm := flag.Duration("warmup", time.Second, "how long each scenario runs before measuring")
	rate := flag.Int("rate", 1000, "publishes per second of the fixed-rate scenario (0 skips it)")
	conns := flag.Int("publish-conns", pgbroker.DefaultPublishConns, "the broker's WithPublishConns")
	pubs := flag.String("publishers", "1,16", "the publisher counts to measure")
	trim := flag.Int("trim", 1000, "messages beyond its bounds per room for the sweep scenario (0 skips it)")
	breakdown := flag.Bool("breakdown", false, "after each broker scenario, print where PostgreSQL's CPU went: per server process (labelled by node and last query) and per function (pg_stat_user_functions)")
	flag.BoolVar(&selfSubscribe, "self", false, "node A, which publishes, also subscribes to every room (a node serving the rooms it publishes to)")
	profile := flag.String("cpuprofile", "", "write this process's CPU profile (both nodes and the publishers) to the file")
	flag.Parse()
	if *profile != "" {
		f, err := os.Create(*profile)
		if err != nil {
			fail(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fail(err)
		}
		defer pprof.StopCPUProfile()
	}

	if *dsn == "" {
		srv, err := pgtest.Start(pgtest.Durable)
		if err != nil {
			fail(err)
		}
		defer srv.Close()
		*dsn = srv.DSN
		postmaster = srv.PID()
	}
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, *dsn+sep(*dsn)+"pool_max_conns=40")
	if err != nil {
		fail(err)
	}
	defer pool.Close()
	if *breakdown {
		breakdownPool = pool
	}
	var version string
	pool.QueryRow(ctx, "SHOW server_version").Scan(&version)
	var fsync, sync string
	pool.QueryRow(ctx, "SHOW fsync").Scan(&fsync)
	pool.QueryRow(ctx, "SHOW synchronous_commit").Scan(&sync)
	fmt.Printf("PostgreSQL %s (fsync %s, synchronous_commit %s), %s, GOMAXPROCS %d, %d rooms, %d-byte payloads, %v per scenario after %v warm-up, publish conns %d\n\n",
		version, fsync, sync, runtime.Version(), runtime.GOMAXPROCS(0), rooms, payloadSize, *dur, *warm, *conns)

	fmt.Println("| scenario | publishers | publishes/s | vs floor | p50 ms | p99 ms | CPU µs/publish: Go + PostgreSQL |")
	fmt.Println("|---|---:|---:|---:|---:|---:|---:|")
	for _, f := range strings.Split(*pubs, ",") {
		var p int
		if _, err := fmt.Sscan(f, &p); err != nil || p < 1 {
			continue // -publishers "" measures only the fixed rate
		}
		floor := runFloor(ctx, pool, p, *warm, *dur)
		row("floor: INSERT; COMMIT", p, floor, floor.rate)
		rc := runRoomcast(ctx, *dsn, p, 0, *conns, *warm, *dur)
		row("roomcast Publish → delivery on another node", p, rc, floor.rate)
	}
	if *rate > 0 {
		fixed := runRoomcast(ctx, *dsn, 16, *rate, *conns, *warm, *dur)
		row(fmt.Sprintf("roomcast at %d/s → delivery on another node", *rate), 16, fixed, 0)
	}
	if *trim > 0 {
		fmt.Println()
		runSweep(ctx, *dsn, *trim)
	}
}

func sep(dsn string) string {
	if strings.Contains(dsn, "?") {
		return "&"
	}
	return "?"
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "pgbroker-bench:", err)
	os.Exit(1)
}

type result struct {
	rate     float64
	p50, p99 time.Duration
	errors   int64
	goCPU    time.Duration // CPU time of this process per publish
	pgCPU    time.Duration // CPU time of the server's processes per publish; 0 when unknown
}

func row(name string, publishers int, r result, floor float64) {
	vs := ""
	if floor > 0 {
		vs = fmt.Sprintf("%.2f×", r.rate/floor)
	}
	errs := ""
	if r.errors > 0 {
		errs = fmt.Sprintf(" (%d errors)", r.errors)
	}
	cpu := fmt.Sprintf("%d + –", r.goCPU.Microseconds())
	if r.pgCPU > 0 {
		cpu = fmt.Sprintf("%d + %d = %d", r.goCPU.Microseconds(), r.pgCPU.Microseconds(), (r.goCPU + r.pgCPU).Microseconds())
	}
	fmt.Printf("| %s%s | %d | %.0f | %s | %.2f | %.2f | %s |\n", name, errs, publishers, r.rate, vs,
		float64(r.p50.Microseconds())/1000, float64(r.p99.Microseconds())/1000, cpu)
}

// recorder collects latencies once measuring started.
type recorder struct {
	measuring atomic.Bool
	mu        sync.Mutex
	d         []time.Duration
}

func (r *recorder) add(d time.Duration) {
	if !r.measuring.Load() {
		return
	}
	r.mu.Lock()
	r.d = append(r.d, d)
	r.mu.Unlock()
}

func (r *recorder) quantiles() (p50, p99 time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.d) == 0 {
		return 0, 0
	}
	slices.Sort(r.d)
	q := func(p float64) time.Duration { return r.d[int(math.Ceil(p*float64(len(r.d))))-1] }
	return q(0.50), q(0.99)
}

// drive runs publishers goroutines calling publish for warm then dur and
// returns the rate of successful calls during dur. With rate > 0 the
// calls are paced to rate per second in all.
func drive(publishers, rate int, warm, dur time.Duration, lat *recorder, publish func(i int64) error) result {
	var (
		n, errs atomic.Int64
		stop    atomic.Bool
		wg      sync.WaitGroup
		next    atomic.Int64
	)
	start := time.Now()
	for range publishers {
		wg.Go(func() {
			for !stop.Load() {
				i := next.Add(1)
				if rate > 0 {
					due := start.Add(time.Duration(i) * time.Second / time.Duration(rate))
					if d := time.Until(due); d > 0 {
						time.Sleep(d)
					}
				}
				if err := publish(i); err != nil {
					errs.Add(1)
					continue
				}
				if lat.measuring.Load() {
					n.Add(1)
				}
			}
		})
	}
	time.Sleep(warm)
	lat.measuring.Store(true)
	measureFrom := time.Now()
	goFrom, pgFrom := cpuTime()
	var (
		tb map[int]int64
		fb map[string]funcStat
	)
	if breakdownPool != nil {
		tb, fb = pidTicks(), funcStats()
	}
	time.Sleep(dur)
	lat.measuring.Store(false)
	got := n.Load()
	elapsed := time.Since(measureFrom)
	goTo, pgTo := cpuTime()
	if breakdownPool != nil && got > 0 {
		printBreakdown(tb, pidTicks(), fb, got)
	}
	stop.Store(true)
	wg.Wait()
	p50, p99 := lat.quantiles()
	res := result{rate: float64(got) / elapsed.Seconds(), p50: p50, p99: p99, errors: errs.Load()}
	if got > 0 {
		res.goCPU = (goTo - goFrom) / time.Duration(got)
		res.pgCPU = (pgTo - pgFrom) / time.Duration(got)
	}
	return res
}

// postmaster is the pid of the server this command started; 0 with
// -postgres, whose CPU time it cannot see.
var postmaster int

// cpuTime is the CPU time (user and system) used so far by this process
// and by the server's processes, read from /proc (Linux).
func cpuTime() (self, server time.Duration) {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) == nil {
		self = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	if postmaster == 0 {
		return self, 0
	}
	var total time.Duration
	for _, ticks := range pidTicks() {
		total += time.Duration(ticks) * time.Second / clockTicks
	}
	return self, total
}

// clockTicks is the kernel's USER_HZ, the unit of /proc/<pid>/stat times.
const clockTicks = 100

func payload() []byte {
	b := binary.BigEndian.AppendUint64(make([]byte, 0, payloadSize), uint64(time.Now().UnixNano()))
	return append(b, make([]byte, payloadSize-8)...)
}

func runFloor(ctx context.Context, pool *pgxpool.Pool, publishers int, warm, dur time.Duration) result {
	if _, err := pool.Exec(ctx, `DROP TABLE IF EXISTS bench_floor;
		CREATE TABLE bench_floor (id bigserial PRIMARY KEY, room text NOT NULL, at timestamptz NOT NULL DEFAULT now(), data bytea NOT NULL)`); err != nil {
		fail(err)
	}
	lat := &recorder{}
	return drive(publishers, 0, warm, dur, lat, func(i int64) error {
		start := time.Now()
		_, err := pool.Exec(ctx, `INSERT INTO bench_floor (room, data) VALUES ($1, $2)`, fmt.Sprint("room-", i%rooms), payload())
		lat.add(time.Since(start))
		return err
	})
}

// selfSubscribe: node A subscribes to every room too (-self).
var selfSubscribe bool

// nodes counts the broker nodes started, to name their connections
// (application_name node0, node1, ...) for -breakdown.
var nodes int

func runRoomcast(ctx context.Context, dsn string, publishers, rate, conns int, warm, dur time.Duration) result {
	schema := fmt.Sprintf("bench_%d", time.Now().UnixNano()%1e9)
	quiet := slog.New(slog.DiscardHandler)
	node := func(deliver func(pubsub.Message)) (*pgbroker.Broker, *pgxpool.Pool) {
		conf := fmt.Sprintf("pool_max_conns=20&application_name=node%d", nodes)
		if breakdownPool != nil {
			conf += "&options=-c%20track_functions%3Dpl" // time each function
		}
		nodes++
		pool, err := pgxpool.New(ctx, dsn+sep(dsn)+conf)
		if err != nil {
			fail(err)
		}
		b, err := pgbroker.New(ctx, pool, pgbroker.WithSchema(schema), pgbroker.WithLogger(quiet), pgbroker.WithPublishConns(conns))
		if err != nil {
			fail(err)
		}
		b.Bind(deliver)
		return b, pool
	}
	lat := &recorder{}
	a, pa := node(func(pubsub.Message) {})
	b, pb := node(func(m pubsub.Message) {
		if m.Kind == pubsub.KindMessage && len(m.Data) >= 8 {
			lat.add(time.Since(time.Unix(0, int64(binary.BigEndian.Uint64(m.Data)))))
		}
	})
	defer func() {
		a.Close()
		b.Close()
		pa.Close()
		pb.Close()
		drop, err := pgxpool.New(ctx, dsn)
		if err == nil {
			drop.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
			drop.Close()
		}
	}()
	for r := range rooms {
		if err := b.Subscribe(ctx, fmt.Sprint("room-", r)); err != nil {
			fail(err)
		}
		if !selfSubscribe {
			continue
		}
		if err := a.Subscribe(ctx, fmt.Sprint("room-", r)); err != nil {
			fail(err)
		}
	}
	h := pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: 100, TTL: time.Minute}}
	return drive(publishers, rate, warm, dur, lat, func(i int64) error {
		_, err := a.Publish(ctx, fmt.Sprint("room-", i%rooms), payload(), h)
		return err
	})
}

// runSweep fills 100 rooms with trim messages beyond their bound (10) and
// times the sweeps that delete them.
func runSweep(ctx context.Context, dsn string, trim int) {
	schema := fmt.Sprintf("bench_sweep_%d", time.Now().UnixNano()%1e9)
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		fail(err)
	}
	defer pool.Close()
	b, err := pgbroker.New(ctx, pool, pgbroker.WithSchema(schema), pgbroker.WithLogger(slog.New(slog.DiscardHandler)),
		pgbroker.WithDeliveryWindow(100*time.Millisecond), pgbroker.WithPollInterval(20*time.Millisecond))
	if err != nil {
		fail(err)
	}
	defer func() {
		pool.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE")
	}()
	h := pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: 10, TTL: time.Hour}}
	var wg sync.WaitGroup
	for r := range rooms {
		wg.Go(func() {
			for range trim + 10 {
				if _, err := b.Publish(ctx, fmt.Sprint("room-", r), payload(), h); err != nil {
					fail(err)
				}
			}
		})
	}
	wg.Wait()
	time.Sleep(200 * time.Millisecond) // past the delivery window
	start := time.Now()
	var total pgbroker.SweepStats
	for {
		s, err := b.Sweep(ctx)
		if err != nil {
			fail(err)
		}
		total.Trimmed += s.Trimmed
		total.Rooms += s.Rooms
		if s.Trimmed == 0 {
			break
		}
	}
	el := time.Since(start)
	var left int
	pool.QueryRow(ctx, "SELECT count(*) FROM "+schema+".messages").Scan(&left)
	fmt.Printf("sweep: %d rows beyond the bounds of %d rooms deleted in %v (%.0f rows/s, batched per room); %d rows left (10 per room)\n",
		total.Trimmed, rooms, el.Round(time.Millisecond), float64(total.Trimmed)/el.Seconds(), left)
	b.Close()
}
