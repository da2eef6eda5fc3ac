// Package faultproxy is a TCP proxy for failure tests: it forwards every
// connection it accepts to one target, and on demand cuts its connections,
// stalls them, or drops what they carry, so a test can break the link
// between a node and its backend (Redis, PostgreSQL, NATS) or between a
// client and a server, and heal it again. It listens on loopback only.
package faultproxy

import (
	"net"
	"sync"
)

type state uint8

const (
	forwarding state = iota
	cut              // connections closed, new ones closed at once
	stalled          // nothing forwarded; bytes wait (TCP pushes back)
	dropping         // bytes read and thrown away; connections stay open
)

// Proxy forwards connections from Addr to a target.
type Proxy struct {
	ln net.Listener

	mu      sync.Mutex
	target  string
	state   state
	changed chan struct{} // closed and replaced on every state change
	conns   map[net.Conn]struct{}
	closed  bool

	wg sync.WaitGroup // the accept loop and every pipe
}

// Start listens on a free loopback port and forwards to target.
func Start(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{target: target, ln: ln, changed: make(chan struct{}), conns: make(map[net.Conn]struct{})}
	p.wg.Go(p.accept)
	return p, nil
}

// Addr is the proxy's address, host:port, to dial instead of the target.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Cut closes every connection and closes new ones as soon as they are
// accepted, until Heal: the target is unreachable.
func (p *Proxy) Cut() {
	p.set(cut)
	p.mu.Lock()
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
}

// Stall stops forwarding in both directions without losing a byte, until
// Heal: a link that lags. Connections stay open and new ones are accepted.
func (p *Proxy) Stall() { p.set(stalled) }

// Drop throws away every byte both ways, until Heal, while connections
// stay open: a network that loses packets, seen by the peers only as
// silence (and, after Heal, as a corrupt stream or a timeout).
func (p *Proxy) Drop() { p.set(dropping) }

// Heal forwards again.
func (p *Proxy) Heal() { p.set(forwarding) }

// SetTarget sends the connections accepted from now on to target: a
// client that reconnects reaches another server, as behind a load
// balancer. Connections already forwarded keep theirs.
func (p *Proxy) SetTarget(target string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.target = target
}

// Close stops the proxy: the listener and every connection close, and
// Close returns once all of its goroutines have ended.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closed = true
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	err := p.ln.Close()
	p.set(cut) // wakes stalled pipes
	p.wg.Wait()
	return err
}

func (p *Proxy) set(s state) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.state = s
	close(p.changed)
	p.changed = make(chan struct{})
}

func (p *Proxy) current() (state, <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.state, p.changed
}

func (p *Proxy) accept() {
	for {
		down, err := p.ln.Accept()
		if err != nil {
			return // closed
		}
		p.mu.Lock()
		st, target := p.state, p.target
		p.mu.Unlock()
		if st == cut {
			down.Close()
			continue
		}
		up, err := net.Dial("tcp", target)
		if err != nil {
			down.Close()
			continue
		}
		if !p.track(down, up) {
			down.Close()
			up.Close()
			return
		}
		p.wg.Go(func() { p.pipe(up, down) })
		p.wg.Go(func() { p.pipe(down, up) })
	}
}

// track registers a connection pair, unless the proxy is closed.
func (p *Proxy) track(cs ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	for _, c := range cs {
		p.conns[c] = struct{}{}
	}
	return true
}

func (p *Proxy) untrack(cs ...net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range cs {
		delete(p.conns, c)
		c.Close()
	}
}

// pipe copies src to dst under the proxy's state until either side ends;
// then it closes both, which ends the opposite pipe too.
func (p *Proxy) pipe(dst, src net.Conn) {
	defer p.untrack(dst, src)
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !p.forward(dst, buf[:n]) {
			return
		}
		if err != nil {
			return // EOF, or a side closed
		}
	}
}

// forward writes b to dst when the state allows, waiting while stalled. It
// reports whether the pipe goes on.
func (p *Proxy) forward(dst net.Conn, b []byte) bool {
	for {
		s, changed := p.current()
		switch s {
		case forwarding:
			_, err := dst.Write(b)
			return err == nil
		case dropping:
			return true
		case stalled:
			<-changed
		default: // cut
			return false
		}
	}
}
