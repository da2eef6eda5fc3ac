package bench

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/roomcast/pubsub/benchmarks/internal/impl"
)

// TestMain lets the test binary play the server and client processes the
// scenario tests start (see RunRole).
func TestMain(m *testing.M) {
	RunRole()
	os.Exit(m.Run())
}

// tinyScenarios are the scenarios shrunk to run in seconds: the
// same shapes (an idle measurement, a throttled rate, an unthrottled flood)
// with 20 connections over two client processes.
func tinyScenarios() []Scenario {
	return []Scenario{
		{Name: "A", Title: "idle then trickle", Conns: 20, Messages: 20, Rate: 200, Size: 128, Idle: true},
		{Name: "B", Title: "rate", Conns: 20, Messages: 20, Rate: 100, Size: 128},
		{Name: "C", Title: "flood", Conns: 20, Messages: 20, Rate: 0, Size: 128},
		{Name: "D", Title: "chat", Conns: 20, Rooms: 4, Messages: 5, Rate: 20, Size: 128},
		{Name: "E", Title: "connect storm", Conns: 20, InFlight: 4},
	}
}

func TestEveryImplementationDeliversEveryMessageInEveryScenario(t *testing.T) {
	t.Parallel()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, spec := range impl.All {
		t.Run(spec.Name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			cfg := Config{Self: self, Impls: []impl.Spec{spec}, Scenarios: tinyScenarios(),
				PerProcess: 10, Settle: 10 * time.Millisecond, DrainIdle: 20 * time.Second, ProfileDir: dir}
			results := Run(cfg)
			if len(results) != len(cfg.Scenarios) {
				t.Fatalf("%d results for %d scenarios", len(results), len(cfg.Scenarios))
			}
			for i, r := range results {
				sc := cfg.Scenarios[i]
				if r.Err != "" {
					t.Fatalf("scenario %s: %s", sc.Name, r.Err)
				}
				if r.Impl != spec.Name || r.Scenario != sc.Name || r.Conns != sc.Conns {
					t.Errorf("scenario %s: result for %s/%s with %d connections", sc.Name, r.Impl, r.Scenario, r.Conns)
				}
				if sc.Messages == 0 { // the connect storm
					if r.ConnectCPU <= 0 || r.ConnectTook <= 0 || r.Published != 0 || r.Delivered != 0 {
						t.Errorf("scenario %s: connect CPU %v over %v, published %d, delivered %d",
							sc.Name, r.ConnectCPU, r.ConnectTook, r.Published, r.Delivered)
					}
					continue
				}
				want := int64(sc.Conns * sc.Messages)
				if r.Published != sc.Messages*max(sc.Rooms, 1) || r.Expected != want || r.Delivered != want {
					t.Errorf("scenario %s: published %d, delivered %d of %d", sc.Name, r.Published, r.Delivered, r.Expected)
				}
				if r.Lost != 0 || r.LostClosed != 0 || r.Reordered != 0 || r.Disconnects != 0 {
					t.Errorf("scenario %s: lost %d, lost on closed %d, reordered %d, disconnects %d",
						sc.Name, r.Lost, r.LostClosed, r.Reordered, r.Disconnects)
				}
				if !(0 < r.P50 && r.P50 <= r.P99 && r.P99 <= r.Max) {
					t.Errorf("scenario %s: latency p50 %v p99 %v max %v", sc.Name, r.P50, r.P99, r.Max)
				}
				if r.CPUPerDelivery <= 0 || r.Throughput <= 0 || r.DeliverTook <= 0 || r.WriteSyscalls <= 0 || r.ClientCPU <= 0 {
					t.Errorf("scenario %s: CPU per delivery %v, throughput %v over %v, %d write syscalls, client CPU %v",
						sc.Name, r.CPUPerDelivery, r.Throughput, r.DeliverTook, r.WriteSyscalls, r.ClientCPU)
				}
				if sc.Idle && spec.Name == "floor" && (r.GoroutinesPerConn > 0.5 || r.IdleRSS <= 0) {
					t.Errorf("scenario %s: the floor keeps %.2f goroutines per connection, idle RSS %d", sc.Name, r.GoroutinesPerConn, r.IdleRSS)
				}
				if sc.Idle && spec.Name == "roomcast" && (r.GoroutinesPerConn > 0.5 || r.IdleRSS <= 0) {
					// On Linux an idle connection parks with the poller.
					t.Errorf("scenario %s: roomcast keeps %.2f goroutines per idle connection, idle RSS %d", sc.Name, r.GoroutinesPerConn, r.IdleRSS)
				}
				if sc.Idle && spec.Name != "floor" && spec.Name != "roomcast" {
					// Every library keeps at least one goroutine and some
					// heap or stack per connection.
					if r.GoroutinesPerConn < 1 || r.HeapPerConn+r.StackPerConn <= 0 || r.IdleRSS <= 0 {
						t.Errorf("scenario %s: %.2f goroutines and %.0f B heap per connection, idle RSS %d",
							sc.Name, r.GoroutinesPerConn, r.HeapPerConn+r.StackPerConn, r.IdleRSS)
					}
				}
			}
			if spec.Name == "roomcast" {
				// The server's own counters come through (messages_out
				// may trail the clients' count by a batch, so only > 0).
				for _, r := range results {
					if r.Expected > 0 && r.Counters["messages_out"] == 0 {
						t.Errorf("scenario %s: roomcast counters %v", r.Scenario, r.Counters)
					}
				}
			}
			for _, f := range []string{"A-heap.pb.gz", "A-goroutines.txt", "A-cpu.pb.gz", "C-cpu.pb.gz"} {
				if st, err := os.Stat(filepath.Join(dir, spec.Name+"-"+f)); err != nil || st.Size() == 0 {
					t.Errorf("profile %s: %v", f, err)
				}
			}
		})
	}
}

