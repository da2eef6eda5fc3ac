package pubsub

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/roomcast/pubsub/internal/wire"
	"github.com/roomcast/pubsub/protocol"
)

// Server-Sent Events, the third mode: a GET of the Handler's path that
// accepts text/event-stream (a browser's EventSource, curl -N) listens to
// one or more rooms. Each room message is an event named after its room,
// its payload in the data lines; each event's id is the stream's position
// in all its rooms, so an EventSource that reconnects (it sends the last
// id as Last-Event-ID) gets exactly what it missed, or an event saying it
// cannot; with events=message (htmx's default) payloads are unnamed
// events instead. PROTOCOL.md, section 8, specifies it.
//
// The connection is a conn like the others (admission, queue, writers,
// heartbeats, shutdown), with no WebSocket: the writers write its events
// to the hijacked connection, and its reader only watches for the end.

// sseRetry is the reconnection delay the stream asks EventSource for.
const sseRetry = 1000

// isSSE reports whether r asks for an event stream.
func isSSE(r *http.Request) bool {
	return r.Method == http.MethodGet && headerHasToken(r.Header, "Accept", "text/event-stream")
}

// ssePos is a position in one room.
type ssePos struct {
	epoch string
	seq   uint64
}

// sseStream is the state of an SSE connection: its rooms, in the order the
// request named them, and its position in each, which every event's id
// carries. Only the connection's writer (one at a time) touches pos and
// next, after admission set them.
type sseStream struct {
	rooms   []string
	unnamed bool     // events=message: payloads as unnamed events (htmx swaps those)
	origin  string   // a cross-origin request's Origin, allowed: the response says so (CORS)
	head    []byte   // the HTTP response head, before the first event, on a hijacked connection
	pos     []ssePos // what the client has: the events written
	next    []ssePos // pos plus the events gathered for the write in progress
	headed  bool     // head was written
}

// sseFrameKind tells the SSE control frames apart.
type sseFrameKind uint8

const (
	sseEventFrame sseFrameKind = iota // a room or direct message: its body is sseEvent's
	sseOpen                           // the retry delay and the stream's first id
	sseReset                          // a room's position changed without its messages (recovery impossible)
	ssePing                           // a comment, the heartbeat
	sseClose                          // the server's reason for ending the stream
)

// newSSEFrame is an SSE control frame; reset frames carry the room's new
// position in m.
func newSSEFrame(kind sseFrameKind, body []byte, m Message) *frame {
	f := &frame{m: m, size: len(body), to: toSSE, sse: kind}
	f.sseWire = body
	f.sseOnce.Do(func() {})
	return f
}

var ssePingFrame = newSSEFrame(ssePing, []byte(": ping\n\n"), Message{})

// sseEvent is the body of a room or direct message's event, all but the
// id line: "event: <room>" (or "+direct"), then the payload as data lines.
// A payload that is not valid UTF-8, or holds a carriage return (which
// the event-stream format would turn into a line break), goes in base64 in
// an event named "<room>+base64", so every receiver gets the exact bytes.
func sseEvent(f *frame) []byte {
	name := "+direct"
	if f.room != nil {
		name = f.m.Room
	}
	p := f.m.Data
	b := make([]byte, 0, 32+len(name)+len(p)*4/3)
	b = append(b, "event: "...)
	b = append(b, name...)
	if f.kind == wire.Binary || strings.ContainsRune(string(p), '\r') {
		b = append(b, "+base64\ndata: "...)
		b = base64.StdEncoding.AppendEncode(b, p)
		return append(b, "\n\n"...)
	}
	b = append(b, '\n')
	for {
		line, rest, more := strings.Cut(string(p), "\n")
		b = append(b, "data: "...)
		b = append(b, line...)
		b = append(b, '\n')
		if !more {
			break
		}
		p = []byte(rest)
	}
	return append(b, '\n')
}

// sseResetEvent says recovery of room was impossible: the client should
// reload it. Its position moves to (epoch, top).
func sseResetEvent(room string, reason protocol.Reason, epoch string, top uint64) *frame {
	b := []byte("event: +reset\ndata: {\"room\":")
	b = wire.AppendString(b, room)
	b = append(b, `,"reason":`...)
	b = wire.AppendString(b, string(reason))
	b = append(b, "}\n\n"...)
	return newSSEFrame(sseReset, b, Message{Room: room, Epoch: epoch, Seq: top})
}

