package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"runtime"
	"runtime/debug"
	rpprof "runtime/pprof"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/roomcast/pubsub/benchmarks/internal/impl"
)

// ServerStats is what GET /control/stats reports about the server process.
type ServerStats struct {
	RSS           int64         `json:"rss"`         // resident memory, bytes (VmRSS)
	HeapInuse     uint64        `json:"heap_inuse"`  // Go heap spans in use, bytes
	StackInuse    uint64        `json:"stack_inuse"` // goroutine stacks, bytes
	Goroutines    int           `json:"goroutines"`
	CPU           time.Duration `json:"cpu"`            // user+system CPU time since start
	UserCPU       time.Duration `json:"user_cpu"`       // the user-space part of CPU
	WriteSyscalls int64         `json:"write_syscalls"` // write system calls since start
	Subscribers   int           `json:"subscribers"`
	Published     uint64        `json:"published"`
	PublishErrors uint64        `json:"publish_errors"`
	// Counters are the implementation's own counts (impl.Counters), since
	// the server started.
	Counters map[string]uint64 `json:"counters,omitempty"`
}

// PublishResult is what POST /control/publish answers once it is done.
type PublishResult struct {
	Sent   int           `json:"sent"`
	Errors int           `json:"errors"`
	Start  int64         `json:"start"` // unix nanoseconds of the first publish
	Took   time.Duration `json:"took"`
}

type server struct {
	srv       impl.Server
	published atomic.Uint64
	failed    atomic.Uint64

	profMu  sync.Mutex
	profBuf *bytes.Buffer
}

// newServerMux serves the implementation at /ws and the control endpoints:
//
//	GET  /control/stats[?gc=1][&prune=1]
//	                              ServerStats; gc=1 first runs runtime.GC and debug.FreeOSMemory,
//	                              prune=1 first lets an impl.Pruner forget closed connections
//	POST /control/publish?run=&count=&rate=&size=[&rooms=]
//	                              publishes count payloads at rate per second (0: as fast as
//	                              Publish returns) into the room "bench", and answers a
//	                              PublishResult when done; with rooms=R > 1, count payloads into
//	                              each of rooms r0…r(R-1), round-robin, at rate per second per room
//	POST /control/cpuprofile/start, /control/cpuprofile/stop (answers the profile)
//	GET  /debug/pprof/...          net/http/pprof
func newServerMux(s *server) *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("/ws", s.srv.Handler())
	mux.HandleFunc("GET /control/stats", s.stats)
	mux.HandleFunc("POST /control/publish", s.publish)
	mux.HandleFunc("POST /control/cpuprofile/start", s.profileStart)
	mux.HandleFunc("POST /control/cpuprofile/stop", s.profileStop)
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	return mux
}