// fakeConns gives a pool n connections without sockets, for feeding
// messages to its counting directly.
func fakeConns(p *pool, n int) []*clientConn {
	for range n {
		p.conns = append(p.conns, &clientConn{})
	}
	return p.conns
}

func TestClientCountsDeliveriesGapsDuplicatesAndClosedConnections(t *testing.T) {
	t.Parallel()
	p := newPool(impl.Raw)
	cs := fakeConns(p, 4)
	p.start(7, 3)
	now := time.Now().UnixNano()
	feed := func(c *clientConn, run int64, seqs ...int64) {
		for _, s := range seqs {
			p.message(c, AppendPayload(nil, run, s, now-int64(time.Millisecond), 64), now)
		}
	}
	feed(cs[0], 6, 1, 2)    // an earlier run's stragglers: ignored
	feed(cs[0], 7, 1, 2, 3) // everything
	feed(cs[1], 7, 1, 3)    // seq 2 lost; the last one arrived
	feed(cs[2], 7, 1)       // then closed
	cs[2].closed.Store(true)
	feed(cs[3], 7, 2, 1) // 1 arrives late: counted as reordered, not delivered
	p.message(cs[3], []byte(`{"id":1,"connect":{}}`), now)

	r := p.report()
	if r.Delivered != 3+2+1+1 {
		t.Errorf("delivered %d, want 7", r.Delivered)
	}
	if r.Lost != 0+1+2 || r.LostClosed != 2 || r.Reordered != 1 {
		t.Errorf("lost %d (want 3), lost on closed %d (want 2), reordered %d (want 1)", r.Lost, r.LostClosed, r.Reordered)
	}
	// Done: conn 0 and 1 got seq 3, conn 2 is closed; conn 3 still waits.
	if r.Done != 3 || r.Open != 3 {
		t.Errorf("done %d (want 3), open %d (want 3)", r.Done, r.Open)
	}
	if n := r.Latency.Count(); n != 8 {
		t.Errorf("%d latencies recorded, want 8 (every message of run 7)", n)
	}
	if q := r.Latency.Quantile(0.5); q < 990*time.Microsecond || q > 1010*time.Microsecond {
		t.Errorf("median latency %v, want about 1ms", q)
	}

	p.start(8, 1) // a new run starts every count afresh
	if r := p.report(); r.Delivered != 0 || r.Latency.Count() != 0 || r.Lost != 3 {
		t.Errorf("after start: delivered %d, latencies %d, lost %d; want 0, 0, 3", r.Delivered, r.Latency.Count(), r.Lost)
	}
}

