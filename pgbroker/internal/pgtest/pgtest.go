// Package pgtest runs a real, throwaway PostgreSQL server for tests: initdb
// into a temporary directory, a free loopback port, its Unix socket in the
// same directory. PostgreSQL refuses to run as root, so when the tests run
// as root (containers, CI) the server runs as the unprivileged "postgres"
// system user, which owns the directory; Close removes it.
package pgtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// ErrNotInstalled: initdb and postgres are neither in PATH nor in
// /usr/lib/postgresql/*/bin.
var ErrNotInstalled = errors.New("pgtest: initdb and postgres not found in PATH or /usr/lib/postgresql/*/bin: install PostgreSQL's server binaries (apt-get install postgresql)")

// Settings are the server settings tests use: nothing is synced to disk,
// so a crash of the machine would lose data, but a commit is written out
// before it returns (synchronous_commit stays on), so a crash of the
// server loses nothing; and room for many parallel tests' connections.
var Settings = map[string]string{
	"fsync":            "off",
	"full_page_writes": "off",
	"max_connections":  "400",
	"shared_buffers":   "64MB",
}

// Durable are the settings of a server that syncs every commit, as a
// production server does: for benchmarks.
var Durable = map[string]string{
	"max_connections": "200",
	"shared_buffers":  "128MB",
}

// Server is one PostgreSQL server. It can be stopped and started again on
// the same port with its data.
type Server struct {
	// DSN reaches the "postgres" database as the superuser "postgres" over
	// TCP on loopback, with no password.
	DSN  string
	Port int

	bin      string // the directory of initdb and postgres
	dir      string
	settings map[string]string
	cred     *syscall.Credential

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited <-chan struct{} // closed once cmd has exited
}

// binDir is where initdb and postgres are: in PATH, or else in Debian's
// /usr/lib/postgresql/<version>/bin, the newest version (the Debian
// package puts only wrappers in PATH).
func binDir() (string, error) {
	if initdb, err := exec.LookPath("initdb"); err == nil {
		if _, err := exec.LookPath("postgres"); err == nil {
			return filepath.Dir(initdb), nil
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	slices.SortFunc(dirs, func(a, b string) int {
		va, _ := strconv.Atoi(filepath.Base(filepath.Dir(a)))
		vb, _ := strconv.Atoi(filepath.Base(filepath.Dir(b)))
		return vb - va
	})
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d, nil
		}
	}
	return "", ErrNotInstalled
}

// Start initializes a cluster in a new temporary directory and starts the
// server with Settings, or with the settings given.
func Start(settings ...map[string]string) (*Server, error) {
	bin, err := binDir()
	if err != nil {
		return nil, err
	}
	removeStale()
	s := &Server{settings: Settings, bin: bin}
	if len(settings) > 0 {
		s.settings = settings[0]
	}
	if os.Geteuid() == 0 {
		if s.cred, err = postgresUser(); err != nil {
			return nil, err
		}
	}
	if s.dir, err = os.MkdirTemp("", "roomcast-pg-"); err != nil {
		return nil, err
	}
	if s.cred != nil {
		if err := os.Chown(s.dir, int(s.cred.Uid), int(s.cred.Gid)); err != nil {
			s.Close()
			return nil, err
		}
	}
	out, err := s.command(filepath.Join(bin, "initdb"), "-D", s.data(), "-U", "postgres", "-A", "trust", "-E", "UTF8",
		"--locale=C", "--no-sync", "--no-instructions").CombinedOutput()
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("pgtest: initdb: %v\n%s", err, out)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		s.Close()
		return nil, err
	}
	s.Port = ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	s.DSN = s.DSNFor("postgres")
	if err := s.Restart(); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// removeStale removes the directories of earlier servers whose process is
// gone without its test binary's cleanup (the binary was killed): the
// postmaster.pid they name is not running, or, with none, they are older
// than ten minutes (an initdb that never finished).
func removeStale() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "roomcast-pg-*"))
	for _, dir := range dirs {
		pidFile, err := os.ReadFile(filepath.Join(dir, "data", "postmaster.pid"))
		if err != nil {
			if fi, err := os.Stat(dir); err == nil && time.Since(fi.ModTime()) > 10*time.Minute {
				os.RemoveAll(dir)
			}
			continue
		}
		line, _, _ := strings.Cut(string(pidFile), "\n")
		pid, err := strconv.Atoi(strings.TrimSpace(line))
		if err != nil || pid <= 0 {
			continue
		}
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			os.RemoveAll(dir)
		}
	}
}

