package pubsubtest

import (
	"context"
	"log/slog"
	"slices"
	"strings"
	"sync"
)

// Logs keeps what a component logs, for a test to check that something
// was logged (a broker's reset, a refused request); each record also goes
// on to Logger. Its zero value is ready to use:
//
//	var logs pubsubtest.Logs
//	b := redisbroker.New(rdb, redisbroker.WithLogger(logs.Logger()))
//	…
//	if !logs.Find(slog.LevelError, "reset", "room", "lobby") { t.Error("no reset logged") }
type Logs struct {
	mu      sync.Mutex
	records []logRecord
}

type logRecord struct {
	level slog.Level
	msg   string
	attrs map[string]string // with the logger's own attributes (With)
}

// Logger is a logger whose records Logs keeps.
func (l *Logs) Logger() *slog.Logger {
	return slog.New(&logsHandler{logs: l, next: Logger().Handler()})
}

// Find reports whether a record at level was logged whose message holds
// msgPart and whose attributes include each key and value of attrs
// ("room", "lobby", …), compared as their String().
func (l *Logs) Find(level slog.Level, msgPart string, attrs ...string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.ContainsFunc(l.records, func(r logRecord) bool {
		if r.level != level || !strings.Contains(r.msg, msgPart) {
			return false
		}
		for i := 0; i+1 < len(attrs); i += 2 {
			if v, ok := r.attrs[attrs[i]]; !ok || v != attrs[i+1] {
				return false
			}
		}
		return true
	})
}

type logsHandler struct {
	logs  *Logs
	next  slog.Handler
	attrs []slog.Attr
}

func (h *logsHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h *logsHandler) Handle(ctx context.Context, r slog.Record) error {
	rec := logRecord{level: r.Level, msg: r.Message, attrs: make(map[string]string, len(h.attrs)+r.NumAttrs())}
	for _, a := range h.attrs {
		rec.attrs[a.Key] = a.Value.String()
	}
	r.Attrs(func(a slog.Attr) bool {
		rec.attrs[a.Key] = a.Value.String()
		return true
	})
	h.logs.mu.Lock()
	h.logs.records = append(h.logs.records, rec)
	h.logs.mu.Unlock()
	if h.next.Enabled(ctx, r.Level) {
		return h.next.Handle(ctx, r)
	}
	return nil
}

func (h *logsHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &logsHandler{logs: h.logs, next: h.next.WithAttrs(as), attrs: append(slices.Clone(h.attrs), as...)}
}

func (h *logsHandler) WithGroup(name string) slog.Handler {
	return &logsHandler{logs: h.logs, next: h.next.WithGroup(name), attrs: h.attrs}
}
