package pubsub

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"html"
	"net/http"
	"net/url"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/coder/websocket"
	"github.com/google/uuid"
	"github.com/roomcast/pubsub/protocol"
)

// The upgrade, read top to bottom: request checks, authentication,
// admission, the mode (and a raw client's room), the hijack, registration,
// and the hand-off to the connection's own goroutine. Every refusal comes
// before any WebSocket resource is spent, as an HTTP status.

// ServeHTTP upgrades the request to a WebSocket and hands the connection to
// a goroutine of the Handler's; it returns right after the upgrade. A plain
// GET of <path>/roomcast.js (and its declarations, roomcast.d.ts) gets
// the embedded browser client instead. A request that offers subprotocol roomcast.v1 is in
// protocol mode; one that offers none is in raw mode. Refusals are answered
// before the upgrade: 503 while shutting down or full, 426 for a request
// that is not a WebSocket upgrade, 400 for a foreign subprotocol or a bad
// room, 403 for a foreign origin or a denied room, 401/403 from the
// authenticate hook, 429 past the per-user limit, 500 when a hook panicked.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !isUpgrade(r) && !isSSE(r) && h.serveClient(w, r) {
		return
	}
	if !h.enter() {
		h.refuse(w, r, refusal{status: http.StatusServiceUnavailable, msg: "the server is shutting down"})
		return
	}
	defer h.serving.Done()
	c, ref := h.admit(r)
	if ref != nil {
		h.refuse(w, r, *ref)
		return
	}
	h.accept(w, r, c)
}

// refusal is an upgrade answered with an HTTP error.
type refusal struct {
	status     int
	msg        string
	retryAfter bool // 503 because the server is full: come back in a few seconds
}

// refuse answers an upgrade request with an HTTP error and counts it.
// The reason is plain text (with nosniff), except for a request from htmx
// (HX-Request: true, such as its SSE extension's): htmx swaps an error
// response into the page as HTML whatever its Content-Type, so there the
// reason is HTML-escaped and shows as text. A reason may quote the
// request (a room name a host's validator accepted, its error).
func (h *Handler) refuse(w http.ResponseWriter, r *http.Request, ref refusal) {
	h.stats.refused.Add(1)
	h.log.Debug("pubsub: upgrade refused", "status", ref.status, "reason", ref.msg, "remote", r.RemoteAddr)
	switch {
	case ref.status == http.StatusUpgradeRequired:
		w.Header().Set("Upgrade", "websocket")
	case ref.retryAfter:
		w.Header().Set("Retry-After", "5")
	}
	msg := "roomcast: " + ref.msg
	if r.Header.Get("HX-Request") == "true" {
		msg = html.EscapeString(msg)
	}
	http.Error(w, msg, ref.status)
}

// admit decides whether the request becomes a connection: the request
// checks, authentication, a connection slot, and in raw mode the room,
// joined already (so a broker failure can still be a 503). It returns the
// connection, or the refusal, having undone everything it did.
func (h *Handler) admit(r *http.Request) (*conn, *refusal) {
	mode := ModeSSE
	if !isSSE(r) {
		if !isUpgrade(r) {
			return nil, &refusal{status: http.StatusUpgradeRequired, msg: "this endpoint accepts WebSocket connections (and event streams: Accept: text/event-stream) only"}
		}
		var ok bool
		if mode, ok = selectMode(r); !ok {
			return nil, &refusal{status: http.StatusBadRequest, msg: "unsupported subprotocol; this server speaks " + protocol.Subprotocol + " or none (raw mode)"}
		}
	}
	if !h.originAllowed(r) {
		return nil, &refusal{status: http.StatusForbidden, msg: "origin not allowed"}
	}
	id, ref := h.authenticate(r)
	if ref != nil {
		return nil, ref
	}
	switch h.reserve(id.UserID) {
	case errServerFull:
		return nil, &refusal{status: http.StatusServiceUnavailable, msg: "too many connections; try again later", retryAfter: true}
	case errUserFull:
		return nil, &refusal{status: http.StatusTooManyRequests, msg: "too many connections for this user"}
	}
	c := newConn(h, Client{ID: uuid.NewString(), UserID: id.UserID, Mode: mode, RemoteAddr: r.RemoteAddr, Info: id.Info})
	switch mode {
	case ModeRaw:
		ref = c.joinRawRoom(r)
	case ModeSSE:
		ref = c.joinSSERooms(r)
	}
	if ref != nil {
		c.abandon()
		return nil, ref
	}
	return c, nil
}

