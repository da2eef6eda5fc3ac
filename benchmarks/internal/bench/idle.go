package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

// Idle connections of each kind the roomcast Handler serves, side by side:
// what one more connection that only waits costs the server. Each kind runs
// against a fresh roomcast server process (cmd/benchserver's), so nothing
// of one kind's run is left in the next one's figures.

// IdleKinds are the kinds of connection RunIdle can open. raw-ping is a
// raw WebSocket whose client has sent one ping of its own, as Python's
// websockets does every 20 s (and browsers never do).
var IdleKinds = []string{"raw", "protocol", "sse", "raw-ping"}

// IdleResult is one kind's cost per connection, from the server's
// measurements after a garbage collection, minus the same before any
// connection.
type IdleResult struct {
	Kind       string
	Conns      int
	RSS        float64 // bytes of resident memory per connection
	Heap       float64 // bytes of Go heap in use per connection
	Stack      float64 // bytes of goroutine stacks per connection
	Goroutines float64 // per connection
	Load       float64 // the machine's 1-minute load average at the end
}

// RunIdle opens conns idle connections of kind to a fresh roomcast server
// (a copy of self in the server role), waits settle, and measures.
func RunIdle(self, kind string, conns int, settle time.Duration) (IdleResult, error) {
	r := IdleResult{Kind: kind, Conns: conns}
	srv, err := startChild(self, "server", "roomcast server", "-impl", "roomcast")
	if err != nil {
		return r, err
	}
	defer srv.stop(30 * time.Second)
	var hello struct{ Addr string }
	if err := srv.next(&hello, 30*time.Second); err != nil {
		return r, err
	}
	ctl := &control{base: "http://" + hello.Addr}
	time.Sleep(settle)
	before, err := ctl.stats(true)
	if err != nil {
		return r, err
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	var closers []io.Closer
	defer func() {
		for _, c := range closers {
			_ = c.Close()
		}
	}()
	for i := range conns {
		c, err := dialIdle(ctx, kind, hello.Addr)
		if err != nil {
			return r, fmt.Errorf("%s connection %d: %v", kind, i+1, err)
		}
		closers = append(closers, c)
		wg.Go(func() { c.wait() })
	}
	if err := ctl.waitSubscribers(conns, time.Minute); err != nil {
		return r, err
	}
	time.Sleep(settle)
	after, err := ctl.stats(true)
	if err != nil {
		return r, err
	}
	n := float64(conns)
	r.RSS = float64(after.RSS-before.RSS) / n
	r.Heap = (float64(after.HeapInuse) - float64(before.HeapInuse)) / n
	r.Stack = (float64(after.StackInuse) - float64(before.StackInuse)) / n
	r.Goroutines = float64(after.Goroutines-before.Goroutines) / n
	r.Load = loadAverage()
	return r, nil
}

// idleConn is one connection that only answers what keeps it alive.
type idleConn interface {
	io.Closer
	wait() // reads until the connection ends
}

func dialIdle(ctx context.Context, kind, addr string) (idleConn, error) {
	switch kind {
	case "raw", "raw-ping":
		ws, _, err := dialer.DialContext(ctx, "ws://"+addr+"/ws?room=bench", nil)
		if err != nil {
			return nil, err
		}
		if kind == "raw-ping" {
			if err := ws.WriteControl(websocket.PingMessage, []byte("idle"), time.Now().Add(30*time.Second)); err != nil {
				ws.Close()
				return nil, err
			}
		}
		return wsIdle{ws}, nil
	case "protocol":
		d := dialer
		d.Subprotocols = []string{"roomcast.v1"}
		ws, _, err := d.DialContext(ctx, "ws://"+addr+"/ws", nil)
		if err != nil {
			return nil, err
		}
		// The welcome, then the subscription's acknowledgement.
		_ = ws.SetReadDeadline(time.Now().Add(30 * time.Second))
		if _, _, err := ws.ReadMessage(); err != nil {
			ws.Close()
			return nil, fmt.Errorf("welcome: %v", err)
		}
		if err := ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"subscribe","id":"1","room":"bench"}`)); err != nil {
			ws.Close()
			return nil, err
		}
		_, ack, err := ws.ReadMessage()
		if err != nil || !strings.Contains(string(ack), `"type":"ack"`) {
			ws.Close()
			return nil, fmt.Errorf("subscribe: %q %v", ack, err)
		}
		_ = ws.SetReadDeadline(time.Time{})
		return protocolIdle{wsIdle{ws}}, nil
	case "sse":
		c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		req, _ := http.NewRequest(http.MethodGet, "http://"+addr+"/ws?room=bench", nil)
		req.Header.Set("Accept", "text/event-stream")
		if err := req.Write(c); err != nil {
			c.Close()
			return nil, err
		}
		br := bufio.NewReaderSize(c, 512)
		_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
		resp, err := http.ReadResponse(br, req)
		if err != nil || resp.StatusCode != http.StatusOK {
			c.Close()
			return nil, fmt.Errorf("event stream: %v %v", resp, err)
		}
		_ = c.SetReadDeadline(time.Time{})
		return sseIdle{c, br}, nil
	}
	return nil, fmt.Errorf("unknown kind %q (want %s)", kind, strings.Join(IdleKinds, ", "))
}

// wsIdle reads, so gorilla answers the server's pings.
type wsIdle struct{ ws *websocket.Conn }

func (c wsIdle) Close() error { return c.ws.Close() }
func (c wsIdle) wait() {
	for {
		if _, _, err := c.ws.ReadMessage(); err != nil {
			return
		}
	}
}

// protocolIdle answers the protocol's heartbeats.
type protocolIdle struct{ wsIdle }

func (c protocolIdle) wait() {
	for {
		_, m, err := c.ws.ReadMessage()
		if err != nil {
			return
		}
		var env struct{ Type string }
		if json.Unmarshal(m, &env) == nil && env.Type == "ping" {
			_ = c.ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"pong"}`))
		}
	}
}

// sseIdle reads the stream's heartbeat comments.
type sseIdle struct {
	c  net.Conn
	br *bufio.Reader
}

func (c sseIdle) Close() error { return c.c.Close() }
func (c sseIdle) wait()        { _, _ = io.Copy(io.Discard, c.br) }
