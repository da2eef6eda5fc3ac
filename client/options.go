package client

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"time"
)

// Option configures a Client. Dial applies options in order and panics
// with a "client: " message on a value out of range.
type Option func(*config)

// Defaults of the options.
const (
	DefaultMinBackoff  = 500 * time.Millisecond
	DefaultMaxBackoff  = 30 * time.Second
	DefaultBufferSize  = 4096
	DefaultDialTimeout = 10 * time.Second
	DefaultReadLimit   = 32 << 20
	DefaultOutboxSize  = 1000
)

// writeTimeout bounds one envelope's write; past it the connection is
// considered dead and re-established.
const writeTimeout = 10 * time.Second

type config struct {
	header      http.Header
	httpClient  *http.Client
	reconnect   bool
	minBackoff  time.Duration
	maxBackoff  time.Duration
	logger      *slog.Logger
	onState     func(State, error)
	onDirect    Handler
	bufferSize  int
	dialTimeout time.Duration
	readLimit   int64
	outboxSize  int
}

func defaultConfig() config {
	return config{
		reconnect:   true,
		minBackoff:  DefaultMinBackoff,
		maxBackoff:  DefaultMaxBackoff,
		bufferSize:  DefaultBufferSize,
		dialTimeout: DefaultDialTimeout,
		readLimit:   DefaultReadLimit,
		outboxSize:  DefaultOutboxSize,
	}
}

func (c *config) validate() {
	bad := func(format string, args ...any) {
		panic("client: " + fmt.Sprintf(format, args...))
	}
	if c.logger == nil {
		c.logger = slog.Default()
	}
	if c.minBackoff <= 0 || c.maxBackoff < c.minBackoff {
		bad("WithReconnect(%v, %v): want 0 < min <= max", c.minBackoff, c.maxBackoff)
	}
	if c.bufferSize < 1 {
		bad("WithBufferSize(%d): want at least 1", c.bufferSize)
	}
	if c.dialTimeout <= 0 {
		bad("WithDialTimeout(%v): want a positive duration", c.dialTimeout)
	}
	if c.outboxSize < 1 {
		bad("WithOutbox(%d): want at least 1", c.outboxSize)
	}
	if c.readLimit < 1 {
		bad("WithReadLimit(%d): want at least 1 byte", c.readLimit)
	}
}

// WithHeader adds headers to every upgrade request, the first and each
// reconnection: typically authentication (Authorization, Cookie).
// Default: none.
func WithHeader(h http.Header) Option {
	return func(c *config) { c.header = h.Clone() }
}

// WithHTTPClient sets the HTTP client that performs upgrade requests (for
// a custom transport, TLS configuration or proxy). Default:
// http.DefaultClient.
func WithHTTPClient(hc *http.Client) Option {
	return func(c *config) { c.httpClient = hc }
}

// WithReconnect sets the delays between reconnection attempts: the n-th
// attempt in a row waits a random time between half and all of
// min*2^(n-1), capped at max. Default: 500ms and 30s.
func WithReconnect(min, max time.Duration) Option {
	return func(c *config) { c.reconnect, c.minBackoff, c.maxBackoff = true, min, max }
}

// WithoutReconnect makes the Client stop (StateClosed) when its connection
// ends, instead of reconnecting. Default: the Client reconnects.
func WithoutReconnect() Option {
	return func(c *config) { c.reconnect = false }
}

// WithLogger sets the logger. Connection changes log at Debug, a handler
// falling behind at Warn; nothing is logged per message. Default:
// slog.Default().
func WithLogger(l *slog.Logger) Option {
	return func(c *config) { c.logger = l }
}

