package pubsub

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"path"
	"strings"
	"time"
)

// Option configures a Handler. Options are applied in order by NewHandler,
// which validates the result once and panics with a "pubsub: " message on a
// value out of range.
type Option func(*config)

// Defaults, one place for every documented default.
const (
	defaultPath              = "/ws"
	defaultMaxMessageBytes   = 64 << 10
	defaultMaxRooms          = 100
	defaultMaxRoomNameLength = 128
	defaultRateLimit         = 20
	defaultRateBurst         = 50
	defaultWriteTimeout      = 10 * time.Second
	defaultHeartbeatInterval = 25 * time.Second
	defaultHeartbeatTimeout  = 10 * time.Second
	defaultQueueMessages     = 4096
	defaultQueueBytes        = 4 << 20
	defaultHistoryTTL        = 10 * time.Minute
	maxHistorySize           = 100_000
	defaultMaxInfoBytes      = 1024

	defaultMaxConnectionsPerUser = 100
	defaultDrainBatch            = 1000
	defaultDrainInterval         = 100 * time.Millisecond
	defaultKeyTTL                = 5 * time.Minute
)

// SlowConsumerPolicy is what a room does when a subscriber's outbound queue
// is full. Whatever the policy, it is counted (Stats, RoomStats, ConnStats)
// and never silent.
type SlowConsumerPolicy uint8

const (
	// SlowConsumerDisconnect closes the subscriber with 4002 "slow
	// consumer" when its queue is full and no drop-oldest message is
	// queued to make room. The default: a client that stays connected has
	// missed nothing.
	SlowConsumerDisconnect SlowConsumerPolicy = iota
	// SlowConsumerDropOldest lets the room's queued messages be discarded,
	// oldest first, to make room in a full queue (for a message of any
	// room); when none is queued, the room's new message itself is
	// dropped. The subscriber sees a gap in seq.
	SlowConsumerDropOldest
	// SlowConsumerKeepLatest keeps at most one of the room's messages
	// queued per subscriber: a newer one replaces the one still waiting,
	// whether or not the queue is full, and the newest value always
	// arrives (it may exceed the queue bound by that one message per
	// room). For tickers, where only the newest value matters; the
	// subscriber sees gaps in seq. Messages replayed from history are
	// never replaced.
	SlowConsumerKeepLatest
)

func (p SlowConsumerPolicy) String() string {
	switch p {
	case SlowConsumerDropOldest:
		return "drop-oldest"
	case SlowConsumerKeepLatest:
		return "keep-latest"
	}
	return "disconnect"
}

// PresenceMode is how a room tracks its members.
type PresenceMode uint8

const (
	// PresenceOn tracks members and sends join and leave events to the
	// subscribers that ask for them. The default.
	PresenceOn PresenceMode = iota
	// PresenceCounts tracks members but sends no events and lists only
	// counts to clients: for rooms with very many members, where a join
	// announced to everyone would cost as much as the room is large.
	PresenceCounts
	// PresenceOff tracks nothing.
	PresenceOff
)

func (m PresenceMode) String() string {
	switch m {
	case PresenceCounts:
		return "counts"
	case PresenceOff:
		return "off"
	}
	return "on"
}

// RoomOptions are one room's settings. The zero value keeps no history,
// tracks presence with events, and disconnects slow consumers.
type RoomOptions struct {
	// HistorySize is how many messages the room keeps for recovery and
	// History; 0 keeps none. At most 100,000.
	HistorySize int
	// HistoryTTL is how long a message is kept, and how long an idle
	// room's state outlives its last message. With HistorySize > 0 and no
	// TTL, 10 minutes applies: no room is kept forever.
	HistoryTTL time.Duration
	// Presence is how the room tracks its members.
	Presence PresenceMode
	// SlowConsumer is what the room does when a subscriber falls behind.
	SlowConsumer SlowConsumerPolicy
}

// normalize brings a hook's answer into range, as documented on the fields.
func (o RoomOptions) normalize() RoomOptions {
	o.HistorySize = min(max(o.HistorySize, 0), maxHistorySize)
	if o.HistorySize > 0 && o.HistoryTTL <= 0 {
		o.HistoryTTL = defaultHistoryTTL
	}
	if o.HistorySize == 0 {
		o.HistoryTTL = 0
	}
	if o.Presence > PresenceOff {
		o.Presence = PresenceOn
	}
	if o.SlowConsumer > SlowConsumerKeepLatest {
		o.SlowConsumer = SlowConsumerDisconnect
	}
	return o
}