// authenticate runs the authenticate hook: 401, or 403 for ErrForbidden,
// or 500 for a panic or an Identity.Info that is not a JSON object.
func (h *Handler) authenticate(r *http.Request) (Identity, *refusal) {
	if h.cfg.authenticate == nil {
		return Identity{}, nil
	}
	var id Identity
	err := h.callHook("authenticate", Client{RemoteAddr: r.RemoteAddr}, func() error {
		var err error
		id, err = h.cfg.authenticate(r)
		return err
	})
	switch {
	case errors.Is(err, errHookPanicked):
		return id, &refusal{status: http.StatusInternalServerError, msg: "internal error"}
	case errors.Is(err, ErrForbidden):
		return id, &refusal{status: http.StatusForbidden, msg: "forbidden"}
	case err != nil:
		h.log.Debug("pubsub: authentication failed", "err", err)
		return id, &refusal{status: http.StatusUnauthorized, msg: "unauthorized"}
	}
	if len(id.Info) > 0 && !isJSONObject(id.Info) {
		h.log.Error("pubsub: the authenticate hook returned an Identity.Info that is not a JSON object", "user_id", id.UserID)
		return id, &refusal{status: http.StatusInternalServerError, msg: "internal error"}
	}
	return id, nil
}

// joinRawRoom joins a raw client's room, when it names one, before the
// upgrade: the room must be valid and the client allowed in it.
func (c *conn) joinRawRoom(r *http.Request) *refusal {
	h := c.h
	q := r.URL.Query() // parsed once: each parse is a map and its strings
	room, err := h.rawRoom(r, q)
	if err != nil {
		return &refusal{status: http.StatusBadRequest, msg: err.Error()}
	}
	history, err := rawHistory(q)
	if err != nil {
		return &refusal{status: http.StatusBadRequest, msg: err.Error()}
	}
	if room == "" {
		return nil
	}
	if v := c.authorize(ActionSubscribe, room); v != allowed {
		return &refusal{status: v.httpStatus(), msg: v.reason("not allowed to subscribe in this room")}
	}
	if _, err := c.subscribe(room, nil, history, false, nil, nil); err != nil {
		h.brokerFailed("subscribe", room, err)
		return &refusal{status: http.StatusServiceUnavailable, msg: "could not join the room; try again later"}
	}
	return nil
}

// accept upgrades (or, for an event stream, takes over the connection),
// registers and hands the connection to its goroutine; on failure it
// abandons it.
func (h *Handler) accept(w http.ResponseWriter, r *http.Request, c *conn) {
	if c.mode == ModeSSE {
		hw := &hijacker{ResponseWriter: w, sock: &c.sockMem}
		if _, _, err := hw.Hijack(); err != nil {
			// HTTP/2 (and any writer that cannot be hijacked) streams
			// through the ResponseWriter instead, on this goroutine.
			h.streamSSE(w, r, c)
			return
		}
		c.sse.head = sseHead(w.Header(), c.sse.origin)
		c.attach(nil, hw.sock, hw.br, nil)
		h.serve(c)
		return
	}
	opts := &websocket.AcceptOptions{
		InsecureSkipVerify: true, // originAllowed already checked, before authentication
		// The Handler writes message frames itself, uncompressed (see wireFrame).
		CompressionMode: websocket.CompressionDisabled,
		OnPongReceived: func(context.Context, []byte) {
			c.lastSeen.Store(time.Now().UnixNano())
		},
	}
	if c.mode == ModeProtocol {
		opts.Subprotocols = []string{protocol.Subprotocol}
	}
	hw := &hijacker{ResponseWriter: w, sock: &c.sockMem}
	ws, err := websocket.Accept(hw, r, opts)
	if err != nil {
		h.log.Debug("pubsub: upgrade failed", "err", err, "remote", r.RemoteAddr)
		c.abandon() // Accept answered the request
		return
	}
	ws.SetReadLimit(h.cfg.maxMessageBytes)
	c.attach(ws, hw.sock, hw.br, hw.bw)
	h.serve(c)
}

