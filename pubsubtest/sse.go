package pubsubtest

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// Event is one event of an event stream (Server-Sent Events), as a
// browser's EventSource dispatches it.
type Event struct {
	Event string // the event's name; "message" when the stream named none
	Data  string // its data lines, joined with "\n"
	ID    string // the stream's last event id once this event was read
}

// EventStream is an event-stream (SSE) client that parses the stream as
// EventSource does, without reconnecting by itself: a test reconnects with
// Reconnect, which sends the last event id like EventSource.
type EventStream struct {
	// Header is the response's header.
	Header http.Header
	// Retry is the reconnection delay the server asked for, 0 until it did.
	Retry time.Duration
	// Comments counts the comment lines read (": ping" heartbeats).
	Comments int

	t       testing.TB
	url     string
	opts    []DialOption
	cancel  context.CancelFunc
	body    io.ReadCloser
	r       *bufio.Reader
	lastID  string
	events  chan streamItem
	quit    chan struct{} // closed by Close: the parser stops sending
	stopped chan struct{} // closed when the parser has ended
	closed  bool
}

type streamItem struct {
	ev  Event
	err error
}

// Listen opens an event stream of url (http://…) with the Accept header
// EventSource sends (unless a Header option sets another), and fails the test unless the server answers 200 with
// text/event-stream. It is closed at the test's cleanup.
func Listen(t testing.TB, url string, opts ...DialOption) *EventStream {
	t.Helper()
	s := &EventStream{t: t, url: url, opts: opts}
	s.open("")
	t.Cleanup(s.Close)
	return s
}

// Listen opens an event stream of path on this server (see the package
// function Listen).
func (s *Server) Listen(path string, opts ...DialOption) *EventStream {
	s.t.Helper()
	return Listen(s.t, s.URL+path, s.client(opts)...)
}

// ListenStatus requests an event stream of url and expects the server to
// refuse it with status.
func ListenStatus(t testing.TB, url string, status int, opts ...DialOption) {
	t.Helper()
	resp, err := streamRequest(t, context.Background(), url, "", dialOptions(opts))
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	resp.Body.Close()
	if resp.StatusCode != status {
		t.Fatalf("GET %s (an event stream): HTTP %d, want %d", url, resp.StatusCode, status)
	}
}

func streamRequest(t testing.TB, ctx context.Context, url, lastID string, c dialConfig) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	for k, vs := range c.header {
		req.Header[k] = vs
	}
	if req.Header.Get("Accept") == "" { // a Header option may send another, as htmx does
		req.Header.Set("Accept", "text/event-stream")
	}
	req.Header.Set("Cache-Control", "no-cache")
	if lastID != "" {
		req.Header.Set("Last-Event-ID", lastID)
	}
	hc := c.httpClient
	if hc == nil {
		hc = http.DefaultClient
	}
	return hc.Do(req)
}

func (s *EventStream) open(lastID string) {
	s.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	resp, err := streamRequest(s.t, ctx, s.url, lastID, dialOptions(s.opts))
	if err != nil {
		cancel()
		s.t.Fatalf("GET %s: %v", s.url, err)
	}
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		cancel()
		s.t.Fatalf("GET %s: HTTP %d %s %q, want 200 and an event stream", s.url, resp.StatusCode, resp.Header.Get("Content-Type"), b)
	}
	s.Header, s.cancel, s.body = resp.Header, cancel, resp.Body
	s.r = bufio.NewReader(resp.Body)
	s.lastID = lastID
	s.events = make(chan streamItem, 1024)
	s.quit = make(chan struct{})
	s.stopped = make(chan struct{})
	s.closed = false
	go s.parse(s.r, s.events, s.quit, s.stopped)
}