func (s *server) stats(w http.ResponseWriter, r *http.Request) {
	if p, ok := s.srv.(impl.Pruner); ok && r.URL.Query().Get("prune") == "1" {
		p.Prune()
	}
	if r.URL.Query().Get("gc") == "1" {
		runtime.GC()
		debug.FreeOSMemory()
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	var counters map[string]uint64
	if c, ok := s.srv.(impl.Counters); ok {
		counters = c.Counters()
	}
	writeJSON(w, ServerStats{
		Counters:      counters,
		RSS:           rss(),
		HeapInuse:     ms.HeapInuse,
		StackInuse:    ms.StackInuse,
		Goroutines:    runtime.NumGoroutine(),
		CPU:           cpuTime(),
		UserCPU:       userCPUTime(),
		WriteSyscalls: writeSyscalls(),
		Subscribers:   s.srv.Subscribers(),
		Published:     s.published.Load(),
		PublishErrors: s.failed.Load(),
	})
}

func (s *server) publish(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	run, err1 := strconv.ParseInt(q.Get("run"), 10, 64)
	count, err2 := strconv.Atoi(q.Get("count"))
	rate, err3 := strconv.ParseFloat(q.Get("rate"), 64)
	size, err4 := strconv.Atoi(q.Get("size"))
	rooms := 1
	var err5 error
	if q.Has("rooms") {
		rooms, err5 = strconv.Atoi(q.Get("rooms"))
	}
	if err := errors.Join(err1, err2, err3, err4, err5); err != nil || count < 0 || rate < 0 || size < 0 || rooms < 1 {
		http.Error(w, "bad parameters", http.StatusBadRequest)
		return
	}
	ctx := r.Context()
	names := []string{impl.Room}
	if rooms > 1 {
		names = RoomNames(rooms)
	}
	var interval time.Duration
	if rate > 0 {
		interval = time.Duration(float64(time.Second) / (rate * float64(rooms)))
	}
	res := PublishResult{}
	buf := make([]byte, 0, size+64)
	start := time.Now()
	res.Start = start.UnixNano()
	for i := range count * rooms {
		if interval > 0 {
			if d := time.Until(start.Add(time.Duration(i) * interval)); d > 0 {
				select {
				case <-time.After(d):
				case <-ctx.Done():
					return
				}
			}
		}
		// Each publish gets its own slice: melody and the gorilla hub keep
		// the caller's bytes in their queues.
		// Room i%rooms gets its (i/rooms+1)th message: every room counts
		// its own messages from 1.
		buf = AppendPayload(buf[:0], run, int64(i/rooms+1), time.Now().UnixNano(), size)
		if err := s.srv.Publish(ctx, names[i%rooms], bytes.Clone(buf)); err != nil {
			res.Errors++
			s.failed.Add(1)
			continue
		}
		res.Sent++
		s.published.Add(1)
	}
	res.Took = time.Since(start)
	writeJSON(w, res)
}

func (s *server) profileStart(w http.ResponseWriter, _ *http.Request) {
	s.profMu.Lock()
	defer s.profMu.Unlock()
	if s.profBuf != nil {
		http.Error(w, "already profiling", http.StatusConflict)
		return
	}
	s.profBuf = new(bytes.Buffer)
	if err := rpprof.StartCPUProfile(s.profBuf); err != nil {
		s.profBuf = nil
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *server) profileStop(w http.ResponseWriter, _ *http.Request) {
	s.profMu.Lock()
	defer s.profMu.Unlock()
	if s.profBuf == nil {
		http.Error(w, "not profiling", http.StatusConflict)
		return
	}
	rpprof.StopCPUProfile()
	_, _ = w.Write(s.profBuf.Bytes())
	s.profBuf = nil
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

// ServerMain runs a benchmark server: it listens on a loopback address,
// prints {"addr":"127.0.0.1:port"} on stdout, and serves until its
// standard input ends (the driver closes it, or died) or -maxlife passes.
func ServerMain(args []string) error {
	fs := flag.NewFlagSet("benchserver", flag.ContinueOnError)
	name := fs.String("impl", "roomcast", "implementation: roomcast, melody, centrifuge, gorilla or floor")
	addr := fs.String("addr", "127.0.0.1:0", "listen address; loopback only")
	maxLife := fs.Duration("maxlife", 30*time.Minute, "exit after this long whatever happens")
	stdinExit := fs.Bool("stdin-exit", true, "exit when standard input ends")
	if err := fs.Parse(args); err != nil {
		return err
	}
	spec, err := impl.Lookup(*name)
	if err != nil {
		return err
	}
	if err := checkLoopback(*addr); err != nil {
		return err
	}
	srv, err := spec.New()
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	s := &server{srv: srv}
	hs := &http.Server{Handler: newServerMux(s)}
	go func() { _ = hs.Serve(ln) }()
	if err := json.NewEncoder(os.Stdout).Encode(map[string]string{"addr": ln.Addr().String(), "impl": spec.Name}); err != nil {
		return err
	}

	stop := make(chan struct{})
	var once sync.Once
	if *stdinExit {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			once.Do(func() { close(stop) })
		}()
	}
	select {
	case <-stop:
	case <-time.After(*maxLife):
		fmt.Fprintln(os.Stderr, "benchserver: -maxlife reached, exiting")
	}
	done := make(chan struct{})
	go func() {
		_ = srv.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = hs.Shutdown(ctx)
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		fmt.Fprintln(os.Stderr, "benchserver: close took over 10s, exiting anyway")
	}
	return nil
}

// RoomNames are the rooms of a scenario with several: r0, r1, …
func RoomNames(n int) []string {
	names := make([]string, n)
	for i := range names {
		names[i] = "r" + strconv.Itoa(i)
	}
	return names
}

// checkLoopback refuses any listen or dial address off this machine.
func checkLoopback(hostport string) error {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return err
	}
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("address %q is not a loopback address; the benchmarks only run on this machine", hostport)
	}
	return nil
}