// sseCloseEvent is the last event of a stream the server ends: code and
// reason as a WebSocket client would get them. EventSource reconnects by
// itself unless the page closes it.
func sseCloseEvent(code protocol.CloseCode, reason string) []byte {
	b := []byte("event: +close\ndata: {\"code\":")
	b = strconv.AppendInt(b, int64(code), 10)
	b = append(b, `,"reason":`...)
	b = wire.AppendString(b, reason)
	return append(b, "}\n\n"...)
}

// sseHeaders sets an event stream's response headers on hdr.
func sseHeaders(hdr http.Header, origin string) {
	hdr.Set("Content-Type", "text/event-stream; charset=utf-8")
	hdr.Set("Cache-Control", "no-cache")
	hdr.Set("X-Accel-Buffering", "no") // nginx: do not buffer the stream
	hdr.Set("X-Content-Type-Options", "nosniff")
	if origin != "" { // a cross-origin request the origin policy allowed
		hdr.Set("Access-Control-Allow-Origin", origin)
		hdr.Set("Access-Control-Allow-Credentials", "true")
		hdr.Add("Vary", "Origin")
	}
}

// sseHead is the HTTP response that starts a stream on a hijacked
// connection, with the headers the host set and the stream's: written by
// the writer before the first event. The body ends when the connection
// closes.
func sseHead(hdr http.Header, origin string) []byte {
	sseHeaders(hdr, origin)
	hdr.Set("Connection", "close")
	var b bytes.Buffer
	b.WriteString("HTTP/1.1 200 OK\r\n")
	_ = hdr.Write(&b)
	b.WriteString("\r\n")
	return b.Bytes()
}

// index is the position of room among the stream's rooms.
func (s *sseStream) index(room string) int {
	for i, r := range s.rooms {
		if r == room {
			return i
		}
	}
	return -1
}

// rewind forgets what a gather took but did not write.
func (s *sseStream) rewind() { copy(s.next, s.pos) }

// commit records that what was gathered was written.
func (s *sseStream) commit() {
	copy(s.pos, s.next)
	s.headed = true
}

// appendEvent appends f's bytes for this stream: the id line before an
// event that moves a room's position, then the event.
func (s *sseStream) appendEvent(b []byte, f *frame) []byte {
	switch {
	case f.sse == sseOpen:
		b = append(b, "retry: "...)
		b = strconv.AppendInt(b, sseRetry, 10)
		b = append(b, '\n')
		b = s.appendID(b)
		return append(b, '\n')
	case f.sse == sseReset || (f.sse == sseEventFrame && f.room != nil):
		if i := s.index(f.m.Room); i >= 0 {
			s.next[i] = ssePos{f.m.Epoch, f.m.Seq}
		}
		b = s.appendID(b)
	}
	w := f.wire(ModeSSE)
	if s.unnamed && f.sse == sseEventFrame {
		// "event: <room>\n" or "event: +direct\n" goes; a "+base64" name
		// stays, so the bytes still say how to read them.
		if line, rest, ok := bytes.Cut(w, []byte{'\n'}); ok && !bytes.HasSuffix(line, []byte("+base64")) {
			w = rest
		}
	}
	return append(b, w...)
}

// sseUnnamed reads the request's event naming: "events=room" (each
// payload an event named after its room, the default) or "events=message"
// (unnamed events, which EventSource's onmessage gets and htmx swaps). A
// request from htmx (HX-Request: true) that names neither gets "message".
func sseUnnamed(r *http.Request, q url.Values) (bool, error) {
	if !q.Has("events") {
		return r.Header.Get("HX-Request") == "true", nil
	}
	switch q.Get("events") {
	case "room":
		return false, nil
	case "message":
		return true, nil
	default:
		return false, errors.New("events must be room (events named after their room) or message (unnamed events)")
	}
}

// appendID appends "id: <position>\n": the stream's position in all its
// rooms, base64url of [["epoch",seq],...] in the rooms' order.
func (s *sseStream) appendID(b []byte) []byte {
	j := make([]byte, 0, 64*len(s.next))
	j = append(j, '[')
	for i, p := range s.next {
		if i > 0 {
			j = append(j, ',')
		}
		j = append(j, '[')
		j = wire.AppendString(j, p.epoch)
		j = append(j, ',')
		j = strconv.AppendUint(j, p.seq, 10)
		j = append(j, ']')
	}
	j = append(j, ']')
	b = append(b, "id: "...)
	b = base64.RawURLEncoding.AppendEncode(b, j)
	return append(b, '\n')
}