func (o RoomOptions) history() HistoryOptions {
	return HistoryOptions{Size: o.HistorySize, TTL: o.HistoryTTL}
}

type config struct {
	logger *slog.Logger

	authenticate func(*http.Request) (Identity, error)
	authorize    func(context.Context, Client, Action, string) error
	onConnect    func(ConnectEvent)
	onDisconnect func(DisconnectEvent)
	onMessage    func(context.Context, *ClientMessage) error

	clientPublish      bool
	originPatterns     []string
	insecureSkipOrigin bool
	path               string
	roomValidator      func(string) error

	maxMessageBytes int64
	maxRooms        int
	rateLimit       float64
	rateBurst       int
	writeTimeout    time.Duration
	heartbeat       time.Duration
	heartbeatWait   time.Duration
	queue           queueLimits
	maxConns        int
	maxConnsPerUser int
	idleTimeout     time.Duration
	drainBatch      int
	drainInterval   time.Duration
	keyTTL          time.Duration
	defaultRoom     string

	broker Broker

	room     RoomOptions                       // every room's defaults
	roomFunc func(room string, o *RoomOptions) // per-room adjustments
	maxInfo  int
}

func defaultConfig() config {
	return config{
		path:            defaultPath,
		maxMessageBytes: defaultMaxMessageBytes,
		maxRooms:        defaultMaxRooms,
		rateLimit:       defaultRateLimit,
		rateBurst:       defaultRateBurst,
		writeTimeout:    defaultWriteTimeout,
		heartbeat:       defaultHeartbeatInterval,
		heartbeatWait:   defaultHeartbeatTimeout,
		queue:           queueLimits{defaultQueueMessages, defaultQueueBytes},
		maxInfo:         defaultMaxInfoBytes,
		maxConnsPerUser: defaultMaxConnectionsPerUser,
		drainBatch:      defaultDrainBatch,
		drainInterval:   defaultDrainInterval,
		keyTTL:          defaultKeyTTL,
	}
}

// maxReplay is the most messages a subscribe replays (history or
// recovery): the queue's bound less one, the ack's place. The welcome
// tells protocol clients ("max_replay").
func (c *config) maxReplay() int { return max(c.queue.messages-1, 1) }

// roomOptions returns room's settings: the defaults, adjusted by the
// WithRoomOptions function.
func (c *config) roomOptions(room string) RoomOptions {
	o := c.room
	if c.roomFunc != nil {
		c.roomFunc(room, &o)
	}
	return o.normalize()
}

