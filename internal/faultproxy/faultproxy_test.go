package faultproxy_test

import (
	"bufio"
	"net"
	"os"
	"testing"
	"time"

	"github.com/roomcast/pubsub/internal/faultproxy"
	"github.com/roomcast/pubsub/internal/leaktest"
)

func TestMain(m *testing.M) { os.Exit(leaktest.After(m.Run())) }

// echoServer echoes every line back; it stops at cleanup.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	var conns []net.Conn
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				for _, c := range conns {
					c.Close()
				}
				return
			}
			conns = append(conns, c)
			go func() {
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						c.Close()
						return
					}
					c.Write([]byte(line))
				}
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return ln.Addr().String()
}

func start(t *testing.T) *faultproxy.Proxy {
	t.Helper()
	p, err := faultproxy.Start(echoServer(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

type line struct {
	c net.Conn
	r *bufio.Reader
}

func dial(t *testing.T, p *faultproxy.Proxy) *line {
	t.Helper()
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &line{c, bufio.NewReader(c)}
}

// roundTrip sends s and reads the echo, within d; it reports what it read
// and the read's error.
func (l *line) roundTrip(s string, d time.Duration) (string, error) {
	l.c.SetDeadline(time.Now().Add(d))
	if _, err := l.c.Write([]byte(s + "\n")); err != nil {
		return "", err
	}
	got, err := l.r.ReadString('\n')
	if len(got) > 0 {
		got = got[:len(got)-1]
	}
	return got, err
}

func TestForwardsAndCuts(t *testing.T) {
	p := start(t)
	l := dial(t, p)
	if got, err := l.roundTrip("hello", 5*time.Second); got != "hello" || err != nil {
		t.Fatalf("through the proxy: %q, %v", got, err)
	}
	p.Cut()
	if got, err := l.roundTrip("cut", 5*time.Second); err == nil {
		t.Fatalf("after Cut the connection still echoes %q", got)
	}
	if got, err := dial(t, p).roundTrip("new", 5*time.Second); err == nil {
		t.Fatalf("a connection made while cut echoes %q", got)
	}
	p.Heal()
	if got, err := dial(t, p).roundTrip("healed", 5*time.Second); got != "healed" || err != nil {
		t.Fatalf("after Heal: %q, %v", got, err)
	}
}

func TestStallHoldsBytesUntilHeal(t *testing.T) {
	p := start(t)
	l := dial(t, p)
	p.Stall()
	if got, err := l.roundTrip("held", 200*time.Millisecond); err == nil {
		t.Fatalf("a stalled link echoed %q", got)
	}
	p.Heal()
	l.c.SetDeadline(time.Now().Add(5 * time.Second))
	got, err := l.r.ReadString('\n')
	if got != "held\n" || err != nil {
		t.Fatalf("after Heal the held line arrived as %q, %v", got, err)
	}
}

func TestDropLosesBytesButKeepsTheConnection(t *testing.T) {
	p := start(t)
	l := dial(t, p)
	p.Drop()
	if got, err := l.roundTrip("lost", 200*time.Millisecond); err == nil {
		t.Fatalf("a dropping link echoed %q", got)
	}
	p.Heal()
	if got, err := l.roundTrip("after", 5*time.Second); got != "after" || err != nil {
		t.Fatalf("after Heal: %q, %v, want the new line only", got, err)
	}
}
