package impl

import (
	"context"
	"io"
	"log/slog"
	"net/http"

	"github.com/roomcast/pubsub"
)

type roomcast struct{ h *pubsub.Handler }

// newRoomcast is pubsub.NewHandler with its defaults, except the logger:
// it discards, as centrifuge's default log level does, so that slow-consumer
// warnings in the flood cost no terminal time.
func newRoomcast() (Server, error) {
	h := pubsub.NewHandler(pubsub.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	return &roomcast{h: h}, nil
}

func (s *roomcast) Handler() http.Handler { return s.h }

func (s *roomcast) Publish(ctx context.Context, room string, data []byte) error {
	return s.h.Publish(ctx, room, data)
}

// Subscribers counts connections: a raw client joins its room before the
// upgrade, so every connection is in its room.
func (s *roomcast) Subscribers() int { return s.h.Stats().Connections }

func (s *roomcast) Close() error { return s.h.Close() }

// Counters reports the Handler's own counts of messages written and of
// connections closed as slow consumers.
func (s *roomcast) Counters() map[string]uint64 {
	st := s.h.Stats()
	return map[string]uint64{"messages_out": st.MessagesOut, "slow_consumers": st.SlowConsumers, "dropped": st.Dropped}
}
