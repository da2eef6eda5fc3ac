package client

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"time"

	"github.com/roomcast/pubsub/protocol"
)

// The outbox: every publish waits in it, under a key of its own, until the
// server answers it. When a connection drops first, the publish goes out
// again on the next one, with the same key, before any newer publish; the
// server sequences a key once (PROTOCOL.md section 3.10), so each publish
// appears in its room exactly once, in the order the Client's publishes
// were made, whichever attempt got through.

// Published is where a publish landed in its room.
type Published struct {
	Room      string
	Epoch     string
	Seq       uint64
	MessageID string
	// Duplicate says an earlier attempt of this publish had been published
	// already (its ack was lost with a connection): this is its position.
	Duplicate bool
}

// outgoing is one publish in the outbox.
type outgoing struct {
	room string
	data []byte
	key  string
	res  chan publishResult // capacity 1; receives once

	// Guarded by the Client's mu.
	sentAt time.Time   // the first attempt's time; zero before it
	on     *session    // the connection its latest attempt went out on
	retry  *time.Timer // a retry due after a transient refusal
}

type publishResult struct {
	pub Published
	err error
}

// newKey returns a random idempotency key: 128 bits, as 32 hex digits.
func newKey() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
	return hex.EncodeToString(b[:])
}

// Publish publishes data into room, exactly once, and returns where it
// landed. The payload travels as JSON when data is valid JSON, else as text
// when it is valid UTF-8, else as binary: either way the server stores
// exactly data. It waits in the Client's outbox (WithOutbox) until the
// server answers; while the Client is reconnecting it waits there too, and a
// publish whose connection dropped before its ack is sent again, with the
// same key, before any newer one, so it appears in the room once and the
// Client's publishes keep their order. When ctx ends first Publish returns
// ctx's error, but the publish stays in the outbox: it is still published,
// once. Transient refusals (rate_limited, unavailable, internal) are tried
// again, with the same key. It fails with ErrOutboxFull, ErrTooLarge, an
// *Error the server answered (forbidden, invalid_room, bad_request…: not
// published), ErrExpired when it could not be confirmed within the
// server's key window (key_ttl_ms: it may or may not have been published),
// or ErrClosed when the Client stops first (likewise).
func (c *Client) Publish(ctx context.Context, room string, data []byte) (Published, error) {
	pub, err := c.publish(ctx, room, data)
	if err != nil {
		return Published{}, fmt.Errorf("client: publish to room %q: %w", room, err)
	}
	return pub, nil
}

func (c *Client) publish(ctx context.Context, room string, data []byte) (Published, error) {
	e := &outgoing{room: room, data: data, key: newKey(), res: make(chan publishResult, 1)}
	c.mu.Lock()
	switch {
	case c.state == StateClosed:
		c.mu.Unlock()
		return Published{}, ErrClosed
	case len(c.outbox) >= c.cfg.outboxSize:
		c.mu.Unlock()
		return Published{}, fmt.Errorf("%w: %d publishes wait for the server", ErrOutboxFull, len(c.outbox))
	}
	if max := c.conn.maxMessageBytes; max > 0 && int64(len(encodePublish("0", e))) > max {
		c.mu.Unlock()
		return Published{}, fmt.Errorf("%w: the server accepts %d bytes", ErrTooLarge, max)
	}
	c.outbox = append(c.outbox, e)
	sess := c.takeForLocked(e)
	c.mu.Unlock()
	c.sendTaken(sess, e)
	select {
	case r := <-e.res:
		return r.pub, r.err
	case <-ctx.Done():
		return Published{}, ctx.Err()
	}
}

// takeForLocked returns the session e's next attempt goes out on, marking
// it so, or nil: when there is no connection, or while a new connection
// sends the older publishes first (flushOutbox sends e then).
func (c *Client) takeForLocked(e *outgoing) *session {
	sess := c.sess
	if sess == nil || c.flushing == sess || e.on == sess {
		return nil
	}
	if e.sentAt.IsZero() {
		e.sentAt = time.Now()
	}
	e.on = sess
	return sess
}

// send writes one attempt of e on sess; the caller holds sendMu, which
// keeps the Client's publishes in the outbox's order on the wire. The
// answer comes to the reader, which resolves e or schedules a retry. A
// write that fails leaves e to the next connection.
func (c *Client) send(sess *session, e *outgoing) {
	id := c.newID()
	if !sess.addPending(id, &pending{ch: make(chan *inbound, 1), onReply: func(r *inbound) error {
		c.answered(e, r)
		return nil
	}}) {
		return // the session ended: the next one sends it
	}
	if err := c.write(sess, encodePublish(id, e)); err != nil {
		sess.dropPending(id)
	}
}

