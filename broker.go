package pubsub

import (
	"context"
	"encoding/json"
	"time"
)

// MessageKind tells a room message from a presence event.
type MessageKind uint8

const (
	KindMessage MessageKind = iota // a published payload, sequenced and kept in history
	KindJoin                       // a member joined the room (presence)
	KindLeave                      // a member left the room (presence)
	// KindReset says this node's stream of the room broke: messages were
	// lost that the broker cannot deliver (its connection to the cluster
	// dropped and the history no longer holds them, or the engine lost the
	// room's state). A broker delivers it before any message past the lost
	// ones. The Handler closes the room's subscribers on this node with
	// 4006 after what they have queued, so they reconnect and recover
	// exactly, or are told that they cannot; the next message starts the
	// room's stream afresh. Only Kind and Room are set.
	KindReset
)

// Message is one message of a room, as a Broker carries it between nodes.
type Message struct {
	Kind MessageKind
	// Room the message belongs to.
	Room string
	// ID is unique across rooms and nodes (a UUID for the memory broker).
	ID string
	// Epoch names one life of the room's sequence. It changes when the
	// room's state is lost (the room was reclaimed, the engine lost its
	// data), so a (Room, Epoch, Seq) triple never names two messages.
	Epoch string
	// Seq is the room's sequence number: 1 for an epoch's first message,
	// then strictly increasing by 1. Presence events carry no Seq.
	Seq uint64
	// Time is when the broker sequenced the message.
	Time time.Time
	// Data is the payload, delivered verbatim. Receivers must not modify
	// it: every subscriber shares it.
	Data []byte
	// Member is who joined or left, for KindJoin and KindLeave.
	Member Member
}

// Member is one connection's presence in a room.
type Member struct {
	ConnID string
	UserID string          // empty for an anonymous connection
	Info   json.RawMessage // from the Identity or the client's subscribe; may be empty
}

// PresenceMember is one member of a room: a user with all its connections
// (tabs, devices), or one anonymous connection.
type PresenceMember struct {
	UserID string          // empty for an anonymous member
	Conns  []string        // connection ids, sorted
	Info   json.RawMessage // the info of the member's connection with the smallest id
}

// Presence is a room's membership, cluster-wide.
type Presence struct {
	Count       int              // members
	Connections int              // connections of all members
	Members     []PresenceMember // sorted by UserID then first connection; nil when counts only
}

// HistoryOptions bounds a room's history; Publish applies them.
type HistoryOptions struct {
	Size int           // messages kept; 0 keeps none
	TTL  time.Duration // how long a message is kept, and how long an idle room's state outlives its last message
}

// PublishOptions says how a Broker keeps one publish.
type PublishOptions struct {
	// History bounds the room's history (the room's options).
	History HistoryOptions
	// Key, when set, makes the publish idempotent within its room: a
	// broker that sequenced a publish with the same Key in the same room
	// less than KeyTTL ago sequences, keeps and delivers nothing, and
	// returns that first message's position with Duplicate set. The
	// Handler namespaces keys (the backend's apart from each user's), so
	// one party's keys never suppress another's publishes.
	Key string
	// KeyTTL is how long a broker remembers Key after the publish that
	// sequenced it; the Handler passes WithIdempotencyWindow.
	KeyTTL time.Duration
}

// PublishResult is where a publish landed.
type PublishResult struct {
	// Message is the message as sequenced. For a Duplicate it is the
	// first publish's: its Kind, Room, ID, Epoch, Seq and Time, and no
	// Data. The zero Message when a broker dropped the publish (a room
	// with no history and no interested node).
	Message
	// Duplicate says Key was seen: nothing was sequenced or delivered.
	Duplicate bool
}

// HistoryQuery selects messages from a room's history.
type HistoryQuery struct {
	Since  uint64 // only messages with Seq greater than Since
	Limit  int    // at most this many; 0 returns none, only the position
	Latest bool   // the newest Limit messages instead of the oldest
}

// HistoryResult is a room's position and the messages a query selected,
// oldest first.
type HistoryResult struct {
	Epoch    string
	Top      uint64 // the Seq of the room's newest message; 0 before the first
	Messages []Message
}

// Broker connects a Handler (a node) to the cluster. It owns each room's
// sequence, history and presence, and delivers each message to every node
// interested in the room, this one included.
//
// The Handler guarantees, for one room, that Subscribe and Unsubscribe
// alternate (Subscribe first) and are never called concurrently, and that
// it calls Join and Leave only between them; Publish and History may be
// called at any time from any goroutine. Every method that blocks takes a
// context. brokertest.Run (and brokertest.RunCluster for brokers that span
// nodes) checks an implementation.
type Broker interface {
	// Bind is called once, by NewHandler, before any other method; a second
	// call panics (one broker serves one Handler). The broker calls deliver
	// for each message and presence event of a room this node subscribed
	// to: one room's in order, never two of one room at once, and with no
	// hole: after the first, each message is the next Seq of the same
	// Epoch, unless a KindReset came first. A repeat is harmless (the
	// Handler drops it); a hole without a reset is treated as one, so no
	// subscriber ever sees it. deliver never blocks on a socket: it
	// queues (and, for the built-in broker only, whose deliveries run on
	// the publisher's goroutine, writes a small room's frames without
	// waiting).
	Bind(deliver func(Message))
	// Publish assigns data the room's next sequence number and a unique
	// ID, appends it to the room's history (bounded by o.History), and
	// delivers it to every interested node, atomically with respect to
	// other publishes and History calls on the room. With o.Key it is
	// idempotent (see PublishOptions), across every node of the cluster
	// and under concurrent publishes of one key. A room with no history
	// and no interested node may drop it, returning the zero result and a
	// nil error. Publish must not retain data beyond the Message.
	Publish(ctx context.Context, room string, data []byte, o PublishOptions) (PublishResult, error)
	// History returns the room's epoch, newest Seq and the messages q
	// selects among those still kept.
	History(ctx context.Context, room string, q HistoryQuery) (HistoryResult, error)
	// Subscribe registers this node's interest in room.
	Subscribe(ctx context.Context, room string) error
	// Unsubscribe withdraws this node's interest in room.
	Unsubscribe(ctx context.Context, room string) error
	// Join adds a connection to the room's presence. With events, a
	// member's first connection is announced to every interested node as
	// a KindJoin message.
	Join(ctx context.Context, room string, m Member, events bool) error
	// Leave removes a connection from the room's presence. With events, a
	// member's last connection leaving is announced as KindLeave.
	Leave(ctx context.Context, room string, m Member, events bool) error
	// Presence lists the room's members; with countsOnly, only the counts.
	Presence(ctx context.Context, room string, countsOnly bool) (Presence, error)
	// Close releases the broker's resources and stops its goroutines.
	Close() error
}
