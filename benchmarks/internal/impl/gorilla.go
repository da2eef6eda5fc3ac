package impl

import (
	"context"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// The settings of gorilla/websocket's chat example.
const (
	gorillaWriteWait      = 10 * time.Second
	gorillaPongWait       = 60 * time.Second
	gorillaPingPeriod     = (gorillaPongWait * 9) / 10
	gorillaMaxMessageSize = 512
)

// gorillaHub is the chat example's hub: one goroutine owns the set of
// clients (here one set per room); register, unregister and broadcast are
// messages to it.
type gorillaHub struct {
	upgrader   websocket.Upgrader
	rooms      map[string]map[*gorillaClient]bool
	broadcast  chan gorillaMessage
	register   chan *gorillaClient
	unregister chan *gorillaClient
	count      atomic.Int64
	quit       chan struct{}
	stopped    chan struct{}
	conns      sync.WaitGroup
	closeOnce  sync.Once
}

type gorillaClient struct {
	hub  *gorillaHub
	conn *websocket.Conn
	room string
	send chan []byte
}

type gorillaMessage struct {
	room string
	data []byte
}

func newGorilla() (Server, error) {
	h := &gorillaHub{
		upgrader:   websocket.Upgrader{ReadBufferSize: 1024, WriteBufferSize: 1024},
		rooms:      make(map[string]map[*gorillaClient]bool),
		broadcast:  make(chan gorillaMessage),
		register:   make(chan *gorillaClient),
		unregister: make(chan *gorillaClient),
		quit:       make(chan struct{}),
		stopped:    make(chan struct{}),
	}
	go h.run()
	return h, nil
}

func (h *gorillaHub) run() {
	defer close(h.stopped)
	for {
		select {
		case c := <-h.register:
			set := h.rooms[c.room]
			if set == nil {
				set = make(map[*gorillaClient]bool)
				h.rooms[c.room] = set
			}
			set[c] = true
			h.count.Add(1)
		case c := <-h.unregister:
			h.remove(c)
		case m := <-h.broadcast:
			for c := range h.rooms[m.room] {
				select {
				case c.send <- m.data:
				default:
					h.remove(c) // the example drops a client that cannot keep up
				}
			}
		case <-h.quit:
			for _, set := range h.rooms {
				for c := range set {
					h.remove(c)
				}
			}
			return
		}
	}
}

func (h *gorillaHub) remove(c *gorillaClient) {
	set := h.rooms[c.room]
	if _, ok := set[c]; ok {
		delete(set, c)
		if len(set) == 0 {
			delete(h.rooms, c.room)
		}
		close(c.send)
		h.count.Add(-1)
	}
}

// Handler is the example's serveWs: upgrade, register, start the two pumps
// and return.
func (h *gorillaHub) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, err := h.upgrader.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		room := r.URL.Query().Get("room")
		if room == "" {
			room = Room
		}
		c := &gorillaClient{hub: h, conn: conn, room: room, send: make(chan []byte, 256)}
		select {
		case h.register <- c:
		case <-h.stopped:
			_ = conn.Close()
			return
		}
		h.conns.Add(2)
		go c.writePump()
		go c.readPump()
	})
}

func (c *gorillaClient) readPump() {
	defer func() {
		select {
		case c.hub.unregister <- c:
		case <-c.hub.stopped:
		}
		_ = c.conn.Close()
		c.hub.conns.Done()
	}()
	c.conn.SetReadLimit(gorillaMaxMessageSize)
	_ = c.conn.SetReadDeadline(time.Now().Add(gorillaPongWait))
	c.conn.SetPongHandler(func(string) error {
		return c.conn.SetReadDeadline(time.Now().Add(gorillaPongWait))
	})
	for {
		if _, _, err := c.conn.ReadMessage(); err != nil {
			return
		}
		// The example broadcasts what clients send; benchmark clients
		// send nothing.
	}
}

// writePump is the example's, writing one frame per payload.
func (c *gorillaClient) writePump() {
	ticker := time.NewTicker(gorillaPingPeriod)
	defer func() {
		ticker.Stop()
		_ = c.conn.Close()
		c.hub.conns.Done()
	}()
	for {
		select {
		case m, ok := <-c.send:
			_ = c.conn.SetWriteDeadline(time.Now().Add(gorillaWriteWait))
			if !ok {
				_ = c.conn.WriteMessage(websocket.CloseMessage, []byte{})
				return
			}
			if err := c.conn.WriteMessage(websocket.TextMessage, m); err != nil {
				return
			}
		case <-ticker.C:
			_ = c.conn.SetWriteDeadline(time.Now().Add(gorillaWriteWait))
			if err := c.conn.WriteMessage(websocket.PingMessage, nil); err != nil {
				return
			}
		}
	}
}

func (h *gorillaHub) Publish(ctx context.Context, room string, data []byte) error {
	select {
	case h.broadcast <- gorillaMessage{room, data}:
		return nil
	case <-h.stopped:
		return http.ErrServerClosed
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (h *gorillaHub) Subscribers() int { return int(h.count.Load()) }

func (h *gorillaHub) Close() error {
	h.closeOnce.Do(func() { close(h.quit) })
	<-h.stopped
	h.conns.Wait()
	return nil
}
