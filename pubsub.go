package pubsub

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"path"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/roomcast/pubsub/protocol"

	"github.com/coder/websocket"
	"github.com/google/uuid"
)

// Sentinel errors, checked with errors.Is.
var (
	// ErrClosed: the Handler (or its broker) is shutting down or closed.
	ErrClosed = errors.New("pubsub: handler closed")
	// ErrInvalidRoom: the room name fails the room validator.
	ErrInvalidRoom = errors.New("pubsub: invalid room name")
	// ErrTooLarge: the payload is larger than a connection's queue may hold.
	ErrTooLarge = errors.New("pubsub: payload larger than the per-connection queue bound")
	// ErrConnNotFound: no open connection on this node has that id (or user).
	ErrConnNotFound = errors.New("pubsub: connection not found")
	// ErrUnauthorized, returned by an authenticate hook, answers 401.
	ErrUnauthorized = errors.New("pubsub: unauthorized")
	// ErrForbidden, returned by an authenticate hook, answers 403; returned
	// by an authorize hook, it denies the action.
	ErrForbidden = errors.New("pubsub: forbidden")
)

// errHookPanicked is what a hook call returns when the hook panicked.
var errHookPanicked = errors.New("pubsub: hook panicked")

// Mode is how a connection talks: raw frames or protocol envelopes.
type Mode uint8

const (
	ModeRaw      Mode = iota // no subprotocol: one room, payloads verbatim
	ModeProtocol             // subprotocol roomcast.v1: JSON envelopes, many rooms
)

func (m Mode) String() string {
	if m == ModeProtocol {
		return "protocol"
	}
	return "raw"
}

// Action is what an authorize hook is asked about.
type Action string

const (
	ActionSubscribe Action = "subscribe"
	ActionPublish   Action = "publish"
)

// Identity is what an authenticate hook says about a client.
type Identity struct {
	// UserID groups a user's connections (tabs, devices) for PublishToUser
	// and DisconnectUser, and makes them one member in presence. Empty
	// means anonymous.
	UserID string
	// Info is shown to other members in presence: a JSON object, such as
	// {"name":"Ann"}. When set, it wins over the info a client supplies.
	// Anything but a JSON object refuses the upgrade with 500 (a host bug).
	Info json.RawMessage
}

// Client describes one connection to hooks and to the server API.
type Client struct {
	ID         string // a random UUID, unique per connection
	UserID     string // from the authenticate hook; empty when anonymous
	Mode       Mode
	RemoteAddr string          // the upgrade request's RemoteAddr
	Info       json.RawMessage // Identity.Info
}

// ConnectEvent is passed to the WithOnConnect callback.
type ConnectEvent struct {
	Client Client
}

// DisconnectEvent is passed to the WithOnDisconnect callback.
type DisconnectEvent struct {
	Client Client
	Code   protocol.CloseCode // the close code; CloseAbnormal (1006) when the connection was lost without one
	Reason string             // the close reason
}

// ClientMessage is a message a client addressed to the server, passed to
// the WithOnMessage handler.
type ClientMessage struct {
	Client Client
	Room   string // raw mode: the connection's room; protocol mode: the optional "room" field
	Data   []byte // the payload; valid until the handler returns
	Binary bool   // raw mode: it came in a binary frame

	c *conn
}

// Reply sends data to the connection the message came from, as a
// direct message. It never blocks.
func (m *ClientMessage) Reply(data []byte) error {
	if !m.c.enqueue(newDirectFrame(bytes.Clone(data))) {
		return ErrConnNotFound
	}
	return nil
}

// Stats is a snapshot of a Handler's counters.
type Stats struct {
	Connections   int    // open connections
	Rooms         int    // rooms with at least one subscriber on this node
	MessagesIn    uint64 // data messages received from clients (heartbeats aside)
	MessagesOut   uint64 // room and direct messages written to clients
	Published     uint64 // messages published into rooms, by the server and clients
	SlowConsumers uint64 // connections closed because their queue overflowed or a write timed out
	Dropped       uint64 // messages discarded by a SlowConsumerDropOldest or SlowConsumerKeepLatest room
	RateLimited   uint64 // client messages refused by the rate limit
	Refused       uint64 // upgrades refused (origin, authentication, room, shutdown)
	HookPanics    uint64 // panics recovered from hooks
}

