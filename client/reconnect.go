package client

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub/protocol"
)

// The manager goroutine: it keeps the Client connected, reconnecting with
// backoff and resubscribing every Subscription with its position, until
// the Client stops.

// run manages the connection until the Client stops: it serves each
// connection, then reconnects with backoff.
func (c *Client) run(s *session) {
	attempt := 0
	first := true
	for {
		cause := c.serve(s, first)
		first = false
		if c.ctx.Err() != nil {
			c.finish(nil)
			return
		}
		c.log.Debug("client: disconnected", "conn_id", s.welcome.connID, "err", cause)
		if !c.cfg.reconnect || permanent(cause) {
			c.finish(cause)
			return
		}
		c.setState(StateReconnecting, cause)
		if !c.waitForSlowHandlers(s) {
			c.finish(nil)
			return
		}
		for {
			if !sleepFor(c.ctx, nil, c.backoff(attempt)) {
				c.finish(nil)
				return
			}
			attempt++
			ctx, cancel := context.WithTimeout(c.ctx, c.cfg.dialTimeout)
			ns, err := c.connect(ctx)
			cancel()
			if err == nil {
				s, attempt = ns, 0
				break
			}
			if c.ctx.Err() != nil {
				c.finish(nil)
				return
			}
			c.log.Debug("client: reconnection failed", "err", err)
			if permanent(err) {
				c.finish(err)
				return
			}
			c.setState(StateReconnecting, err)
		}
	}
}

// backoff is the delay before the attempt-th reconnection in a row: a
// random time between half and all of min*2^attempt, capped at max.
func (c *Client) backoff(attempt int) time.Duration {
	d := c.cfg.minBackoff
	for i := 0; i < attempt && d < c.cfg.maxBackoff; i++ {
		d *= 2
	}
	d = min(d, c.cfg.maxBackoff)
	half := d / 2
	return half + rand.N(d-half+1)
}

// sleepFor waits d; it reports false when ctx or stop ended first.
func sleepFor(ctx context.Context, stop <-chan struct{}, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	case <-stop:
		return false
	}
}

// waitForSlowHandlers waits until the handlers that overflowed on s have
// emptied their buffers, so the replay fits. It reports false when the
// Client is closed first.
func (c *Client) waitForSlowHandlers(s *session) bool {
	s.mu.Lock()
	slow, slowDirect := s.slow, s.slowDirect
	s.mu.Unlock()
	for _, sub := range slow {
		if !sub.q.waitIdle(c.ctx) {
			return false
		}
	}
	if slowDirect && !c.direct.waitIdle(c.ctx) {
		return false
	}
	return true
}

// serve runs one connection: its reader, the resubscriptions, the writes
// of the reader's envelopes and the heartbeat watch. It returns why the
// connection ended.
func (c *Client) serve(s *session, first bool) error {
	subs := c.adopt(s, first)
	c.log.Debug("client: connected", "conn_id", s.welcome.connID)

	c.wg.Go(func() { c.read(s) })
	c.wg.Go(func() { c.flushOutbox(s) })
	var restored chan error
	if len(subs) > 0 {
		restored = make(chan error, 1)
		c.wg.Go(func() { restored <- c.resubscribe(s, subs) })
	} else {
		c.setState(StateConnected, nil)
	}
	var hb *time.Timer
	var heartbeat <-chan time.Time
	if s.welcome.limit > 0 {
		hb = time.NewTimer(s.welcome.limit)
		defer hb.Stop()
		heartbeat = hb.C
	}
	for {
		select {
		case <-s.done:
			cause := closeEnded(s)
			if restored != nil {
				<-restored // its requests fail now that s is done
			}
			return cause
		case err := <-restored:
			restored = nil
			if err != nil {
				s.setCause(err, false)
				_ = s.ws.CloseNow()
				continue
			}
			c.setState(StateConnected, nil)
		case env := <-s.outbox:
			if err := c.write(s, env); err != nil {
				_ = s.ws.CloseNow() // the reader reports the loss
			}
		case <-heartbeat:
			idle := time.Since(time.Unix(0, s.lastRead.Load()))
			if idle < s.welcome.limit {
				hb.Reset(s.welcome.limit - idle)
				continue
			}
			c.log.Debug("client: heartbeat timeout", "conn_id", s.welcome.connID)
			s.setCause(ErrHeartbeatTimeout, false)
			_ = s.ws.CloseNow()
			heartbeat = nil
		case <-c.ctx.Done():
			s.setCause(ErrClosed, false)
			_ = s.ws.Close(websocket.StatusNormalClosure, "")
			<-s.done
			_ = s.ws.CloseNow()
			if restored != nil {
				<-restored
			}
			return ErrClosed
		}
	}
}