// parse reads the stream as the event-stream format says: lines end with
// CR, LF or CRLF; a blank line dispatches; "id" sets the last event id
// even for an event without data (which is not dispatched).
func (s *EventStream) parse(r *bufio.Reader, events chan<- streamItem, quit <-chan struct{}, stopped chan<- struct{}) {
	defer close(stopped)
	out := make(chan streamItem)
	go func() { // forwards to events unless the stream is closed
		for it := range out {
			select {
			case events <- it:
			case <-quit:
			}
		}
	}()
	defer close(out)
	var name, data string
	var hasData bool
	id := s.lastID
	for {
		line, err := readLine(r)
		if err != nil {
			out <- streamItem{err: err}
			return
		}
		switch {
		case line == "":
			if hasData {
				out <- streamItem{ev: Event{Event: cmpOr(name, "message"), Data: strings.TrimSuffix(data, "\n"), ID: id}}
			} else if name == "" {
				out <- streamItem{ev: Event{ID: id}} // an id-only event: not dispatched, but it moves the id
			}
			name, data, hasData = "", "", false
		case strings.HasPrefix(line, ":"):
			out <- streamItem{ev: Event{Event: ":comment", Data: strings.TrimPrefix(strings.TrimPrefix(line, ":"), " ")}}
		default:
			field, value, _ := strings.Cut(line, ":")
			value = strings.TrimPrefix(value, " ")
			switch field {
			case "event":
				name = value
			case "data":
				data += value + "\n"
				hasData = true
			case "id":
				if !strings.ContainsRune(value, 0) {
					id = value
				}
			case "retry":
				if d, err := time.ParseDuration(value + "ms"); err == nil {
					out <- streamItem{ev: Event{Event: ":retry", Data: d.String()}}
				}
			}
		}
	}
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// readLine reads one line ending in CR, LF or CRLF, without its end.
func readLine(r *bufio.Reader) (string, error) {
	var b strings.Builder
	for {
		c, err := r.ReadByte()
		if err != nil {
			return "", err
		}
		switch c {
		case '\n':
			return b.String(), nil
		case '\r':
			if next, err := r.Peek(1); err == nil && next[0] == '\n' {
				r.ReadByte()
			}
			return b.String(), nil
		}
		b.WriteByte(c)
	}
}

// Next returns the next dispatched event, keeping track of the id, the
// retry delay and the comments on the way; it fails the test if the
// stream ends first or nothing comes within Timeout.
func (s *EventStream) Next() Event {
	s.t.Helper()
	ev, err := s.TryNext()
	if err != nil {
		s.t.Fatalf("event stream %s: %v", s.url, err)
	}
	return ev
}

// TryNext is Next, returning the error that ended the stream instead of
// failing the test.
func (s *EventStream) TryNext() (Event, error) {
	deadline := time.NewTimer(Timeout)
	defer deadline.Stop()
	for {
		select {
		case it := <-s.events:
			if it.err != nil {
				return Event{}, it.err
			}
			switch it.ev.Event {
			case ":comment":
				s.Comments++
				continue
			case ":retry":
				s.Retry, _ = time.ParseDuration(it.ev.Data)
				continue
			case "":
				s.lastID = it.ev.ID
				continue
			}
			s.lastID = it.ev.ID
			return it.ev, nil
		case <-deadline.C:
			return Event{}, errors.New("no event within the timeout")
		}
	}
}

// Expect reads the next event and expects its name and data.
func (s *EventStream) Expect(event, data string) Event {
	s.t.Helper()
	ev := s.Next()
	if ev.Event != event || ev.Data != data {
		s.t.Fatalf("event %q data %q, want event %q data %q", ev.Event, ev.Data, event, data)
	}
	return ev
}

// ExpectEnd reads until the server ends the stream, and returns the events
// read on the way.
func (s *EventStream) ExpectEnd() []Event {
	s.t.Helper()
	var evs []Event
	for {
		ev, err := s.TryNext()
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return evs
			}
			s.t.Fatalf("event stream %s ended with %v, want the server to end it", s.url, err)
		}
		evs = append(evs, ev)
	}
}

// AwaitID reads until the stream has an event id (the server sends its
// starting position first) and returns it; events read on the way fail the
// test.
func (s *EventStream) AwaitID() string {
	s.t.Helper()
	deadline := time.NewTimer(Timeout)
	defer deadline.Stop()
	for s.lastID == "" {
		select {
		case it := <-s.events:
			switch {
			case it.err != nil:
				s.t.Fatalf("event stream %s ended before it had an id: %v", s.url, it.err)
			case it.ev.Event == ":comment":
				s.Comments++
			case it.ev.Event == ":retry":
				s.Retry, _ = time.ParseDuration(it.ev.Data)
			case it.ev.Event == "":
				s.lastID = it.ev.ID
			default:
				s.t.Fatalf("event %+v before the stream's id", it.ev)
			}
		case <-deadline.C:
			s.t.Fatalf("event stream %s: no id within the timeout", s.url)
		}
	}
	return s.lastID
}

// LastID is the stream's last event id, as EventSource would send it on
// reconnecting.
func (s *EventStream) LastID() string { return s.lastID }

// Reconnect drops the stream (if it is still open) and opens it again with
// the last event id as Last-Event-ID, as EventSource does, first reading
// what already arrived so the id is the last one the client received.
func (s *EventStream) Reconnect() {
	s.t.Helper()
	s.Close()
	for done := false; !done; {
		var it streamItem
		select {
		case it = <-s.events:
		default:
			done = true
			continue
		}
		if it.err != nil {
			break
		}
		if it.ev.Event != ":comment" && it.ev.Event != ":retry" {
			if it.ev.Event != "" {
				s.t.Fatalf("an event arrived unread before Reconnect: %+v", it.ev)
			}
			s.lastID = it.ev.ID
		}
	}
	s.open(s.lastID)
}

// Close drops the stream, as a closed tab would. Events already received
// can still be read.
func (s *EventStream) Close() {
	if s.closed {
		return
	}
	s.closed = true
	close(s.quit)
	s.cancel()
	s.body.Close()
	<-s.stopped
}
