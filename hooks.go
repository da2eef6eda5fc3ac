package pubsub

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"runtime/debug"

	"github.com/roomcast/pubsub/protocol"
)

// Mode is how a connection talks: raw frames or protocol envelopes.
type Mode uint8

const (
	ModeRaw      Mode = iota // no subprotocol: one room, payloads verbatim
	ModeProtocol             // subprotocol roomcast.v1: JSON envelopes, many rooms
	ModeSSE                  // Server-Sent Events: listen only, rooms by name, exact recovery by Last-Event-ID
)

func (m Mode) String() string {
	switch m {
	case ModeProtocol:
		return "protocol"
	case ModeSSE:
		return "sse"
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

// errHookPanicked is what a hook call returns when the hook panicked.
var errHookPanicked = errors.New("pubsub: hook panicked")

// verdict is what a hook's answer to a client's request means; each mode
// turns it into its own answer: an HTTP status before the upgrade, a close
// code in raw mode, an error code in protocol mode.
type verdict uint8

const (
	allowed verdict = iota // the hook returned nil
	denied                 // it returned an error
	failed                 // it panicked (counted and logged by callHook)
)

func verdictOf(err error) verdict {
	switch {
	case err == nil:
		return allowed
	case errors.Is(err, errHookPanicked):
		return failed
	}
	return denied
}

// httpStatus answers a refused upgrade.
func (v verdict) httpStatus() int {
	if v == failed {
		return http.StatusInternalServerError
	}
	return http.StatusForbidden
}

// closeCode closes a raw connection whose request was refused.
func (v verdict) closeCode() protocol.CloseCode {
	if v == failed {
		return protocol.CloseInternalError
	}
	return protocol.ClosePolicyViolation
}

// reason is the close reason or error message: whenDenied, or "internal
// error" when the hook failed (the client never learns more).
func (v verdict) reason(whenDenied string) string {
	if v == failed {
		return "internal error"
	}
	return whenDenied
}

// protoError answers a refused protocol request: code when denied,
// "internal" when the hook failed.
func (v verdict) protoError(code protocol.ErrorCode, whenDenied string) *protoError {
	if v == failed {
		code = protocol.CodeInternal
	}
	return &protoError{code, v.reason(whenDenied)}
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

func (h *Handler) callAuthorize(ctx context.Context, cl Client, a Action, room string) error {
	return h.callHook("authorize", cl, func() error { return h.cfg.authorize(ctx, cl, a, room) })
}

func (h *Handler) callOnMessage(ctx context.Context, m *ClientMessage) error {
	return h.callHook("on_message", m.Client, func() error { return h.cfg.onMessage(ctx, m) })
}