type counters struct {
	messagesIn, messagesOut, published, slowConsumers, dropped,
	rateLimited, refused, hookPanics atomic.Uint64
}

// Handler serves WebSocket clients and publishes into rooms. Create it with
// NewHandler; it is safe for concurrent use.
type Handler struct {
	cfg   config
	log   *slog.Logger
	rooms *registry
	stats counters

	ctx    context.Context // every connection's context derives from it
	cancel context.CancelFunc

	mu        sync.Mutex
	closing   bool
	conns     map[string]*conn
	users     map[string]map[*conn]struct{}
	slots     int            // connections open or upgrading (WithMaxConnections)
	userSlots map[string]int // the same per user (WithMaxConnectionsPerUser)
	serving   sync.WaitGroup // running ServeHTTP calls
	live      sync.WaitGroup // served connections' goroutines (conn.run)
	writers   writerPool

	closeBroker sync.Once
	brokerErr   error
}

// NewHandler returns a Handler configured by opts. It starts no goroutine
// and panics with a "pubsub: " message on an option out of range.
func NewHandler(opts ...Option) *Handler {
	cfg := defaultConfig()
	for _, o := range opts {
		o(&cfg)
	}
	cfg.validate()
	h := &Handler{
		cfg:       cfg,
		log:       cfg.logger,
		conns:     make(map[string]*conn),
		users:     make(map[string]map[*conn]struct{}),
		userSlots: make(map[string]int),
	}
	h.writers.max, h.writers.out = runtime.GOMAXPROCS(0), &h.stats.messagesOut
	h.ctx, h.cancel = context.WithCancel(context.Background())
	h.rooms = newRegistry(cfg.broker, h.cfg.roomOptions, cfg.queue.messages, h.brokerFailed)
	cfg.broker.Bind(h.rooms.deliver)
	return h
}

func (h *Handler) brokerFailed(op, room string, err error) {
	h.log.Error("pubsub: broker "+op+" failed", "room", room, "err", err)
}

// refuse answers an upgrade request with an HTTP error before any
// WebSocket resource is spent.
func (h *Handler) refuse(w http.ResponseWriter, r *http.Request, status int, msg string) {
	h.stats.refused.Add(1)
	h.log.Debug("pubsub: upgrade refused", "status", status, "reason", msg, "remote", r.RemoteAddr)
	http.Error(w, "roomcast: "+msg, status)
}

