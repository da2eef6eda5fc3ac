package pubsub

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"strconv"
	"sync"
	"time"

	"github.com/roomcast/pubsub/protocol"
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
	live      sync.WaitGroup // served connections: their reader goroutine, or their park (conn.serveRead)
	writers   writerPool
	poll      poller     // where idle connections wait for input without a goroutine (Linux)
	beats     heartbeats // runs every connection's heartbeat, from one goroutine

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

// Publish publishes data into room. Every subscriber, on every node, gets
// it in the room's order. Publish copies data and never blocks on a
// subscriber; it fails with ErrInvalidRoom, ErrTooLarge, ErrClosed, or the
// broker's error. With IdempotencyKey it publishes at most once per key.
func (h *Handler) Publish(ctx context.Context, room string, data []byte, opts ...PublishOption) error {
	var o publishConfig
	for _, f := range opts {
		f(&o)
	}
	key := ""
	if o.keySet {
		if o.key == "" || len(o.key) > maxKey {
			return fmt.Errorf("pubsub: publish to room %q: the idempotency key must be 1 to %d bytes", room, maxKey)
		}
		key = "h" + o.key // the backend's keys, apart from every client's
	}
	if _, err := h.publish(ctx, room, data, key); err != nil {
		return fmt.Errorf("pubsub: publish to room %q: %w", room, err)
	}
	return nil
}

// PublishOption adjusts one Publish.
type PublishOption func(*publishConfig)

type publishConfig struct {
	key    string
	keySet bool
}

// IdempotencyKey makes a Publish idempotent: once a publish with key was
// sequenced in the room, another one with the same key, on any node of the
// cluster, within WithIdempotencyWindow (5 minutes by default), publishes
// nothing and succeeds. A backend that does not know whether a Publish
// went through (it timed out) retries it with the same key. The key is 1
// to 64 bytes; the backend's keys never meet its clients' (PROTOCOL.md,
// publish "key").
func IdempotencyKey(key string) PublishOption {
	return func(o *publishConfig) { o.key, o.keySet = key, true }
}

// publish publishes data, with the idempotency key (already namespaced)
// when key is set, and counts it.
func (h *Handler) publish(ctx context.Context, room string, data []byte, key string) (PublishResult, error) {
	if h.isClosing() {
		return PublishResult{}, ErrClosed
	}
	if err := h.roomError(room); err != nil {
		return PublishResult{}, err
	}
	if len(data) > h.cfg.queue.bytes {
		return PublishResult{}, ErrTooLarge
	}
	o := PublishOptions{History: h.cfg.roomOptions(room).history()}
	if key != "" {
		o.Key, o.KeyTTL = key, h.cfg.keyTTL
	}
	res, err := h.cfg.broker.Publish(ctx, room, bytes.Clone(data), o)
	if err != nil {
		return PublishResult{}, err
	}
	if res.Duplicate {
		h.stats.duplicates.Add(1)
	} else {
		h.stats.published.Add(1)
	}
	return res, nil
}

// clientKey namespaces a client's idempotency key by its user, so that no
// user's keys can suppress another's publishes (or the backend's): "u",
// the user id's length, ":", the user id, the key. Anonymous clients share
// one namespace; their keys must be unguessable (the clients' are random).
func clientKey(userID, key string) string {
	return "u" + strconv.Itoa(len(userID)) + ":" + userID + key
}

// publishFromClient publishes a client's message, turning failures into
// the client's error codes.
func (h *Handler) publishFromClient(ctx context.Context, c Client, room string, data []byte, key string) (PublishResult, *protoError) {
	if key != "" {
		key = clientKey(c.UserID, key)
	}
	res, err := h.publish(ctx, room, data, key)
	switch {
	case err == nil:
		return res, nil
	case errors.Is(err, ErrTooLarge):
		return res, badRequest("the payload is larger than the server's queue bound")
	case errors.Is(err, ErrClosed):
		return res, &protoError{protocol.CodeUnavailable, "the server is shutting down"}
	default:
		h.brokerFailed("publish", room, err)
		return res, &protoError{protocol.CodeUnavailable, "could not publish; try again later"}
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
	if c := h.conn(connID); c == nil || !c.enqueue(newDirectFrame(bytes.Clone(data))) {
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

// conn is the open connection with id on this node, or nil.
func (h *Handler) conn(id string) *conn {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.conns[id]
}

// roomError is nil for a valid room name, else an error wrapping
// ErrInvalidRoom with the validator's reason.
func (h *Handler) roomError(room string) error {
	if err := h.cfg.roomValidator(room); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalidRoom, err)
	}
	return nil
}

// checkRoom is roomError for a protocol request: invalid_room, with the
// validator's reason for the client.
func (h *Handler) checkRoom(room string) *protoError {
	if err := h.cfg.roomValidator(room); err != nil {
		return &protoError{protocol.CodeInvalidRoom, err.Error()}
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
	if err := h.roomError(room); err != nil {
		return nil, fmt.Errorf("pubsub: history of room %q: %w", room, err)
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
	if err := h.roomError(room); err != nil {
		return Presence{}, fmt.Errorf("pubsub: presence of room %q: %w", room, err)
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

// Disconnect closes one connection with close code 4003 and reason
// (at most 123 bytes are sent). It fails with ErrConnNotFound.
func (h *Handler) Disconnect(connID, reason string) error {
	if c := h.conn(connID); c == nil || !c.beginClose(protocol.CloseDisconnected, reason, false) {
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

// Shutdown drains the Handler: new upgrades get 503, every connection is
// sent what it has queued and then closed with 1001 "going away", in
// batches (WithDrain) so clients do not all reconnect at the same moment,
// and Shutdown waits for every connection's goroutines to end, then closes
// the broker. If ctx ends first, the remaining connections are closed at
// once and ctx's error is returned. Calling it again (or Close) is safe.
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
	h.poll.stop()       // no connection is left to park
	h.beats.stop()      // nor one with a heartbeat
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
