package pubsubtest_test

import (
	"log/slog"
	"testing"

	"github.com/roomcast/pubsub/pubsubtest"
)

func TestLogsFindsARecordByLevelMessageAndAttributes(t *testing.T) {
	var logs pubsubtest.Logs
	log := logs.Logger().With("node", "a")
	log.Error("room reset: messages were lost", "room", "lobby", "missed", 3)
	log.Warn("slow")

	for _, tc := range []struct {
		level slog.Level
		msg   string
		attrs []string
		want  bool
	}{
		{slog.LevelError, "messages were lost", nil, true},
		{slog.LevelError, "reset", []string{"room", "lobby"}, true},
		{slog.LevelError, "reset", []string{"room", "lobby", "node", "a", "missed", "3"}, true}, // With's attributes count
		{slog.LevelError, "reset", []string{"room", "other"}, false},
		{slog.LevelError, "reset", []string{"absent", ""}, false},
		{slog.LevelWarn, "messages were lost", nil, false},
		{slog.LevelWarn, "slow", []string{"node", "a"}, true},
		{slog.LevelInfo, "", nil, false},
	} {
		if got := logs.Find(tc.level, tc.msg, tc.attrs...); got != tc.want {
			t.Errorf("Find(%v, %q, %q) = %v, want %v", tc.level, tc.msg, tc.attrs, got, tc.want)
		}
	}
}
