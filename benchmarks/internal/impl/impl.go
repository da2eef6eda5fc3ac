// Package impl holds the four servers the comparison runs. Each one serves
// WebSocket clients at /ws, puts every connection into the one room
// "bench", and publishes into it from the server side, each with its
// library's default settings:
//
//   - roomcast: pubsub.NewHandler in raw mode; clients dial /ws?room=bench
//     and get each payload verbatim as one text frame. Publish is
//     Handler.Publish through the default in-memory broker.
//   - melody: melody.New; every session is in the room (melody has no
//     rooms), so a publish is Melody.Broadcast. One text frame per payload.
//   - centrifuge: a centrifuge.Node with its WebSocket transport and the
//     JSON protocol. OnConnecting accepts every client anonymously and
//     subscribes it to channel "bench" server-side (ConnectReply
//     Subscriptions); a publish is Node.Publish into the in-memory broker.
//     Clients speak centrifuge's protocol: they send {"id":1,"connect":{}},
//     wait for the reply, answer the server's {} pings with {}, and get
//     each payload inside a push {"push":{"channel":"bench","pub":{"data":…}}};
//     several pushes may share one frame, separated by newlines.
//   - gorilla: the hub of gorilla/websocket's chat example (a hub goroutine
//     owning the set of clients, a reader and a writer goroutine per
//     connection, 256-message send channels, 54 s pings, a client whose
//     channel is full is dropped), except that the writer sends one frame
//     per payload instead of joining queued payloads with newlines, so the
//     wire is the same as roomcast's and melody's.
package impl

import (
	"context"
	"fmt"
	"net/http"
)

// Room is the room (channel) every benchmark connection joins.
const Room = "bench"

// Server is one implementation under test.
type Server interface {
	// Handler serves the WebSocket endpoint; it is mounted at /ws.
	Handler() http.Handler
	// Publish sends data to every connection in the room, from the server.
	Publish(ctx context.Context, data []byte) error
	// Subscribers is how many connections are in the room now.
	Subscribers() int
	// Close closes every connection and stops the implementation's
	// goroutines.
	Close() error
}

// Counters is implemented by servers that count things worth reporting
// beside the measurements, such as roomcast's slow consumers.
type Counters interface {
	Counters() map[string]uint64
}

// Protocol is what a client speaks to an implementation.
type Protocol string

const (
	// Raw: dial, then read one payload per frame.
	Raw Protocol = "raw"
	// Centrifuge: centrifuge's JSON protocol (see the package comment).
	Centrifuge Protocol = "centrifuge"
)

// Spec names an implementation and how clients talk to it.
type Spec struct {
	Name     string
	Path     string // the WebSocket URL path and query clients dial
	Protocol Protocol
	New      func() (Server, error)
}

// All lists the implementations in the order reports show them; roomcast
// first, since the others are compared against it.
var All = []Spec{
	{Name: "roomcast", Path: "/ws?room=" + Room, Protocol: Raw, New: newRoomcast},
	{Name: "melody", Path: "/ws", Protocol: Raw, New: newMelody},
	{Name: "centrifuge", Path: "/ws", Protocol: Centrifuge, New: newCentrifuge},
	{Name: "gorilla", Path: "/ws", Protocol: Raw, New: newGorilla},
}

// Lookup finds an implementation by name.
func Lookup(name string) (Spec, error) {
	for _, s := range All {
		if s.Name == name {
			return s, nil
		}
	}
	return Spec{}, fmt.Errorf("unknown implementation %q (want roomcast, melody, centrifuge or gorilla)", name)
}