// validate fills in the defaults that need construction (the logger, the
// room validator, the memory broker) and panics on the first value out of
// range. It runs once, in NewHandler.
func (c *config) validate() {
	bad := func(format string, args ...any) {
		panic("pubsub: " + fmt.Sprintf(format, args...))
	}
	if c.logger == nil {
		c.logger = slog.Default()
	}
	if c.roomValidator == nil {
		c.roomValidator = ValidRoomName
	}
	if c.broker == nil {
		c.broker = NewMemoryBroker()
	}
	if !strings.HasPrefix(c.path, "/") || path.Clean(c.path) != c.path {
		bad("WithPath(%q): the path must be clean and start with /", c.path)
	}
	for _, p := range c.originPatterns {
		if _, err := path.Match(p, ""); err != nil {
			bad("WithOriginPatterns(%q): %v", p, err)
		}
	}
	if c.maxMessageBytes < 1 || c.maxMessageBytes > 64<<20 {
		bad("WithMaxMessageBytes(%d): want 1 to 64 MiB", c.maxMessageBytes)
	}
	if c.maxRooms < 1 || c.maxRooms > 1_000_000 {
		bad("WithMaxRooms(%d): want 1 to 1,000,000", c.maxRooms)
	}
	if c.rateLimit <= 0 || c.rateBurst < 1 {
		bad("WithRateLimit(%v, %d): want a positive rate and a burst of at least 1", c.rateLimit, c.rateBurst)
	}
	if c.writeTimeout < 10*time.Millisecond {
		bad("WithWriteTimeout(%v): want at least 10ms", c.writeTimeout)
	}
	if c.heartbeat < 10*time.Millisecond || c.heartbeatWait < 10*time.Millisecond {
		bad("WithHeartbeat(%v, %v): want both at least 10ms", c.heartbeat, c.heartbeatWait)
	}
	if c.room.HistorySize < 0 || c.room.HistorySize > maxHistorySize || c.room.HistoryTTL < 0 ||
		(c.room.HistorySize > 0 && c.room.HistoryTTL == 0) {
		bad("WithHistory(%d, %v): want a size from 0 to %d and, with a size, a positive TTL",
			c.room.HistorySize, c.room.HistoryTTL, maxHistorySize)
	}
	if c.room.Presence > PresenceOff {
		bad("WithPresence(%d): not a PresenceMode", c.room.Presence)
	}
	if c.room.SlowConsumer > SlowConsumerKeepLatest {
		bad("WithSlowConsumerPolicy(%d): not a SlowConsumerPolicy", c.room.SlowConsumer)
	}
	if c.maxConns < 0 || c.maxConnsPerUser < 0 {
		bad("WithMaxConnections(%d) / WithMaxConnectionsPerUser(%d): want 0 (no limit) or more", c.maxConns, c.maxConnsPerUser)
	}
	if c.idleTimeout < 0 || (c.idleTimeout > 0 && c.idleTimeout < 10*time.Millisecond) {
		bad("WithIdleTimeout(%v): want 0 (off) or at least 10ms", c.idleTimeout)
	}
	if c.drainBatch < 1 || c.drainInterval < 0 {
		bad("WithDrain(%d, %v): want a batch of at least 1 and an interval of 0 or more", c.drainBatch, c.drainInterval)
	}
	if c.maxInfo < 0 || c.maxInfo > 64<<10 {
		bad("WithMaxInfoBytes(%d): want 0 to 64 KiB", c.maxInfo)
	}
	if c.defaultRoom != "" {
		if err := c.roomValidator(c.defaultRoom); err != nil {
			bad("WithDefaultRoom(%q): %v", c.defaultRoom, err)
		}
	}
	if c.keyTTL < time.Second || c.keyTTL > 24*time.Hour {
		bad("WithIdempotencyWindow(%v): want 1s to 24h", c.keyTTL)
	}
	if c.queue.messages < 1 || c.queue.bytes < 1 {
		bad("WithQueueLimits(%d, %d): want at least 1 message and 1 byte", c.queue.messages, c.queue.bytes)
	}
}

// WithLogger sets the logger. Default: slog.Default(). Connection lifecycle
// and client mistakes log at Debug, slow consumers at Warn, broker failures
// and hook panics at Error; nothing is logged per message.
func WithLogger(l *slog.Logger) Option {
	return func(c *config) { c.logger = l }
}

// WithAuthenticate sets the hook that identifies a client from its upgrade
// request (cookies, headers, a token in the query), before any WebSocket
// resource is spent. A nil error accepts the client with the returned
// Identity. An error refuses the upgrade with 401 Unauthorized, or with 403
// Forbidden when it wraps ErrForbidden; the error's text is logged at Debug,
// never sent to the client. Default: every client is accepted anonymously
// (empty UserID).
func WithAuthenticate(f func(r *http.Request) (Identity, error)) Option {
	return func(c *config) { c.authenticate = f }
}

// WithAuthorize sets the hook consulted before each subscribe and each client
// publish, per room. A nil error allows the action; any error denies it (the
// client gets the "forbidden" error code in protocol mode, 403 before the
// upgrade or close code 1008 in raw mode). When set, it decides client
// publishes too, whatever WithClientPublish says. Default: subscribing is
// allowed, publishing follows WithClientPublish.
func WithAuthorize(f func(ctx context.Context, c Client, a Action, room string) error) Option {
	return func(c *config) { c.authorize = f }
}

// WithClientPublish lets clients publish into rooms when no authorize hook is
// set. Default: false, clients only listen and the backend publishes.
func WithClientPublish(allow bool) Option {
	return func(c *config) { c.clientPublish = allow }
}

// WithOnConnect sets a callback run after a client's upgrade, before it is
// sent anything. Default: none.
func WithOnConnect(f func(ConnectEvent)) Option {
	return func(c *config) { c.onConnect = f }
}

// WithOnDisconnect sets a callback run once per connection after it closed,
// with the close code and reason. Default: none.
func WithOnDisconnect(f func(DisconnectEvent)) Option {
	return func(c *config) { c.onDisconnect = f }
}