// ServeHTTP upgrades the request to a WebSocket and serves it until it
// closes. A plain GET of <path>/roomcast.js gets the browser client
// instead (see ClientScript). A request that offers subprotocol roomcast.v1 is in protocol
// mode; one that offers none is in raw mode. Refusals are answered before
// the upgrade: 503 while shutting down, 426 for a request that is not a
// WebSocket upgrade, 400 for a foreign subprotocol or a bad room, 403 for a
// foreign origin or a denied room, 401/403 from the authenticate hook.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !isUpgrade(r) && h.serveClient(w, r) {
		return
	}
	if !h.enter() {
		h.refuse(w, r, http.StatusServiceUnavailable, "the server is shutting down")
		return
	}
	defer h.serving.Done()

	if !isUpgrade(r) {
		w.Header().Set("Upgrade", "websocket")
		h.refuse(w, r, http.StatusUpgradeRequired, "this endpoint accepts WebSocket connections only")
		return
	}
	mode, ok := selectMode(r)
	if !ok {
		h.refuse(w, r, http.StatusBadRequest, "unsupported subprotocol; this server speaks "+protocol.Subprotocol+" or none (raw mode)")
		return
	}
	if !h.originAllowed(r) {
		h.refuse(w, r, http.StatusForbidden, "origin not allowed")
		return
	}
	id, err := h.callAuthenticate(r)
	if err != nil {
		switch {
		case errors.Is(err, errHookPanicked):
			h.refuse(w, r, http.StatusInternalServerError, "internal error")
		case errors.Is(err, ErrForbidden):
			h.refuse(w, r, http.StatusForbidden, "forbidden")
		default:
			h.log.Debug("pubsub: authentication failed", "err", err)
			h.refuse(w, r, http.StatusUnauthorized, "unauthorized")
		}
		return
	}
	if len(id.Info) > 0 && !isJSONObject(id.Info) {
		h.log.Error("pubsub: the authenticate hook returned an Identity.Info that is not a JSON object", "user_id", id.UserID)
		h.refuse(w, r, http.StatusInternalServerError, "internal error")
		return
	}
	// A slot, before any WebSocket resource is spent; run gives it back.
	switch h.reserve(id.UserID) {
	case errServerFull:
		w.Header().Set("Retry-After", "5")
		h.refuse(w, r, http.StatusServiceUnavailable, "too many connections; try again later")
		return
	case errUserFull:
		h.refuse(w, r, http.StatusTooManyRequests, "too many connections for this user")
		return
	}
	c := newConn(h, Client{ID: uuid.NewString(), UserID: id.UserID, Mode: mode, RemoteAddr: r.RemoteAddr, Info: id.Info})
	// Until the connection is handed to its own goroutine, this call owns
	// it and undoes what it did on every early return.
	handedOff := false
	defer func() {
		if !handedOff {
			c.leaveAll()
			c.cancel()
			h.release(id.UserID)
		}
	}()

	if mode == ModeRaw {
		room, err := h.rawRoom(r)
		if err != nil {
			h.refuse(w, r, http.StatusBadRequest, err.Error())
			return
		}
		history, err := rawHistory(r)
		if err != nil {
			h.refuse(w, r, http.StatusBadRequest, err.Error())
			return
		}
		if room != "" {
			if perr := c.authorize(ActionSubscribe, room); perr != nil {
				status := http.StatusForbidden
				if perr.code == protocol.CodeInternal {
					status = http.StatusInternalServerError
				}
				h.refuse(w, r, status, perr.msg)
				return
			}
			// Join before the upgrade, so a broker failure can still be a 503.
			if _, err := c.subscribe(room, nil, history, false, nil, ""); err != nil {
				h.brokerFailed("subscribe", room, err)
				h.refuse(w, r, http.StatusServiceUnavailable, "could not join the room; try again later")
				return
			}
		}
	}
	opts := &websocket.AcceptOptions{
		InsecureSkipVerify: true, // originAllowed already checked, before authentication
		// The Handler writes message frames itself, uncompressed (see wireFrame).
		CompressionMode: websocket.CompressionDisabled,
		OnPongReceived: func(context.Context, []byte) {
			c.lastSeen.Store(time.Now().UnixNano())
		},
	}
	if mode == ModeProtocol {
		opts.Subprotocols = []string{protocol.Subprotocol}
	}
	hw := &hijacker{ResponseWriter: w}
	ws, err := websocket.Accept(hw, r, opts)
	if err != nil {
		h.log.Debug("pubsub: upgrade failed", "err", err, "remote", r.RemoteAddr)
		return // Accept answered the request
	}
	ws.SetReadLimit(h.cfg.maxMessageBytes)
	c.mu.Lock()
	c.ws, c.sock, c.br = ws, hw.sock, hw.br
	c.mu.Unlock()
	if c.proto {
		// Queued before the connection is reachable (register), so it is
		// always the first frame.
		c.enqueue(newControlFrame(encodeWelcome(welcome{
			ConnID:          c.client.ID,
			UserID:          c.client.UserID,
			HeartbeatMS:     h.cfg.heartbeat.Milliseconds(),
			TimeoutMS:       h.cfg.heartbeatWait.Milliseconds(),
			MaxMessageBytes: h.cfg.maxMessageBytes,
			MaxRooms:        h.cfg.maxRooms,
		})))
	}
	if !h.register(c) {
		c.beginClose(protocol.CloseGoingAway, "server shutting down", false)
		c.wg.Wait()
		return
	}
	handedOff = true
	h.log.Debug("pubsub: connected", "conn_id", c.client.ID, "user_id", c.client.UserID, "mode", mode.String())
	if h.cfg.onConnect != nil {
		h.callHook("on_connect", c.client, func() error { h.cfg.onConnect(ConnectEvent{Client: c.client}); return nil })
	}
	c.startHeartbeat()
	c.wakeWriter() // what a raw client's history query queued before the upgrade
	// ServeHTTP returns now: net/http then frees the request's state (its
	// buffers, the serving goroutine's stack), which would otherwise live
	// as long as the connection. register counted this goroutine in h.live.
	go func() {
		defer h.live.Done()
		c.run()
	}()
}

// enter counts a ServeHTTP call, unless the Handler is closing.
func (h *Handler) enter() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closing {
		return false
	}
	h.serving.Add(1)
	return true
}

