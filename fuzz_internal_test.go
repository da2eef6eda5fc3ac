package pubsub

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/roomcast/pubsub/internal/wire"
	"github.com/roomcast/pubsub/protocol"
)

// Fuzz targets for every parser of client input beside the envelope
// decoder (FuzzDecodeInbound, protocol_internal_test.go): room names, the
// raw-mode query, the upgrade headers, the Origin check, and the payload
// classification that decides how client bytes are sent back out, and an
// event stream's Last-Event-ID. Seed
// corpora live in testdata/fuzz/<target>/. Helpers start with "fuzz".

// fuzzHandler is a Handler for the methods under test; NewHandler starts
// no goroutine, so building one per target costs nothing to tear down.
func fuzzHandler(f *testing.F, opts ...Option) *Handler {
	h := NewHandler(append([]Option{WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil)))}, opts...)...)
	f.Cleanup(func() { h.Close() })
	return h
}

// fuzzRoomSpec is the documented room-name rule, written independently of
// ValidRoomName: 1 to 128 bytes, each an ASCII letter, a digit or one of
// _ - . : @ /.
func fuzzRoomSpec(room string) bool {
	const allowed = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:@/"
	if len(room) < 1 || len(room) > 128 {
		return false
	}
	for i := range len(room) {
		if strings.IndexByte(allowed, room[i]) < 0 {
			return false
		}
	}
	return true
}

// FuzzValidRoomName: ValidRoomName never panics, accepts exactly the names
// the documented rule accepts, and explains every refusal.
func FuzzValidRoomName(f *testing.F) {
	for _, s := range []string{"", "lobby", "orders:42", "a/b@c.d-e_f", "a b", "café", "\x00", "\xff", "<script>",
		strings.Repeat("r", 128), strings.Repeat("r", 129)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, room string) {
		err := ValidRoomName(room)
		if want := fuzzRoomSpec(room); (err == nil) != want {
			t.Fatalf("ValidRoomName(%q) = %v, want accepted %v", room, err, want)
		}
		if err != nil && err.Error() == "" {
			t.Fatalf("ValidRoomName(%q): an error without a message", room)
		}
	})
}

// FuzzRawQuery: the raw-mode room and history parsers never panic on any
// URL path, query or route wildcard; an accepted room is valid and is the
// one the client named (query first, then the wildcard, then the path
// below WithPath); an accepted history is in range and is the number given.
func FuzzRawQuery(f *testing.F) {
	h := fuzzHandler(f)
	for _, s := range [][3]string{
		{"room=lobby", "/ws", ""},
		{"room=", "/ws", ""},
		{"room=a%20b&history=10", "/ws", ""},
		{"history=-1", "/ws/lobby", ""},
		{"history=100001&room=x", "/ws", ""},
		{"history=0x10", "/ws/", ""},
		{"room=%zz&room=b", "/ws/a", ""},
		{"", "/ws/a/b:c", ""},
		{"", "/wsx/lobby", ""},
		{"token=t", "/rooms/lobby", "lobby"},
		{"history=+5", "/ws", "bad room"},
	} {
		f.Add(s[0], s[1], s[2])
	}
	f.Fuzz(func(t *testing.T, rawQuery, path, wildcard string) {
		r := &http.Request{Method: http.MethodGet, URL: &url.URL{Path: path, RawQuery: rawQuery}, Header: http.Header{}}
		if wildcard != "" {
			r.SetPathValue("room", wildcard)
		}
		q := r.URL.Query()

		room, err := h.rawRoom(r, q)
		var named string // the room the request names, by the documented order
		switch {
		case q.Has("room"):
			named = q.Get("room")
		case wildcard != "":
			named = wildcard
		default:
			named, _ = strings.CutPrefix(path, defaultPath+"/")
			if !strings.HasPrefix(path, defaultPath+"/") {
				named = ""
			}
		}
		switch {
		case err != nil:
			if room != "" || err.Error() == "" {
				t.Fatalf("rawRoom: room %q with error %v", room, err)
			}
			if named != "" && ValidRoomName(named) == nil {
				t.Fatalf("rawRoom refused the valid room %q: %v", named, err)
			}
			if named == "" && !q.Has("room") {
				t.Fatalf("rawRoom refused a request naming no room: %v", err)
			}
		case room != named:
			t.Fatalf("rawRoom = %q, want the named room %q", room, named)
		case room != "" && ValidRoomName(room) != nil:
			t.Fatalf("rawRoom accepted the invalid room %q", room)
		}

		n, err := rawHistory(q)
		v := q.Get("history")
		want, convErr := strconv.Atoi(v)
		switch {
		case !q.Has("history"):
			if n != 0 || err != nil {
				t.Fatalf("rawHistory without the parameter = %d, %v", n, err)
			}
		case v == "": // "history" or "history=": a value that is not a number
			if err == nil {
				t.Fatalf("rawHistory accepted an empty history parameter: %d", n)
			}
		case err != nil:
			if convErr == nil && want >= 0 && want <= maxHistorySize {
				t.Fatalf("rawHistory refused %q: %v", v, err)
			}
		case n < 0 || n > maxHistorySize || convErr != nil || n != want:
			t.Fatalf("rawHistory(%q) = %d, want a number from 0 to %d equal to the value", v, n, maxHistorySize)
		}
	})
}