// WithOnMessage sets the server-side handler for client messages addressed
// to the server: every frame of a raw-mode client (which then is not
// published automatically) and every "send" envelope in protocol mode. It
// runs on the connection's reader goroutine, so one client's messages are
// handled in order. In protocol mode a nil error is acknowledged and an
// error is answered with the "rejected" error code (its text is not sent).
// Default: none.
func WithOnMessage(f func(ctx context.Context, m *ClientMessage) error) Option {
	return func(c *config) { c.onMessage = f }
}

// WithOriginPatterns allows cross-origin upgrades from browsers whose Origin
// host matches one of the patterns (path.Match syntax, case-insensitive; a
// pattern with "://" is matched against "scheme://host"). Default: only the
// request's own host. Requests without an Origin header (non-browser
// clients) are always allowed, since no browser can omit it.
func WithOriginPatterns(patterns ...string) Option {
	return func(c *config) { c.originPatterns = append(c.originPatterns, patterns...) }
}

// WithInsecureSkipOriginCheck turns the origin check off: any web page can
// then open a connection with its visitors' cookies. Use it only when
// authentication does not rely on ambient credentials. Default: off.
func WithInsecureSkipOriginCheck() Option {
	return func(c *config) { c.insecureSkipOrigin = true }
}

// WithPath sets the path the Handler is mounted at. Middleware serves the
// WebSocket endpoint there, and a raw-mode client may name its room as the
// path below it ("/ws/lobby"). Default: "/ws".
func WithPath(p string) Option {
	return func(c *config) { c.path = p }
}

// WithRoomValidator replaces the room-name check applied to every room a
// client or the backend names. Default: ValidRoomName.
func WithRoomValidator(f func(room string) error) Option {
	return func(c *config) { c.roomValidator = f }
}

// WithMaxMessageBytes bounds one inbound WebSocket message. A larger message
// closes the connection with 1009. Default: 64 KiB; range 1 byte to 64 MiB.
func WithMaxMessageBytes(n int64) Option {
	return func(c *config) { c.maxMessageBytes = n }
}

// WithMaxRooms bounds the rooms one protocol-mode connection may join; one
// more is answered with "too_many_rooms". Default: 100; range 1 to 1,000,000.
func WithMaxRooms(n int) Option {
	return func(c *config) { c.maxRooms = n }
}

// WithRateLimit bounds the messages one client may send (heartbeats aside)
// with a token bucket: perSecond sustained, burst at once. Past it a
// protocol-mode message is answered with "rate_limited" and dropped; a
// raw-mode client is closed with 4004. Default: 20 per second, burst 50.
func WithRateLimit(perSecond float64, burst int) Option {
	return func(c *config) { c.rateLimit, c.rateBurst = perSecond, burst }
}

// WithWriteTimeout bounds how long one write of queued messages to a socket
// may take. A client that does not read for that long is not keeping up: it
// is closed as a slow consumer (4002, counted in Stats), at once, without
// waiting for a close handshake. Default: 10s; at least 10ms.
func WithWriteTimeout(d time.Duration) Option {
	return func(c *config) { c.writeTimeout = d }
}

// WithHeartbeat sets how often the server checks a connection's liveness and
// how long it waits for an answer. A protocol-mode client gets a "ping"
// envelope every interval and must show life (any message, "pong" included)
// within interval+timeout; a raw-mode client that sent nothing for an
// interval gets a WebSocket ping and must answer it within timeout. A dead
// peer is closed with 4001. Default: 25s and 10s; each at least 10ms.
func WithHeartbeat(interval, timeout time.Duration) Option {
	return func(c *config) { c.heartbeat, c.heartbeatWait = interval, timeout }
}

// WithQueueLimits bounds each connection's outbound queue, in messages and
// in bytes. A consumer whose queue would pass either bound is disconnected
// with 4002 "slow consumer" and counted in Stats. A Publish larger than the
// byte bound fails with ErrTooLarge, since no connection could take it.
// Default: 4096 messages and 4 MiB. The byte bound is the memory bound; the
// message bound lets a client fall a burst of a few thousand small
// messages behind (about a second of a flood on loopback) without being
// cut off.
func WithQueueLimits(messages, bytes int) Option {
	return func(c *config) { c.queue.messages, c.queue.bytes = messages, bytes }
}