var (
	errServerFull = errors.New("server full")
	errUserFull   = errors.New("user full")
)

// reserve takes a connection slot for userID, within WithMaxConnections
// and WithMaxConnectionsPerUser. Slots count upgrades in progress too, so
// a burst cannot overshoot. release gives the slot back.
func (h *Handler) reserve(userID string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if max := h.cfg.maxConns; max > 0 && h.slots >= max {
		return errServerFull
	}
	if max := h.cfg.maxConnsPerUser; max > 0 && userID != "" && h.userSlots[userID] >= max {
		return errUserFull
	}
	h.slots++
	if userID != "" {
		h.userSlots[userID]++
	}
	return nil
}

func (h *Handler) release(userID string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.slots--
	if userID != "" {
		if h.userSlots[userID]--; h.userSlots[userID] <= 0 {
			delete(h.userSlots, userID)
		}
	}
}

func (h *Handler) register(c *conn) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closing {
		return false
	}
	h.conns[c.client.ID] = c
	h.live.Add(1) // under mu, so never after Shutdown began to wait
	if uid := c.client.UserID; uid != "" {
		set := h.users[uid]
		if set == nil {
			set = make(map[*conn]struct{})
			h.users[uid] = set
		}
		set[c] = struct{}{}
	}
	return true
}

func (h *Handler) unregister(c *conn) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.conns, c.client.ID)
	if uid := c.client.UserID; uid != "" {
		delete(h.users[uid], c)
		if len(h.users[uid]) == 0 {
			delete(h.users, uid)
		}
	}
}

func isUpgrade(r *http.Request) bool {
	return r.Method == http.MethodGet &&
		headerHasToken(r.Header, "Connection", "upgrade") &&
		headerHasToken(r.Header, "Upgrade", "websocket")
}

func headerHasToken(h http.Header, key, token string) bool {
	for _, v := range h.Values(key) {
		for t := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// selectMode reads the offered subprotocols: ours means protocol mode,
// none means raw mode, and only foreign ones are refused.
func selectMode(r *http.Request) (Mode, bool) {
	offered := false
	for _, v := range r.Header.Values("Sec-WebSocket-Protocol") {
		for t := range strings.SplitSeq(v, ",") {
			t = strings.TrimSpace(t)
			if t == protocol.Subprotocol {
				return ModeProtocol, true
			}
			if t != "" {
				offered = true
			}
		}
	}
	return ModeRaw, !offered
}

// originAllowed applies the origin policy: no Origin header (not a
// browser), the request's own host, or a WithOriginPatterns match.
func (h *Handler) originAllowed(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" || h.cfg.insecureSkipOrigin {
		return true
	}
	u, err := url.Parse(origin)
	if err != nil || u.Host == "" {
		return false
	}
	if strings.EqualFold(u.Host, r.Host) {
		return true
	}
	for _, p := range h.cfg.originPatterns {
		target := u.Host
		if strings.Contains(p, "://") {
			target = u.Scheme + "://" + u.Host
		}
		if ok, _ := path.Match(strings.ToLower(p), strings.ToLower(target)); ok {
			return true
		}
	}
	return false
}

// rawRoom finds a raw-mode client's room: the "room" query parameter, else
// a {room...} path wildcard of the route, else the path below WithPath.
// No room at all is allowed: the client then only gets direct messages.
func (h *Handler) rawRoom(r *http.Request) (string, error) {
	room := ""
	q := r.URL.Query()
	switch {
	case q.Has("room"):
		room = q.Get("room")
		if room == "" {
			return "", errors.New("the room query parameter is empty")
		}
	case r.PathValue("room") != "":
		room = r.PathValue("room")
	default:
		rest, ok := strings.CutPrefix(r.URL.Path, h.cfg.path+"/")
		if !ok || rest == "" {
			return "", nil
		}
		room = rest
	}
	if err := h.cfg.roomValidator(room); err != nil {
		return "", fmt.Errorf("invalid room: %v", err)
	}
	return room, nil
}

func isJSONObject(b []byte) bool {
	t := bytes.TrimLeft(b, " \t\r\n")
	return len(t) > 0 && t[0] == '{' && json.Valid(b)
}

// rawHistory reads a raw-mode client's "history" query parameter: how
// many of the room's last messages to replay before live ones.
func rawHistory(r *http.Request) (int, error) {
	v := r.URL.Query().Get("history")
	if v == "" {
		return 0, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 || n > MaxHistorySize {
		return 0, fmt.Errorf("the history query parameter must be a number from 0 to %d", MaxHistorySize)
	}
	return n, nil
}

// Publish publishes data into room. Every subscriber, on every node, gets
// it in the room's order. Publish copies data and never blocks on a
// subscriber; it fails with ErrInvalidRoom, ErrTooLarge, ErrClosed, or the
// broker's error.
func (h *Handler) Publish(ctx context.Context, room string, data []byte) error {
	if err := h.publish(ctx, room, data); err != nil {
		return fmt.Errorf("pubsub: publish to room %q: %w", room, err)
	}
	return nil
}

func (h *Handler) publish(ctx context.Context, room string, data []byte) error {
	if h.isClosing() {
		return ErrClosed
	}
	if err := h.cfg.roomValidator(room); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalidRoom, err)
	}
	if len(data) > h.cfg.queue.bytes {
		return ErrTooLarge
	}
	if _, err := h.cfg.broker.Publish(ctx, room, bytes.Clone(data), PublishOptions{History: h.cfg.roomOptions(room).history()}); err != nil {
		return err
	}
	h.stats.published.Add(1)
	return nil
}

