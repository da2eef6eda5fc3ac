package pubsub

import (
	"encoding/binary"
	"sync"
	"time"

	"github.com/roomcast/pubsub/internal/wire"
)

// frame is one outbound message, built once and shared by every queue it
// is put in. Its bytes on the wire, framing included, are built at most
// once per mode, by the first writer that needs them, and then written as
// they are to every subscriber's socket.
type frame struct {
	m      Message // room messages and presence events; Data is the raw-mode payload
	room   *room   // the room whose policy applies; nil for direct and control frames
	kind   wire.Kind
	size   int       // what the frame counts against a queue's byte bound
	at     time.Time // when it was published, for lag
	data   bool      // carries a payload (room or direct message)
	replay bool      // replayed from history: never replaced by a SlowConsumerKeepLatest room
	to     audience  // the modes whose connections take it
	sse    sseFrameKind

	encode    func() []byte // the protocol-mode envelope
	protoOnce sync.Once
	protoWire []byte // a text frame holding the envelope
	rawOnce   sync.Once
	rawWire   []byte // a text or binary frame holding the payload as published
	sseOnce   sync.Once
	sseWire   []byte // the SSE event, but its id line (see sseWire)
}

// audience is the modes a frame is for, a bit per Mode.
type audience uint8

const (
	toRaw      audience = 1 << ModeRaw
	toProtocol audience = 1 << ModeProtocol
	toSSE      audience = 1 << ModeSSE
	toAll               = toRaw | toProtocol | toSSE
)

func newRoomFrame(m Message, r *room) *frame {
	if m.Kind != KindMessage {
		return &frame{m: m, room: r, size: 64, at: m.Time, to: toProtocol,
			encode: func() []byte { return encodePresenceEvent(m) }}
	}
	kind := wire.Classify(m.Data)
	return &frame{
		m: m, room: r, kind: kind, size: len(m.Data), at: m.Time, data: true, to: toAll,
		encode: func() []byte { return encodeMessage(m, kind) },
	}
}

func newDirectFrame(p []byte) *frame {
	kind := wire.Classify(p)
	return &frame{
		m: Message{Data: p}, kind: kind, size: len(p), at: time.Now(), data: true, to: toAll,
		encode: func() []byte { return encodeDirect(p, kind) },
	}
}

// newControlFrame is a protocol-mode reply (welcome, ack, error, ping, pong).
func newControlFrame(env []byte) *frame {
	f := &frame{size: len(env), to: toProtocol}
	f.protoWire = wireFrame(opText, env)
	f.protoOnce.Do(func() {})
	return f
}

// wire is the frame as it goes on the wire to a connection of mode.
// newPongFrame is a pong with payload, the answer to a client's ping,
// for a WebSocket of either mode.
func newPongFrame(payload []byte) *frame {
	w := wireFrame(opPong, payload)
	f := &frame{size: len(w), to: toRaw | toProtocol, protoWire: w, rawWire: w}
	f.protoOnce.Do(func() {})
	f.rawOnce.Do(func() {})
	return f
}

func (f *frame) wire(mode Mode) []byte {
	switch mode {
	case ModeProtocol:
		f.protoOnce.Do(func() { f.protoWire = wireFrame(opText, f.encode()) })
		return f.protoWire
	case ModeSSE:
		f.sseOnce.Do(func() { f.sseWire = sseEvent(f) })
		return f.sseWire
	}
	f.rawOnce.Do(func() {
		op := byte(opText)
		if f.kind == wire.Binary {
			op = opBinary
		}
		f.rawWire = wireFrame(op, f.m.Data)
	})
	return f.rawWire
}

// policy is the slow-consumer policy that applies to f.
func (f *frame) policy() SlowConsumerPolicy {
	if f.room == nil || !f.data {
		return SlowConsumerDisconnect
	}
	return f.room.opts.SlowConsumer
}

// WebSocket opcodes of the frames the Handler writes or reads itself (RFC
// 6455, section 5.2): messages, raw mode's heartbeat ping, and the pings
// and pongs a connection's reader takes between messages, with the pongs
// that answer those pings (conn.takeControl). Other control frames (close,
// a ping inside a fragmented message) are coder/websocket's.
const (
	opText   = 0x1
	opBinary = 0x2
	opPing   = 0x9
	opPong   = 0xA
)

// wireFrame is payload as one unfragmented server frame: FIN set, no
// extension bits (the Handler never negotiates compression), unmasked as
// the server's frames must be, with the shortest length encoding.
func wireFrame(opcode byte, payload []byte) []byte {
	n := len(payload)
	var hdr [10]byte
	hdr[0] = 0x80 | opcode
	h := 2
	switch {
	case n < 126:
		hdr[1] = byte(n)
	case n <= 0xFFFF:
		hdr[1] = 126
		binary.BigEndian.PutUint16(hdr[2:], uint16(n))
		h = 4
	default:
		hdr[1] = 127
		binary.BigEndian.PutUint64(hdr[2:], uint64(n))
		h = 10
	}
	out := make([]byte, h+n)
	copy(out, hdr[:h])
	copy(out[h:], payload)
	return out
}
