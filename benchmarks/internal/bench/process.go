package bench

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"time"
)

// RoleEnv names the role a re-executed copy of the driver's binary plays:
// "server" or "client". The driver starts its servers and clients as copies
// of itself, so `go run ./cmd/compare` needs no build step and the tests
// exercise the same processes.
const RoleEnv = "ROOMCAST_BENCH_ROLE"

// RunRole runs ServerMain or ClientMain and exits when this process was
// started as one; otherwise it returns at once. Call it first in main (and
// in TestMain).
func RunRole() {
	var err error
	switch os.Getenv(RoleEnv) {
	case "":
		return
	case "server":
		err = ServerMain(os.Args[1:])
	case "client":
		err = ClientMain(os.Args[1:])
	default:
		err = fmt.Errorf("unknown %s %q", RoleEnv, os.Getenv(RoleEnv))
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", os.Getenv(RoleEnv), err)
		os.Exit(1)
	}
	os.Exit(0)
}

// child is a server or client process driven over its stdin and stdout.
type child struct {
	name   string
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan []byte
	exited chan struct{}
	err    error // Wait's result; read after exited is closed
}

func startChild(self, role, name string, args ...string) (*child, error) {
	cmd := exec.Command(self, args...)
	cmd.Env = append(os.Environ(), RoleEnv+"="+role)
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
	c := &child{name: name, cmd: cmd, stdin: stdin, lines: make(chan []byte, 16), exited: make(chan struct{})}
	go func() {
		s := bufio.NewScanner(stdout)
		s.Buffer(make([]byte, 64<<10), 64<<20)
		for s.Scan() {
			c.lines <- append([]byte(nil), s.Bytes()...)
		}
		close(c.lines)
		c.err = cmd.Wait()
		close(c.exited)
	}()
	return c, nil
}

// next decodes the child's next output line into v.
func (c *child) next(v any, timeout time.Duration) error {
	select {
	case line, ok := <-c.lines:
		if !ok {
			<-c.exited
			return fmt.Errorf("%s exited: %v", c.name, c.err)
		}
		if err := json.Unmarshal(line, v); err != nil {
			return fmt.Errorf("%s said %q: %v", c.name, line, err)
		}
		return nil
	case <-time.After(timeout):
		return fmt.Errorf("%s said nothing for %v", c.name, timeout)
	}
}

func (c *child) send(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = c.stdin.Write(append(b, '\n'))
	return err
}

// stop closes the child's stdin, which tells it to exit, and kills it if
// it has not within timeout.
func (c *child) stop(timeout time.Duration) error {
	_ = c.stdin.Close()
	go func() {
		for range c.lines { // keep the pipe drained while it exits
		}
	}()
	select {
	case <-c.exited:
	case <-time.After(timeout):
		_ = c.cmd.Process.Kill()
		<-c.exited
		return fmt.Errorf("%s did not exit within %v; killed", c.name, timeout)
	}
	var ee *exec.ExitError
	if errors.As(c.err, &ee) {
		return fmt.Errorf("%s: %v", c.name, c.err)
	}
	return nil
}