// fuzzTokens splits header lines as HTTP lists: comma-separated, trimmed.
func fuzzTokens(lines []string) []string {
	var out []string
	for _, l := range lines {
		for t := range strings.SplitSeq(l, ",") {
			out = append(out, strings.TrimSpace(t))
		}
	}
	return out
}

// FuzzUpgradeHeaders: the upgrade checks never panic on any header values
// (several lines of a header are separated by "\n" in the input); a request
// is an upgrade exactly when it is a GET with the "upgrade" and "websocket"
// tokens; protocol mode is chosen exactly when roomcast.v1 is offered, raw
// mode when nothing is, and anything else is refused.
func FuzzUpgradeHeaders(f *testing.F) {
	for _, s := range [][4]string{
		{"GET", "Upgrade", "websocket", ""},
		{"GET", "keep-alive, Upgrade", "WebSocket", protocol.Subprotocol},
		{"GET", "upgrade", "websocket", "chat.v2, " + protocol.Subprotocol},
		{"GET", "upgrade", "websocket", "chat.v2"},
		{"GET", "upgrade", "websocket", " , ,"},
		{"POST", "Upgrade", "websocket", ""},
		{"GET", "close", "h2c", "ROOMCAST.V1"},
		{"GET", "Upgrade\nclose", "\nwebsocket", "\n" + protocol.Subprotocol + "\n"},
		{"GET", "Upgrade", "websocket", "roomcast.v1x,roomcast.v"},
	} {
		f.Add(s[0], s[1], s[2], s[3])
	}
	f.Fuzz(func(t *testing.T, method, connection, upgrade, protocols string) {
		r := &http.Request{Method: method, Header: http.Header{}}
		for key, v := range map[string]string{"Connection": connection, "Upgrade": upgrade, "Sec-WebSocket-Protocol": protocols} {
			if v != "" {
				for l := range strings.SplitSeq(v, "\n") {
					r.Header.Add(key, l)
				}
			}
		}
		hasToken := func(key, token string) bool {
			for _, t := range fuzzTokens(r.Header.Values(key)) {
				if strings.EqualFold(t, token) {
					return true
				}
			}
			return false
		}
		wantUpgrade := method == http.MethodGet && hasToken("Connection", "upgrade") && hasToken("Upgrade", "websocket")
		if got := isUpgrade(r); got != wantUpgrade {
			t.Fatalf("isUpgrade = %v, want %v for %q", got, wantUpgrade, r.Header)
		}

		ours, foreign := false, false
		for _, t := range fuzzTokens(r.Header.Values("Sec-WebSocket-Protocol")) {
			switch {
			case t == protocol.Subprotocol:
				ours = true
			case t != "":
				foreign = true
			}
		}
		mode, ok := selectMode(r)
		switch {
		case ours:
			if mode != ModeProtocol || !ok {
				t.Fatalf("selectMode = %v, %v with %s offered, want protocol mode", mode, ok, protocol.Subprotocol)
			}
		case foreign:
			if ok {
				t.Fatalf("selectMode accepted only foreign subprotocols %q (mode %v)", protocols, mode)
			}
		default:
			if mode != ModeRaw || !ok {
				t.Fatalf("selectMode = %v, %v with nothing offered, want raw mode", mode, ok)
			}
		}
	})
}

// fuzzOriginPatterns are the patterns of the patterned Handler of
// FuzzOriginAllowed, and fuzzPatternAllows says, independently of
// originAllowed, whether they admit an origin's scheme and host.
var fuzzOriginPatterns = []string{"*.example.com", "https://trusted.example.org"}

func fuzzPatternAllows(scheme, host string) bool {
	host = strings.ToLower(host)
	if sub, ok := strings.CutSuffix(host, ".example.com"); ok && !strings.Contains(sub, "/") {
		return true
	}
	return strings.ToLower(scheme)+"://"+host == "https://trusted.example.org"
}

