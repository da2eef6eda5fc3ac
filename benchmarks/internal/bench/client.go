package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
	"github.com/roomcast/pubsub/benchmarks/internal/impl"
)

// A load client process opens its connections, prints a "ready" event, then
// follows commands from its standard input, one JSON object per line:
//
//	{"cmd":"start","run":R,"count":C}  count run R's C messages from now on; answers "started"
//	{"cmd":"report"}                   answers a "report" event (ClientReport)
//	{"cmd":"close"}                    closes every connection, answers "closed" and exits
//
// Events go to standard output, one JSON object per line. The process also
// exits when its standard input ends or -maxlife passes.

// ClientReport is one client process's counts for the current run.
type ClientReport struct {
	Conns       int         `json:"conns"`       // connections opened
	Open        int         `json:"open"`        // still open
	Disconnects int         `json:"disconnects"` // closed by the server or the network, ever
	CloseCodes  map[int]int `json:"close_codes"` // those disconnects by close code (1006: no close frame)
	Run         int64       `json:"run"`
	Count       int64       `json:"count"`     // messages the run publishes
	Delivered   int64       `json:"delivered"` // run messages received, in order, once
	Reordered   int64       `json:"reordered"` // run messages received twice or out of order
	// Done counts connections that will receive no more of the run:
	// closed ones and those that got the run's last message.
	Done int `json:"done"`
	// Lost is what open connections are missing; LostClosed what closed
	// ones missed.
	Lost       int64    `json:"lost"`
	LostClosed int64    `json:"lost_closed"`
	Latency    Snapshot `json:"latency"`
	FirstRecv  int64    `json:"first_recv"` // unix nanoseconds
	LastRecv   int64    `json:"last_recv"`
	// CPU is this client process's user+system CPU time so far.
	CPU time.Duration `json:"cpu"`
}

type clientConn struct {
	ws        *websocket.Conn
	run       atomic.Int64
	received  atomic.Int64
	lastSeq   atomic.Int64
	reordered atomic.Int64
	closed    atomic.Bool
}

type pool struct {
	proto impl.Protocol
	conns []*clientConn

	run       atomic.Int64
	count     atomic.Int64
	hist      atomic.Pointer[Histogram]
	firstRecv atomic.Int64
	lastRecv  atomic.Int64

	closing atomic.Bool // closes from now on are ours, not disconnects
	mu      sync.Mutex
	codes   map[int]int
	readers sync.WaitGroup
}

func newPool(proto impl.Protocol) *pool {
	p := &pool{proto: proto, codes: map[int]int{}}
	p.hist.Store(new(Histogram))
	return p
}

var dialer = websocket.Dialer{
	HandshakeTimeout: 30 * time.Second,
	// Small buffers keep the clients, which share the machine with the
	// server, cheap; frames larger than the buffer are still read whole.
	ReadBufferSize:  1024,
	WriteBufferSize: 512,
}

// dial opens one connection and, for centrifuge, connects: the server
// subscribes it to the room before it answers the connect command.
func (p *pool) dial(ctx context.Context, u, room string) (*clientConn, error) {
	u = strings.ReplaceAll(u, impl.RoomVar, url.QueryEscape(room))
	var ws *websocket.Conn
	var err error
	for attempt := range 3 {
		ws, _, err = dialer.DialContext(ctx, u, nil)
		if err == nil || ctx.Err() != nil {
			break
		}
		time.Sleep(time.Duration(attempt+1) * 100 * time.Millisecond)
	}
	if err != nil {
		return nil, err
	}
	if p.proto == impl.Centrifuge {
		if err := centrifugeConnect(ws, room); err != nil {
			_ = ws.Close()
			return nil, err
		}
	}
	return &clientConn{ws: ws}, nil
}

