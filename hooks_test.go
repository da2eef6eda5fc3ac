package pubsub_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// The connection hooks (WithOnConnect, WithOnDisconnect) and what a hook
// that panics costs: its request only. hookLog, the tests' recorder of
// connects and disconnects, lives here too.

// hookLog records every OnConnect and OnDisconnect of a Handler. It is the
// tests' one way to learn a raw client's connection ID, and how a
// connection ended as the server saw it.
type hookLog struct {
	mu          sync.Mutex
	connects    []pubsub.Client
	disconnects []pubsub.DisconnectEvent
}

// options returns the two recording hooks, then opts.
func (l *hookLog) options(opts ...pubsub.Option) []pubsub.Option {
	return append([]pubsub.Option{
		pubsub.WithOnConnect(func(e pubsub.ConnectEvent) {
			l.mu.Lock()
			l.connects = append(l.connects, e.Client)
			l.mu.Unlock()
		}),
		pubsub.WithOnDisconnect(func(e pubsub.DisconnectEvent) {
			l.mu.Lock()
			l.disconnects = append(l.disconnects, e)
			l.mu.Unlock()
		}),
	}, opts...)
}

func (l *hookLog) snapshot() ([]pubsub.Client, []pubsub.DisconnectEvent) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.connects), slices.Clone(l.disconnects)
}

// connected waits for the n-th OnConnect call (1-based) and returns its
// Client. Dial one client at a time to know whose it is.
func (l *hookLog) connected(t *testing.T, n int) pubsub.Client {
	t.Helper()
	return l.await(t, fmt.Sprintf("OnConnect call #%d", n), func(cs []pubsub.Client) int { return n - 1 })
}

// connectedAs waits for the first connection of userID and returns it.
func (l *hookLog) connectedAs(t *testing.T, userID string) pubsub.Client {
	t.Helper()
	return l.await(t, "a connection of "+userID, func(cs []pubsub.Client) int {
		return slices.IndexFunc(cs, func(c pubsub.Client) bool { return c.UserID == userID })
	})
}

// await waits until pick finds a connect (its index, or -1 or more than
// there are) and returns it.
func (l *hookLog) await(t *testing.T, what string, pick func([]pubsub.Client) int) pubsub.Client {
	t.Helper()
	var cl pubsub.Client
	pubsubtest.WaitFor(t, what, func() bool {
		cs, _ := l.snapshot()
		i := pick(cs)
		if i < 0 || i >= len(cs) {
			return false
		}
		cl = cs[i]
		return true
	})
	return cl
}

// ended reports whether OnDisconnect ran for the connection id.
func (l *hookLog) ended(id string) (pubsub.DisconnectEvent, bool) {
	_, ds := l.snapshot()
	for _, d := range ds {
		if d.Client.ID == id {
			return d, true
		}
	}
	return pubsub.DisconnectEvent{}, false
}

// disconnected waits for OnDisconnect of the connection id.
func (l *hookLog) disconnected(t *testing.T, id string) pubsub.DisconnectEvent {
	t.Helper()
	var ev pubsub.DisconnectEvent
	pubsubtest.WaitFor(t, "OnDisconnect of "+id, func() bool {
		var ok bool
		ev, ok = l.ended(id)
		return ok
	})
	return ev
}

// disconnectedWith waits for OnDisconnect of the connection id and expects
// the close code.
func (l *hookLog) disconnectedWith(t *testing.T, id string, code protocol.CloseCode) pubsub.DisconnectEvent {
	t.Helper()
	ev := l.disconnected(t, id)
	if ev.Code != code {
		t.Fatalf("connection %s closed with %d %q, want %d", id, ev.Code, ev.Reason, code)
	}
	return ev
}

// offer sends v on ch without blocking, for a hook that reports to a test
// (which takes it with pubsubtest.Receive).
func offer[T any](ch chan<- T, v T) {
	select {
	case ch <- v:
	default:
	}
}

