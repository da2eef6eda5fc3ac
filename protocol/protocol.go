// Package protocol is the vocabulary of roomcast's wire protocol, version 1
// (PROTOCOL.md at the repository root): the subprotocol name, the error
// codes, the reasons a recovery is refused, the close codes, and Envelope,
// which decodes whatever the server sends. The server (package pubsub),
// the Go client (package client) and the test kit (package pubsubtest) all
// speak in these names, so they cannot drift apart; the browser client's
// copy (CLOSE, ERROR and REASON in js/roomcast.js) and PROTOCOL.md's
// tables are checked against them by tests.
package protocol

import "strconv"

// Subprotocol is the WebSocket subprotocol of protocol mode. A client that
// offers it speaks JSON envelopes; a client that offers no subprotocol is
// in raw mode.
const Subprotocol = "roomcast.v1"

// ErrorCode is the code of an "error" envelope (PROTOCOL.md section 3.5).
// Clients branch on it, never on the human-readable message beside it.
type ErrorCode string

const (
	CodeBadRequest    ErrorCode = "bad_request"    // the request is malformed; do not retry it
	CodeUnknownType   ErrorCode = "unknown_type"   // a "type" this version does not know
	CodeInvalidRoom   ErrorCode = "invalid_room"   // the room name fails validation
	CodeForbidden     ErrorCode = "forbidden"      // the host does not allow this subscribe or publish
	CodeTooManyRooms  ErrorCode = "too_many_rooms" // one room more than the connection may join
	CodeRateLimited   ErrorCode = "rate_limited"   // sent too fast: the request was dropped; retry slower
	CodeNotSubscribed ErrorCode = "not_subscribed" // unsubscribe from, or presence of, a room not joined
	CodeNotSupported  ErrorCode = "not_supported"  // no message handler on the server, or presence off in the room
	CodeRejected      ErrorCode = "rejected"       // the server's message handler refused a send
	CodeUnavailable   ErrorCode = "unavailable"    // the server could not do it now; retry with backoff
	CodeInternal      ErrorCode = "internal"       // the server failed while handling it; retry with backoff
)

// ErrorCodes lists every error code, in PROTOCOL.md's order.
func ErrorCodes() []ErrorCode {
	return []ErrorCode{CodeBadRequest, CodeUnknownType, CodeInvalidRoom, CodeForbidden, CodeTooManyRooms,
		CodeRateLimited, CodeNotSubscribed, CodeNotSupported, CodeRejected, CodeUnavailable, CodeInternal}
}

// Reason says why a subscribe with "since" could not recover exactly
// (PROTOCOL.md section 3.7): the client should reload the room's state.
type Reason string

const (
	ReasonEpochChanged    Reason = "epoch_changed"     // the room's state was lost since (restart, reclaimed)
	ReasonHistoryTooShort Reason = "history_too_short" // some missed messages are no longer kept
	ReasonTooManyMissed   Reason = "too_many_missed"   // more were missed than one connection may have queued
	ReasonUnknownPosition Reason = "unknown_position"  // the position is ahead of the room: not of this epoch
)

// Reasons lists every reason, in PROTOCOL.md's order.
func Reasons() []Reason {
	return []Reason{ReasonEpochChanged, ReasonHistoryTooShort, ReasonTooManyMissed, ReasonUnknownPosition}
}

// CloseCode is a WebSocket close code (PROTOCOL.md section 4).
type CloseCode int

const (
	CloseNormal           CloseCode = 1000 // normal closure: the client's own close, echoed
	CloseGoingAway        CloseCode = 1001 // the server is shutting down: reconnect elsewhere or later
	CloseUnsupportedData  CloseCode = 1003 // a binary frame in protocol mode
	CloseAbnormal         CloseCode = 1006 // the connection ended without a close frame (never sent, only reported)
	CloseInvalidPayload   CloseCode = 1007 // a text frame that is not UTF-8
	ClosePolicyViolation  CloseCode = 1008 // raw mode: publish not allowed, no room, or the message handler refused
	CloseMessageTooBig    CloseCode = 1009 // a message over the server's limit
	CloseInternalError    CloseCode = 1011 // raw mode: the server's message handler failed
	CloseTryAgainLater    CloseCode = 1013 // raw mode: the server could not publish the message
	CloseHeartbeatTimeout CloseCode = 4001 // no sign of life within the heartbeat timeout
	CloseSlowConsumer     CloseCode = 4002 // the outbound queue overflowed, or a write timed out
	CloseDisconnected     CloseCode = 4003 // the server disconnected it on purpose (kicked, logged out)
	CloseRateLimited      CloseCode = 4004 // raw mode: faster than the rate limit
	CloseIdleTimeout      CloseCode = 4005 // no message either way for the idle timeout
	CloseRoomReset        CloseCode = 4006 // the server lost messages of a joined room: reconnect and recover
)

// CloseCodes lists every close code, in PROTOCOL.md's order.
func CloseCodes() []CloseCode {
	return []CloseCode{CloseNormal, CloseGoingAway, CloseUnsupportedData, CloseAbnormal, CloseInvalidPayload,
		ClosePolicyViolation, CloseMessageTooBig, CloseInternalError, CloseTryAgainLater, CloseHeartbeatTimeout,
		CloseSlowConsumer, CloseDisconnected, CloseRateLimited, CloseIdleTimeout, CloseRoomReset}
}

var closeNames = map[CloseCode]string{
	CloseNormal:           "normal closure",
	CloseGoingAway:        "going away",
	CloseUnsupportedData:  "unsupported data",
	CloseAbnormal:         "abnormal closure",
	CloseInvalidPayload:   "invalid payload",
	ClosePolicyViolation:  "policy violation",
	CloseMessageTooBig:    "message too big",
	CloseInternalError:    "internal error",
	CloseTryAgainLater:    "try again later",
	CloseHeartbeatTimeout: "heartbeat timeout",
	CloseSlowConsumer:     "slow consumer",
	CloseDisconnected:     "disconnected",
	CloseRateLimited:      "rate limited",
	CloseIdleTimeout:      "idle timeout",
	CloseRoomReset:        "room reset",
}

// String is the code and its name, "4002 slow consumer"; a code this
// package does not name is just its number.
func (c CloseCode) String() string {
	if name, ok := closeNames[c]; ok {
		return strconv.Itoa(int(c)) + " " + name
	}
	return strconv.Itoa(int(c))
}
