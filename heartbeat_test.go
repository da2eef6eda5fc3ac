package pubsub_test

import (
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// Heartbeats and idle timeouts (conn.go): protocol mode's ping and pong
// envelopes, raw mode's WebSocket pings, 4001 for a client that shows no
// life, 4005 for one that stays quiet past WithIdleTimeout.

// rawFrame is one result of a background read.
type rawFrame struct {
	binary bool
	data   []byte
	err    error
}

// readLoop keeps a read pending on c, so that the client answers the
// server's pings, and hands every frame, then the error that ended
// reading, to the returned channel. Cleanup stops it.
func readLoop(t *testing.T, c *pubsubtest.RawConn) <-chan rawFrame {
	out := make(chan rawFrame)
	done := make(chan struct{})
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		for {
			binary, b, err := c.TryRead()
			select {
			case out <- rawFrame{binary, b, err}:
			case <-done:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() {
		close(done)
		c.CloseNow()
		<-exited
	})
	return out
}

// nextText takes the next frame of a readLoop and expects text want.
func nextText(t *testing.T, frames <-chan rawFrame, want string) {
	t.Helper()
	f := pubsubtest.Receive(t, frames, "a frame")
	if f.err != nil {
		t.Fatalf("read: %v, want text %q", f.err, want)
	}
	if f.binary || string(f.data) != want {
		t.Fatalf("read %q (binary %v), want text %q", f.data, f.binary, want)
	}
}

// ---- Protocol mode ----

func TestProtocolServerSendsPingEnvelopeEveryInterval(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithHeartbeat(20*time.Millisecond, time.Second))
	p := srv.Dial("/ws")
	for range 3 {
		p.Ping()
		p.Send(`{"type":"pong"}`)
	}
	if n := p.Buffered(); n != 0 {
		t.Fatalf("%d envelopes came between the pings, want none: %s", n, p.Next())
	}
}

func TestProtocolClientPingGetsPong(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	p := srv.Dial("/ws")
	p.Send(`{"type":"ping"}`)
	expectPong(t, p)
	// A client pong is not answered: the next frame is the next ping's pong.
	p.Send(`{"type":"pong"}`)
	p.Send(`{"type":"ping"}`)
	expectPong(t, p)
}

// TestProtocolClientShowingLifeStaysOpen: a client that answers each ping
// (with a pong, or with any other message) outlives many times the
// interval+timeout a silent client gets (see the next test).
func TestProtocolClientShowingLifeStaysOpen(t *testing.T) {
	t.Parallel()
	// The timeout is generous so a loaded machine (a pong late by most of
	// a second) cannot fail a healthy client; 160 pings still span about
	// three times the interval+timeout a silent client lasts.
	const interval, timeout = 20 * time.Millisecond, time.Second
	tests := []struct {
		name   string
		answer string
	}{
		{"pong", `{"type":"pong"}`},
		{"ping of its own", `{"type":"ping"}`},
		{"any request", `{"type":"subscribe","room":"alive"}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			// 50 answers a second: above the default rate limit, which is
			// not what this test is about.
			srv := pubsubtest.Start(t, pubsub.WithHeartbeat(interval, timeout), pubsub.WithRateLimit(1000, 1000))
			p := srv.Dial("/ws")
			// 160 pings take at least 159 intervals: 3.18s, three times
			// the 1.02s a silent client lasts.
			for range 160 {
				p.Ping()
				p.Send(tt.answer)
			}
			p.Ack(pubsubtest.Fields{"type": "subscribe", "room": "still-open"})
			if n := srv.Stats().Connections; n != 1 {
				t.Fatalf("%d connections, want 1", n)
			}
		})
	}
}

func TestProtocolSilentClientIsClosedWith4001(t *testing.T) {
	t.Parallel()
	var hooks hookLog
	srv := pubsubtest.Start(t, hooks.options(pubsub.WithHeartbeat(20*time.Millisecond, 150*time.Millisecond))...)
	p := srv.Dial("/ws")
	// The client reads (pings flow) but never sends.
	p.Ping()
	p.ExpectClose(protocol.CloseHeartbeatTimeout)
	hooks.disconnectedWith(t, p.Welcome.ConnID, protocol.CloseHeartbeatTimeout)
}

func TestProtocolPingWithIDIsAnsweredByPongWithTheSameID(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	p := srv.Dial("/ws")
	if e := p.Request(pubsubtest.Fields{"type": "ping"}); e.Type != "pong" {
		t.Fatalf("ping with id: got %s, want a pong with the id", e)
	}
}

// ---- Raw mode ----

func TestRawHeartbeatKeepsReadingClientConnected(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name              string
		interval, timeout time.Duration
	}{
		// Budgets for a pong of 200ms or more, so a loaded machine cannot
		// fail a healthy client; the shapes are what matter.
		{"interval equal to timeout", 200 * time.Millisecond, 200 * time.Millisecond},
		// The defaults' shape (25s, 10s).
		{"interval longer than timeout", 400 * time.Millisecond, 200 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var hooks hookLog
			srv := pubsubtest.Start(t, hooks.options(pubsub.WithHeartbeat(tt.interval, tt.timeout))...)

			// The server pings a silent raw client at most once per interval,
			// so wantPings pings mean at least wantPings intervals went by.
			const wantPings = 3
			var pings atomic.Int32
			enough := make(chan struct{})
			c := srv.DialRaw("/ws?room=hb", pubsubtest.OnPing(func() {
				if pings.Add(1) == wantPings {
					close(enough)
				}
			}))
			frames := readLoop(t, c)
			select {
			case <-enough:
			case f := <-frames:
				t.Fatalf("after %d pings the connection gave %q %v, want it open", pings.Load(), f.data, f.err)
			case <-pubsubtest.Context(t).Done():
				t.Fatalf("timed out after %d pings", pings.Load())
			}
			srv.Publish("hb", []byte("still here"))
			nextText(t, frames, "still here")
			if _, ds := hooks.snapshot(); len(ds) != 0 {
				t.Fatalf("disconnected with %d %q, want connected", ds[0].Code, ds[0].Reason)
			}
		})
	}
}

func TestRawHeartbeatClosesClientThatNeverReadsWith4001(t *testing.T) {
	t.Parallel()
	var hooks hookLog
	srv := pubsubtest.Start(t, hooks.options(pubsub.WithHeartbeat(50*time.Millisecond, 50*time.Millisecond))...)

	silent := srv.DialRaw("/ws?room=hb") // never reads, so never answers a ping
	silentID := hooks.connected(t, 1).ID
	live := srv.DialRaw("/ws?room=hb")
	liveFrames := readLoop(t, live)

	// A connection that is closing takes no more messages. The probes queue
	// up unread on the silent client until then.
	ctx := pubsubtest.Context(t)
	pubsubtest.WaitFor(t, "the server to give up on the silent client", func() bool {
		return errors.Is(srv.PublishToConn(ctx, silentID, []byte("probe")), pubsub.ErrConnNotFound)
	})
	// Reading now lets the server's close handshake finish at once.
	silent.ExpectClose(protocol.CloseHeartbeatTimeout)
	hooks.disconnectedWith(t, silentID, protocol.CloseHeartbeatTimeout)
	if _, ds := hooks.snapshot(); ds[0].Client.ID != silentID {
		t.Fatalf("the first disconnect is %s's, want the silent client's (%s)", ds[0].Client.ID, silentID)
	}

	// The client that kept reading outlived it and is still served.
	srv.Publish("hb", []byte("after the timeout"))
	nextText(t, liveFrames, "after the timeout")
	// The silent client leaves its room after the disconnect hook ran.
	pubsubtest.WaitFor(t, "the silent client to leave the room", func() bool { return len(srv.Connections("hb")) == 1 })
}

// ---- Idle timeout ----

func TestIdleTimeoutClosesAQuietConnectionAndSparesABusyOne(t *testing.T) {
	t.Parallel()
	const idle = 150 * time.Millisecond
	srv := pubsubtest.Start(t, pubsub.WithIdleTimeout(idle), pubsub.WithHeartbeat(20*time.Millisecond, 10*time.Second))
	quiet := srv.DialRaw("/ws?room=quiet")
	busy := srv.DialRaw("/ws?room=busy")
	quietEnd := make(chan error, 1)
	go func() { quietEnd <- readToEnd(quiet) }() // answers pings: alive, but idle

	// Traffic for three idle timeouts keeps the busy one open.
	start := time.Now()
	for time.Since(start) < 3*idle {
		srv.Publish("busy", []byte("tick"))
		busy.ExpectText("tick")
	}
	pubsubtest.WaitFor(t, "the quiet connection to be closed", func() bool { return len(srv.Connections("quiet")) == 0 })
	if len(srv.Connections("busy")) != 1 {
		t.Fatal("the busy connection was closed too")
	}
	if code, _, _ := pubsubtest.CloseOf(pubsubtest.Receive(t, quietEnd, "the quiet client's end")); code != protocol.CloseIdleTimeout {
		t.Fatalf("the quiet connection was closed with %d, want 4005", code)
	}
}

func TestIdleTimeoutCloseCodeIs4005(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithIdleTimeout(50*time.Millisecond), pubsub.WithHeartbeat(20*time.Millisecond, 10*time.Second))
	c := srv.DialRaw("/ws?room=quiet")
	if reason := c.ExpectClose(protocol.CloseIdleTimeout); reason != "idle timeout" {
		t.Fatalf("reason %q", reason)
	}
}