func centrifugeConnect(ws *websocket.Conn, room string) error {
	cmd := []byte(`{"id":1,"connect":{}}`)
	if room != impl.Room {
		cmd, _ = json.Marshal(map[string]any{"id": 1, "connect": map[string]any{"data": map[string]string{"room": room}}})
	}
	_ = ws.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if err := ws.WriteMessage(websocket.TextMessage, cmd); err != nil {
		return err
	}
	_ = ws.SetReadDeadline(time.Now().Add(30 * time.Second))
	defer func() { _ = ws.SetReadDeadline(time.Time{}) }()
	for {
		_, m, err := ws.ReadMessage()
		if err != nil {
			return err
		}
		for line := range bytes.SplitSeq(m, []byte("\n")) {
			if !bytes.Contains(line, []byte(`"id":1`)) {
				continue
			}
			if !bytes.Contains(line, []byte(`"connect"`)) {
				return fmt.Errorf("centrifuge refused the connect: %s", line)
			}
			return nil
		}
	}
}

// read is a connection's one goroutine: it counts and times the run's
// messages until the connection closes.
func (p *pool) read(c *clientConn) {
	defer p.readers.Done()
	var buf []byte
	for {
		_, r, err := c.ws.NextReader()
		if err == nil {
			buf, err = readAll(r, buf[:0])
		}
		if err != nil {
			c.closed.Store(true)
			if !p.closing.Load() {
				code := 1006
				var ce *websocket.CloseError
				if errors.As(err, &ce) {
					code = ce.Code
				}
				p.mu.Lock()
				p.codes[code]++
				p.mu.Unlock()
			}
			_ = c.ws.Close()
			return
		}
		now := time.Now().UnixNano()
		if p.proto == impl.Centrifuge {
			for line := range bytes.SplitSeq(buf, []byte("\n")) {
				if bytes.Equal(line, []byte("{}")) {
					// The server's ping: answer it, as centrifuge clients must.
					_ = c.ws.SetWriteDeadline(time.Now().Add(10 * time.Second))
					_ = c.ws.WriteMessage(websocket.TextMessage, []byte("{}"))
					continue
				}
				p.message(c, line, now)
			}
			continue
		}
		p.message(c, buf, now)
	}
}

func readAll(r io.Reader, buf []byte) ([]byte, error) {
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			return buf, err
		}
	}
}

func (p *pool) message(c *clientConn, m []byte, now int64) {
	run, seq, t, ok := ParsePayload(m)
	if !ok || run != p.run.Load() {
		return // a reply, or a straggler of an earlier run
	}
	if c.run.Load() != run {
		c.received.Store(0)
		c.lastSeq.Store(0)
		c.reordered.Store(0)
		c.run.Store(run)
	}
	p.hist.Load().Record(time.Duration(now - t))
	if seq <= c.lastSeq.Load() {
		c.reordered.Add(1)
	} else {
		c.received.Add(1)
		c.lastSeq.Store(seq)
	}
	p.firstRecv.CompareAndSwap(0, now)
	for {
		l := p.lastRecv.Load()
		if now <= l || p.lastRecv.CompareAndSwap(l, now) {
			break
		}
	}
}

// start begins counting run's count messages.
func (p *pool) start(run, count int64) {
	p.count.Store(count)
	p.hist.Store(new(Histogram))
	p.firstRecv.Store(0)
	p.lastRecv.Store(0)
	p.run.Store(run)
}

func (p *pool) report() ClientReport {
	run, count := p.run.Load(), p.count.Load()
	r := ClientReport{Conns: len(p.conns), Run: run, Count: count, CloseCodes: map[int]int{},
		Latency: p.hist.Load().Snapshot(), FirstRecv: p.firstRecv.Load(), LastRecv: p.lastRecv.Load(), CPU: cpuTime()}
	p.mu.Lock()
	for code, n := range p.codes {
		r.CloseCodes[code] = n
		r.Disconnects += n
	}
	p.mu.Unlock()
	for _, c := range p.conns {
		closed := c.closed.Load()
		var got, last int64
		if c.run.Load() == run {
			got, last = c.received.Load(), c.lastSeq.Load()
			r.Reordered += c.reordered.Load()
		}
		r.Delivered += got
		if closed {
			r.LostClosed += count - got
			r.Done++
			continue
		}
		r.Open++
		r.Lost += count - got
		if last == count {
			r.Done++
		}
	}
	return r
}