// publishFromClient publishes a client's message, turning failures into
// the client's error codes.
func (h *Handler) publishFromClient(ctx context.Context, room string, data []byte) *protoError {
	err := h.publish(ctx, room, data)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, ErrTooLarge):
		return badRequest("the payload is larger than the server's queue bound")
	case errors.Is(err, ErrClosed):
		return &protoError{protocol.CodeUnavailable, "the server is shutting down"}
	default:
		h.brokerFailed("publish", room, err)
		return &protoError{protocol.CodeUnavailable, "could not publish; try again later"}
	}
}

func (h *Handler) isClosing() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.closing
}

// PublishToConn sends data to one connection on this node as a direct
// message. It never blocks; it fails with ErrConnNotFound when no open
// connection has that id.
func (h *Handler) PublishToConn(ctx context.Context, connID string, data []byte) error {
	if len(data) > h.cfg.queue.bytes {
		return fmt.Errorf("pubsub: publish to connection %q: %w", connID, ErrTooLarge)
	}
	h.mu.Lock()
	c := h.conns[connID]
	h.mu.Unlock()
	if c == nil || !c.enqueue(newDirectFrame(bytes.Clone(data))) {
		return fmt.Errorf("pubsub: publish to connection %q: %w", connID, ErrConnNotFound)
	}
	return nil
}

// PublishToUser sends data to every connection of userID on this node as
// a direct message. It fails with ErrConnNotFound when the user has no
// open connection.
func (h *Handler) PublishToUser(ctx context.Context, userID string, data []byte) error {
	if len(data) > h.cfg.queue.bytes {
		return fmt.Errorf("pubsub: publish to user %q: %w", userID, ErrTooLarge)
	}
	f := newDirectFrame(bytes.Clone(data))
	sent := 0
	for _, c := range h.userConns(userID) {
		if c.enqueue(f) {
			sent++
		}
	}
	if sent == 0 {
		return fmt.Errorf("pubsub: publish to user %q: %w", userID, ErrConnNotFound)
	}
	return nil
}

func (h *Handler) userConns(userID string) []*conn {
	h.mu.Lock()
	defer h.mu.Unlock()
	if userID == "" {
		return nil
	}
	out := make([]*conn, 0, len(h.users[userID]))
	for c := range h.users[userID] {
		out = append(out, c)
	}
	return out
}

// Connections lists the connections on this node subscribed to room.
func (h *Handler) Connections(room string) []Client {
	return h.rooms.clients(room)
}

// History returns up to limit of the newest messages room keeps, oldest
// first (see WithHistory). A room without history returns none.
func (h *Handler) History(ctx context.Context, room string, limit int) ([]Message, error) {
	if err := h.cfg.roomValidator(room); err != nil {
		return nil, fmt.Errorf("pubsub: history of room %q: %w: %v", room, ErrInvalidRoom, err)
	}
	if limit <= 0 {
		return nil, nil
	}
	res, err := h.cfg.broker.History(ctx, room, HistoryQuery{Limit: limit, Latest: true})
	if err != nil {
		return nil, fmt.Errorf("pubsub: history of room %q: %w", room, err)
	}
	return res.Messages, nil
}

