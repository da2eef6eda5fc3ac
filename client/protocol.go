package client

import (
	"encoding/json"
	"strconv"

	"github.com/roomcast/pubsub/protocol"

	"github.com/roomcast/pubsub/internal/wire"
)

// Kind is how a payload travelled: the server chooses it from the bytes.
type Kind uint8

const (
	KindJSON   Kind = iota // valid JSON, carried in "data"
	KindText               // other valid UTF-8, carried in "text"
	KindBinary             // anything else, carried base64 in "binary"
)

func (k Kind) String() string {
	switch k {
	case KindJSON:
		return "json"
	case KindText:
		return "text"
	case KindBinary:
		return "binary"
	}
	return "Kind(" + strconv.Itoa(int(k)) + ")"
}

// appendPayload appends the payload field, without a leading comma.
func appendPayload(b, p []byte) []byte { return wire.AppendPayload(b, p, wire.Classify(p)) }

// appendString appends s as a JSON string.
func appendString(b []byte, s string) []byte { return wire.AppendString(b, s) }

// request starts an envelope: {"type":typ,"id":id and, when room is set,
// ,"room":room. The caller appends the rest and the closing brace.
func request(typ, id, room string) []byte {
	b := make([]byte, 0, 64+len(room))
	b = append(b, `{"type":`...)
	b = appendString(b, typ)
	if id != "" {
		b = append(b, `,"id":`...)
		b = appendString(b, id)
	}
	if room != "" {
		b = append(b, `,"room":`...)
		b = appendString(b, room)
	}
	return b
}

// position is where a subscription stands in its room.
type position struct {
	epoch string
	seq   uint64
}

func encodeSubscribe(id, room string, history int, presence bool, info json.RawMessage, since *position) []byte {
	b := request("subscribe", id, room)
	if since != nil {
		b = append(b, `,"since":{"epoch":`...)
		b = appendString(b, since.epoch)
		b = append(b, `,"seq":`...)
		b = strconv.AppendUint(b, since.seq, 10)
		b = append(b, '}')
	} else if history > 0 {
		b = append(b, `,"history":`...)
		b = strconv.AppendInt(b, int64(history), 10)
	}
	if presence {
		b = append(b, `,"presence":true`...)
	}
	if len(info) > 0 {
		b = append(b, `,"info":`...)
		b = append(b, info...)
	}
	return append(b, '}')
}

// encodeRoomRequest is an unsubscribe or presence request.
func encodeRoomRequest(typ, id, room string) []byte {
	return append(request(typ, id, room), '}')
}

// encodePublish is an attempt of a publish, with its key.
func encodePublish(id string, e *outgoing) []byte {
	b := request("publish", id, e.room)
	b = append(b, `,"key":`...)
	b = appendString(b, e.key)
	b = append(b, ',')
	b = appendPayload(b, e.data)
	return append(b, '}')
}

// encodePayloadRequest is a send request.
func encodePayloadRequest(typ, id, room string, p []byte) []byte {
	b := request(typ, id, room)
	b = append(b, ',')
	b = appendPayload(b, p)
	return append(b, '}')
}

var pongEnvelope = []byte(`{"type":"pong"}`)

// inbound is any server envelope (see protocol.Envelope).
type inbound struct{ protocol.Envelope }

// payload decodes the envelope's one payload field.
func (in *inbound) payload() ([]byte, Kind, error) {
	p, kind, err := wire.DecodePayload(in.Data, in.Text, in.Binary)
	return p, Kind(kind), err
}

// err is the reply's error, for an "error" envelope.
func (in *inbound) err() error {
	if in.Type != "error" {
		return nil
	}
	return &Error{Code: in.Code, Message: in.Message}
}

// deref is *p, or 0 for a field the envelope left out.
func deref(p *int) int {
	if p == nil {
		return 0
	}
	return *p
}