// ClientMain runs a load client process (see the comment on ClientReport).
func ClientMain(args []string) error {
	fs := flag.NewFlagSet("loadclient", flag.ContinueOnError)
	rawURL := fs.String("url", "", "WebSocket URL to dial, ws://127.0.0.1:port/ws...; "+impl.RoomVar+" in it stands for the connection's room")
	rooms := fs.Int("rooms", 1, "with more than 1, connection i (counting from -first) joins room r(i%rooms); otherwise every connection joins \""+impl.Room+"\"")
	first := fs.Int("first", 0, "the index of this process's first connection among all processes'")
	n := fs.Int("conns", 100, "connections to open")
	proto := fs.String("proto", string(impl.Raw), "client protocol: raw or centrifuge")
	parallel := fs.Int("dial-parallel", 32, "dials in flight at once")
	maxLife := fs.Duration("maxlife", 30*time.Minute, "exit after this long whatever happens")
	if err := fs.Parse(args); err != nil {
		return err
	}
	u, err := url.Parse(strings.ReplaceAll(*rawURL, impl.RoomVar, impl.Room))
	if err != nil {
		return err
	}
	if err := checkLoopback(u.Host); err != nil {
		return err
	}
	p := newPool(impl.Protocol(*proto))
	out := &eventWriter{enc: json.NewEncoder(os.Stdout)}
	go func() {
		time.Sleep(*maxLife)
		fmt.Fprintln(os.Stderr, "loadclient: -maxlife reached, exiting")
		os.Exit(2)
	}()

	began := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	conns := make([]*clientConn, *n)
	errs := make([]error, *n)
	sem := make(chan struct{}, max(*parallel, 1))
	var wg sync.WaitGroup
	for i := range conns {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			room := impl.Room
			if *rooms > 1 {
				room = "r" + strconv.Itoa((*first+i)%*rooms)
			}
			conns[i], errs[i] = p.dial(ctx, *rawURL, room)
		})
	}
	wg.Wait()
	failed := 0
	var firstErr error
	for i, c := range conns {
		if c == nil {
			failed++
			firstErr = cmpErr(firstErr, errs[i])
			continue
		}
		p.conns = append(p.conns, c)
	}
	for _, c := range p.conns {
		p.readers.Add(1)
		go p.read(c)
	}
	ready := map[string]any{"event": "ready", "conns": len(p.conns), "failed": failed, "took": time.Since(began)}
	if firstErr != nil {
		ready["error"] = firstErr.Error()
	}
	out.write(ready)

	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		var cmd struct {
			Cmd   string `json:"cmd"`
			Run   int64  `json:"run"`
			Count int64  `json:"count"`
		}
		if err := json.Unmarshal(in.Bytes(), &cmd); err != nil {
			return fmt.Errorf("bad command %q: %v", in.Text(), err)
		}
		switch cmd.Cmd {
		case "start":
			p.start(cmd.Run, cmd.Count)
			out.write(map[string]any{"event": "started", "run": cmd.Run})
		case "report":
			out.write(struct {
				Event string `json:"event"`
				ClientReport
			}{"report", p.report()})
		case "close":
			p.closeAll()
			out.write(map[string]any{"event": "closed"})
			return nil
		default:
			return fmt.Errorf("unknown command %q", cmd.Cmd)
		}
	}
	p.closeAll()
	return nil
}

func cmpErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// closeAll closes every connection with a close frame and waits (bounded)
// for the readers to end.
func (p *pool) closeAll() {
	p.closing.Store(true)
	msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "")
	for _, c := range p.conns {
		_ = c.ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
		_ = c.ws.SetReadDeadline(time.Now().Add(2 * time.Second))
	}
	done := make(chan struct{})
	go func() { p.readers.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		for _, c := range p.conns {
			_ = c.ws.Close()
		}
	}
}

type eventWriter struct {
	mu  sync.Mutex
	enc *json.Encoder
}

func (w *eventWriter) write(v any) {
	w.mu.Lock()
	defer w.mu.Unlock()
	_ = w.enc.Encode(v)
}
