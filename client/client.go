package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/roomcast/pubsub/protocol"

	"github.com/coder/websocket"
)

// Sentinel errors, checked with errors.Is.
var (
	// ErrClosed: the Client was closed, or stopped for good (see Err).
	ErrClosed = errors.New("client: closed")
	// ErrDisconnected: there is no connection right now (the Client is
	// reconnecting), or it was lost before the server answered. A Publish
	// that fails so may or may not have been published.
	ErrDisconnected = errors.New("client: not connected")
	// ErrSlowHandler, reported to WithOnState: a handler fell behind and
	// its buffer overflowed, so the Client reconnects to recover.
	ErrSlowHandler = errors.New("client: a handler fell behind its buffer")
	// ErrHeartbeatTimeout, reported to WithOnState: nothing came from the
	// server for heartbeat_ms + timeout_ms, so the Client reconnects.
	ErrHeartbeatTimeout = errors.New("client: no sign of life from the server within the heartbeat timeout")
	// ErrAlreadySubscribed: Subscribe to a room this Client is subscribed to.
	ErrAlreadySubscribed = errors.New("client: already subscribed to this room")
	// ErrTooLarge: the request is larger than the server accepts
	// (max_message_bytes). It was not sent; the connection stays up.
	ErrTooLarge = errors.New("client: request larger than the server accepts")
	// ErrProtocol: the server broke the roomcast.v1 protocol.
	ErrProtocol = errors.New("client: protocol violation by the server")
)

// Error is an error the server answered a request with. Branch on Code
// (protocol.CodeForbidden, …); Message is for people.
type Error struct {
	Code    protocol.ErrorCode
	Message string
}

func (e *Error) Error() string { return string(e.Code) + ": " + e.Message }

// CloseError is how the server ended a connection: its close code and
// reason (PROTOCOL.md section 4). protocol.CloseAbnormal (1006) means
// the connection was lost without a close frame.
type CloseError struct {
	Code   protocol.CloseCode
	Reason string
	err    error // the underlying error, for 1006
}

func (e *CloseError) Error() string {
	if e.Code == protocol.CloseAbnormal {
		if e.err != nil {
			return "client: connection lost: " + e.err.Error()
		}
		return "client: connection lost"
	}
	return "client: connection closed by the server with " + strconv.Itoa(int(e.Code)) + " " + strconv.Quote(e.Reason)
}

func (e *CloseError) Unwrap() error { return e.err }

// DialError is a refused upgrade. StatusCode is the HTTP status (401, 403,
// 503…), or 0 when no HTTP response came.
type DialError struct {
	StatusCode int
	Err        error
}

func (e *DialError) Error() string {
	if e.StatusCode != 0 {
		return "client: dial refused with HTTP " + strconv.Itoa(e.StatusCode) + ": " + e.Err.Error()
	}
	return "client: dial: " + e.Err.Error()
}

func (e *DialError) Unwrap() error { return e.Err }

// permanent reports whether err ends the Client rather than calling for a
// reconnection: the close codes that say the client must change (1003,
// 1007, 1008), that the server disconnected it on purpose (4003) or closed
// it as idle (4005: dial again when there is something to do), and
// upgrade refusals in 4xx (but 408 and 429).
func permanent(err error) bool {
	var ce *CloseError
	if errors.As(err, &ce) {
		switch ce.Code {
		case protocol.CloseUnsupportedData, protocol.CloseInvalidPayload, protocol.ClosePolicyViolation,
			protocol.CloseDisconnected, protocol.CloseIdleTimeout:
			return true
		}
		return false
	}
	var de *DialError
	if errors.As(err, &de) {
		s := de.StatusCode
		return s >= 400 && s < 500 && s != http.StatusRequestTimeout && s != http.StatusTooManyRequests
	}
	return errors.Is(err, errNoSubprotocol)
}

var errNoSubprotocol = errors.New("the server did not select subprotocol " + protocol.Subprotocol)

// State is the Client's connection state.
type State uint8

