package protocol

import "encoding/json"

// Envelope is any server envelope of protocol mode (PROTOCOL.md section
// 3), as encoding/json decodes it. Within roomcast.v1 the server only adds
// fields and types, so one struct decodes them all: a field the envelope's
// type does not carry is zero, a pointer field is nil when the envelope
// left it out, and unknown fields are ignored. The Go client and the
// pubsubtest kit both read envelopes into it. A message's payload is in
// exactly one of Data (JSON), Text and Binary (base64).
type Envelope struct {
	Type string `json:"type"`
	ID   string `json:"id"`
	Room string `json:"room"`

	// message; epoch and seq also in the acks of subscribe and publish
	Epoch     string          `json:"epoch"`
	Seq       uint64          `json:"seq"`
	MessageID string          `json:"message_id"`
	Duplicate bool            `json:"duplicate"` // a publish's ack: its key was sequenced already
	Time      int64           `json:"time"`
	Data      json.RawMessage `json:"data"`
	Text      *string         `json:"text"`
	Binary    *string         `json:"binary"`

	// error
	Code    ErrorCode `json:"code"`
	Message string    `json:"message"`

	// welcome, join and leave
	ConnID string          `json:"conn_id"`
	UserID string          `json:"user_id"`
	Info   json.RawMessage `json:"info"`

	// ack of a subscribe
	Presence  string `json:"presence"`
	Missed    *int   `json:"missed"`
	Recovered *bool  `json:"recovered"`
	Reason    Reason `json:"reason"`

	// presence reply
	Count       *int     `json:"count"`
	Connections *int     `json:"connections"`
	Members     []Member `json:"members"`

	// welcome
	Protocol        string `json:"protocol"`
	HeartbeatMS     int64  `json:"heartbeat_ms"`
	TimeoutMS       int64  `json:"timeout_ms"`
	MaxMessageBytes int64  `json:"max_message_bytes"`
	MaxRooms        int    `json:"max_rooms"`
	MaxReplay       int    `json:"max_replay"`
	KeyTTLMS        int64  `json:"key_ttl_ms"`
}

// Member is one member of a presence reply (PROTOCOL.md section 3.8): a
// user (empty for an anonymous connection, a member of its own), its
// connections, and the info of the one with the smallest id.
type Member struct {
	Conns  []string        `json:"conns"`
	UserID string          `json:"user_id"`
	Info   json.RawMessage `json:"info"`
}