// parseLastEventID reads the positions an id of this stream carried, one
// per room (an empty epoch: no position in that room); ok is false for
// anything else (another stream's id, garbage).
func parseLastEventID(id string, rooms int) (pos []ssePos, ok bool) {
	if id == "" || len(id) > 64<<10 {
		return nil, false
	}
	j, err := base64.RawURLEncoding.DecodeString(id)
	if err != nil {
		return nil, false
	}
	var raw [][2]json.RawMessage
	if json.Unmarshal(j, &raw) != nil || len(raw) != rooms {
		return nil, false
	}
	pos = make([]ssePos, rooms)
	for i, p := range raw {
		if json.Unmarshal(p[0], &pos[i].epoch) != nil || json.Unmarshal(p[1], &pos[i].seq) != nil {
			return nil, false
		}
	}
	return pos, true
}

// sseRooms reads an SSE request's rooms: every "room" query parameter, in
// order, duplicates once; else the path below WithPath; else
// WithDefaultRoom. Each must pass the room validator and be a valid event
// name (no line break).
func (h *Handler) sseRooms(r *http.Request, q url.Values) ([]string, error) {
	var rooms []string
	seen := make(map[string]bool)
	if q.Has("room") {
		for _, room := range q["room"] {
			if !seen[room] {
				seen[room] = true
				rooms = append(rooms, room)
			}
		}
	} else if room, err := h.rawRoom(r, q); err != nil {
		return nil, err
	} else if room != "" {
		rooms = []string{room}
	}
	switch {
	case len(rooms) == 0:
		return nil, errors.New("name a room: ?room=… (repeat it for several)")
	case len(rooms) > h.cfg.maxRooms:
		return nil, fmt.Errorf("at most %d rooms per stream", h.cfg.maxRooms)
	}
	for _, room := range rooms {
		if room == "" {
			return nil, errors.New("the room query parameter is empty")
		}
		if err := h.cfg.roomValidator(room); err != nil {
			return nil, fmt.Errorf("invalid room: %v", err)
		}
		if strings.ContainsAny(room, "\r\n") || !utf8.ValidString(room) {
			return nil, errors.New("invalid room: a room of an event stream names its events: no line breaks")
		}
	}
	return rooms, nil
}

// joinSSERooms subscribes an SSE connection to its rooms before the
// response starts: each from the request's Last-Event-ID position when it
// has one (exact recovery, or a reset event saying why not), else after
// replaying ?history=N messages, else live. Then it queues the stream's
// first id, so that even a stream that gets no event before it drops
// reconnects where it started.
func (c *conn) joinSSERooms(r *http.Request) *refusal {
	h := c.h
	q := r.URL.Query()
	rooms, err := h.sseRooms(r, q)
	if err != nil {
		return &refusal{status: http.StatusBadRequest, msg: err.Error()}
	}
	history, err := rawHistory(q)
	if err != nil {
		return &refusal{status: http.StatusBadRequest, msg: err.Error()}
	}
	unnamed, err := sseUnnamed(r, q)
	if err != nil {
		return &refusal{status: http.StatusBadRequest, msg: err.Error()}
	}
	// EventSource sends the last id it got; a client opening a new stream
	// (another set of rooms) passes positions in the query instead.
	lastID := r.Header.Get("Last-Event-ID")
	if lastID == "" {
		lastID = q.Get("last_event_id")
	}
	last, resuming := parseLastEventID(lastID, len(rooms))
	s := &sseStream{rooms: rooms, unnamed: unnamed, pos: make([]ssePos, len(rooms)), next: make([]ssePos, len(rooms))}
	c.sse = s
	if o := r.Header.Get("Origin"); o != "" && !h.sameOrigin(r) {
		s.origin = o // allowed by the origin policy (admit checked it): tell the browser
	}
	for _, room := range rooms {
		if v := c.authorize(ActionSubscribe, room); v != allowed {
			return &refusal{status: v.httpStatus(), msg: v.reason("not allowed to subscribe in room " + room)}
		}
	}
	for i, room := range rooms {
		var since *position
		if resuming && last[i].epoch != "" {
			since = &position{Epoch: last[i].epoch, Seq: &last[i].seq}
		}
		out, err := c.subscribe(room, since, history, false, nil, func(out subscribed) *frame {
			if out.recovery && !out.recovered {
				return sseResetEvent(room, out.reason, out.epoch, out.top)
			}
			return nil
		})
		if err != nil {
			h.brokerFailed("subscribe", room, err)
			return &refusal{status: http.StatusServiceUnavailable, msg: "could not join the room; try again later"}
		}
		// Where the client stands before what was just queued: its own
		// position when recovering, else just before the replay.
		start := ssePos{out.epoch, out.top - uint64(out.missed)}
		if out.recovered {
			start.seq = *since.Seq
		} else if out.recovery {
			start = last[i] // the reset event moves it
		}
		s.pos[i] = start
	}
	s.rewind()
	c.enqueue(newSSEFrame(sseOpen, nil, Message{}))
	return nil
}

