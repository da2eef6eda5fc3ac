package natsbroker

import (
	"context"
	"errors"
	"sync"

	"github.com/nats-io/nats.go"
)

// link follows the state of the broker's NATS connection, so that a call
// waiting for an answer gives up as soon as the connection drops instead
// of at its deadline: the answer is lost with the connection.
type link struct {
	mu       sync.Mutex
	down     bool
	next     uint64
	inflight map[uint64]context.CancelCauseFunc
}

// call returns ctx, ended with ErrDisconnected when the connection drops
// (at once if it is down), and the function that releases it.
func (l *link) call(ctx context.Context) (context.Context, func()) {
	ctx, cancel := context.WithCancelCause(ctx)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.down {
		cancel(ErrDisconnected)
		return ctx, func() {}
	}
	if l.inflight == nil {
		l.inflight = make(map[uint64]context.CancelCauseFunc)
	}
	l.next++
	id := l.next
	l.inflight[id] = cancel
	return ctx, func() {
		l.mu.Lock()
		delete(l.inflight, id)
		l.mu.Unlock()
		cancel(nil)
	}
}

// set records the connection's state; going down ends every call in
// flight.
func (l *link) set(down bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.down = down
	if !down {
		return
	}
	for id, cancel := range l.inflight {
		cancel(ErrDisconnected)
		delete(l.inflight, id)
	}
}

// linkErr prefers ErrDisconnected when a call ended because the
// connection dropped.
func linkErr(ctx context.Context, err error) error {
	if err != nil && errors.Is(context.Cause(ctx), ErrDisconnected) {
		return ErrDisconnected
	}
	return err
}

// watchLoop is the watcher: it follows the connection's status until
// Close, and asks the reader to catch up after each reconnect.
func (b *Broker) watchLoop(status chan nats.Status) {
	for {
		select {
		case <-b.ctx.Done():
			return
		case st, ok := <-status:
			if !ok {
				return
			}
			switch st {
			case nats.DISCONNECTED, nats.RECONNECTING, nats.CLOSED:
				b.link.set(true)
			case nats.CONNECTED:
				b.link.set(false)
				select {
				case b.resyncs <- struct{}{}:
				default: // one is pending already
				}
			}
		}
	}
}
