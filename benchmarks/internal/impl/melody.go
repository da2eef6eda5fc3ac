package impl

import (
	"context"
	"net/http"

	"github.com/olahol/melody"
)

type melodyServer struct{ m *melody.Melody }

// newMelody is melody.New with its defaults. Melody has no rooms: every
// session is in the benchmark's room, and a publish is a Broadcast.
func newMelody() (Server, error) {
	return &melodyServer{m: melody.New()}, nil
}

func (s *melodyServer) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = s.m.HandleRequest(w, r)
	})
}

func (s *melodyServer) Publish(_ context.Context, data []byte) error {
	return s.m.Broadcast(data)
}

func (s *melodyServer) Subscribers() int { return s.m.Len() }

func (s *melodyServer) Close() error {
	if s.m.IsClosed() {
		return nil
	}
	return s.m.Close()
}
