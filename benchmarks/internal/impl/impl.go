// Package impl holds the servers the comparison runs. Each one serves
// WebSocket clients at /ws, puts each connection into the room it asks for
// (the query parameter room; "bench" in the one-room scenarios), and
// publishes into rooms from the server side, each with its library's
// default settings:
//
//   - roomcast: pubsub.NewHandler in raw mode; clients dial /ws?room=bench
//     and get each payload verbatim as one text frame. Publish is
//     Handler.Publish through the default in-memory broker.
//   - melody: melody.New; melody has no rooms: a publish to "bench" is
//     Melody.Broadcast, and to any other room Melody.BroadcastFilter over
//     every session, matching the room kept in the session's keys (set only
//     for rooms other than "bench"). One text frame per payload.
//   - centrifuge: a centrifuge.Node with its WebSocket transport and the
//     JSON protocol. OnConnecting accepts every client anonymously and
//     subscribes it server-side (ConnectReply Subscriptions) to the channel
//     its connect command names in its data ({"room":…}; "bench" without);
//     a publish is Node.Publish into the in-memory broker. Clients speak
//     centrifuge's protocol: they send {"id":1,"connect":{…}},
//     wait for the reply, answer the server's {} pings with {}, and get
//     each payload inside a push {"push":{"channel":"bench","pub":{"data":…}}};
//     several pushes may share one frame, separated by newlines.
//   - gorilla: the hub of gorilla/websocket's chat example (a hub goroutine
//     owning the set of clients, a reader and a writer goroutine per
//     connection, 256-message send channels, 54 s pings, a client whose
//     channel is full is dropped), except that the writer sends one frame
//     per payload instead of joining queued payloads with newlines, so the
//     wire is the same as roomcast's and melody's, and keeping a set of
//     clients per room.
//   - floor: no WebSocket library and not a usable server: the cost of a
//     design that makes one write system call per delivery and nothing
//     else. See floor.go.
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
	// Publish sends data to every connection in room, from the server.
	Publish(ctx context.Context, room string, data []byte) error
	// Subscribers is how many connections are in rooms now.
	Subscribers() int
	// Close closes every connection and stops the implementation's
	// goroutines.
	Close() error
}

// Pruner is implemented by servers that learn of a client's end only when
// asked (the floor, which never reads): Prune forgets the connections whose
// peer closed. The driver calls it only between scenarios.
type Pruner interface {
	Prune()
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
	Name string
	// Path is the WebSocket URL path and query clients dial; RoomVar in it
	// stands for the connection's room. Centrifuge clients name their room
	// in their connect command instead.
	Path     string
	Protocol Protocol
	New      func() (Server, error)
}

// RoomVar is replaced by a connection's room in Spec.Path.
const RoomVar = "{room}"

// All lists the implementations in the order reports show them; roomcast
// first, since the others are compared against it.
var All = []Spec{
	{Name: "roomcast", Path: "/ws?room=" + RoomVar, Protocol: Raw, New: newRoomcast},
	{Name: "melody", Path: "/ws?room=" + RoomVar, Protocol: Raw, New: newMelody},
	{Name: "centrifuge", Path: "/ws", Protocol: Centrifuge, New: newCentrifuge},
	{Name: "gorilla", Path: "/ws?room=" + RoomVar, Protocol: Raw, New: newGorilla},
	{Name: "floor", Path: "/ws?room=" + RoomVar, Protocol: Raw, New: newFloor},
}

// Lookup finds an implementation by name.
func Lookup(name string) (Spec, error) {
	for _, s := range All {
		if s.Name == name {
			return s, nil
		}
	}
	return Spec{}, fmt.Errorf("unknown implementation %q (want roomcast, melody, centrifuge, gorilla or floor)", name)
}
