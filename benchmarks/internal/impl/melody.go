package impl

import (
	"context"
	"net/http"

	"github.com/olahol/melody"
)

type melodyServer struct{ m *melody.Melody }

// newMelody is melody.New with its defaults. Melody has no rooms: a session
// of a room other than Room keeps its room in its keys, a publish to Room
// is a Broadcast and one to another room a BroadcastFilter.
func newMelody() (Server, error) {
	return &melodyServer{m: melody.New()}, nil
}

func (s *melodyServer) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if room := r.URL.Query().Get("room"); room != "" && room != Room {
			_ = s.m.HandleRequestWithKeys(w, r, map[string]any{"room": room})
			return
		}
		_ = s.m.HandleRequest(w, r)
	})
}

func (s *melodyServer) Publish(_ context.Context, room string, data []byte) error {
	if room == Room {
		return s.m.Broadcast(data)
	}
	return s.m.BroadcastFilter(data, func(ss *melody.Session) bool {
		v, _ := ss.Get("room")
		return v == room
	})
}

func (s *melodyServer) Subscribers() int { return s.m.Len() }

func (s *melodyServer) Close() error {
	if s.m.IsClosed() {
		return nil
	}
	return s.m.Close()
}