// watchSSE is an event stream's reader: the client sends nothing after its
// request, so it only waits for the end of the connection. Bytes from the
// client (a pipelined request) end the stream too.
func (c *conn) watchSSE(woken bool) (parked bool) {
	var b [64]byte
	for ; ; woken = false {
		if c.waitInput(woken) {
			return true
		}
		n, err := c.br.Read(b[:])
		if n > 0 {
			c.beginClose(protocol.ClosePolicyViolation, "an event stream takes no input", false)
			return false
		}
		if err != nil {
			c.beginClose(protocol.CloseAbnormal, "connection lost", false)
			return false
		}
	}
}

// streamSSE serves an event stream through a ResponseWriter that cannot be
// hijacked (HTTP/2): the connection's writer writes to the response and
// flushes, and this ServeHTTP call lasts as long as the stream (the
// Handler waits for it in Shutdown, as for every ServeHTTP call).
func (h *Handler) streamSSE(w http.ResponseWriter, r *http.Request, c *conn) {
	sseHeaders(w.Header(), c.sse.origin)
	w.WriteHeader(http.StatusOK)
	sc := &streamConn{w: w, rc: http.NewResponseController(w), ctx: r.Context(), done: make(chan struct{})}
	if err := sc.rc.Flush(); err != nil {
		c.abandon()
		return
	}
	c.sse.headed = true
	sock := &c.sockMem
	sock.init(sc, nil)
	c.attach(nil, sock, bufio.NewReaderSize(sock, readBufferSize), nil)
	h.serve(c)
	<-sc.done // closed with the connection
}

// streamConn is an event stream's connection over a ResponseWriter: writes
// go to the response, flushed; reads wait for the request (the client's
// stream) to end. It is never a TCP connection, so the writer pool hands
// it to a writer of its own.
type streamConn struct {
	w    http.ResponseWriter
	rc   *http.ResponseController
	ctx  context.Context
	done chan struct{}
	once sync.Once
}

var _ net.Conn = (*streamConn)(nil)

func (s *streamConn) Read([]byte) (int, error) {
	select {
	case <-s.ctx.Done():
		return 0, io.EOF
	case <-s.done:
		return 0, net.ErrClosed
	}
}

func (s *streamConn) Write(p []byte) (int, error) {
	n, err := s.w.Write(p)
	if err == nil {
		err = s.rc.Flush()
	}
	return n, err
}

func (s *streamConn) Close() error {
	s.once.Do(func() { close(s.done) })
	return nil
}

func (s *streamConn) SetWriteDeadline(t time.Time) error {
	if err := s.rc.SetWriteDeadline(t); err != nil && !errors.Is(err, http.ErrNotSupported) {
		return err
	}
	return nil
}

func (s *streamConn) SetDeadline(t time.Time) error   { return s.SetWriteDeadline(t) }
func (s *streamConn) SetReadDeadline(time.Time) error { return nil }
func (s *streamConn) LocalAddr() net.Addr             { return streamAddr{} }
func (s *streamConn) RemoteAddr() net.Addr            { return streamAddr{} }

type streamAddr struct{}

func (streamAddr) Network() string { return "http" }
func (streamAddr) String() string  { return "response stream" }