func TestOnConnectAndOnDisconnectRunOncePerConnectionWithItsClient(t *testing.T) {
	t.Parallel()
	var hooks hookLog
	srv := pubsubtest.Start(t, hooks.options(headerAuth())...)

	p := srv.Dial("/ws", asUser("alice"))
	pc := hooks.connected(t, 1)
	raw := srv.DialRaw("/ws?room=lobby", asUser("bob"))
	rc := hooks.connected(t, 2)
	anon := srv.Dial("/ws")
	ac := hooks.connected(t, 3)

	if pc.ID != p.Welcome.ConnID || pc.UserID != "alice" || pc.Mode != pubsub.ModeProtocol || pc.RemoteAddr == "" {
		t.Errorf("OnConnect client %+v, want id %s, user alice, protocol mode, a RemoteAddr", pc, p.Welcome.ConnID)
	}
	if rc.ID == "" || rc.UserID != "bob" || rc.Mode != pubsub.ModeRaw || rc.RemoteAddr == "" {
		t.Errorf("OnConnect client %+v, want user bob, raw mode, a RemoteAddr", rc)
	}
	if ac.ID != anon.Welcome.ConnID || ac.UserID != "" || ac.Mode != pubsub.ModeProtocol {
		t.Errorf("OnConnect client %+v, want id %s, anonymous, protocol mode", ac, anon.Welcome.ConnID)
	}

	p.Close(protocol.CloseNormal, "bye")
	raw.CloseNow()
	hooks.disconnected(t, pc.ID)
	hooks.disconnected(t, rc.ID)
	// Close waits for every ServeHTTP call, so every hook has run by then.
	srv.Close()
	ended(t, anon)

	connects, disconnects := hooks.snapshot()
	for _, cl := range []pubsub.Client{pc, rc, ac} {
		nc, nd := 0, 0
		for _, c := range connects {
			if c.ID == cl.ID {
				nc++
			}
		}
		for _, d := range disconnects {
			if d.Client.ID == cl.ID {
				nd++
				if !reflect.DeepEqual(d.Client, cl) {
					t.Errorf("OnDisconnect client %+v, want %+v as in OnConnect", d.Client, cl)
				}
			}
		}
		if nc != 1 || nd != 1 {
			t.Errorf("connection %s: OnConnect ran %d times, OnDisconnect %d times; want once each", cl.ID, nc, nd)
		}
	}
	if len(connects) != 3 || len(disconnects) != 3 {
		t.Errorf("%d OnConnect and %d OnDisconnect calls, want 3 each", len(connects), len(disconnects))
	}
}

func TestOnDisconnectReportsTheCloseCode(t *testing.T) {
	t.Parallel()
	var hooks hookLog
	srv := pubsubtest.Start(t, hooks.options()...)

	// Each subtest dials its own client, bound to it.
	dial := func(t *testing.T) *pubsubtest.Conn { return pubsubtest.Dial(t, srv.WS("/ws")) }
	t.Run("client closes with 1000", func(t *testing.T) {
		p := dial(t)
		p.Close(protocol.CloseNormal, "done here")
		ev := hooks.disconnected(t, p.Welcome.ConnID)
		if ev.Code != protocol.CloseNormal || ev.Reason != "done here" {
			t.Fatalf("OnDisconnect code %d reason %q, want 1000 %q", ev.Code, ev.Reason, "done here")
		}
	})
	t.Run("client closes with its own code", func(t *testing.T) {
		p := dial(t)
		p.Close(4321, "app code")
		ev := hooks.disconnected(t, p.Welcome.ConnID)
		if ev.Code != 4321 || ev.Reason != "app code" {
			t.Fatalf("OnDisconnect code %d reason %q, want 4321 %q", ev.Code, ev.Reason, "app code")
		}
	})
	t.Run("connection lost without a close", func(t *testing.T) {
		p := dial(t)
		p.CloseNow()
		hooks.disconnectedWith(t, p.Welcome.ConnID, protocol.CloseAbnormal)
	})
	t.Run("Disconnect", func(t *testing.T) {
		p := dial(t)
		if err := srv.Disconnect(p.Welcome.ConnID, "bye"); err != nil {
			t.Fatal(err)
		}
		p.ExpectClose(protocol.CloseDisconnected)
		if ev := hooks.disconnectedWith(t, p.Welcome.ConnID, protocol.CloseDisconnected); ev.Reason != "bye" {
			t.Fatalf("OnDisconnect code %d reason %q, want 4003 \"bye\"", ev.Code, ev.Reason)
		}
	})
	// Shutdown's 1001 and the slow consumer's 4002 are checked with those
	// features (pubsub_test.go, queue_test.go).
}

func TestPanickingConnectHooksDoNotCrashTheServer(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t,
		pubsub.WithOnConnect(func(pubsub.ConnectEvent) { panic("on connect") }),
		pubsub.WithOnDisconnect(func(pubsub.DisconnectEvent) { panic("on disconnect") }),
	)
	for i := range 2 {
		p := srv.Dial("/ws")
		p.Subscribe("r")
		srv.Publish("r", []byte(`"hi"`))
		p.NextMessage("r")
		p.Close(protocol.CloseNormal, "")
		pubsubtest.WaitFor(t, "the hooks to have panicked", func() bool {
			s := srv.Stats()
			return s.HookPanics == uint64(2*(i+1)) && s.Connections == 0
		})
	}
}