const (
	StateConnected    State = iota // connected, every subscription restored
	StateReconnecting              // the connection ended; waiting, dialing or resubscribing
	StateClosed                    // stopped for good
)

func (s State) String() string {
	switch s {
	case StateConnected:
		return "connected"
	case StateReconnecting:
		return "reconnecting"
	case StateClosed:
		return "closed"
	}
	return "State(" + strconv.Itoa(int(s)) + ")"
}

// Client is a roomcast.v1 connection that reconnects by itself. Create it
// with Dial; it is safe for concurrent use. Close it when done.
type Client struct {
	url string
	cfg config
	log *slog.Logger

	ctx    context.Context // ends when the Client stops
	cancel context.CancelFunc
	wg     sync.WaitGroup // every goroutine the Client started
	done   chan struct{}
	nextID atomic.Uint64
	direct *queue // nil without WithOnDirect

	mu    sync.Mutex
	sess  *session // the open connection; nil while there is none
	state State
	err   error
	subs  map[string]*Subscription
	conn  welcome
}

// welcome is what the server said of the connection.
type welcome struct {
	connID, userID  string
	limit           time.Duration // heartbeat_ms + timeout_ms; 0 when the server sends no heartbeats
	maxMessageBytes int64
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

// Dial connects to a roomcast server in protocol mode, waits for its
// welcome, and returns a Client that keeps the connection up until Close.
// url is ws:// or wss:// (http:// and https:// work too). ctx bounds the
// first connection only; Dial does not retry it: a refused upgrade is a
// *DialError. Dial panics with a "client: " message on an option out of
// range.
func Dial(ctx context.Context, url string, opts ...Option) (*Client, error) {
	cfg := defaultConfig()
	for _, o := range opts {
		o(&cfg)
	}
	cfg.validate()
	c := &Client{
		url:  url,
		cfg:  cfg,
		log:  cfg.logger,
		done: make(chan struct{}),
		subs: make(map[string]*Subscription),
	}
	s, err := c.connect(ctx)
	if err != nil {
		return nil, err
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.sess, c.conn = s, s.welcome
	if cfg.onDirect != nil {
		c.direct = newQueue(cfg.bufferSize)
		c.wg.Go(c.dispatchDirect)
	}
	c.wg.Go(func() { c.run(s) })
	return c, nil
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
	w := welcome{connID: in.ConnID, userID: in.UserID, maxMessageBytes: in.MaxMessageBytes}
	if in.HeartbeatMS > 0 {
		w.limit = time.Duration(in.HeartbeatMS+max(in.TimeoutMS, 0)) * time.Millisecond
	}
	return w, nil
}

// ConnID is the server's id of the current connection (or of the last
// one, while reconnecting); it changes with every connection.
func (c *Client) ConnID() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.conn.connID
}

// UserID is the user the server authenticated; empty when anonymous.
func (c *Client) UserID() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.conn.userID
}

// State is the Client's connection state now.
func (c *Client) State() State {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state
}

// Done is closed when the Client has stopped: after Close, or when the
// server ended it for good (see Err).
func (c *Client) Done() <-chan struct{} { return c.done }

// Err is nil while the Client runs. Once Done is closed it is ErrClosed
// after Close, or why the Client stopped: a *CloseError with a code after
// which reconnecting would not help (1003, 1007, 1008, 4003, and 4005: the
// server closed the idle connection, so dial again when there is something
// to do), a *DialError refusing a reconnection with a 4xx status (but 408
// and 429), or the connection's end under WithoutReconnect.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close closes the connection (with a close handshake, bounded by a few
// seconds when the server does not answer), stops reconnecting, discards
// undelivered messages, and returns once every goroutine the Client
// started has ended, including handler calls under way. Do not call it
// from a Handler or another callback of this Client: it would wait for
// itself (use go c.Close()). Calling it again is safe.
func (c *Client) Close() error {
	c.cancel()
	c.wg.Wait()
	return nil
}