// resubscribe subscribes subs again on s, each from its position. A
// subscription the server now refuses for good ends (OnRecover gets the
// error); an error worth retrying later ends the connection, so the
// Client reconnects.
func (c *Client) resubscribe(s *session, subs []*Subscription) error {
	for _, sub := range subs {
		for delay := retryMin; ; delay = min(2*delay, retryMax) {
			c.mu.Lock()
			active, since := sub.state == subActive, sub.pos
			c.mu.Unlock()
			if !active {
				break // left meanwhile
			}
			id := c.newID()
			env := encodeSubscribe(id, sub.room, 0, sub.cfg.onPresence != nil, sub.cfg.info, &since)
			_, _, err := c.roundTrip(c.ctx, s, id, env, c.subscribeReply(sub, true))
			var e *Error
			if err == nil {
				break
			}
			if !errors.As(err, &e) {
				return err // the connection ended
			}
			switch e.Code {
			case protocol.CodeRateLimited:
				if !sleepFor(c.ctx, s.done, delay) {
					return ErrDisconnected
				}
				continue
			case protocol.CodeUnavailable, protocol.CodeInternal:
				return fmt.Errorf("client: resubscribe to room %q: %w", sub.room, err)
			}
			c.endSubscription(sub, fmt.Errorf("client: resubscribe to room %q: %w", sub.room, err))
			break
		}
	}
	return nil
}

// endSubscription removes a subscription that could not be restored,
// telling its OnRecover why once what it has queued is delivered.
func (c *Client) endSubscription(sub *Subscription, err error) {
	c.log.Debug("client: subscription ended", "room", sub.room, "err", err)
	c.mu.Lock()
	defer c.mu.Unlock()
	if sub.state != subActive {
		return
	}
	if c.subs[sub.room] == sub {
		delete(c.subs, sub.room)
	}
	sub.state = subGone
	close(sub.gone)
	sub.q.push(item{rec: &Recovery{Room: sub.room, Err: err}}, true)
	sub.q.end()
}

// finish stops the Client for good; it runs on the manager, last.
func (c *Client) finish(cause error) {
	c.mu.Lock()
	c.state = StateClosed
	c.err = cause
	if cause == nil {
		c.err = ErrClosed
	}
	c.sess = nil
	for _, sub := range c.subs {
		c.forgetLocked(sub)
	}
	c.failOutboxLocked(ErrClosed)
	c.mu.Unlock()
	if c.direct != nil {
		c.direct.stop()
	}
	c.cancel()
	if cause != nil {
		c.log.Debug("client: stopped", "err", cause)
	}
	if c.cfg.onState != nil {
		c.cfg.onState(StateClosed, cause)
	}
	close(c.done)
}

func (c *Client) setState(st State, err error) {
	c.mu.Lock()
	c.state = st
	c.mu.Unlock()
	if c.cfg.onState != nil {
		c.cfg.onState(st, err)
	}
}

// adopt makes s the client's session and returns the subscriptions to
// restore on it (none on the first connection).
func (c *Client) adopt(s *session, first bool) []*Subscription {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sess, c.conn = s, s.welcome
	c.flushing = s // publishes waiting from before go first
	var subs []*Subscription
	if !first {
		for _, sub := range c.subs {
			if sub.state == subActive {
				subs = append(subs, sub)
			}
		}
	}
	return subs
}

// closeEnded closes the WebSocket of a session that ended, with a close
// frame saying why when the client ended it, and returns the cause.
func closeEnded(s *session) error {
	s.mu.Lock()
	cause, graceful := s.cause, s.graceful
	s.mu.Unlock()
	switch {
	case graceful && errors.Is(cause, ErrSlowHandler):
		_ = s.ws.Close(websocket.StatusNormalClosure, "client handler fell behind")
	case graceful:
		_ = s.ws.Close(websocket.StatusProtocolError, "protocol violation")
	default:
		_ = s.ws.CloseNow()
	}
	return cause
}