func TestClientRecordsTheCloseCodeOfAServerDisconnect(t *testing.T) {
	t.Parallel()
	up := websocket.Upgrader{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer ws.Close()
		_ = ws.WriteMessage(websocket.TextMessage, AppendPayload(nil, 1, 1, time.Now().UnixNano(), 64))
		_ = ws.WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(4002, "slow consumer"))
		_, _, _ = ws.ReadMessage() // until the client's close
	}))
	t.Cleanup(srv.Close)

	p := newPool(impl.Raw)
	p.start(1, 5)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := p.dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http"), impl.Room)
	if err != nil {
		t.Fatal(err)
	}
	p.conns = append(p.conns, c)
	p.readers.Add(1)
	go p.read(c)
	done := make(chan struct{})
	go func() { p.readers.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		t.Fatal("the reader did not end after the server's close")
	}
	r := p.report()
	if r.Disconnects != 1 || r.CloseCodes[4002] != 1 || r.Open != 0 || r.Done != 1 {
		t.Errorf("disconnects %d, codes %v, open %d, done %d; want 1, {4002:1}, 0, 1", r.Disconnects, r.CloseCodes, r.Open, r.Done)
	}
	if r.Delivered != 1 || r.LostClosed != 4 {
		t.Errorf("delivered %d, lost on closed %d; want 1, 4", r.Delivered, r.LostClosed)
	}
}

func TestServersAndClientsRefuseAddressesOffThisMachine(t *testing.T) {
	t.Parallel()
	if err := ServerMain([]string{"-addr", "0.0.0.0:0"}); err == nil || !strings.Contains(err.Error(), "loopback") {
		t.Errorf("server on 0.0.0.0: %v, want a loopback error", err)
	}
	if err := ClientMain([]string{"-url", "ws://192.0.2.1:80/ws", "-conns", "1"}); err == nil || !strings.Contains(err.Error(), "loopback") {
		t.Errorf("client to 192.0.2.1: %v, want a loopback error", err)
	}
	for _, ok := range []string{"127.0.0.1:0", "localhost:8080", "[::1]:0"} {
		if err := checkLoopback(ok); err != nil {
			t.Errorf("checkLoopback(%q): %v", ok, err)
		}
	}
}

func TestPayloadIsExactlyItsSizeAndParsesBack(t *testing.T) {
	t.Parallel()
	for _, size := range []int{128, 4096} {
		b := AppendPayload([]byte("prefix"), 12, 345, 1732190000123456789, size)
		p := b[len("prefix"):]
		if len(p) != size {
			t.Errorf("size %d: payload is %d bytes", size, len(p))
		}
		run, seq, ts, ok := ParsePayload(p)
		if !ok || run != 12 || seq != 345 || ts != 1732190000123456789 {
			t.Errorf("size %d: parsed %d %d %d %v", size, run, seq, ts, ok)
		}
		push := append(append([]byte(`{"push":{"channel":"bench","pub":{"data":`), p...), "}}}"...)
		if run, seq, _, ok := ParsePayload(push); !ok || run != 12 || seq != 345 {
			t.Errorf("size %d: in a centrifuge push: %d %d %v", size, run, seq, ok)
		}
	}
	if _, _, _, ok := ParsePayload([]byte(`{"run":1,"seq":2}`)); ok {
		t.Error("a payload without t parsed")
	}
	if _, _, _, ok := ParsePayload([]byte(`{}`)); ok {
		t.Error("a centrifuge ping parsed as a payload")
	}
}

func TestHistogramQuantilesAreWithinOnePercent(t *testing.T) {
	t.Parallel()
	var a, b Histogram
	for i := 1; i <= 1000; i++ {
		h := &a
		if i%2 == 0 {
			h = &b
		}
		h.Record(time.Duration(i) * time.Millisecond)
	}
	s := a.Snapshot()
	s.Merge(b.Snapshot())
	if s.Count() != 1000 || s.Max != time.Second {
		t.Fatalf("count %d, max %v", s.Count(), s.Max)
	}
	for _, c := range []struct {
		q    float64
		want time.Duration
	}{{0.5, 500 * time.Millisecond}, {0.99, 990 * time.Millisecond}, {0.001, time.Millisecond}, {1, time.Second}} {
		got := s.Quantile(c.q)
		if d := got - c.want; d < -c.want/100 || d > c.want/100 {
			t.Errorf("quantile %g: %v, want %v ±1%%", c.q, got, c.want)
		}
	}
	for _, us := range []uint64{0, 1, 255, 256, 257, 511, 512, 1 << 20, 1<<40 + 12345} {
		low, width := bucketRange(bucketOf(us))
		if us < low || us >= low+width {
			t.Errorf("%d µs is in bucket [%d, %d)", us, low, low+width)
		}
	}
	if (Snapshot{}).Quantile(0.5) != 0 {
		t.Error("an empty histogram has a median")
	}
}

