package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/roomcast/pubsub/protocol"
)

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

	mu       sync.Mutex
	sess     *session // the open connection; nil while there is none
	state    State
	err      error
	subs     map[string]*Subscription
	conn     welcome
	outbox   []*outgoing // publishes waiting for the server's answer, oldest first
	flushing *session    // the connection whose flushOutbox still runs

	sendMu sync.Mutex // held across a publish's write: the outbox's order on the wire
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
				Reason: r.Reason, Missed: deref(r.Missed), Epoch: r.Epoch, Seq: r.Seq}
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