// postgresUser is the credential of the "postgres" system user.
func postgresUser() (*syscall.Credential, error) {
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("pgtest: running as root, PostgreSQL needs an unprivileged user: %w (create the system user postgres)", err)
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err1 != nil || err2 != nil {
		return nil, fmt.Errorf("pgtest: user postgres has uid %q gid %q", u.Uid, u.Gid)
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

// DSNFor is the DSN of database db on this server.
func (s *Server) DSNFor(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", s.Port, db)
}

func (s *Server) data() string { return filepath.Join(s.dir, "data") }

// command runs bin as the server's user, in its directory.
func (s *Server) command(bin string, args ...string) *exec.Cmd {
	cmd := exec.Command(bin, args...)
	cmd.Dir = s.dir
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred, Setpgid: true}
	return cmd
}

// start starts the server's process so that it dies with the test binary
// rather than outliving it (the parent-death signal), and returns a
// channel closed once it has exited and been waited for. The kernel sends
// that signal when the thread that forked the process ends, not the
// process, so the fork happens on a goroutine locked to its thread that
// lives as long as the server: the Go runtime never lets that thread go
// while the server runs.
func start(cmd *exec.Cmd) (exited <-chan struct{}, err error) {
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	done := make(chan struct{})
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with this goroutine, after the server
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		_ = cmd.Wait()
		close(done)
	}()
	if err := <-started; err != nil {
		return nil, err
	}
	return done, nil
}

// Restart starts the server after Stop or Crash, on the same port, with
// its data, and waits until it accepts connections.
func (s *Server) Restart() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		return errors.New("pgtest: the server is running")
	}
	args := []string{"-D", s.data(), "-p", strconv.Itoa(s.Port), "-k", s.dir, "-c", "listen_addresses=127.0.0.1"}
	for k, v := range s.settings {
		args = append(args, "-c", k+"="+v)
	}
	log, err := os.OpenFile(filepath.Join(s.dir, "postgres.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer log.Close()
	cmd := s.command(filepath.Join(s.bin, "postgres"), args...)
	cmd.Stdout, cmd.Stderr = log, log
	exited, err := start(cmd)
	if err != nil {
		return fmt.Errorf("pgtest: start postgres: %w", err)
	}
	s.cmd, s.exited = cmd, exited
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := ping(s.DSN)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			s.stopLocked(syscall.SIGKILL)
			out, _ := os.ReadFile(filepath.Join(s.dir, "postgres.log"))
			return fmt.Errorf("pgtest: postgres on port %d did not accept connections: %v\n%s", s.Port, err, out)
		}
		time.Sleep(20 * time.Millisecond) // a process starting: nothing to wait on but its port
	}
}

func ping(dsn string) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	c, err := pgconn.Connect(ctx, dsn)
	if err != nil {
		return err
	}
	return c.Close(ctx)
}

// Stop shuts the server down the way an operator's restart does (a fast
// shutdown: sessions are ended, committed data is kept) and waits for it.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopLocked(syscall.SIGINT)
}

// Crash stops the server at once, as a power cut of the database process
// would (an immediate shutdown: no checkpoint; the next start recovers
// every commit from the write-ahead log).
func (s *Server) Crash() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopLocked(syscall.SIGQUIT)
}

func (s *Server) stopLocked(sig syscall.Signal) {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Signal(sig)
	select {
	case <-s.exited:
	case <-time.After(30 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.exited
	}
	s.cmd, s.exited = nil, nil
}

// Close stops the server and removes its directory.
func (s *Server) Close() {
	s.mu.Lock()
	s.stopLocked(syscall.SIGQUIT)
	s.mu.Unlock()
	if s.dir != "" {
		os.RemoveAll(s.dir)
	}
}

// PID is the server's postmaster process id, 0 while it is stopped.
func (s *Server) PID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

// Log returns the server's log so far, for a failing test to show.
func (s *Server) Log() string {
	b, _ := os.ReadFile(filepath.Join(s.dir, "postgres.log"))
	return string(b)
}