// WithBroker sets the broker that carries publishes between nodes. One
// broker serves one Handler. Default: NewMemoryBroker(), a single node.
func WithBroker(b Broker) Option {
	return func(c *config) { c.broker = b }
}

// WithHistory makes every room keep its last size messages for at most ttl,
// so a reconnecting client can recover what it missed and the backend can
// read History. Default: no history. size 0 to 100,000; with a size,
// ttl must be positive. WithRoomOptions can set it per room.
func WithHistory(size int, ttl time.Duration) Option {
	return func(c *config) { c.room.HistorySize, c.room.HistoryTTL = size, ttl }
}

// WithPresence sets how every room tracks its members. Default: PresenceOn.
// WithRoomOptions can set it per room.
func WithPresence(m PresenceMode) Option {
	return func(c *config) { c.room.Presence = m }
}

// WithSlowConsumerPolicy sets what every room does when a subscriber's
// queue is full. Default: SlowConsumerDisconnect. WithRoomOptions can set it per room.
func WithSlowConsumerPolicy(p SlowConsumerPolicy) Option {
	return func(c *config) { c.room.SlowConsumer = p }
}

// WithRoomOptions adjusts each room's settings. f gets the room's name and
// the defaults (from WithHistory, WithPresence, WithSlowConsumerPolicy) to
// change in place. It is called whenever a room's settings are needed (on
// every publish, and when a room gets its first subscriber on this node),
// so it must be fast and give the same answer for the same room, on every
// node. Values out of range are brought into range as RoomOptions
// documents. Default: none, every room gets the defaults.
func WithRoomOptions(f func(room string, o *RoomOptions)) Option {
	return func(c *config) { c.roomFunc = f }
}

// WithMaxInfoBytes bounds the presence info a client may attach when it
// subscribes (a JSON object); a larger one is answered with bad_request.
// Default: 1 KiB; range 0 (clients may attach none) to 64 KiB.
func WithMaxInfoBytes(n int) Option {
	return func(c *config) { c.maxInfo = n }
}

// WithMaxConnections bounds the connections this Handler serves at once,
// upgrades in progress included. One more is refused before the upgrade
// with 503 and Retry-After. Set it below the process's file limit. Default:
// 0, no limit.
func WithMaxConnections(n int) Option {
	return func(c *config) { c.maxConns = n }
}

// WithMaxConnectionsPerUser bounds the connections of one authenticated
// user (Identity.UserID) at once; one more is refused before the upgrade
// with 429. Anonymous connections are not counted per user. Default: 100;
// 0 means no limit.
func WithMaxConnectionsPerUser(n int) Option {
	return func(c *config) { c.maxConnsPerUser = n }
}

// WithIdleTimeout closes a connection (4005 "idle timeout") after d with no
// message either way, heartbeats aside; it is checked at each heartbeat, so
// the close comes up to one heartbeat interval later. Default: 0, off (a
// live client is never closed for being quiet).
func WithIdleTimeout(d time.Duration) Option {
	return func(c *config) { c.idleTimeout = d }
}

// WithDrain paces Shutdown: it closes connections batch at a time, interval
// apart, so a fleet's clients do not all reconnect in the same instant.
// When Shutdown's context ends, the rest are closed at once. Default: 1000
// connections every 100ms.
func WithDrain(batch int, interval time.Duration) Option {
	return func(c *config) { c.drainBatch, c.drainInterval = batch, interval }
}

// WithIdempotencyWindow sets how long a publish's idempotency key is
// remembered: a publish with a key sequenced less than d ago, from the
// backend (IdempotencyKey) or a client (the publish "key"), publishes
// nothing again. Clients learn it from the welcome ("key_ttl_ms") and stop
// resending a publish older than it. Longer windows cost the broker memory
// (a key per keyed publish). Default 5 minutes; 1s to 24h.
func WithIdempotencyWindow(d time.Duration) Option {
	return func(c *config) { c.keyTTL = d }
}

// WithDefaultRoom is the room of a raw-mode client that names none (no
// "room" query parameter, nothing below the path): a tutorial's
// `wscat -c ws://host/ws` then joins it and can chat at once. Default: none;
// such a client only gets direct messages, and publishing closes it with
// 1008. The room must pass the room validator.
func WithDefaultRoom(room string) Option {
	return func(c *config) { c.defaultRoom = room }
}
