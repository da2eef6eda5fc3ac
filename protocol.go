package pubsub

import (
	"bytes"
	"encoding/json"
	"errors"
	"strconv"

	"github.com/roomcast/pubsub/protocol"

	"github.com/roomcast/pubsub/internal/wire"
)

const (
	maxRequestID = 64 // bytes of a request's "id"
	maxKey       = 64 // bytes of a publish's idempotency "key"
)

// inbound is one client envelope as decoded; only the fields its type uses
// are set.
type inbound struct {
	Type   string          `json:"type"`
	RawID  *string         `json:"id"`
	RoomIn *string         `json:"room"`
	Data   json.RawMessage `json:"data"`
	Text   *string         `json:"text"`
	Binary *string         `json:"binary"`

	// subscribe only
	Since    *position       `json:"since"`
	History  int             `json:"history"`
	Presence bool            `json:"presence"`
	Info     json.RawMessage `json:"info"`

	// publish only
	Key *string `json:"key"`

	ID      requestID // from RawID
	Room    string    // from RoomIn; "" when absent
	payload []byte    // the decoded payload of publish and send
}

// requestID is a request's "id": any JSON string of at most 64 bytes, the
// empty string included; set is false when the request has none (no "id",
// or "id": null).
type requestID struct {
	s   string
	set bool
}

// appendID appends `,"id":…` when the request had an id.
func appendID(b []byte, id requestID) []byte {
	if !id.set {
		return b
	}
	b = append(b, `,"id":`...)
	return wire.AppendString(b, id.s)
}

// position is where a client stands in a room: the last message it got.
type position struct {
	Epoch string  `json:"epoch"`
	Seq   *uint64 `json:"seq"`
}

// protoError is an error answered to the client with a code and a message
// written for the client (never internal error text).
type protoError struct {
	code protocol.ErrorCode
	msg  string
}

func (e *protoError) Error() string { return string(e.code) + ": " + e.msg }

func badRequest(msg string) *protoError { return &protoError{protocol.CodeBadRequest, msg} }

// decodeInbound parses one protocol-mode text frame. It never panics, and it
// fills in.payload for the types that carry one. On error the returned
// envelope still carries whatever id could be read, so the error can be
// matched to its request.
func decodeInbound(b []byte) (inbound, *protoError) {
	var in inbound
	if err := json.Unmarshal(b, &in); err != nil {
		// Salvage the id, if any, so the client can match the error.
		var probe struct {
			ID *string `json:"id"`
		}
		in = inbound{}
		if json.Unmarshal(b, &probe) == nil && probe.ID != nil && len(*probe.ID) <= maxRequestID {
			in.ID = requestID{*probe.ID, true}
		}
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) && typeErr.Field != "" {
			return in, badRequest("field " + strconv.Quote(typeErr.Field) + " has the wrong type")
		}
		return in, badRequest("the message is not a JSON object")
	}
	if in.RawID != nil {
		if len(*in.RawID) > maxRequestID {
			return in, badRequest("id is longer than 64 bytes") // and not echoed
		}
		in.ID = requestID{*in.RawID, true}
	}
	if in.RoomIn != nil {
		in.Room = *in.RoomIn
	}
	// A type that names a room requires the field; an empty name is a room
	// name that fails validation (invalid_room), checked by dispatch.
	needsRoom := in.Type == "subscribe" || in.Type == "unsubscribe" || in.Type == "presence" || in.Type == "publish"
	switch {
	case in.Type == "":
		return in, badRequest(`"type" is required`)
	case needsRoom && in.RoomIn == nil:
		return in, badRequest(`"room" is required`)
	}
	switch in.Type {
	case "ping", "pong", "unsubscribe", "presence":
		return in, nil
	case "subscribe":
		return in, in.checkSubscribe()
	case "publish", "send":
		if in.Key != nil && (*in.Key == "" || len(*in.Key) > maxKey) {
			return in, badRequest(`"key" must be 1 to 64 bytes`)
		}
		p, err := in.decodePayload()
		if err != nil {
			return in, err
		}
		in.payload = p
		return in, nil
	default:
		return in, &protoError{protocol.CodeUnknownType, "unknown type " + strconv.Quote(in.Type)}
	}
}

