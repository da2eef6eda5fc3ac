// Command scale runs several roomcast nodes on one Redis at scale, on this
// machine, kills one of them mid-stream, and counts every message:
//
//	cd redisbroker && go run ./cmd/scale                 # about 1½ minutes
//	go run ./cmd/scale -rooms 1x500,10x50 -per-load 500  # a quick try
//
// It starts its own redis-server (no persistence, loopback), -nodes Handler
// processes (each a pubsub.Handler on redisbroker.New, history 1,000
// messages for 10 minutes, behind no sticky sessions) and load processes
// of -per-load connections each (the Go client, protocol mode, reconnect
// and recovery on). Connection i starts on node i mod -nodes; a client
// that loses its node dials the next one that answers. Rooms come in
// several sizes (-rooms: count x subscribers). Once every connection is
// subscribed, every node publishes into every room (-rate messages per
// second per room in all, shared by the nodes) for -duration; at -kill-at
// it SIGKILLs node 0. Its clients reconnect to the others and resubscribe
// from their last message. After publishing ends it waits until every
// connection has each room's last message (or -drain passes), then checks
// each connection: every message of its room exactly once, in order (none
// lost, none doubled), and reports deliveries per second, latency (publish
// to receipt, recoveries included), CPU per delivery per node, Redis's CPU
// and the recovery time of the killed node's clients. Every process it
// starts is a copy of this binary; they listen on 127.0.0.1 only and exit
// when it closes their standard input, or after -maxlife.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/client"
	"github.com/roomcast/pubsub/redisbroker"
	"github.com/roomcast/pubsub/redisbroker/internal/redistest"
)

const roleEnv = "ROOMCAST_SCALE_ROLE"

func main() {
	var err error
	switch os.Getenv(roleEnv) {
	case "node":
		err = runNode(os.Args[1:])
	case "load":
		err = runLoad(os.Args[1:])
	default:
		err = runDriver(os.Args[1:], os.Stdout, os.Stderr)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "scale:", err)
		os.Exit(1)
	}
}

// room is one room and its subscribers.
type room struct {
	Name string
	Subs int
}

func parseRooms(spec string) ([]room, error) {
	var rooms []room
	for part := range strings.SplitSeq(spec, ",") {
		count, size, ok := strings.Cut(strings.TrimSpace(part), "x")
		n, err1 := strconv.Atoi(count)
		s, err2 := strconv.Atoi(size)
		if !ok || err1 != nil || err2 != nil || n < 1 || s < 1 {
			return nil, fmt.Errorf("-rooms %q: want count x subscribers, comma-separated (1x5000,10x500)", spec)
		}
		for i := range n {
			rooms = append(rooms, room{Name: fmt.Sprintf("r%d-%d", s, i), Subs: s})
		}
	}
	return rooms, nil
}

// exitWithStdin ends the process when its parent closes its standard
// input, or after maxlife.
func exitWithStdin(maxlife time.Duration) {
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	time.AfterFunc(maxlife, func() {
		fmt.Fprintln(os.Stderr, "scale: -maxlife reached")
		os.Exit(2)
	})
}

