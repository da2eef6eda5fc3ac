package client

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub/protocol"
)

// A session is one connection of the Client: its dial, its welcome, the
// requests waiting for a reply on it, and its end.

// welcome is what the server said of the connection.
type welcome struct {
	connID, userID  string
	limit           time.Duration // heartbeat_ms + timeout_ms; 0 when the server sends no heartbeats
	maxMessageBytes int64
	keyTTL          time.Duration // key_ttl_ms: how long the server remembers a publish's key; 0 when it does not say
}

// session is one WebSocket connection.
type session struct {
	ws       *websocket.Conn
	welcome  welcome
	lastRead atomic.Int64  // unix nanoseconds
	outbox   chan []byte   // envelopes the manager writes for the reader (pong, cleanups)
	done     chan struct{} // closed when the reader has ended

	mu         sync.Mutex
	ended      bool
	pending    map[string]*pending
	cause      error           // why the connection ended; the first one counts
	slow       []*Subscription // subscriptions whose buffer overflowed
	slowDirect bool
	graceful   bool // end it with a close handshake of ours
}

type pending struct {
	ch chan *inbound // capacity 1
	// onReply runs on the reader before the reply is handed over and
	// before any later envelope is read; an error ends the connection.
	onReply func(*inbound) error
}

func (s *session) setCause(err error, graceful bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cause == nil {
		s.cause, s.graceful = err, graceful
	}
}

func (s *session) addPending(id string, p *pending) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ended {
		return false
	}
	s.pending[id] = p
	return true
}

func (s *session) takePending(id string) *pending {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.pending[id]
	delete(s.pending, id)
	return p
}

func (s *session) dropPending(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.pending, id)
}

// connect dials, checks the subprotocol and reads the welcome.
func (c *Client) connect(ctx context.Context) (*session, error) {
	ws, resp, err := websocket.Dial(ctx, c.url, &websocket.DialOptions{
		HTTPClient:   c.cfg.httpClient,
		HTTPHeader:   c.cfg.header,
		Subprotocols: []string{protocol.Subprotocol},
	})
	if err != nil {
		de := &DialError{Err: err}
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			de.StatusCode = resp.StatusCode
		}
		return nil, de
	}
	if ws.Subprotocol() != protocol.Subprotocol {
		ws.CloseNow()
		return nil, &DialError{Err: errNoSubprotocol}
	}
	ws.SetReadLimit(c.cfg.readLimit)
	w, err := readWelcome(ctx, ws)
	if err != nil {
		ws.CloseNow()
		return nil, &DialError{Err: err}
	}
	s := &session{
		ws:      ws,
		welcome: w,
		outbox:  make(chan []byte, 16),
		done:    make(chan struct{}),
		pending: make(map[string]*pending),
	}
	s.lastRead.Store(time.Now().UnixNano())
	return s, nil
}

func readWelcome(ctx context.Context, ws *websocket.Conn) (welcome, error) {
	typ, b, err := ws.Read(ctx)
	if err != nil {
		return welcome{}, fmt.Errorf("waiting for the welcome: %w", err)
	}
	var in inbound
	if typ != websocket.MessageText || json.Unmarshal(b, &in) != nil || in.Type != "welcome" {
		return welcome{}, fmt.Errorf("%w: the first message is not a welcome", ErrProtocol)
	}
	w := welcome{connID: in.ConnID, userID: in.UserID, maxMessageBytes: in.MaxMessageBytes,
		keyTTL: time.Duration(max(in.KeyTTLMS, 0)) * time.Millisecond}
	if in.HeartbeatMS > 0 {
		w.limit = time.Duration(in.HeartbeatMS+max(in.TimeoutMS, 0)) * time.Millisecond
	}
	return w, nil
}

// session returns the open connection.
func (c *Client) session() (*session, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.state == StateClosed:
		return nil, ErrClosed
	case c.sess == nil:
		return nil, ErrDisconnected
	}
	return c.sess, nil
}

// roundTrip sends env, a request with id, on sess and waits for its reply.
// sent reports whether env was written. The reply's onReply runs even when
// ctx ended first.
func (c *Client) roundTrip(ctx context.Context, sess *session, id string, env []byte, onReply func(*inbound) error) (_ *inbound, sent bool, _ error) {
	if max := sess.welcome.maxMessageBytes; max > 0 && int64(len(env)) > max {
		return nil, false, fmt.Errorf("%w: %d bytes, the server accepts %d", ErrTooLarge, len(env), max)
	}
	if err := ctx.Err(); err != nil {
		return nil, false, err
	}
	p := &pending{ch: make(chan *inbound, 1), onReply: onReply}
	if !sess.addPending(id, p) {
		return nil, false, c.lost()
	}
	if err := c.write(sess, env); err != nil {
		sess.dropPending(id)
		return nil, false, c.lost()
	}
	select {
	case r := <-p.ch:
		return r, true, r.err()
	case <-sess.done:
		select {
		case r := <-p.ch: // the reply came before the end
			return r, true, r.err()
		default:
		}
		return nil, true, c.lost()
	case <-ctx.Done():
		return nil, true, ctx.Err()
	}
}

// write writes one envelope. Its context is not the caller's: coder/websocket
// closes the connection when a write's context ends, even just after the
// frame went out, and one caller giving up must not cost every
// subscription a reconnection. A write that takes longer than
// writeTimeout (the server stopped reading) does close the connection.
func (c *Client) write(sess *session, env []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), writeTimeout)
	defer cancel()
	return sess.ws.Write(ctx, websocket.MessageText, env)
}

// endSession runs when s's reader ends: requests waiting on s fail, and
// subscriptions that were only under way on s are dropped (their callers
// get ErrDisconnected).
func (c *Client) endSession(s *session) {
	s.mu.Lock()
	s.ended = true
	s.pending = nil
	s.mu.Unlock()
	c.mu.Lock()
	if c.sess == s {
		c.sess = nil
	}
	for _, sub := range c.subs {
		if sub.state == subLeaving || (sub.state == subJoining && sub.sentOn == s) {
			c.forgetLocked(sub)
		}
	}
	c.mu.Unlock()
	close(s.done)
}