func (in *inbound) checkSubscribe() *protoError {
	if in.Since != nil {
		if in.Since.Epoch == "" || in.Since.Seq == nil {
			return badRequest(`"since" needs "epoch" (a string) and "seq" (an integer)`)
		}
		if in.History != 0 {
			return badRequest(`"since" and "history" cannot be combined`)
		}
	}
	if in.History < 0 || in.History > maxHistorySize {
		return badRequest(`"history" must be from 0 to ` + strconv.Itoa(maxHistorySize))
	}
	if in.Info != nil {
		if t := bytes.TrimLeft(in.Info, " \t\r\n"); len(t) == 0 || (t[0] != '{' && !bytes.Equal(t, []byte("null"))) {
			return badRequest(`"info" must be a JSON object`)
		}
		if bytes.Equal(bytes.TrimSpace(in.Info), []byte("null")) {
			in.Info = nil
		}
	}
	return nil
}

func (in *inbound) decodePayload() ([]byte, *protoError) {
	p, kind, err := wire.DecodePayload(in.Data, in.Text, in.Binary)
	if err != nil {
		return nil, badRequest(err.Error())
	}
	if kind == wire.JSON {
		p = bytes.Clone(p) // in.Data aliases the frame, which the reader reuses
	}
	return p, nil
}

// encodeMessage is the envelope of a room message, built once per publish.
func encodeMessage(m Message, kind wire.Kind) []byte {
	b := make([]byte, 0, 128+len(m.Room)+len(m.Epoch)+len(m.ID)+len(m.Data)*4/3)
	b = append(b, `{"type":"message","room":`...)
	b = wire.AppendString(b, m.Room)
	b = append(b, `,"epoch":`...)
	b = wire.AppendString(b, m.Epoch)
	b = append(b, `,"seq":`...)
	b = strconv.AppendUint(b, m.Seq, 10)
	if m.ID != "" {
		b = append(b, `,"message_id":`...)
		b = wire.AppendString(b, m.ID)
	}
	if !m.Time.IsZero() {
		b = append(b, `,"time":`...)
		b = strconv.AppendInt(b, m.Time.UnixMilli(), 10)
	}
	b = append(b, ',')
	b = wire.AppendPayload(b, m.Data, kind)
	return append(b, '}')
}

// encodePresenceEvent is the envelope of a join or leave event.
func encodePresenceEvent(m Message) []byte {
	b := make([]byte, 0, 128+len(m.Room)+len(m.Member.Info))
	if m.Kind == KindJoin {
		b = append(b, `{"type":"join","room":`...)
	} else {
		b = append(b, `{"type":"leave","room":`...)
	}
	b = wire.AppendString(b, m.Room)
	b = appendMemberFields(b, m.Member.ConnID, m.Member.UserID, m.Member.Info)
	return append(b, '}')
}

func appendMemberFields(b []byte, connID, userID string, info json.RawMessage) []byte {
	if connID != "" {
		b = append(b, `,"conn_id":`...)
		b = wire.AppendString(b, connID)
	}
	if userID != "" {
		b = append(b, `,"user_id":`...)
		b = wire.AppendString(b, userID)
	}
	if len(info) > 0 {
		b = append(b, `,"info":`...)
		b = append(b, info...)
	}
	return b
}

// subscribed is what a subscribe's ack says about the subscription.
type subscribed struct {
	room      string
	epoch     string
	top       uint64
	presence  PresenceMode
	recovery  bool            // the client asked to recover
	recovered bool            // and got exactly what it missed
	reason    protocol.Reason // why not, when it did not
	missed    int             // messages replayed before live ones
}

func encodeSubscribed(id requestID, s subscribed) []byte {
	b := append([]byte(nil), `{"type":"ack"`...)
	b = appendID(b, id)
	b = append(b, `,"room":`...)
	b = wire.AppendString(b, s.room)
	b = append(b, `,"epoch":`...)
	b = wire.AppendString(b, s.epoch)
	b = append(b, `,"seq":`...)
	b = strconv.AppendUint(b, s.top, 10)
	b = append(b, `,"presence":`...)
	b = wire.AppendString(b, s.presence.String())
	if s.recovery {
		b = append(b, `,"recovered":`...)
		b = strconv.AppendBool(b, s.recovered)
		if s.reason != "" {
			b = append(b, `,"reason":`...)
			b = wire.AppendString(b, s.reason)
		}
	}
	b = append(b, `,"missed":`...)
	b = strconv.AppendInt(b, int64(s.missed), 10)
	return append(b, '}')
}