func serveLoopback(mux *http.ServeMux) (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	go func() { _ = http.Serve(ln, mux) }()
	return ln.Addr().String(), nil
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

// ---- node ----

type nodeStats struct {
	CPU         time.Duration
	MessagesOut uint64
	Published   uint64
	Connections int
	Failed      uint64 // publishes that returned an error
}

func runNode(args []string) error {
	fs := flag.NewFlagSet("node", flag.ContinueOnError)
	addr := fs.String("redis", "", "Redis address")
	index := fs.Int("index", 0, "this node's number")
	maxlife := fs.Duration("maxlife", 10*time.Minute, "exit after this long")
	if err := fs.Parse(args); err != nil {
		return err
	}
	exitWithStdin(*maxlife)
	rdb := redis.NewClient(&redis.Options{Addr: *addr})
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
	b := redisbroker.New(rdb, redisbroker.WithLogger(log))
	h := pubsub.NewHandler(pubsub.WithBroker(b), pubsub.WithHistory(1000, 10*time.Minute),
		pubsub.WithLogger(log), pubsub.WithMaxConnectionsPerUser(0))
	var failed atomic.Uint64
	mux := http.NewServeMux()
	mux.Handle("/ws", h)
	mux.HandleFunc("/stats", func(w http.ResponseWriter, _ *http.Request) {
		s := h.Stats()
		writeJSON(w, nodeStats{CPU: processCPU(), MessagesOut: s.MessagesOut, Published: s.Published,
			Connections: s.Connections, Failed: failed.Load()})
	})
	// POST /publish?rate=R&duration=D&nodes=N with the room names, one a
	// line: publish into each at R/N per second for D.
	mux.HandleFunc("/publish", func(w http.ResponseWriter, r *http.Request) {
		rate, _ := strconv.ParseFloat(r.URL.Query().Get("rate"), 64)
		d, _ := time.ParseDuration(r.URL.Query().Get("duration"))
		nodes, _ := strconv.Atoi(r.URL.Query().Get("nodes"))
		body, _ := io.ReadAll(r.Body)
		rooms := strings.Fields(string(body))
		if rate <= 0 || d <= 0 || nodes < 1 {
			http.Error(w, "bad parameters", http.StatusBadRequest)
			return
		}
		interval := time.Duration(float64(time.Second) * float64(nodes) / rate)
		end := time.Now().Add(d)
		for i, name := range rooms {
			go func() {
				// Spread the rooms' ticks over the interval.
				time.Sleep(interval * time.Duration(i) / time.Duration(len(rooms)))
				tick := time.NewTicker(interval)
				defer tick.Stop()
				for k := 0; time.Now().Before(end); k++ {
					data := fmt.Appendf(nil, `{"t":%d,"node":%d,"k":%d}`, time.Now().UnixNano(), *index, k)
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					if err := h.Publish(ctx, name, data); err != nil {
						failed.Add(1)
					}
					cancel()
					<-tick.C
				}
			}()
		}
	})
	// POST /tops with room names: each room's newest seq and epoch.
	mux.HandleFunc("/tops", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		out := make(map[string]top)
		for _, name := range strings.Fields(string(body)) {
			res, err := b.History(r.Context(), name, pubsub.HistoryQuery{})
			if err != nil {
				http.Error(w, err.Error(), http.StatusServiceUnavailable)
				return
			}
			out[name] = top{Epoch: res.Epoch, Seq: res.Top}
		}
		writeJSON(w, out)
	})
	addr2, err := serveLoopback(mux)
	if err != nil {
		return err
	}
	fmt.Println("LISTEN", addr2)
	select {}
}

type top struct {
	Epoch string
	Seq   uint64
}

// ---- load ----

// connCount is what one connection received of its room.
type connCount struct {
	mu          sync.Mutex
	room        string
	epoch       string
	first       uint64
	last        uint64
	n           uint64
	doubled     uint64 // a seq at or below the last one
	holes       uint64 // seqs skipped
	epochs      int    // epoch changes seen
	refused     int    // recoveries refused (the messages are lost)
	recoveries  int
	recoveredAt int64 // unix ns of the last successful recovery
}

type loadStats struct {
	Conns        int
	Subscribed   int
	Deliveries   uint64
	Doubled      uint64
	Holes        uint64
	EpochChanges int
	Refused      int
	Recoveries   int
	RecoveredAt  []int64 // unix ns, one per connection that recovered
	Latency      []uint64
	CPU          time.Duration
	// Filled by /check: connections missing messages at the end.
	Behind     int
	BehindMsgs uint64
	Ahead      int
}