func TestReportShowsMediansOfRounds(t *testing.T) {
	t.Parallel()
	sc := []Scenario{{Name: "A", Title: "idle", Conns: 10, Messages: 2, Rate: 5, Size: 128, Idle: true}}
	var results []Result
	for i, kib := range []float64{30, 10, 20} {
		results = append(results, Result{Impl: "roomcast", Scenario: "A", Round: i + 1, Conns: 10, RSSPerConn: kib * 1024, Delivered: 20})
	}
	results[1].Note = "2 connections never got the last message"
	var buf bytes.Buffer
	WriteMarkdown(&buf, Header{}, sc, results)
	out := buf.String()
	for _, want := range []string{
		"ran 3 times",
		"| delivered | 20 of 20 / 20 of 20 / 20 of 20 |",
		"| memory per connection, RSS after GC (lower is better) | 20.00 KiB |",
		"roomcast (round 2): 2 connections never got the last message",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
}

func TestReportShowsEveryImplementationWithRatiosToTheFirst(t *testing.T) {
	t.Parallel()
	sc := []Scenario{{Name: "A", Title: "idle", Conns: 10, Messages: 2, Rate: 5, Size: 128, Idle: true},
		{Name: "C", Title: "flood", Conns: 10, Messages: 2, Size: 128}}
	results := []Result{
		{Impl: "roomcast", Scenario: "A", Conns: 10, RSSPerConn: 10 << 10, GoroutinesPerConn: 1, Delivered: 20, P50: time.Millisecond},
		{Impl: "roomcast", Scenario: "C", Conns: 10, Delivered: 20, Throughput: 1000, Published: 2},
		{Impl: "other", Scenario: "A", Conns: 10, RSSPerConn: 25 << 10, GoroutinesPerConn: 2, Delivered: 18, Lost: 2, P50: 3 * time.Millisecond},
		{Impl: "other", Scenario: "C", Err: "deliveries stopped", CloseCodes: map[int]int{4002: 3}},
	}
	var buf bytes.Buffer
	WriteMarkdown(&buf, Header{Command: "go run ./cmd/compare", Machine: Machine{CPUs: 2, CPUModel: "X"}, Rev: "commit abc1234"}, sc, results)
	out := buf.String()
	for _, want := range []string{
		"command: `go run ./cmd/compare`",
		"github.com/roomcast/pubsub (this repository, commit abc1234)",
		"2 CPUs (X)",
		"| metric | roomcast | other |",
		"| memory per connection, RSS after GC (lower is better) | 10.00 KiB | 25.00 KiB (2.50×) |",
		"| goroutines per connection | 1.00 | 2.00 (2.00×) |",
		"| latency p50 | 1.00 ms | 3.00 ms (3.00×) |",
		"| delivered | 20 of 20 | 18 of 20 |",
		"| lost on open connections | 0 | 2 |",
		"| deliveries per second (higher is better) | 1000 | – |",
		"other did not complete: deliveries stopped",
		"other close codes: map[4002:3]",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
}

func TestIdleMeasuresEveryKindOfConnection(t *testing.T) {
	t.Parallel()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, kind := range IdleKinds {
		r, err := RunIdle(self, kind, 20, 10*time.Millisecond)
		if err != nil {
			t.Fatalf("%s: %v", kind, err)
		}
		// On Linux no kind keeps a goroutine while idle: each parks with
		// the Handler's poller (one goroutine for all). Memory figures are
		// too noisy for 20 connections to check here.
		if r.Kind != kind || r.Conns != 20 || r.Goroutines > 0.1 {
			t.Errorf("%s: %+v, want 20 connections and no goroutine per connection", kind, r)
		}
	}
	if _, err := RunIdle(self, "carrier-pigeon", 1, 0); err == nil || !strings.Contains(err.Error(), "want raw, protocol, sse") {
		t.Errorf("an unknown kind: %v", err)
	}
}