// encodePresence is the reply to a presence request.
func encodePresence(id requestID, room string, p Presence) []byte {
	b := append([]byte(nil), `{"type":"presence"`...)
	b = appendID(b, id)
	b = append(b, `,"room":`...)
	b = wire.AppendString(b, room)
	b = append(b, `,"count":`...)
	b = strconv.AppendInt(b, int64(p.Count), 10)
	b = append(b, `,"connections":`...)
	b = strconv.AppendInt(b, int64(p.Connections), 10)
	if p.Members != nil {
		b = append(b, `,"members":[`...)
		for i, m := range p.Members {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, `{"conns":[`...)
			for j, id := range m.Conns {
				if j > 0 {
					b = append(b, ',')
				}
				b = wire.AppendString(b, id)
			}
			b = append(b, ']')
			b = appendMemberFields(b, "", m.UserID, m.Info)
			b = append(b, '}')
		}
		b = append(b, ']')
	}
	return append(b, '}')
}

// encodeDirect is the envelope of a message sent to one connection or user.
func encodeDirect(p []byte, kind wire.Kind) []byte {
	b := make([]byte, 0, 24+len(p)*4/3)
	b = append(b, `{"type":"direct",`...)
	b = wire.AppendPayload(b, p, kind)
	return append(b, '}')
}

func encodeAck(id requestID) []byte {
	b := append([]byte(nil), `{"type":"ack"`...)
	b = appendID(b, id)
	return append(b, '}')
}

// encodePublished acknowledges a publish with where its message landed:
// the room's epoch and seq and the message's id, and "duplicate" when its
// key had been sequenced already (the position is the first publish's). A
// publish the broker dropped (a room with no history and no subscriber)
// gets a bare ack.
func encodePublished(id requestID, room string, res PublishResult) []byte {
	if res.Epoch == "" {
		return encodeAck(id)
	}
	b := append([]byte(nil), `{"type":"ack"`...)
	b = appendID(b, id)
	b = append(b, `,"room":`...)
	b = wire.AppendString(b, room)
	b = append(b, `,"epoch":`...)
	b = wire.AppendString(b, res.Epoch)
	b = append(b, `,"seq":`...)
	b = strconv.AppendUint(b, res.Seq, 10)
	b = append(b, `,"message_id":`...)
	b = wire.AppendString(b, res.ID)
	if res.Duplicate {
		b = append(b, `,"duplicate":true`...)
	}
	return append(b, '}')
}

func encodeError(id requestID, e *protoError) []byte {
	b := append([]byte(nil), `{"type":"error"`...)
	b = appendID(b, id)
	b = append(b, `,"code":`...)
	b = wire.AppendString(b, e.code)
	b = append(b, `,"message":`...)
	b = wire.AppendString(b, e.msg)
	return append(b, '}')
}

type welcome struct {
	Type            string `json:"type"`
	Protocol        string `json:"protocol"`
	ConnID          string `json:"conn_id"`
	UserID          string `json:"user_id,omitempty"`
	HeartbeatMS     int64  `json:"heartbeat_ms"`
	TimeoutMS       int64  `json:"timeout_ms"`
	MaxMessageBytes int64  `json:"max_message_bytes"`
	MaxRooms        int    `json:"max_rooms"`
	MaxReplay       int    `json:"max_replay"`
	KeyTTLMS        int64  `json:"key_ttl_ms"`
}

func encodeWelcome(w welcome) []byte {
	w.Type, w.Protocol = "welcome", protocol.Subprotocol
	b, _ := json.Marshal(w) // a struct of strings and numbers cannot fail
	return b
}

var pingEnvelope = []byte(`{"type":"ping"}`)

// encodePong answers a client ping, echoing its id when it had one.
func encodePong(id requestID) []byte {
	b := append([]byte(nil), `{"type":"pong"`...)
	b = appendID(b, id)
	return append(b, '}')
}