func runLoad(args []string) error {
	fs := flag.NewFlagSet("load", flag.ContinueOnError)
	nodeList := fs.String("nodes", "", "node addresses, comma-separated")
	roomSpec := fs.String("rooms", "", "room:connections, comma-separated")
	first := fs.Int("first", 0, "the global index of this process's first connection")
	maxlife := fs.Duration("maxlife", 10*time.Minute, "exit after this long")
	if err := fs.Parse(args); err != nil {
		return err
	}
	exitWithStdin(*maxlife)
	nodes := strings.Split(*nodeList, ",")
	var names []string
	for part := range strings.SplitSeq(*roomSpec, ",") {
		name, count, _ := strings.Cut(part, ":")
		n, _ := strconv.Atoi(count)
		for range n {
			names = append(names, name)
		}
	}
	var (
		mu    sync.Mutex
		lat   = make([]uint64, 40) // log2 buckets of µs
		conns = make([]*connCount, len(names))
		subs  atomic.Int64
	)
	for i := range conns {
		conns[i] = &connCount{room: names[i]}
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/stats", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, collect(conns, lat, &mu, int(subs.Load())))
	})
	// POST /check with the rooms' tops: how many connections lack the end.
	mux.HandleFunc("/check", func(w http.ResponseWriter, r *http.Request) {
		var tops map[string]top
		if err := json.NewDecoder(r.Body).Decode(&tops); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		s := collect(conns, lat, &mu, int(subs.Load()))
		countBehind(&s, conns, tops)
		writeJSON(w, s)
	})
	addr, err := serveLoopback(mux)
	if err != nil {
		return err
	}
	fmt.Println("LISTEN", addr)

	// Dial in parallel, a bounded number at a time.
	sem := make(chan struct{}, 64)
	var wg sync.WaitGroup
	var dialErr atomic.Pointer[error]
	for i, c := range conns {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if err := startConn(nodes, *first+i, c, lat, &mu); err != nil {
				dialErr.CompareAndSwap(nil, &err)
				return
			}
			subs.Add(1)
		})
	}
	wg.Wait()
	if e := dialErr.Load(); e != nil {
		return *e
	}
	fmt.Println("READY")
	select {}
}

func startConn(nodes []string, index int, c *connCount, lat []uint64, mu *sync.Mutex) error {
	next := index % len(nodes)
	dial := func(ctx context.Context, network, _ string) (net.Conn, error) {
		var last error
		for range nodes {
			addr := nodes[next%len(nodes)]
			conn, err := (&net.Dialer{Timeout: time.Second}).DialContext(ctx, network, addr)
			if err == nil {
				return conn, nil
			}
			last = err
			// Spread a dead node's clients over the others.
			next += 1 + (index/len(nodes))%max(len(nodes)-1, 1)
		}
		return nil, last
	}
	hc := &http.Client{Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true}}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cl, err := client.Dial(ctx, "ws://roomcast/ws", client.WithHTTPClient(hc),
		client.WithReconnect(50*time.Millisecond, time.Second),
		client.WithLogger(slog.New(slog.DiscardHandler)), client.WithBufferSize(4096))
	if err != nil {
		return err
	}
	onMsg := func(m client.Message) {
		now := time.Now().UnixNano()
		c.mu.Lock()
		switch {
		case c.epoch == "":
			c.epoch, c.first = m.Epoch, m.Seq
		case m.Epoch != c.epoch:
			c.epochs++
			c.epoch, c.first = m.Epoch, m.Seq
		case m.Seq <= c.last:
			c.doubled++
		case m.Seq > c.last+1:
			c.holes += m.Seq - c.last - 1
		}
		if m.Seq > c.last || m.Epoch != c.epoch {
			c.last = m.Seq
		}
		c.n++
		c.mu.Unlock()
		if i := strings.Index(string(m.Data), `"t":`); i >= 0 {
			rest := string(m.Data[i+4:])
			if j := strings.IndexByte(rest, ','); j > 0 {
				if t, err := strconv.ParseInt(rest[:j], 10, 64); err == nil && now > t {
					us := uint64(now-t) / 1000
					b := 0
					for us > 1 && b < len(lat)-1 {
						us >>= 1
						b++
					}
					mu.Lock()
					lat[b]++
					mu.Unlock()
				}
			}
		}
	}
	onRecover := func(r client.Recovery) {
		c.mu.Lock()
		defer c.mu.Unlock()
		c.recoveries++
		if !r.Recovered {
			c.refused++
			return
		}
		c.recoveredAt = time.Now().UnixNano()
	}
	_, err = cl.Subscribe(ctx, c.room, onMsg, client.OnRecover(onRecover))
	return err
}

func collect(conns []*connCount, lat []uint64, mu *sync.Mutex, subscribed int) loadStats {
	s := loadStats{Conns: len(conns), Subscribed: subscribed, CPU: processCPU()}
	for _, c := range conns {
		c.mu.Lock()
		s.Deliveries += c.n
		s.Doubled += c.doubled
		s.Holes += c.holes
		s.EpochChanges += c.epochs
		s.Refused += c.refused
		s.Recoveries += c.recoveries
		if c.recoveredAt != 0 {
			s.RecoveredAt = append(s.RecoveredAt, c.recoveredAt)
		}
		c.mu.Unlock()
	}
	mu.Lock()
	s.Latency = slices.Clone(lat)
	mu.Unlock()
	return s
}

