package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/coder/websocket"
)

// The reader of a session: every envelope the server sends is routed to
// the request waiting for it, to a Subscription's buffer, or to the direct
// messages' buffer, never blocking on a handler.

// read reads s until it ends, routing each envelope. It never blocks on a
// handler or a write.
func (c *Client) read(s *session) {
	defer c.endSession(s)
	for {
		typ, b, err := s.ws.Read(context.Background()) // the manager closes s.ws to stop it
		if err != nil {
			s.setCause(readError(err), false)
			return
		}
		s.lastRead.Store(time.Now().UnixNano())
		var in inbound
		if typ != websocket.MessageText {
			s.setCause(fmt.Errorf("%w: a binary message", ErrProtocol), true)
			return
		}
		if err := json.Unmarshal(b, &in); err != nil {
			s.setCause(fmt.Errorf("%w: %v", ErrProtocol, err), true)
			return
		}
		if err := c.route(s, &in); err != nil {
			s.setCause(err, true)
			return
		}
	}
}

// route handles one envelope; an error ends the connection.
func (c *Client) route(s *session, in *inbound) error {
	switch in.Type {
	case "message":
		return c.routeMessage(s, in)
	case "join", "leave":
		return c.routeEvent(s, in)
	case "direct":
		return c.routeDirect(s, in)
	case "ack", "error", "presence":
		if in.ID == "" {
			if in.Type == "error" {
				c.log.Debug("client: error without a request id", "code", in.Code, "message", in.Message)
			}
			return nil
		}
		p := s.takePending(in.ID)
		if p == nil {
			return nil
		}
		if p.onReply != nil {
			if err := p.onReply(in); err != nil {
				return err
			}
		}
		p.ch <- in
	case "ping":
		select {
		case s.outbox <- pongEnvelope:
		default:
			return errors.New("client: too many pending writes")
		}
	}
	return nil // pong, welcome again, and types of later versions
}

func (c *Client) routeMessage(s *session, in *inbound) error {
	data, kind, err := in.payload()
	if err != nil {
		return fmt.Errorf("%w: message of room %q: %v", ErrProtocol, in.Room, err)
	}
	m := Message{Room: in.Room, Epoch: in.Epoch, Seq: in.Seq, ID: in.MessageID, Data: data, Kind: kind}
	if in.Time != 0 {
		m.Time = time.UnixMilli(in.Time)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	sub := c.subs[in.Room]
	if sub == nil || sub.state != subActive {
		return nil // left: late messages are not wanted
	}
	if !sub.q.push(item{msg: m}, false) {
		return c.overflowLocked(s, sub)
	}
	sub.pos = position{m.Epoch, m.Seq}
	return nil
}

func (c *Client) routeEvent(s *session, in *inbound) error {
	ev := &Event{Type: EventJoin, Room: in.Room, ConnID: in.ConnID, UserID: in.UserID, Info: in.Info}
	if in.Type == "leave" {
		ev.Type = EventLeave
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	sub := c.subs[in.Room]
	if sub == nil || sub.state != subActive || sub.cfg.onPresence == nil {
		return nil
	}
	if !sub.q.push(item{ev: ev}, false) {
		return c.overflowLocked(s, sub)
	}
	return nil
}

// overflowLocked ends s because sub's handler fell behind; the manager
// waits for it to catch up before reconnecting, and the resubscription
// recovers from sub's position, which the lost message did not advance.
func (c *Client) overflowLocked(s *session, sub *Subscription) error {
	c.log.Warn("client: handler fell behind; reconnecting to recover", "room", sub.room, "buffer", c.cfg.bufferSize)
	s.mu.Lock()
	s.slow = append(s.slow, sub)
	s.mu.Unlock()
	return fmt.Errorf("%w (room %q, %d buffered)", ErrSlowHandler, sub.room, c.cfg.bufferSize)
}

func (c *Client) routeDirect(s *session, in *inbound) error {
	data, kind, err := in.payload()
	if err != nil {
		return fmt.Errorf("%w: direct message: %v", ErrProtocol, err)
	}
	if c.direct == nil {
		return nil
	}
	if !c.direct.push(item{msg: Message{Data: data, Kind: kind}}, false) {
		c.log.Warn("client: direct message handler fell behind; a direct message was lost", "buffer", c.cfg.bufferSize)
		s.mu.Lock()
		s.slowDirect = true
		s.mu.Unlock()
		return fmt.Errorf("%w (direct messages, %d buffered; one was lost)", ErrSlowHandler, c.cfg.bufferSize)
	}
	return nil
}

func (c *Client) dispatchDirect() {
	for {
		it, ok := c.direct.pop()
		if !ok {
			return
		}
		c.cfg.onDirect(it.msg)
		c.direct.done()
	}
}