// FuzzOriginAllowed: the origin check never panics on any Origin and Host;
// without patterns it allows exactly the requests without Origin and those
// from the request's own host, so a foreign host is never allowed; with
// patterns it allows those and what the patterns match, nothing else.
func FuzzOriginAllowed(f *testing.F) {
	plain := fuzzHandler(f)
	patterned := fuzzHandler(f, WithOriginPatterns(fuzzOriginPatterns...))
	for _, s := range [][2]string{
		{"", "example.com"},
		{"https://example.com", "example.com"},
		{"https://EXAMPLE.com", "example.com"},
		{"https://example.com:8443", "example.com"},
		{"https://evil.com", "example.com"},
		{"null", "example.com"},
		{"https://app.example.com", "site.test"},
		{"https://app.example.com.evil.com", "site.test"},
		{"http://trusted.example.org", "site.test"},
		{"https://trusted.example.org", "site.test"},
		{"https://user@example.com", "evil.com"},
		{"//example.com", "example.com"},
		{"https://%zz", ""},
		{"https://a/b.example.com", "x"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, origin, host string) {
		r := &http.Request{Method: http.MethodGet, Host: host, Header: http.Header{}}
		if origin != "" {
			r.Header.Set("Origin", origin)
		}
		origin = r.Header.Get("Origin") // what the check reads
		same, byPattern := origin == "", false
		if u, err := url.Parse(origin); origin != "" && err == nil && u.Host != "" {
			same = strings.EqualFold(u.Host, host)
			byPattern = fuzzPatternAllows(u.Scheme, u.Host)
		}
		if got := plain.originAllowed(r); got != same {
			t.Fatalf("without patterns, Origin %q on Host %q: allowed %v, want %v", origin, host, got, same)
		}
		if got := patterned.originAllowed(r); got != (same || byPattern) {
			t.Fatalf("with patterns %q, Origin %q on Host %q: allowed %v, want %v", fuzzOriginPatterns, origin, host, got, same || byPattern)
		}
	})
}

// fuzzValidUTF8 replaces each invalid byte with U+FFFD, as the encoder does.
func fuzzValidUTF8(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		b.WriteRune(r) // utf8.RuneError for an invalid byte
		i += size
	}
	return b.String()
}