// answered resolves e with the server's answer to one attempt. A
// transient refusal (rate limited, unavailable, internal) is tried again
// with the same key after a delay: the key keeps it from being published
// twice, if the refused attempt was in fact published.
func (c *Client) answered(e *outgoing, r *inbound) {
	err := r.err()
	if err == nil {
		c.resolve(e, publishResult{pub: Published{Room: e.room, Epoch: r.Epoch, Seq: r.Seq, MessageID: r.MessageID, Duplicate: r.Duplicate}})
		return
	}
	switch err.(*Error).Code {
	case protocol.CodeRateLimited, protocol.CodeUnavailable, protocol.CodeInternal:
		c.mu.Lock()
		if c.waitingLocked(e) && !c.expiredLocked(e) {
			e.on = nil
			e.retry = time.AfterFunc(retryMax, func() { c.retry(e) })
			c.mu.Unlock()
			return
		}
		c.mu.Unlock()
	}
	c.resolve(e, publishResult{err: err})
}

// retry sends e again on the current connection, if it still waits.
func (c *Client) retry(e *outgoing) {
	c.mu.Lock()
	e.retry = nil
	if !c.waitingLocked(e) {
		c.mu.Unlock()
		return
	}
	if c.expiredLocked(e) {
		c.resolveLocked(e, publishResult{err: ErrExpired})
		c.mu.Unlock()
		return
	}
	sess := c.takeForLocked(e)
	c.mu.Unlock()
	c.sendTaken(sess, e)
}

// sendTaken sends e on sess, which takeForLocked chose (nil: not now),
// in send order with flushOutbox.
func (c *Client) sendTaken(sess *session, e *outgoing) {
	if sess == nil {
		return
	}
	c.sendMu.Lock()
	defer c.sendMu.Unlock()
	c.send(sess, e)
}

// flushOutbox runs when a connection is up: it sends every waiting
// publish on it, oldest first, and those made meanwhile, so nothing newer
// overtakes them. A publish first sent longer ago than the server's key
// window fails with ErrExpired instead: sending it again could publish it
// twice.
func (c *Client) flushOutbox(sess *session) {
	c.sendMu.Lock()
	defer c.sendMu.Unlock()
	for {
		c.mu.Lock()
		if c.sess != sess {
			c.mu.Unlock()
			return // ended meanwhile: the next connection flushes
		}
		var next *outgoing
		for _, e := range c.outbox {
			if e.on == sess || e.retry != nil {
				continue // on this connection already, or due for a retry
			}
			if c.expiredLocked(e) {
				c.resolveLocked(e, publishResult{err: ErrExpired})
				break // the outbox changed: look again
			}
			next = e
			break
		}
		if next == nil {
			if c.flushing == sess {
				c.flushing = nil
			}
			c.mu.Unlock()
			return
		}
		c.flushing = sess
		if next.sentAt.IsZero() {
			next.sentAt = time.Now()
		}
		next.on = sess
		c.mu.Unlock()
		c.send(sess, next)
	}
}

// expiredLocked reports whether e was first sent longer ago than the
// server remembers keys.
func (c *Client) expiredLocked(e *outgoing) bool {
	ttl := c.conn.keyTTL
	return ttl > 0 && !e.sentAt.IsZero() && time.Since(e.sentAt) > ttl
}

func (c *Client) waitingLocked(e *outgoing) bool {
	for _, x := range c.outbox {
		if x == e {
			return true
		}
	}
	return false
}

func (c *Client) resolve(e *outgoing, r publishResult) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.resolveLocked(e, r)
}

// resolveLocked takes e out of the outbox and hands its caller r, once.
func (c *Client) resolveLocked(e *outgoing, r publishResult) {
	for i, x := range c.outbox {
		if x == e {
			c.outbox = append(c.outbox[:i], c.outbox[i+1:]...)
			if e.retry != nil {
				e.retry.Stop()
			}
			e.res <- r
			return
		}
	}
}

// failOutboxLocked fails every waiting publish with err: the Client stops.
func (c *Client) failOutboxLocked(err error) {
	for _, e := range c.outbox {
		if e.retry != nil {
			e.retry.Stop()
		}
		e.res <- publishResult{err: err}
	}
	c.outbox = nil
}
