package impl

import (
	"context"
	"encoding/json"
	"net/http"
	"time"

	"github.com/centrifugal/centrifuge"
)

type centrifugeServer struct {
	node *centrifuge.Node
	ws   http.Handler
}

// newCentrifuge is a centrifuge.Node and WebSocket handler with default
// Config and WebsocketConfig. OnConnecting accepts every client as an
// anonymous user and subscribes it to the room server-side.
func newCentrifuge() (Server, error) {
	node, err := centrifuge.New(centrifuge.Config{})
	if err != nil {
		return nil, err
	}
	node.OnConnecting(func(_ context.Context, e centrifuge.ConnectEvent) (centrifuge.ConnectReply, error) {
		room := Room
		if len(e.Data) > 0 {
			var d struct{ Room string }
			if err := json.Unmarshal(e.Data, &d); err == nil && d.Room != "" {
				room = d.Room
			}
		}
		return centrifuge.ConnectReply{
			Credentials:   &centrifuge.Credentials{UserID: ""},
			Subscriptions: map[string]centrifuge.SubscribeOptions{room: {}},
		}, nil
	})
	node.OnConnect(func(*centrifuge.Client) {})
	if err := node.Run(); err != nil {
		return nil, err
	}
	return &centrifugeServer{node: node, ws: centrifuge.NewWebsocketHandler(node, centrifuge.WebsocketConfig{})}, nil
}

func (s *centrifugeServer) Handler() http.Handler { return s.ws }

func (s *centrifugeServer) Publish(_ context.Context, room string, data []byte) error {
	_, err := s.node.Publish(room, data)
	return err
}

func (s *centrifugeServer) Subscribers() int { return s.node.Hub().NumSubscriptions() }

func (s *centrifugeServer) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return s.node.Shutdown(ctx)
}
