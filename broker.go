package pubsub

import (
	"context"
	"sync"

	"github.com/google/uuid"
)

// Message is one message of a room, as a Broker carries it between nodes.
type Message struct {
	// Room the message was published to.
	Room string
	// Epoch names one lifetime of the room's sequence. It changes when the
	// room's state is lost (for the memory broker: when the room is
	// reclaimed), so a (Epoch, Seq) pair never names two messages.
	Epoch string
	// Seq is the room's sequence number, strictly increasing within an epoch,
	// starting at 1.
	Seq uint64
	// Data is the payload, delivered verbatim. Receivers must not modify it:
	// it is shared by every subscriber.
	Data []byte
}

// Broker connects a Handler (a node) to the cluster. It assigns each
// message of a room its place in the room's order and delivers it to every
// node interested in the room, this one included.
//
// The Handler guarantees, for one room, that Subscribe and Unsubscribe
// alternate (Subscribe first) and are never called concurrently; Publish may
// be called at any time from any goroutine. Every method that blocks takes a
// context.
type Broker interface {
	// Bind is called once, by NewHandler, before any other method. The
	// broker calls deliver for each message of a room this node subscribed
	// to: one room's messages in sequence order, never two of one room at
	// once. deliver only enqueues; it never blocks on a socket.
	Bind(deliver func(Message))
	// Publish assigns data its sequence number in room and delivers it to
	// every interested node. A room no node is subscribed to may drop it,
	// returning the zero Message and a nil error. Publish must not retain
	// data beyond the delivered Message.
	Publish(ctx context.Context, room string, data []byte) (Message, error)
	// Subscribe registers this node's interest in room.
	Subscribe(ctx context.Context, room string) error
	// Unsubscribe withdraws this node's interest in room.
	Unsubscribe(ctx context.Context, room string) error
	// Close releases the broker's resources and stops its goroutines.
	Close() error
}

// NewMemoryBroker returns the in-process broker, the default: one node, no
// goroutines. A room's sequence lives while this node is subscribed to it;
// when the room is reclaimed its next life starts a new epoch.
func NewMemoryBroker() Broker {
	return &memoryBroker{rooms: make(map[string]*memoryRoom)}
}

var _ Broker = (*memoryBroker)(nil)

type memoryBroker struct {
	deliver func(Message)

	mu     sync.Mutex
	rooms  map[string]*memoryRoom
	closed bool
}

type memoryRoom struct {
	mu    sync.Mutex // orders the room: held from sequence assignment to delivery
	epoch string
	seq   uint64
}

func (b *memoryBroker) Bind(deliver func(Message)) {
	if b.deliver != nil {
		panic("pubsub: this broker is already bound to a Handler; create one broker per Handler")
	}
	b.deliver = deliver
}

func (b *memoryBroker) Publish(ctx context.Context, room string, data []byte) (Message, error) {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return Message{}, ErrClosed
	}
	r := b.rooms[room]
	b.mu.Unlock()
	if r == nil {
		return Message{}, nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.seq++
	m := Message{Room: room, Epoch: r.epoch, Seq: r.seq, Data: data}
	b.deliver(m)
	return m, nil
}

func (b *memoryBroker) Subscribe(ctx context.Context, room string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return ErrClosed
	}
	if b.rooms[room] == nil {
		b.rooms[room] = &memoryRoom{epoch: uuid.NewString()}
	}
	return nil
}

func (b *memoryBroker) Unsubscribe(ctx context.Context, room string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.rooms, room)
	return nil
}

func (b *memoryBroker) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	clear(b.rooms)
	return nil
}