// serve queues a protocol connection's welcome, registers the connection,
// runs the connect hook, and starts it.
func (h *Handler) serve(c *conn) {
	if c.mode == ModeProtocol {
		// Queued before the connection is reachable (register), so it is
		// always the first frame.
		c.enqueue(newControlFrame(encodeWelcome(welcome{
			ConnID:          c.client.ID,
			UserID:          c.client.UserID,
			HeartbeatMS:     h.cfg.heartbeat.Milliseconds(),
			TimeoutMS:       h.cfg.heartbeatWait.Milliseconds(),
			MaxMessageBytes: h.cfg.maxMessageBytes,
			MaxRooms:        h.cfg.maxRooms,
			MaxReplay:       h.cfg.maxReplay(),
			KeyTTLMS:        h.cfg.keyTTL.Milliseconds(),
		})))
	}
	if !h.register(c) {
		// Shutdown began during the upgrade. A raw connection was in its
		// room already, so messages may be queued for it: flushed first,
		// as Shutdown does for every connection.
		c.beginClose(protocol.CloseGoingAway, "server shutting down", true)
		c.wg.Wait()
		c.abandon()
		return
	}
	h.stats.accepted.Add(1)
	h.log.Debug("pubsub: connected", "conn_id", c.client.ID, "user_id", c.client.UserID, "mode", c.client.Mode.String())
	if h.cfg.onConnect != nil {
		h.callHook("on_connect", c.client, func() error { h.cfg.onConnect(ConnectEvent{Client: c.client}); return nil })
	}
	// ServeHTTP returns now: net/http then frees the request's state (its
	// buffers, the serving goroutine's stack), which would otherwise live
	// as long as the connection. register counted the goroutine in h.live.
	c.start()
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

// register makes c reachable (Disconnect, PublishToConn, Shutdown) and
// counts its goroutine in h.live, unless the Handler is closing.
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
	if origin == "" || h.cfg.insecureSkipOrigin || h.sameOrigin(r) {
		return true
	}
	u, err := url.Parse(origin)
	if err != nil || u.Host == "" {
		return false
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
// a {room...} path wildcard of the route, else the path below WithPath,
// else WithDefaultRoom. No room at all is allowed: the client then only
// gets direct messages. q is r's query.
func (h *Handler) rawRoom(r *http.Request, q url.Values) (string, error) {
	room := ""
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
			return h.cfg.defaultRoom, nil // "" unless WithDefaultRoom
		}
		room = rest
	}
	if err := h.cfg.roomValidator(room); err != nil {
		return "", fmt.Errorf("invalid room: %v", err)
	}
	return room, nil
}

// sameOrigin reports whether the request's Origin is its own host.
func (h *Handler) sameOrigin(r *http.Request) bool {
	u, err := url.Parse(r.Header.Get("Origin"))
	return err == nil && u.Host != "" && strings.EqualFold(u.Host, r.Host)
}

func isJSONObject(b []byte) bool {
	t := bytes.TrimLeft(b, " \t\r\n")
	return len(t) > 0 && t[0] == '{' && json.Valid(b)
}

// rawHistory reads a raw-mode client's "history" query parameter: how
// many of the room's last messages to replay before live ones. q is the
// request's query.
func rawHistory(q url.Values) (int, error) {
	if !q.Has("history") {
		return 0, nil
	}
	v := q.Get("history")
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 || n > maxHistorySize {
		return 0, fmt.Errorf("the history query parameter must be a number from 0 to %d", maxHistorySize)
	}
	return n, nil
}