// TestProtocolHookPanicIsInternalAndServerKeepsWorking: a panicking hook
// costs its request only; the connection, other connections and the
// server stay up, and Stats counts the panics.
func TestProtocolHookPanicIsInternalAndServerKeepsWorking(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t,
		pubsub.WithAuthorize(func(_ context.Context, _ pubsub.Client, _ pubsub.Action, room string) error {
			if room == "boom" {
				panic("authorize bug")
			}
			return nil
		}),
		pubsub.WithOnMessage(func(_ context.Context, m *pubsub.ClientMessage) error {
			if string(m.Data) == "boom" {
				panic("on_message bug")
			}
			return nil
		}))
	p := srv.Dial("/ws")
	bystander := srv.Dial("/ws")
	bystander.Subscribe("calm")
	before := srv.Stats().HookPanics

	p.Error(pubsubtest.Fields{"type": "send", "text": "boom"}, protocol.CodeInternal)
	p.Error(pubsubtest.Fields{"type": "subscribe", "room": "boom"}, protocol.CodeInternal)
	p.Error(pubsubtest.Fields{"type": "publish", "room": "boom", "text": "x"}, protocol.CodeInternal)
	if got := srv.Stats().HookPanics - before; got != 3 {
		t.Fatalf("Stats().HookPanics grew by %d, want 3", got)
	}

	p.Ack(pubsubtest.Fields{"type": "send", "text": "fine"})
	p.Subscribe("calm")
	p.Publish("calm", "still up")
	for _, c := range []*pubsubtest.Conn{p, bystander} {
		if m := c.NextMessage("calm"); m.Text == nil || *m.Text != "still up" {
			t.Fatalf("got %s", m)
		}
	}
	srv.Dial("/ws").Subscribe("calm") // new connections still work
}

func TestRawAuthorizePanicRefusesUpgradeWith500AndServerKeepsServing(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithAuthorize(func(_ context.Context, _ pubsub.Client, _ pubsub.Action, room string) error {
		if room == "boom" {
			panic("authorize bug")
		}
		return nil
	}))
	srv.Refused("/ws?room=boom", http.StatusInternalServerError)
	if got := srv.Stats().HookPanics; got != 1 {
		t.Fatalf("Stats().HookPanics = %d, want 1", got)
	}
	expectRefused(t, srv, 1)

	c := srv.DialRaw("/ws?room=fine")
	srv.Publish("fine", []byte("still serving"))
	c.ExpectText("still serving")
}

// A hook gets a context that lives as long as the connection: it ends when
// the server closes the connection, or the Handler closes, and so does a
// context derived from it; until then it is live. (A client that leaves
// while its own message's hook runs is noticed by the connection's reader,
// which is in the hook: when the hook returns.)
func TestAHookContextEndsWithItsConnection(t *testing.T) {
	t.Parallel()
	ends := map[string]func(srv *pubsubtest.Server, c *pubsubtest.RawConn, cl pubsub.Client){
		"the server disconnects the client": func(srv *pubsubtest.Server, _ *pubsubtest.RawConn, cl pubsub.Client) {
			if err := srv.Handler.Disconnect(cl.ID, "bye"); err != nil {
				t.Errorf("Disconnect: %v", err)
			}
		},
		"the Handler closes": func(srv *pubsubtest.Server, _ *pubsubtest.RawConn, _ pubsub.Client) {
			_ = srv.Handler.Close()
		},
	}
	for name, end := range ends {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			type outcome struct{ before, after, derived error }
			entered := make(chan pubsub.Client, 1)
			done := make(chan outcome, 1)
			srv := pubsubtest.Start(t, pubsub.WithOnMessage(func(ctx context.Context, m *pubsub.ClientMessage) error {
				before := ctx.Err()
				derived, cancel := context.WithTimeout(ctx, time.Hour)
				defer cancel()
				entered <- m.Client
				<-derived.Done()
				done <- outcome{before, ctx.Err(), derived.Err()}
				return nil
			}))
			c := srv.DialRaw("/ws?room=hooks")
			c.Send("wait for me")
			cl := pubsubtest.Receive(t, entered, "the hook's start")
			end(srv, c, cl)
			got := pubsubtest.Receive(t, done, "the hook's end")
			if got.before != nil {
				t.Errorf("the hook's context had ended (%v) before the connection did", got.before)
			}
			if !errors.Is(got.after, context.Canceled) || !errors.Is(got.derived, context.Canceled) {
				t.Errorf("after the end: the hook's context says %v, the one derived from it %v; want both context.Canceled", got.after, got.derived)
			}
		})
	}
}