// WithOnState sets a callback for the Client's connection state: Connected
// (with a nil error) once Dial's connection is ready and after each
// reconnection, once every subscription is restored; Reconnecting with the
// reason, when the connection ends and after each failed attempt; Closed
// once, at the end, with nil after Close or the reason the Client stopped
// for good. Calls come one at a time, in order, from the goroutine that
// manages the connection: keep them short, and do not call Close from one
// (it would wait for itself; use go c.Close()). Default: none.
func WithOnState(f func(State, error)) Option {
	return func(c *config) { c.onState = f }
}

// WithOnDirect sets the handler of direct messages: those the server
// addressed to this connection or its user rather than to a room. Their
// Room, Epoch, Seq and ID are empty. They are delivered in order on a
// goroutine of their own with a buffer of WithBufferSize messages. When
// that buffer is full the Client treats it like a full subscription buffer
// (it reconnects once the handler caught up, and WithOnState gets
// ErrSlowHandler), but direct messages have no history: the one that did
// not fit is lost. Default: direct messages are ignored.
func WithOnDirect(h Handler) Option {
	return func(c *config) { c.onDirect = h }
}

// WithBufferSize bounds the messages (and presence events) waiting for
// each subscription's Handler, and the direct messages waiting for the
// WithOnDirect handler. When a buffer is full the Client never drops a
// message silently: it closes the connection, waits until the slow handler
// has caught up, reconnects and recovers the missed messages from the
// room's history (see Recovery), reporting ErrSlowHandler to WithOnState.
// The default is the server's default queue (4,096 messages), so an empty
// buffer holds any replay a server with default limits sends: a replay is
// never more than the server's queue holds. Default: 4096; at least 1.
func WithBufferSize(n int) Option {
	return func(c *config) { c.bufferSize = n }
}

// WithDialTimeout bounds each reconnection attempt: the upgrade and the
// server's welcome. Dial itself is bounded by its context. Default: 10s.
func WithDialTimeout(d time.Duration) Option {
	return func(c *config) { c.dialTimeout = d }
}

// WithReadLimit bounds one message from the server, in bytes. A larger
// one closes the connection (and, being replayed on recovery, would again),
// so keep it above the largest envelope the server may send: its queue's
// byte bound (4 MiB by default), base64-encoded. Default: 32 MiB.
func WithReadLimit(n int64) Option {
	return func(c *config) { c.readLimit = n }
}

// SubscribeOption configures one subscription.
type SubscribeOption func(*subConfig)

type subConfig struct {
	onPresence func(Event)
	info       json.RawMessage
	history    int
	onRecover  func(Recovery)
}

// OnPresence asks for the room's join and leave events and passes them to
// f, on the subscription's goroutine, in order with its messages. The
// first event may be this connection's own join. Default: no events.
func OnPresence(f func(Event)) SubscribeOption {
	return func(c *subConfig) { c.onPresence = f }
}

// Info is what other members see of this connection in the room's
// presence: a JSON object, at most 1 KiB on a default server. The server's
// own info for the user, when it has some, wins. Default: none.
func Info(info json.RawMessage) SubscribeOption {
	return func(c *subConfig) { c.info = info }
}

// History asks for the room's last n kept messages, replayed before the
// live ones with no gap and no duplicate. The server sends fewer when the
// room keeps fewer. Only the first subscribe uses it; a resubscription
// after a reconnect recovers from the subscription's position instead.
// Default: 0.
func History(n int) SubscribeOption {
	return func(c *subConfig) { c.history = n }
}

// OnRecover passes f the outcome of each resubscription after a reconnect,
// on the subscription's goroutine, before the replayed messages. Default:
// none (the outcome is logged at Debug).
func OnRecover(f func(Recovery)) SubscribeOption {
	return func(c *subConfig) { c.onRecover = f }
}

// WithOutbox bounds the publishes waiting in the outbox for the server's
// answer (see Publish): sent and not yet acknowledged, or waiting for a
// connection. One more fails at once with ErrOutboxFull. Default: 1000; at
// least 1.
func WithOutbox(n int) Option {
	return func(c *config) { c.outboxSize = n }
}
