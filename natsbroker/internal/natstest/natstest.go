// Package natstest runs real NATS servers with JetStream inside a test
// binary: one server, or a cluster of several with routes between them,
// each on free loopback ports with its JetStream storage in a temporary
// directory. A server can be stopped and started again on the same ports
// and storage, like a restarted process.
//
// It embeds github.com/nats-io/nats-server/v2; only the broker's tests
// import it, so an application that uses the broker never builds it.
package natstest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// readyTimeout bounds how long a server may take to accept connections
// (and, in a cluster, to elect a JetStream meta leader).
const readyTimeout = 20 * time.Second

// Server is one nats-server with JetStream.
type Server struct {
	// URL is nats://127.0.0.1:port, for nats.Connect.
	URL string
	// Addr is 127.0.0.1:port, for a TCP proxy in front of the server.
	Addr string

	mu   sync.Mutex
	opts *server.Options
	srv  *server.Server
	dir  string
	own  bool // dir is the server's own, removed by Close
}

// Start starts a single server on a free loopback port, its JetStream
// storage in a new temporary directory.
func Start() (*Server, error) {
	dir, err := os.MkdirTemp("", "roomcast-nats-")
	if err != nil {
		return nil, err
	}
	s := newServer("single", dir)
	s.own = true
	if err := s.Restart(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return s, nil
}

// newServer describes a server that takes a free port when it first
// starts (the server picks it, so parallel tests never race for one), and
// keeps it when it restarts.
func newServer(name string, dir string) *Server {
	opts := &server.Options{
		ServerName: name,
		Host:       "127.0.0.1",
		Port:       server.RANDOM_PORT,
		NoLog:      true,
		NoSigs:     true,
		JetStream:  true,
		StoreDir:   dir,
		// Small and bounded: the tests' streams are tiny.
		JetStreamMaxMemory: 256 << 20,
		JetStreamMaxStore:  1 << 30,
	}
	return &Server{opts: opts, dir: dir}
}

// Restart starts the server after Stop, on the same port, with the same
// storage: what JetStream had written to disk is still there.
func (s *Server) Restart() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv != nil {
		return errors.New("natstest: the server is running")
	}
	srv, err := server.NewServer(s.opts.Clone())
	if err != nil {
		return fmt.Errorf("natstest: %w", err)
	}
	srv.Start()
	if !srv.ReadyForConnections(readyTimeout) {
		srv.Shutdown()
		srv.WaitForShutdown()
		return fmt.Errorf("natstest: nats-server %s did not accept connections", s.opts.ServerName)
	}
	if s.opts.Port == server.RANDOM_PORT {
		// Keep the ports it took, for restarts.
		s.opts.Port = srv.Addr().(*net.TCPAddr).Port
		s.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(s.opts.Port))
		s.URL = "nats://" + s.Addr
	}
	s.srv = srv
	return nil
}

// Stop shuts the server down: its connections drop, and it stops
// answering until Restart.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv == nil {
		return
	}
	s.srv.Shutdown()
	s.srv.WaitForShutdown()
	s.srv = nil
}

// Wipe deletes the server's JetStream storage. Call it between Stop and
// Restart to model a server that lost its data.
func (s *Server) Wipe() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv != nil {
		return errors.New("natstest: stop the server before wiping its storage")
	}
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(s.dir, e.Name())); err != nil {
			return err
		}
	}
	return nil
}

// Running reports whether the server is up.
func (s *Server) Running() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.srv != nil
}

// Name is the server's name.
func (s *Server) Name() string { return s.opts.ServerName }

// Close stops the server and removes its storage directory when it is
// the server's own.
func (s *Server) Close() {
	s.Stop()
	if s.own {
		os.RemoveAll(s.dir)
	}
}

// Cluster is several servers joined by routes into one JetStream cluster.
type Cluster struct {
	Servers []*Server
	dir     string
}

// StartCluster starts n servers (n >= 3 for JetStream replicas 3) joined
// by routes, and waits until each accepts connections and JetStream's
// meta leader counts all n as peers. Route ports are chosen before the
// servers start (each lists the others); should a parallel test take one
// meanwhile, the cluster starts again on others.
func StartCluster(n int) (*Cluster, error) {
	if n < 1 {
		return nil, errors.New("natstest: a cluster needs a server")
	}
	var err error
	for range 3 {
		var c *Cluster
		if c, err = startCluster(n); err == nil {
			return c, nil
		}
	}
	return nil, err
}

func startCluster(n int) (*Cluster, error) {
	dir, err := os.MkdirTemp("", "roomcast-nats-cluster-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{dir: dir}
	routePorts := make([]int, n)
	for i := range n {
		if routePorts[i], err = freePort(); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
	}
	for i := range n {
		s := newServer(fmt.Sprintf("n%d", i+1), filepath.Join(dir, fmt.Sprintf("n%d", i+1)))
		s.opts.Cluster = server.ClusterOpts{Name: "roomcast-test", Host: "127.0.0.1", Port: routePorts[i]}
		for j := range n {
			if j != i {
				s.opts.Routes = append(s.opts.Routes, server.RoutesFromStr(fmt.Sprintf("nats://127.0.0.1:%d", routePorts[j]))...)
			}
		}
		c.Servers = append(c.Servers, s)
	}
	// Start them together: a JetStream cluster waits for its peers.
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, s := range c.Servers {
		wg.Go(func() { errs[i] = s.Restart() })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		c.Close()
		return nil, err
	}
	deadline := time.Now().Add(readyTimeout)
	for !c.ready(n) {
		if time.Now().After(deadline) {
			c.Close()
			return nil, fmt.Errorf("natstest: JetStream's meta leader did not count %d peers", n)
		}
		time.Sleep(20 * time.Millisecond) // servers starting: nothing to wait on but their state
	}
	return c, nil
}

// ready reports whether JetStream has a meta leader that counts n peers.
func (c *Cluster) ready(n int) bool {
	for _, s := range c.Servers {
		s.mu.Lock()
		srv := s.srv
		s.mu.Unlock()
		if srv != nil && srv.JetStreamIsLeader() && len(srv.JetStreamClusterPeers()) == n {
			return true
		}
	}
	return false
}

// URLs lists every server's URL, comma-separated, for nats.Connect.
func (c *Cluster) URLs() string {
	var out string
	for i, s := range c.Servers {
		if i > 0 {
			out += ","
		}
		out += s.URL
	}
	return out
}

// StreamLeader returns the server that leads the stream of the account's
// JetStream, or nil.
func (c *Cluster) StreamLeader(stream string) *Server {
	for _, s := range c.Servers {
		s.mu.Lock()
		srv := s.srv
		s.mu.Unlock()
		if srv == nil {
			continue
		}
		if srv.JetStreamIsStreamLeader(server.DEFAULT_GLOBAL_ACCOUNT, stream) {
			return s
		}
	}
	return nil
}

// Close stops every server and removes their storage.
func (c *Cluster) Close() {
	var wg sync.WaitGroup
	for _, s := range c.Servers {
		wg.Go(s.Stop)
	}
	wg.Wait()
	os.RemoveAll(c.dir)
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}