// Subscribe joins room and returns once the server acknowledged it; from
// then on h gets the room's messages: replayed ones first (History),
// then live ones, in order. The subscription survives reconnections (see
// Recovery). A refusal is an *Error (invalid_room, forbidden,
// too_many_rooms…); ErrDisconnected while reconnecting; ErrAlreadySubscribed
// when this Client is subscribed to room already.
func (c *Client) Subscribe(ctx context.Context, room string, h Handler, opts ...SubscribeOption) (*Subscription, error) {
	sub, err := c.subscribe(ctx, room, h, opts)
	if err != nil {
		return nil, fmt.Errorf("client: subscribe to room %q: %w", room, err)
	}
	return sub, nil
}

func (c *Client) subscribe(ctx context.Context, room string, h Handler, opts []SubscribeOption) (*Subscription, error) {
	if h == nil {
		return nil, errors.New("a nil Handler")
	}
	var cfg subConfig
	for _, o := range opts {
		o(&cfg)
	}
	if len(cfg.info) > 0 && !json.Valid(cfg.info) {
		return nil, errors.New("Info is not valid JSON")
	}
	c.mu.Lock()
	for {
		if c.state == StateClosed {
			c.mu.Unlock()
			return nil, ErrClosed
		}
		old := c.subs[room]
		if old == nil {
			break
		}
		if old.state != subLeaving {
			c.mu.Unlock()
			return nil, ErrAlreadySubscribed
		}
		// The room is being left: wait for that to finish.
		c.mu.Unlock()
		select {
		case <-old.gone:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		c.mu.Lock()
	}
	sess := c.sess
	if sess == nil {
		c.mu.Unlock()
		return nil, ErrDisconnected
	}
	sub := &Subscription{c: c, room: room, h: h, cfg: cfg, q: newQueue(c.cfg.bufferSize),
		gone: make(chan struct{}), state: subJoining, sentOn: sess}
	c.subs[room] = sub
	c.wg.Go(sub.dispatch) // under c.mu, while not closed: the manager still runs
	c.mu.Unlock()

	id := c.newID()
	env := encodeSubscribe(id, room, cfg.history, cfg.onPresence != nil, cfg.info, nil)
	_, sent, err := c.roundTrip(ctx, sess, id, env, c.subscribeReply(sub, false))
	if err == nil {
		return sub, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch sub.state {
	case subActive:
		return sub, nil // acknowledged after all, as ctx ended
	case subGone:
		return nil, err // already dropped (refused, or its connection ended)
	}
	if ctxErr := ctx.Err(); sent && ctxErr != nil && err == ctxErr {
		// Abandoned while the server works on it: the reply (or the
		// connection's end) cleans up; meanwhile the room counts as being
		// left, so a new Subscribe waits for the cleanup.
		sub.state = subLeaving
		sub.q.stop()
		return nil, err
	}
	c.forgetLocked(sub)
	return nil, err
}

// subscribeReply handles the reply to a subscribe of sub, on the reader.
func (c *Client) subscribeReply(sub *Subscription, resub bool) func(*inbound) error {
	return func(r *inbound) error {
		c.mu.Lock()
		defer c.mu.Unlock()
		if r.Type == "error" {
			if !resub {
				c.forgetLocked(sub)
			}
			return nil // a failed resubscription is handled by resubscribe
		}
		if r.Type != "ack" || r.Room == "" {
			// An ack without a position: the server had the room already,
			// so its view and ours differ. Reconnect to start over.
			return fmt.Errorf("%w: a subscribe to room %q was acknowledged without a position", ErrProtocol, sub.room)
		}
		switch sub.state {
		case subLeaving, subGone:
			// Left (or abandoned) while the subscribe was under way: undo it.
			return c.cleanupLocked(sub)
		}
		sub.state = subActive
		sub.pos = position{r.Epoch, r.Seq}
		if resub {
			rec := &Recovery{Room: sub.room, Recovered: r.Recovered != nil && *r.Recovered,
				Reason: r.Reason, Missed: r.Missed, Epoch: r.Epoch, Seq: r.Seq}
			if !rec.Recovered {
				c.log.Debug("client: recovery refused", "room", sub.room, "reason", rec.Reason)
			}
			sub.q.push(item{rec: rec}, true)
		}
		return nil
	}
}

// cleanupLocked unsubscribes a room the server subscribed after the
// Client gave it up. It runs on the reader, so the manager writes it.
func (c *Client) cleanupLocked(sub *Subscription) error {
	sess := c.sess
	if sess == nil {
		return nil
	}
	id := c.newID()
	sess.addPending(id, &pending{ch: make(chan *inbound, 1), onReply: func(r *inbound) error {
		if r.Code != protocol.CodeRateLimited {
			c.forget(sub)
		}
		return nil
	}})
	select {
	case sess.outbox <- encodeRoomRequest("unsubscribe", id, sub.room):
		return nil
	default:
		return fmt.Errorf("client: too many pending writes")
	}
}

// forget removes sub from the Client and stops its deliveries.
func (c *Client) forget(sub *Subscription) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.forgetLocked(sub)
}

func (c *Client) forgetLocked(sub *Subscription) {
	if c.subs[sub.room] == sub {
		delete(c.subs, sub.room)
	}
	if sub.state != subGone {
		sub.state = subGone
		close(sub.gone)
	}
	sub.q.stop()
}

// Publish publishes data into room and returns once the server
// acknowledged it. The payload travels as JSON when data is valid JSON,
// else as text when it is valid UTF-8, else as binary: either way the
// server stores exactly data. A refusal is an *Error (forbidden,
// invalid_room, rate_limited, unavailable…); ErrDisconnected while
// reconnecting or when the connection was lost before the ack (the
// message may then have been published or not); ErrTooLarge when the
// request exceeds the server's max_message_bytes.
func (c *Client) Publish(ctx context.Context, room string, data []byte) error {
	if err := c.payloadRequest(ctx, "publish", room, data); err != nil {
		return fmt.Errorf("client: publish to room %q: %w", room, err)
	}
	return nil
}

// Send sends data to the server's message handler (not to a room) and
// returns once it accepted it. room is optional: it is passed to the
// handler. A refusal is an *Error: not_supported when the server has no
// handler, rejected when the handler refused it.
func (c *Client) Send(ctx context.Context, room string, data []byte) error {
	if err := c.payloadRequest(ctx, "send", room, data); err != nil {
		return fmt.Errorf("client: send: %w", err)
	}
	return nil
}

func (c *Client) payloadRequest(ctx context.Context, typ, room string, data []byte) error {
	sess, err := c.session()
	if err != nil {
		return err
	}
	id := c.newID()
	_, _, err = c.roundTrip(ctx, sess, id, encodePayloadRequest(typ, id, room, data), nil)
	return err
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

func (c *Client) newID() string {
	return strconv.FormatUint(c.nextID.Add(1), 10)
}

// lost is the error of a request whose connection ended.
func (c *Client) lost() error {
	if c.ctx.Err() != nil {
		return ErrClosed
	}
	return ErrDisconnected
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

// run manages the connection until the Client stops: it serves each
// connection, then reconnects with backoff.
func (c *Client) run(s *session) {
	attempt := 0
	first := true
	for {
		cause := c.serve(s, first)
		first = false
		if c.ctx.Err() != nil {
			c.finish(nil)
			return
		}
		c.log.Debug("client: disconnected", "conn_id", s.welcome.connID, "err", cause)
		if !c.cfg.reconnect || permanent(cause) {
			c.finish(cause)
			return
		}
		c.setState(StateReconnecting, cause)
		if !c.waitForSlowHandlers(s) {
			c.finish(nil)
			return
		}
		for {
			if !sleepFor(c.ctx, nil, c.backoff(attempt)) {
				c.finish(nil)
				return
			}
			attempt++
			ctx, cancel := context.WithTimeout(c.ctx, c.cfg.dialTimeout)
			ns, err := c.connect(ctx)
			cancel()
			if err == nil {
				s, attempt = ns, 0
				break
			}
			if c.ctx.Err() != nil {
				c.finish(nil)
				return
			}
			c.log.Debug("client: reconnection failed", "err", err)
			if permanent(err) {
				c.finish(err)
				return
			}
			c.setState(StateReconnecting, err)
		}
	}
}

// backoff is the delay before the attempt-th reconnection in a row: a
// random time between half and all of min*2^attempt, capped at max.
func (c *Client) backoff(attempt int) time.Duration {
	d := c.cfg.minBackoff
	for i := 0; i < attempt && d < c.cfg.maxBackoff; i++ {
		d *= 2
	}
	d = min(d, c.cfg.maxBackoff)
	half := d / 2
	return half + rand.N(d-half+1)
}

// sleepFor waits d; it reports false when ctx or stop ended first.
func sleepFor(ctx context.Context, stop <-chan struct{}, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	case <-stop:
		return false
	}
}

// waitForSlowHandlers waits until the handlers that overflowed on s have
// emptied their buffers, so the replay fits. It reports false when the
// Client is closed first.
func (c *Client) waitForSlowHandlers(s *session) bool {
	s.mu.Lock()
	slow, slowDirect := s.slow, s.slowDirect
	s.mu.Unlock()
	for _, sub := range slow {
		if !sub.q.waitIdle(c.ctx) {
			return false
		}
	}
	if slowDirect && !c.direct.waitIdle(c.ctx) {
		return false
	}
	return true
}

// serve runs one connection: its reader, the resubscriptions, the writes
// of the reader's envelopes and the heartbeat watch. It returns why the
// connection ended.
func (c *Client) serve(s *session, first bool) error {
	c.mu.Lock()
	c.sess, c.conn = s, s.welcome
	var subs []*Subscription
	if !first {
		for _, sub := range c.subs {
			if sub.state == subActive {
				subs = append(subs, sub)
			}
		}
	}
	c.mu.Unlock()
	c.log.Debug("client: connected", "conn_id", s.welcome.connID)

	c.wg.Go(func() { c.read(s) })
	var restored chan error
	if len(subs) > 0 {
		restored = make(chan error, 1)
		c.wg.Go(func() { restored <- c.resubscribe(s, subs) })
	} else {
		c.setState(StateConnected, nil)
	}
	var hb *time.Timer
	var heartbeat <-chan time.Time
	if s.welcome.limit > 0 {
		hb = time.NewTimer(s.welcome.limit)
		defer hb.Stop()
		heartbeat = hb.C
	}
	for {
		select {
		case <-s.done:
			s.mu.Lock()
			cause, graceful := s.cause, s.graceful
			s.mu.Unlock()
			switch {
			case graceful && errors.Is(cause, ErrSlowHandler):
				_ = s.ws.Close(websocket.StatusNormalClosure, "client handler fell behind")
			case graceful:
				_ = s.ws.Close(websocket.StatusProtocolError, "protocol violation")
			default:
				_ = s.ws.CloseNow()
			}
			if restored != nil {
				<-restored // its requests fail now that s is done
			}
			return cause
		case err := <-restored:
			restored = nil
			if err != nil {
				s.setCause(err, false)
				_ = s.ws.CloseNow()
				continue
			}
			c.setState(StateConnected, nil)
		case env := <-s.outbox:
			if err := c.write(s, env); err != nil {
				_ = s.ws.CloseNow() // the reader reports the loss
			}
		case <-heartbeat:
			idle := time.Since(time.Unix(0, s.lastRead.Load()))
			if idle < s.welcome.limit {
				hb.Reset(s.welcome.limit - idle)
				continue
			}
			c.log.Debug("client: heartbeat timeout", "conn_id", s.welcome.connID)
			s.setCause(ErrHeartbeatTimeout, false)
			_ = s.ws.CloseNow()
			heartbeat = nil
		case <-c.ctx.Done():
			s.setCause(ErrClosed, false)
			_ = s.ws.Close(websocket.StatusNormalClosure, "")
			<-s.done
			_ = s.ws.CloseNow()
			if restored != nil {
				<-restored
			}
			return ErrClosed
		}
	}
}

// resubscribe subscribes subs again on s, each from its position. A
// subscription the server now refuses for good ends (OnRecover gets the
// error); an error worth retrying later ends the connection, so the
// Client reconnects.
func (c *Client) resubscribe(s *session, subs []*Subscription) error {
	for _, sub := range subs {
		for delay := retryMin; ; delay = min(2*delay, retryMax) {
			c.mu.Lock()
			active, since := sub.state == subActive, sub.pos
			c.mu.Unlock()
			if !active {
				break // left meanwhile
			}
			id := c.newID()
			env := encodeSubscribe(id, sub.room, 0, sub.cfg.onPresence != nil, sub.cfg.info, &since)
			_, _, err := c.roundTrip(c.ctx, s, id, env, c.subscribeReply(sub, true))
			var e *Error
			if err == nil {
				break
			}
			if !errors.As(err, &e) {
				return err // the connection ended
			}
			switch e.Code {
			case protocol.CodeRateLimited:
				if !sleepFor(c.ctx, s.done, delay) {
					return ErrDisconnected
				}
				continue
			case protocol.CodeUnavailable, protocol.CodeInternal:
				return fmt.Errorf("client: resubscribe to room %q: %w", sub.room, err)
			}
			c.endSubscription(sub, fmt.Errorf("client: resubscribe to room %q: %w", sub.room, err))
			break
		}
	}
	return nil
}

// retryMin and retryMax bound the delays between the Client's own retries
// of a rate-limited request.
const (
	retryMin = 50 * time.Millisecond
	retryMax = time.Second
)

// endSubscription removes a subscription that could not be restored,
// telling its OnRecover why once what it has queued is delivered.
func (c *Client) endSubscription(sub *Subscription, err error) {
	c.log.Debug("client: subscription ended", "room", sub.room, "err", err)
	c.mu.Lock()
	defer c.mu.Unlock()
	if sub.state != subActive {
		return
	}
	if c.subs[sub.room] == sub {
		delete(c.subs, sub.room)
	}
	sub.state = subGone
	close(sub.gone)
	sub.q.push(item{rec: &Recovery{Room: sub.room, Err: err}}, true)
	sub.q.end()
}

// finish stops the Client for good; it runs on the manager, last.
func (c *Client) finish(cause error) {
	c.mu.Lock()
	c.state = StateClosed
	c.err = cause
	if cause == nil {
		c.err = ErrClosed
	}
	c.sess = nil
	for _, sub := range c.subs {
		c.forgetLocked(sub)
	}
	c.mu.Unlock()
	if c.direct != nil {
		c.direct.stop()
	}
	c.cancel()
	if cause != nil {
		c.log.Debug("client: stopped", "err", cause)
	}
	if c.cfg.onState != nil {
		c.cfg.onState(StateClosed, cause)
	}
	close(c.done)
}

func (c *Client) setState(st State, err error) {
	c.mu.Lock()
	c.state = st
	c.mu.Unlock()
	if c.cfg.onState != nil {
		c.cfg.onState(st, err)
	}
}

// read reads s until it ends, routing each envelope. It never blocks on a
// handler or a write.
func (c *Client) read(s *session) {
	defer c.endSession(s)
	for {
		typ, b, err := s.ws.Read(context.Background()) // the manager closes s.ws to stop it
		if err != nil {
			s.setCause(readError(err), false)
			return
		}
		s.lastRead.Store(time.Now().UnixNano())
		var in inbound
		if typ != websocket.MessageText {
			s.setCause(fmt.Errorf("%w: a binary message", ErrProtocol), true)
			return
		}
		if err := json.Unmarshal(b, &in); err != nil {
			s.setCause(fmt.Errorf("%w: %v", ErrProtocol, err), true)
			return
		}
		if err := c.route(s, &in); err != nil {
			s.setCause(err, true)
			return
		}
	}
}

func readError(err error) error {
	var ce websocket.CloseError
	if errors.As(err, &ce) {
		return &CloseError{Code: protocol.CloseCode(ce.Code), Reason: ce.Reason}
	}
	return &CloseError{Code: protocol.CloseAbnormal, err: err}
}

// route handles one envelope; an error ends the connection.
func (c *Client) route(s *session, in *inbound) error {
	switch in.Type {
	case "message":
		return c.routeMessage(s, in)
	case "join", "leave":
		return c.routeEvent(s, in)
	case "direct":
		return c.routeDirect(s, in)
	case "ack", "error", "presence":
		if in.ID == "" {
			if in.Type == "error" {
				c.log.Debug("client: error without a request id", "code", in.Code, "message", in.Message)
			}
			return nil
		}
		p := s.takePending(in.ID)
		if p == nil {
			return nil
		}
		if p.onReply != nil {
			if err := p.onReply(in); err != nil {
				return err
			}
		}
		p.ch <- in
	case "ping":
		select {
		case s.outbox <- pongEnvelope:
		default:
			return errors.New("client: too many pending writes")
		}
	}
	return nil // pong, welcome again, and types of later versions
}

func (c *Client) routeMessage(s *session, in *inbound) error {
	data, kind, err := in.payload()
	if err != nil {
		return fmt.Errorf("%w: message of room %q: %v", ErrProtocol, in.Room, err)
	}
	m := Message{Room: in.Room, Epoch: in.Epoch, Seq: in.Seq, ID: in.MessageID, Data: data, Kind: kind}
	if in.Time != 0 {
		m.Time = time.UnixMilli(in.Time)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	sub := c.subs[in.Room]
	if sub == nil || sub.state != subActive {
		return nil // left: late messages are not wanted
	}
	if !sub.q.push(item{msg: m}, false) {
		return c.overflowLocked(s, sub)
	}
	sub.pos = position{m.Epoch, m.Seq}
	return nil
}

func (c *Client) routeEvent(s *session, in *inbound) error {
	ev := &Event{Type: EventJoin, Room: in.Room, ConnID: in.ConnID, UserID: in.UserID, Info: in.Info}
	if in.Type == "leave" {
		ev.Type = EventLeave
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	sub := c.subs[in.Room]
	if sub == nil || sub.state != subActive || sub.cfg.onPresence == nil {
		return nil
	}
	if !sub.q.push(item{ev: ev}, false) {
		return c.overflowLocked(s, sub)
	}
	return nil
}

// overflowLocked ends s because sub's handler fell behind; the manager
// waits for it to catch up before reconnecting, and the resubscription
// recovers from sub's position, which the lost message did not advance.
func (c *Client) overflowLocked(s *session, sub *Subscription) error {
	c.log.Warn("client: handler fell behind; reconnecting to recover", "room", sub.room, "buffer", c.cfg.bufferSize)
	s.mu.Lock()
	s.slow = append(s.slow, sub)
	s.mu.Unlock()
	return fmt.Errorf("%w (room %q, %d buffered)", ErrSlowHandler, sub.room, c.cfg.bufferSize)
}

func (c *Client) routeDirect(s *session, in *inbound) error {
	data, kind, err := in.payload()
	if err != nil {
		return fmt.Errorf("%w: direct message: %v", ErrProtocol, err)
	}
	if c.direct == nil {
		return nil
	}
	if !c.direct.push(item{msg: Message{Data: data, Kind: kind}}, false) {
		c.log.Warn("client: direct message handler fell behind; a direct message was lost", "buffer", c.cfg.bufferSize)
		s.mu.Lock()
		s.slowDirect = true
		s.mu.Unlock()
		return fmt.Errorf("%w (direct messages, %d buffered; one was lost)", ErrSlowHandler, c.cfg.bufferSize)
	}
	return nil
}

func (c *Client) dispatchDirect() {
	for {
		it, ok := c.direct.pop()
		if !ok {
			return
		}
		c.cfg.onDirect(it.msg)
		c.direct.done()
	}
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
