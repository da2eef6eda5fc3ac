package client

import (
	"errors"
	"net/http"
	"strconv"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub/protocol"
)

// What can go wrong, and how the Client tells it.

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
	// ErrOutboxFull: WithOutbox publishes already wait for the server's
	// answer; this one was not queued.
	ErrOutboxFull = errors.New("client: the outbox is full")
	// ErrExpired: a publish could not be confirmed within the server's key
	// window (the welcome's key_ttl_ms), so sending it again could publish
	// it twice: it may or may not have been published.
	ErrExpired = errors.New("client: publish not confirmed within the server's key window")
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

func readError(err error) error {
	var ce websocket.CloseError
	if errors.As(err, &ce) {
		return &CloseError{Code: protocol.CloseCode(ce.Code), Reason: ce.Reason}
	}
	return &CloseError{Code: protocol.CloseAbnormal, err: err}
}