// ---- driver ----

type child struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	addr  string
	lines chan string
}

func startChild(self, role string, args ...string) (*child, error) {
	cmd := exec.Command(self, args...)
	cmd.Env = append(os.Environ(), roleEnv+"="+role)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	c := &child{cmd: cmd, stdin: stdin, lines: make(chan string, 4)}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
		close(c.lines)
	}()
	line, err := c.wait("LISTEN ", 30*time.Second)
	if err != nil {
		c.stop()
		return nil, fmt.Errorf("%s: %w", role, err)
	}
	c.addr = line
	return c, nil
}

func (c *child) wait(prefix string, d time.Duration) (string, error) {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case line, ok := <-c.lines:
			if !ok {
				return "", errors.New("exited")
			}
			if rest, ok := strings.CutPrefix(line, prefix); ok {
				return rest, nil
			}
		case <-t.C:
			return "", fmt.Errorf("no %q within %v", prefix, d)
		}
	}
}

func (c *child) stop() {
	c.stdin.Close()
	done := make(chan struct{})
	go func() { _ = c.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = c.cmd.Process.Kill()
		<-done
	}
}

func getJSON(url string, v any) error {
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("%s: %s %s", url, resp.Status, b)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

func postJSON(url string, body io.Reader, v any) error {
	resp, err := http.Post(url, "text/plain", body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("%s: %s %s", url, resp.Status, b)
	}
	if v == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// driverFlags is the driver's command line.
type driverFlags struct {
	roomSpec                         string
	rooms                            []room
	nodes, perLoad                   int
	rate                             float64
	duration, killAt, drain, maxlife time.Duration
}

func parseDriverFlags(args []string, stderr io.Writer) (driverFlags, error) {
	var f driverFlags
	fs := flag.NewFlagSet("scale", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.roomSpec, "rooms", "1x5000,10x500,100x50", "rooms: count x subscribers, comma-separated")
	fs.IntVar(&f.nodes, "nodes", 3, "Handler processes")
	fs.IntVar(&f.perLoad, "per-load", 2500, "connections per load process")
	fs.Float64Var(&f.rate, "rate", 4, "messages per second per room, over all nodes")
	fs.DurationVar(&f.duration, "duration", 30*time.Second, "publishing time")
	fs.DurationVar(&f.killAt, "kill-at", 10*time.Second, "SIGKILL node 0 this long into publishing (0: never)")
	fs.DurationVar(&f.drain, "drain", 30*time.Second, "after publishing, wait at most this long for every connection to have the end")
	fs.DurationVar(&f.maxlife, "maxlife", 10*time.Minute, "every process exits after this long")
	if err := fs.Parse(args); err != nil {
		return f, err
	}
	var err error
	if f.rooms, err = parseRooms(f.roomSpec); err != nil {
		return f, err
	}
	if f.nodes < 2 {
		return f, errors.New("-nodes: want at least 2, one to kill")
	}
	return f, nil
}

func runDriver(args []string, stdout, stderr io.Writer) error {
	f, err := parseDriverFlags(args, stderr)
	if err != nil {
		return err
	}
	rooms := f.rooms
	self, err := os.Executable()
	if err != nil {
		return err
	}
	started := time.Now()
	load0 := loadavg()
	logf := func(format string, a ...any) {
		fmt.Fprintf(stderr, "%s "+format+"\n", append([]any{time.Since(started).Round(100 * time.Millisecond)}, a...)...)
	}

	srv, err := redistest.StartWith("--maxclients", "1000")
	if err != nil {
		return err
	}
	defer srv.Close()
	admin := redis.NewClient(&redis.Options{Addr: srv.Addr})
	defer admin.Close()
	ctx := context.Background()

	nodes, err := startNodes(self, f.nodes, srv.Addr, f.maxlife)
	defer func() {
		for _, n := range nodes {
			n.stop()
		}
	}()
	if err != nil {
		return err
	}
	nodeAddrs := make([]string, len(nodes))
	for i, n := range nodes {
		nodeAddrs[i] = n.addr
	}
	logf("redis %s, nodes %v", srv.Addr, nodeAddrs)

	loads, err := startLoads(self, rooms, f.perLoad, nodeAddrs, f.maxlife)
	defer func() {
		for _, l := range loads {
			l.stop()
		}
	}()
	if err != nil {
		return err
	}
	conns := 0
	for _, r := range rooms {
		conns += r.Subs
	}
	logf("%d connections subscribed in %d rooms over %d load processes", conns, len(rooms), len(loads))

	r, err := measure(ctx, f, admin, nodes, loads, logf)
	if err != nil {
		return err
	}
	r.started, r.load0 = started, load0
	return report(stdout, r)
}

// measure publishes from every node for f.duration, kills node 0 at
// f.killAt, waits for every connection to have its room's end, and
// returns what it counted.
func measure(ctx context.Context, f driverFlags, admin *redis.Client, nodes, loads []*child, logf func(string, ...any)) (run, error) {
	nodeAddrs := make([]string, len(nodes))
	for i, n := range nodes {
		nodeAddrs[i] = n.addr
	}
	names := make([]string, len(f.rooms))
	for i, r := range f.rooms {
		names[i] = r.Name
	}
	body := strings.Join(names, "\n")
	before, err := statsOfNodes(nodeAddrs, nil)
	if err != nil {
		return run{}, err
	}
	redis0, err := redisCPU(ctx, admin)
	if err != nil {
		return run{}, err
	}
	loadCPU0, err := loadsCPU(loads)
	if err != nil {
		return run{}, err
	}
	if err := admin.ConfigResetStat(ctx).Err(); err != nil {
		return run{}, err
	}
	pubStart := time.Now()
	for _, addr := range nodeAddrs {
		url := fmt.Sprintf("http://%s/publish?rate=%g&duration=%s&nodes=%d", addr, f.rate, f.duration, len(nodes))
		if err := postJSON(url, strings.NewReader(body), nil); err != nil {
			return run{}, err
		}
	}
	logf("publishing: %g messages/s per room for %v", f.rate, f.duration)

	var killed time.Time
	var atKill nodeStats
	if f.killAt > 0 && f.killAt < f.duration {
		time.Sleep(f.killAt)
		if s, err := statsOfNodes(nodeAddrs[:1], nil); err == nil {
			atKill = s[0]
		}
		killed = time.Now()
		_ = nodes[0].cmd.Process.Signal(syscall.SIGKILL)
		logf("SIGKILLed node 0 (%s), which served %d connections", nodeAddrs[0], atKill.Connections)
	}
	time.Sleep(time.Until(pubStart.Add(f.duration)))
	pubEnd := time.Now()
	live := 1
	if killed.IsZero() {
		live = 0
	}
	tops, final, err := settle(nodeAddrs[live], loads, body, f.drain, pubEnd, logf)
	if err != nil {
		return run{}, err
	}
	settled := time.Now()
	redis1, err := redisCPU(ctx, admin)
	if err != nil {
		return run{}, err
	}
	cmdstats, err := admin.Info(ctx, "commandstats").Result()
	if err != nil {
		return run{}, err
	}
	var gone *nodeStats // node 0's, as it was killed
	if !killed.IsZero() {
		gone = &atKill
	}
	after, err := statsOfNodes(nodeAddrs, gone)
	if err != nil {
		return run{}, err
	}

	return run{
		roomSpec: f.roomSpec, rooms: f.rooms, rate: f.rate, duration: f.duration, killAt: f.killAt,
		nodes: len(nodes), loads: len(loads), before: before, after: after, final: final, loadCPU0: loadCPU0, tops: tops,
		pubStart: pubStart, settled: settled, killed: killed, redisUsed: redis1 - redis0, cmdstats: cmdstats,
	}, nil
}

// topCommands lists the n commands that took Redis the most time.
func topCommands(stats string, n int) string {
	type cmd struct {
		name        string
		calls, usec int64
	}
	var cmds []cmd
	for line := range strings.SplitSeq(stats, "\n") {
		rest, ok := strings.CutPrefix(strings.TrimSpace(line), "cmdstat_")
		if !ok {
			continue
		}
		name, kv, _ := strings.Cut(rest, ":")
		c := cmd{name: name}
		for f := range strings.SplitSeq(kv, ",") {
			k, v, _ := strings.Cut(f, "=")
			switch k {
			case "calls":
				c.calls, _ = strconv.ParseInt(v, 10, 64)
			case "usec":
				c.usec, _ = strconv.ParseInt(v, 10, 64)
			}
		}
		cmds = append(cmds, c)
	}
	slices.SortFunc(cmds, func(a, b cmd) int { return int(b.usec - a.usec) })
	var parts []string
	for _, c := range cmds[:min(n, len(cmds))] {
		parts = append(parts, fmt.Sprintf("%s %d, %d", c.name, c.calls, c.usec))
	}
	return strings.Join(parts, "; ")
}

func quantile(buckets []uint64, q float64) time.Duration {
	var total uint64
	for _, n := range buckets {
		total += n
	}
	want := uint64(float64(total) * q)
	var acc uint64
	for b, n := range buckets {
		acc += n
		if acc > want {
			return time.Duration(uint64(1)<<(b+1)) * time.Microsecond
		}
	}
	return 0
}

func loadavg() string {
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

func redisCPU(ctx context.Context, c *redis.Client) (time.Duration, error) {
	s, err := c.Info(ctx, "cpu").Result()
	if err != nil {
		return 0, err
	}
	var total float64
	for line := range strings.SplitSeq(s, "\n") {
		for _, k := range []string{"used_cpu_sys:", "used_cpu_user:"} {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), k); ok {
				f, _ := strconv.ParseFloat(v, 64)
				total += f
			}
		}
	}
	return time.Duration(total * float64(time.Second)), nil
}

// dealRooms deals the rooms' connections out to load processes in order,
// perLoad each: for each process, "room:count" for the rooms it serves.
func dealRooms(rooms []room, perLoad int) [][]string {
	var slots []string
	for _, r := range rooms {
		for range r.Subs {
			slots = append(slots, r.Name)
		}
	}
	var specs [][]string
	for first := 0; first < len(slots); first += perLoad {
		chunk := slots[first:min(first+perLoad, len(slots))]
		var spec []string
		for i := 0; i < len(chunk); {
			j := i
			for j < len(chunk) && chunk[j] == chunk[i] {
				j++
			}
			spec = append(spec, fmt.Sprintf("%s:%d", chunk[i], j-i))
			i = j
		}
		specs = append(specs, spec)
	}
	return specs
}

// settle waits, at most drain, for every connection to have its room's
// last message (as the live node at nodeAddr tells them), and returns the
// rooms' last positions and each load process's final count.
func settle(nodeAddr string, loads []*child, body string, drain time.Duration, pubEnd time.Time, logf func(string, ...any)) (map[string]top, []loadStats, error) {
	deadline := time.Now().Add(drain)
	for {
		time.Sleep(500 * time.Millisecond) // polling other processes: nothing to wait on
		var tops map[string]top
		if err := postJSON("http://"+nodeAddr+"/tops", strings.NewReader(body), &tops); err != nil {
			return nil, nil, err
		}
		b, _ := json.Marshal(tops)
		var final []loadStats
		behind := 0
		for _, l := range loads {
			var s loadStats
			if err := postJSON("http://"+l.addr+"/check", bytes.NewReader(b), &s); err != nil {
				return nil, nil, err
			}
			final = append(final, s)
			behind += s.Behind
		}
		if behind == 0 || time.Now().After(deadline) {
			logf("%d connections behind the end, %v after publishing ended", behind, time.Since(pubEnd).Round(100*time.Millisecond))
			return tops, final, nil
		}
	}
}

// run is what the driver measured, for its report.
type run struct {
	started           time.Time
	load0             string
	roomSpec          string
	rooms             []room
	rate              float64
	duration, killAt  time.Duration
	nodes, loads      int
	before, after     []nodeStats // per node; a killed node's after is as it was killed
	final             []loadStats
	loadCPU0          []time.Duration
	tops              map[string]top
	pubStart, settled time.Time
	killed            time.Time // zero: no node killed
	redisUsed         time.Duration
	cmdstats          string
}

// report writes the run's table to w, and fails unless every connection
// got every message of its room exactly once, in order.
func report(w io.Writer, r run) error {
	var publishFailed uint64
	for i := range r.before {
		publishFailed += r.after[i].Failed - r.before[i].Failed
	}
	var sum loadStats
	lat := make([]uint64, 40)
	var recovered []int64
	var loadCPU time.Duration
	for i, s := range r.final {
		sum.Conns += s.Conns
		sum.Deliveries += s.Deliveries
		sum.Doubled += s.Doubled
		sum.Holes += s.Holes
		sum.EpochChanges += s.EpochChanges
		sum.Refused += s.Refused
		sum.Recoveries += s.Recoveries
		sum.Behind += s.Behind
		sum.BehindMsgs += s.BehindMsgs
		sum.Ahead += s.Ahead
		recovered = append(recovered, s.RecoveredAt...)
		loadCPU += s.CPU - r.loadCPU0[i]
		for b, n := range s.Latency {
			lat[b] += n
		}
	}
	var expected uint64
	for _, room := range r.rooms {
		expected += r.tops[room.Name].Seq * uint64(room.Subs)
	}
	window := r.settled.Sub(r.pubStart)
	fmt.Fprintf(w, "scale: %s UTC, %d nodes on one redis-server, %d connections in %d rooms (%s) over %d load processes; %g messages/s per room for %v; node 0 SIGKILLed at %v\n",
		r.started.UTC().Format("2006-01-02 15:04"), r.nodes, sum.Conns, len(r.rooms), r.roomSpec, r.loads, r.rate, r.duration, r.killAt)
	fmt.Fprintf(w, "load average (1, 5, 15 min): %s at the start, %s at the end; took %v\n\n", r.load0, loadavg(), time.Since(r.started).Round(time.Second))
	fmt.Fprintf(w, "| | |\n|---|---|\n")
	var sequenced uint64
	for _, room := range r.rooms {
		sequenced += r.tops[room.Name].Seq
	}
	fmt.Fprintf(w, "| messages sequenced (the rooms' last seqs) | %d (publishes that failed: %d) |\n", sequenced, publishFailed)
	fmt.Fprintf(w, "| deliveries expected (each room's last seq × its subscribers) | %d |\n", expected)
	fmt.Fprintf(w, "| deliveries counted | %d |\n", sum.Deliveries)
	fmt.Fprintf(w, "| lost (holes on a subscription, plus connections short of the end) | %d holes; %d connections short by %d messages |\n", sum.Holes, sum.Behind, sum.BehindMsgs)
	fmt.Fprintf(w, "| doubled | %d |\n", sum.Doubled)
	fmt.Fprintf(w, "| recoveries | %d, of which refused (reset or epoch changed) %d; epoch changes seen %d |\n", sum.Recoveries, sum.Refused, sum.EpochChanges)
	fmt.Fprintf(w, "| deliveries/s (publishing start to every connection at the end) | %.0f over %v |\n", float64(sum.Deliveries)/window.Seconds(), window.Round(100*time.Millisecond))
	p50, p99 := quantile(lat, 0.5), quantile(lat, 0.99)
	fmt.Fprintf(w, "| latency, publish to receipt (recoveries included) | p50 ≤ %v, p99 ≤ %v (log2 buckets) |\n", p50, p99)
	if !r.killed.IsZero() {
		slices.Sort(recovered)
		var after []time.Duration
		for _, t := range recovered {
			if t > r.killed.UnixNano() {
				after = append(after, time.Duration(t-r.killed.UnixNano()))
			}
		}
		if len(after) > 0 {
			fmt.Fprintf(w, "| recovery after the kill (resubscribed with the missed messages) | %d connections; p50 %v, p99 %v, last %v |\n",
				len(after), after[len(after)/2].Round(time.Millisecond), after[len(after)*99/100].Round(time.Millisecond), after[len(after)-1].Round(time.Millisecond))
		}
	}
	redisUsed := r.redisUsed
	fmt.Fprintf(w, "| Redis CPU | %v: %.2f µs per delivery, %.1f µs per message sequenced |\n", redisUsed.Round(time.Millisecond),
		float64(redisUsed.Microseconds())/float64(max(sum.Deliveries, 1)), float64(redisUsed.Microseconds())/float64(max(sequenced, 1)))
	fmt.Fprintf(w, "| Redis's busiest commands (INFO commandstats: calls, µs) | %s |\n", topCommands(r.cmdstats, 6))
	fmt.Fprintf(w, "| load processes' CPU (the clients) | %v: %.2f µs per delivery |\n", loadCPU.Round(time.Millisecond), float64(loadCPU.Microseconds())/float64(max(sum.Deliveries, 1)))
	nodeTable(w, r)
	if sum.Holes+sum.Doubled+uint64(sum.Behind)+uint64(sum.Ahead) > 0 || sum.Deliveries != expected {
		fmt.Fprintf(w, "\nNOT EXACT: %d holes, %d doubled, %d connections behind, %d ahead, %d deliveries against %d expected\n",
			sum.Holes, sum.Doubled, sum.Behind, sum.Ahead, sum.Deliveries, expected)
		return errors.New("delivery was not exact")
	}
	fmt.Fprintln(w, "\nExact: every connection got every message of its room once, in order.")
	return nil
}

// startLoads starts the load processes (perLoad connections each, dealt
// in room order) and waits until every connection is subscribed. The
// processes it started are returned even on an error, to be stopped.
func startLoads(self string, rooms []room, perLoad int, nodeAddrs []string, maxlife time.Duration) ([]*child, error) {
	var loads []*child
	for i, spec := range dealRooms(rooms, perLoad) {
		l, err := startChild(self, "load", "-nodes", strings.Join(nodeAddrs, ","), "-rooms", strings.Join(spec, ","),
			"-first", strconv.Itoa(i*perLoad), "-maxlife", maxlife.String())
		if err != nil {
			return loads, err
		}
		loads = append(loads, l)
	}
	for i, l := range loads {
		if _, err := l.wait("READY", 5*time.Minute); err != nil {
			return loads, fmt.Errorf("load %d: %w", i, err)
		}
	}
	return loads, nil
}

// loadsCPU is each load process's CPU time so far.
func loadsCPU(loads []*child) ([]time.Duration, error) {
	cpu := make([]time.Duration, len(loads))
	for i, l := range loads {
		var s loadStats
		if err := getJSON("http://"+l.addr+"/stats", &s); err != nil {
			return nil, err
		}
		cpu[i] = s.CPU
	}
	return cpu, nil
}

// startNodes starts n Handler processes on the Redis at redisAddr. The
// processes it started are returned even on an error, to be stopped.
func startNodes(self string, n int, redisAddr string, maxlife time.Duration) ([]*child, error) {
	var nodes []*child
	for i := range n {
		c, err := startChild(self, "node", "-redis", redisAddr, "-index", strconv.Itoa(i), "-maxlife", maxlife.String())
		if err != nil {
			return nodes, err
		}
		nodes = append(nodes, c)
	}
	return nodes, nil
}

// statsOfNodes asks each node for its counters; with gone, node 0 was
// killed and gone is what it said last.
func statsOfNodes(nodeAddrs []string, gone *nodeStats) ([]nodeStats, error) {
	stats := make([]nodeStats, len(nodeAddrs))
	for i, addr := range nodeAddrs {
		if i == 0 && gone != nil {
			stats[i] = *gone
			continue
		}
		if err := getJSON("http://"+addr+"/stats", &stats[i]); err != nil {
			return nil, err
		}
	}
	return stats, nil
}

// nodeTable writes each node's share of the work.
func nodeTable(w io.Writer, r run) {
	fmt.Fprintf(w, "\n| node | connections at the end | deliveries written | CPU | CPU per delivery |\n|---|---:|---:|---:|---:|\n")
	for i := range r.after {
		out := r.after[i].MessagesOut - r.before[i].MessagesOut
		cpu := r.after[i].CPU - r.before[i].CPU
		note := ""
		if !r.killed.IsZero() && i == 0 {
			note = " (until SIGKILL)"
		}
		fmt.Fprintf(w, "| %d%s | %d | %d | %v | %.2f µs |\n", i, note, r.after[i].Connections, out, cpu.Round(time.Millisecond),
			float64(cpu.Microseconds())/float64(max(out, 1)))
	}
}

// countBehind counts in s the connections short of their room's last
// message (tops), and by how many messages, and those past it.
func countBehind(s *loadStats, conns []*connCount, tops map[string]top) {
	for _, c := range conns {
		c.mu.Lock()
		t := tops[c.room]
		switch {
		case c.epoch != t.Epoch || c.last < t.Seq:
			s.Behind++
			if c.epoch == t.Epoch {
				s.BehindMsgs += t.Seq - c.last
			} else {
				s.BehindMsgs += t.Seq
			}
		case c.last > t.Seq:
			s.Ahead++
		}
		c.mu.Unlock()
	}
}