// fuzzPayload checks one outbound envelope: valid UTF-8, valid JSON, with
// exactly the payload field its kind names, holding the payload. It
// returns the decoded envelope's other fields.
func fuzzPayload(t *testing.T, env, p []byte, kind wire.Kind) map[string]json.RawMessage {
	t.Helper()
	if !utf8.Valid(env) || !json.Valid(env) {
		t.Fatalf("envelope %q is not valid UTF-8 JSON", env)
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(env, &fields); err != nil {
		t.Fatalf("envelope %q: %v", env, err)
	}
	n := 0
	for _, f := range []string{"data", "text", "binary"} {
		if _, ok := fields[f]; ok {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("envelope %q has %d payload fields, want 1", env, n)
	}
	switch kind {
	case wire.JSON:
		// The value is embedded as is, and classify keeps JSON with white
		// space around it out of "data": a decoder gets exactly p.
		if got, ok := fields["data"]; !ok || !bytes.Equal(got, p) {
			t.Fatalf("payload %q: data %q", p, got)
		}
	case wire.Text:
		var s string
		if err := json.Unmarshal(fields["text"], &s); err != nil || s != string(p) {
			t.Fatalf("payload %q: text %q (%v)", p, fields["text"], err)
		}
	case wire.Binary:
		var s string
		if err := json.Unmarshal(fields["binary"], &s); err != nil {
			t.Fatalf("payload %q: binary %q (%v)", p, fields["binary"], err)
		}
		if got, err := base64.StdEncoding.DecodeString(s); err != nil || !bytes.Equal(got, p) {
			t.Fatalf("payload %q: binary %q decodes to %q (%v)", p, s, got, err)
		}
	default:
		t.Fatalf("payload %q: unknown kind %d", p, kind)
	}
	return fields
}

// FuzzEncodeMessageRoundTrip: whatever bytes are published, classify picks
// a kind that raw mode can send (a text frame only for valid UTF-8), and
// the message and direct envelopes are valid UTF-8 JSON whose payload
// decodes back to exactly those bytes, and whose other fields decode back
// to what was encoded.
func FuzzEncodeMessageRoundTrip(f *testing.F) {
	for _, s := range []string{`{"a":[1,{"b":null}]}`, " 42 ", `"str"`, "plain text", "", "\xff\x00\x01", "a\u2028b",
		`{"a":"\xff"}`, "null", "1e999", `"\ud800"`, "[1,2", "\t\n"} {
		f.Add([]byte(s), "lobby", "3c1f9a0e-5d1b-4a53-8d27-0f4a2b8e9c11", "0b6f3f57", uint64(17), int64(1795263070148))
	}
	f.Add([]byte("x"), "a\"b\\c\xff", "e\u2029", "", uint64(1<<63), int64(-1))
	f.Fuzz(func(t *testing.T, data []byte, room, epoch, id string, seq uint64, ms int64) {
		kind := wire.Classify(data)
		if (kind == wire.Binary) != !utf8.Valid(data) {
			t.Fatalf("wire.Classify(%q) = %d: binary must be exactly the invalid UTF-8", data, kind)
		}
		if kind == wire.JSON && !json.Valid(data) {
			t.Fatalf("wire.Classify(%q) = JSON for invalid JSON", data)
		}
		trimmed := len(data) > 0 && strings.TrimSpace(string(data[:1])) != "" && strings.TrimSpace(string(data[len(data)-1:])) != ""
		if kind == wire.Text && trimmed && json.Valid(data) {
			t.Fatalf("wire.Classify(%q) = text for JSON with no white space around it", data)
		}
		m := Message{Kind: KindMessage, Room: room, Epoch: epoch, ID: id, Seq: seq, Time: time.UnixMilli(ms), Data: data}
		env := encodeMessage(m, kind)
		fuzzPayload(t, env, data, kind)
		type fields struct {
			Type      string `json:"type"`
			Room      string `json:"room"`
			Epoch     string `json:"epoch"`
			Seq       uint64 `json:"seq"`
			MessageID string `json:"message_id"`
			Time      int64  `json:"time"`
		}
		var got fields
		if err := json.Unmarshal(env, &got); err != nil {
			t.Fatalf("envelope %q: %v", env, err)
		}
		want := fields{"message", fuzzValidUTF8(room), fuzzValidUTF8(epoch), seq, fuzzValidUTF8(id), 0}
		if !m.Time.IsZero() {
			want.Time = m.Time.UnixMilli()
		}
		if got != want {
			t.Fatalf("message fields %+v, want %+v", got, want)
		}
		direct := fuzzPayload(t, encodeDirect(data, kind), data, kind)
		if string(direct["type"]) != `"direct"` || len(direct) != 2 {
			t.Fatalf("direct envelope fields %v", direct)
		}
	})
}

// FuzzSSELastEventID: any Last-Event-ID is read without panicking, as
// positions for exactly the stream's rooms or not at all; and the ids the
// server writes read back as the positions they carry.
func FuzzSSELastEventID(f *testing.F) {
	f.Add("W1siZSIsMV0sWyIiLDBdXQ", 2, "e", uint64(1), "", uint64(0))
	f.Add("", 1, "3c1f", uint64(42), "x", uint64(7))
	f.Add("not base64!", 1, "", uint64(0), "\u2028", uint64(1<<63))
	f.Add("W1siZSIsLTFdXQ", 1, "e\"", uint64(18446744073709551615), "a", uint64(0))
	f.Fuzz(func(t *testing.T, id string, rooms int, e1 string, s1 uint64, e2 string, s2 uint64) {
		rooms = int(uint(rooms)%4) + 1
		if pos, ok := parseLastEventID(id, rooms); ok && len(pos) != rooms {
			t.Fatalf("%q read as %d positions for %d rooms", id, len(pos), rooms)
		}
		want := []ssePos{{e1, s1}, {e2, s2}}
		s := &sseStream{next: want}
		line := string(s.appendID(nil))
		got, ok := parseLastEventID(strings.TrimSuffix(strings.TrimPrefix(line, "id: "), "\n"), 2)
		if !ok || !slices.Equal(got, want) {
			if !utf8.ValidString(e1) || !utf8.ValidString(e2) {
				return // epochs are UUIDs; JSON cannot carry other bytes exactly
			}
			t.Fatalf("the id %q reads back as %v %v, want %v", line, got, ok, want)
		}
	})
}

// FuzzControlSize: the frames a connection's reader takes itself between
// messages (conn.takeControl) are exactly whole, final, masked pings and
// pongs with no reserved bit and at most 125 bytes of payload, within the
// bytes given.
func FuzzControlSize(f *testing.F) {
	f.Add([]byte{0x8A, 0x80, 1, 2, 3, 4})
	f.Add([]byte{0x8A, 0x82, 1, 2, 3, 4, 'h', 'b', 0x81})
	f.Add([]byte{0x8A, 0x00})
	f.Add([]byte{0x89, 0x80, 1, 2, 3, 4})
	f.Add([]byte{0x89, 0x84, 1, 2, 3, 4, 'a', 'b', 'c', 'd'})
	f.Fuzz(func(t *testing.T, b []byte) {
		n, op, ok := controlSize(b)
		if !ok {
			if n != 0 || op != 0 {
				t.Fatalf("not a ping or a pong, size %d, opcode %#x", n, op)
			}
			return
		}
		if n > len(b) || (b[0] != 0x8A && b[0] != 0x89) || op != b[0]&0x0f || b[1]&0x80 == 0 || int(b[1]&0x7f) > 125 || n != 6+int(b[1]&0x7f) {
			t.Fatalf("controlSize(% x) = %d, %#x", b, n, op)
		}
	})
}