// Presence lists room's members across the cluster. A user with several
// connections is one member. In a PresenceCounts room only the counts are
// filled in; in a PresenceOff room everything is zero.
func (h *Handler) Presence(ctx context.Context, room string) (Presence, error) {
	if err := h.cfg.roomValidator(room); err != nil {
		return Presence{}, fmt.Errorf("pubsub: presence of room %q: %w: %v", room, ErrInvalidRoom, err)
	}
	o := h.cfg.roomOptions(room)
	if o.Presence == PresenceOff {
		return Presence{}, nil
	}
	p, err := h.cfg.broker.Presence(ctx, room, o.Presence == PresenceCounts)
	if err != nil {
		return Presence{}, fmt.Errorf("pubsub: presence of room %q: %w", room, err)
	}
	return p, nil
}

// ConnStats is how one connection is keeping up.
type ConnStats struct {
	Client        Client
	QueueMessages int           // messages waiting to be written
	QueueBytes    int           // their payload bytes
	Lag           time.Duration // age of the oldest waiting message; 0 when none waits
	Dropped       uint64        // messages a SlowConsumerDropOldest or SlowConsumerKeepLatest room discarded for it
}

// RoomStats is how a room's subscribers on this node are keeping up.
type RoomStats struct {
	Room          string
	Options       RoomOptions
	Subscribers   int
	Dropped       uint64      // messages its drop policy discarded, all subscribers together
	SlowConsumers uint64      // subscribers closed because its messages did not fit their queue
	Connections   []ConnStats // every subscriber, the most lagging first
}

// RoomStats reports on room's subscribers on this node, the most lagging
// first, so a publisher can see who is falling behind. The counters start
// when the room gets its first subscriber on this node.
func (h *Handler) RoomStats(room string) RoomStats {
	st := RoomStats{Room: room, Options: h.cfg.roomOptions(room)}
	r := h.rooms.lookup(room)
	if r == nil {
		return st
	}
	st.Options = r.opts
	st.Dropped, st.SlowConsumers = r.dropped.Load(), r.slowConsumers.Load()
	for _, c := range h.rooms.conns(r) {
		st.Connections = append(st.Connections, c.stats())
	}
	st.Subscribers = len(st.Connections)
	slices.SortStableFunc(st.Connections, func(a, b ConnStats) int {
		if a.Lag != b.Lag {
			return cmp.Compare(b.Lag, a.Lag)
		}
		return cmp.Compare(b.QueueMessages, a.QueueMessages)
	})
	return st
}

// ConnStats reports how one connection on this node is keeping up. It
// fails with ErrConnNotFound.
func (h *Handler) ConnStats(connID string) (ConnStats, error) {
	h.mu.Lock()
	c := h.conns[connID]
	h.mu.Unlock()
	if c == nil {
		return ConnStats{}, fmt.Errorf("pubsub: stats of connection %q: %w", connID, ErrConnNotFound)
	}
	return c.stats(), nil
}

// Disconnect closes one connection with close code 4003 and reason
// (at most 123 bytes are sent). It fails with ErrConnNotFound.
func (h *Handler) Disconnect(connID, reason string) error {
	h.mu.Lock()
	c := h.conns[connID]
	h.mu.Unlock()
	if c == nil || !c.beginClose(protocol.CloseDisconnected, reason, false) {
		return fmt.Errorf("pubsub: disconnect %q: %w", connID, ErrConnNotFound)
	}
	return nil
}

// DisconnectUser closes every connection of userID on this node with close
// code 4003 and reason, and returns how many it closed.
func (h *Handler) DisconnectUser(userID, reason string) int {
	n := 0
	for _, c := range h.userConns(userID) {
		if c.beginClose(protocol.CloseDisconnected, reason, false) {
			n++ // a connection already closing is not closed by this call
		}
	}
	return n
}

// Stats returns a snapshot of the Handler's counters.
func (h *Handler) Stats() Stats {
	h.mu.Lock()
	n := len(h.conns)
	h.mu.Unlock()
	return Stats{
		Connections:   n,
		Rooms:         h.rooms.count(),
		MessagesIn:    h.stats.messagesIn.Load(),
		MessagesOut:   h.stats.messagesOut.Load(),
		Published:     h.stats.published.Load(),
		SlowConsumers: h.stats.slowConsumers.Load(),
		Dropped:       h.stats.dropped.Load(),
		RateLimited:   h.stats.rateLimited.Load(),
		Refused:       h.stats.refused.Load(),
		HookPanics:    h.stats.hookPanics.Load(),
	}
}

// Shutdown drains the Handler: new upgrades get 503, every connection is
// sent what it has queued and then closed with 1001 "going away", in
// batches (WithDrain) so clients do not all reconnect at the same moment,
// and
// Shutdown waits for every connection's goroutines to end, then closes the
// broker. If ctx ends first, the remaining connections are closed at once
// and ctx's error is returned. Calling it again (or Close) is safe.
//
// http.Server.Shutdown does not close hijacked connections such as
// WebSockets; call this beside it (see the package example).
func (h *Handler) Shutdown(ctx context.Context) error {
	conns := h.beginShutdown()
	h.drain(ctx, conns)
	done := make(chan struct{})
	go func() { h.wait(); close(done) }()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
		for _, c := range conns {
			c.kill()
		}
		<-done
	}
	h.cancel()
	return errors.Join(err, h.closeBrokerOnce())
}

// drain closes conns with 1001, flushing each, in batches of WithDrain
// spaced by its interval, so their clients do not all reconnect at once.
// When ctx ends, the rest are closed at once.
func (h *Handler) drain(ctx context.Context, conns []*conn) {
	batch, pause := h.cfg.drainBatch, h.cfg.drainInterval
	var t *time.Timer
	for i, c := range conns {
		if i > 0 && i%batch == 0 && ctx.Err() == nil {
			if t == nil {
				t = time.NewTimer(pause)
				defer t.Stop()
			} else {
				t.Reset(pause)
			}
			select {
			case <-t.C:
			case <-ctx.Done():
			}
		}
		c.beginClose(protocol.CloseGoingAway, "server shutting down", true)
	}
}

// Close closes every connection at once, without flushing queues or
// waiting for close handshakes, waits for their goroutines to end, and
// closes the broker. Calling it again (or Shutdown) is safe.
func (h *Handler) Close() error {
	conns := h.beginShutdown()
	for _, c := range conns {
		c.beginClose(protocol.CloseGoingAway, "server shutting down", false)
		c.kill()
	}
	h.cancel()
	h.wait()
	return h.closeBrokerOnce()
}

// wait returns once every ServeHTTP call and every connection's goroutines
// have ended. Connections are counted before their ServeHTTP call ends, so
// waiting for serving first cannot miss one.
func (h *Handler) wait() {
	h.serving.Wait()
	h.live.Wait()
	h.writers.wg.Wait() // ends soon: with no connection left, nothing is queued
}

func (h *Handler) beginShutdown() []*conn {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closing = true
	out := make([]*conn, 0, len(h.conns))
	for _, c := range h.conns {
		out = append(out, c)
	}
	return out
}

func (h *Handler) closeBrokerOnce() error {
	h.closeBroker.Do(func() { h.brokerErr = h.cfg.broker.Close() })
	return h.brokerErr
}

// callHook runs a hook, turning a panic into errHookPanicked: a hook's bug
// costs its request, never the server.
func (h *Handler) callHook(name string, cl Client, f func() error) (err error) {
	defer func() {
		if p := recover(); p != nil {
			h.stats.hookPanics.Add(1)
			h.log.Error("pubsub: hook panicked", "hook", name, "conn_id", cl.ID, "user_id", cl.UserID,
				"err", fmt.Errorf("%v", p), "stack", string(debug.Stack()))
			err = errHookPanicked
		}
	}()
	return f()
}

func (h *Handler) callAuthenticate(r *http.Request) (id Identity, err error) {
	if h.cfg.authenticate == nil {
		return Identity{}, nil
	}
	err = h.callHook("authenticate", Client{RemoteAddr: r.RemoteAddr}, func() error {
		var err error
		id, err = h.cfg.authenticate(r)
		return err
	})
	return id, err
}

func (h *Handler) callAuthorize(ctx context.Context, cl Client, a Action, room string) error {
	return h.callHook("authorize", cl, func() error { return h.cfg.authorize(ctx, cl, a, room) })
}

func (h *Handler) callOnMessage(ctx context.Context, m *ClientMessage) error {
	return h.callHook("on_message", m.Client, func() error { return h.cfg.onMessage(ctx, m) })
}
