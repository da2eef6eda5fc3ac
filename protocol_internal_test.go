package pubsub

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"maps"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/roomcast/pubsub/internal/wire"
	"github.com/roomcast/pubsub/protocol"
)

// Internal tests of protocol.go: the envelope decoder, the JSON string
// writer and the encoders. End-to-end behaviour is in protocol_test.go and
// payload_test.go.

func strp(s string) *string { return &s }

func TestDecodeInbound(t *testing.T) {
	t.Parallel()
	id64 := strings.Repeat("i", 64)
	id65 := strings.Repeat("i", 65)
	tests := []struct {
		name    string
		in      string
		typ     string             // want in.Type (checked on success only)
		room    string             // want in.Room (checked on success only)
		id      string             // want in.ID, on success and on error (the salvaged id)
		payload *string            // want in.payload; nil means no payload
		code    protocol.ErrorCode // want error code; "" means success
	}{
		// Valid envelopes.
		{name: "ping", in: `{"type":"ping"}`, typ: "ping"},
		{name: "pong", in: `{"type":"pong"}`, typ: "pong"},
		{name: "ping ignores room and payload", in: `{"type":"ping","room":"a","text":"x","data":1}`, typ: "ping", room: "a"},
		{name: "subscribe with id", in: `{"type":"subscribe","room":"lobby","id":"r1"}`, typ: "subscribe", room: "lobby", id: "r1"},
		{name: "unsubscribe", in: `{"type":"unsubscribe","room":"lobby"}`, typ: "unsubscribe", room: "lobby"},
		{name: "publish data object", in: `{"type":"publish","room":"a","data":{"x":[1,2]}}`, typ: "publish", room: "a", payload: strp(`{"x":[1,2]}`)},
		{name: "publish data keeps inner whitespace verbatim", in: `{"type":"publish","room":"a","data": { "x" : [1, 2] } }`, typ: "publish", room: "a", payload: strp(`{ "x" : [1, 2] }`)},
		{name: "publish data number", in: `{"type":"publish","room":"a","data":-1.5e3}`, typ: "publish", room: "a", payload: strp(`-1.5e3`)},
		{name: "publish data string", in: `{"type":"publish","room":"a","data":"s\"q"}`, typ: "publish", room: "a", payload: strp(`"s\"q"`)},
		{name: "publish data null is a payload", in: `{"type":"publish","room":"a","data":null}`, typ: "publish", room: "a", payload: strp(`null`)},
		{name: "publish text unescaped", in: `{"type":"publish","room":"a","text":"a\"b\u00e9\n\ud83d\ude00"}`, typ: "publish", room: "a", payload: strp("a\"bé\n😀")},
		{name: "publish empty text", in: `{"type":"publish","room":"a","text":""}`, typ: "publish", room: "a", payload: strp("")},
		{name: "publish binary", in: `{"type":"publish","room":"a","binary":"/wCA"}`, typ: "publish", room: "a", payload: strp("\xff\x00\x80")},
		{name: "publish empty binary", in: `{"type":"publish","room":"a","binary":""}`, typ: "publish", room: "a", payload: strp("")},
		{name: "publish text null counts as absent", in: `{"type":"publish","room":"a","text":null,"data":7}`, typ: "publish", room: "a", payload: strp("7")},
		{name: "send without room", in: `{"type":"send","text":"hi","id":"s"}`, typ: "send", id: "s", payload: strp("hi")},
		{name: "send with room", in: `{"type":"send","room":"a","data":true}`, typ: "send", room: "a", payload: strp("true")},
		{name: "unknown fields are ignored", in: `{"type":"subscribe","room":"a","id":"f","v":2,"future":{"x":[null]}}`, typ: "subscribe", room: "a", id: "f"},
		{name: "id of exactly 64 bytes", in: `{"type":"ping","id":"` + id64 + `"}`, typ: "ping", id: id64},
		{name: "leading and trailing whitespace", in: " \n{\"type\":\"ping\"}\t ", typ: "ping"},

		// bad_request: not a JSON object.
		{name: "empty input", in: ``, code: protocol.CodeBadRequest},
		{name: "not JSON", in: `hello`, code: protocol.CodeBadRequest},
		{name: "truncated object loses its id", in: `{"type":"subscribe","room":"a","id":"r1"`, code: protocol.CodeBadRequest},
		{name: "trailing comma", in: `{"type":"ping","id":"r1",}`, code: protocol.CodeBadRequest},
		{name: "trailing garbage", in: `{"type":"ping","id":"r1"} x`, code: protocol.CodeBadRequest},
		{name: "array", in: `[{"type":"ping"}]`, code: protocol.CodeBadRequest},
		{name: "string", in: `"ping"`, code: protocol.CodeBadRequest},
		{name: "number", in: `42`, code: protocol.CodeBadRequest},
		{name: "null", in: `null`, code: protocol.CodeBadRequest},

		// bad_request: mistyped fields; the id is salvaged when it is a string.
		{name: "room is a number", in: `{"type":"subscribe","room":5,"id":"r1"}`, id: "r1", code: protocol.CodeBadRequest},
		{name: "type is a number", in: `{"type":1,"id":"r1"}`, id: "r1", code: protocol.CodeBadRequest},
		{name: "text is a number", in: `{"type":"publish","room":"a","text":5,"id":"r1"}`, id: "r1", code: protocol.CodeBadRequest},
		{name: "binary is an array", in: `{"type":"publish","room":"a","binary":["/w=="],"id":"r1"}`, id: "r1", code: protocol.CodeBadRequest},
		{name: "id is a number", in: `{"type":"subscribe","room":"a","id":7}`, code: protocol.CodeBadRequest},
		{name: "id is an object", in: `{"type":"ping","id":{"a":"b"}}`, code: protocol.CodeBadRequest},
		{name: "mistyped field with a long id drops the id", in: `{"type":"subscribe","room":5,"id":"` + id65 + `"}`, code: protocol.CodeBadRequest},

		// bad_request: missing or invalid fields.
		{name: "id over 64 bytes", in: `{"type":"ping","id":"` + id65 + `"}`, code: protocol.CodeBadRequest},
		{name: "missing type", in: `{"room":"a","id":"r1"}`, id: "r1", code: protocol.CodeBadRequest},
		{name: "empty type", in: `{"type":"","id":"r1"}`, id: "r1", code: protocol.CodeBadRequest},
		{name: "subscribe without room", in: `{"type":"subscribe","id":"r1"}`, id: "r1", code: protocol.CodeBadRequest},
		{name: "subscribe with empty room (invalid_room, from dispatch)", in: `{"type":"subscribe","room":"","id":"r1"}`, typ: "subscribe", id: "r1"},
		{name: "subscribe without room", in: `{"type":"subscribe","id":"r1"}`, id: "r1", code: protocol.CodeBadRequest},
		{name: "unsubscribe without room", in: `{"type":"unsubscribe","id":"r1"}`, id: "r1", code: protocol.CodeBadRequest},
		{name: "publish without room", in: `{"type":"publish","text":"x","id":"r1"}`, id: "r1", code: protocol.CodeBadRequest},
		{name: "publish without payload", in: `{"type":"publish","room":"a","id":"r1"}`, id: "r1", code: protocol.CodeBadRequest},
		{name: "send without payload", in: `{"type":"send","id":"r1"}`, id: "r1", code: protocol.CodeBadRequest},
		{name: "data and text", in: `{"type":"publish","room":"a","data":1,"text":"1","id":"r1"}`, id: "r1", code: protocol.CodeBadRequest},
		{name: "text and binary", in: `{"type":"send","text":"1","binary":"MQ==","id":"r1"}`, id: "r1", code: protocol.CodeBadRequest},
		{name: "all three payloads", in: `{"type":"publish","room":"a","data":1,"text":"1","binary":"MQ==","id":"r1"}`, id: "r1", code: protocol.CodeBadRequest},
		{name: "binary not base64", in: `{"type":"publish","room":"a","binary":"***","id":"r1"}`, id: "r1", code: protocol.CodeBadRequest},
		{name: "binary URL-safe alphabet", in: `{"type":"publish","room":"a","binary":"_-8=","id":"r1"}`, id: "r1", code: protocol.CodeBadRequest},
		{name: "binary missing padding", in: `{"type":"publish","room":"a","binary":"/w","id":"r1"}`, id: "r1", code: protocol.CodeBadRequest},

		// unknown_type.
		{name: "unknown type", in: `{"type":"frobnicate","id":"r1"}`, id: "r1", code: protocol.CodeUnknownType},
		{name: "type is case-sensitive", in: `{"type":"Subscribe","room":"a","id":"r1"}`, id: "r1", code: protocol.CodeUnknownType},
		{name: "server-only type ack", in: `{"type":"ack","id":"r1"}`, id: "r1", code: protocol.CodeUnknownType},
		{name: "server-only type message", in: `{"type":"message","room":"a","data":1,"id":"r1"}`, id: "r1", code: protocol.CodeUnknownType},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			in, err := decodeInbound([]byte(tt.in))
			if in.ID.s != tt.id || in.ID.set != (tt.id != "") {
				t.Errorf("id %+v, want %q", in.ID, tt.id)
			}
			if tt.code != "" {
				if err == nil {
					t.Fatalf("decoded %+v, want error %q", in, tt.code)
				}
				if err.code != tt.code || err.msg == "" {
					t.Fatalf("error %q %q, want code %q with a message", err.code, err.msg, tt.code)
				}
				if in.payload != nil {
					t.Errorf("payload %q set on error", in.payload)
				}
				return
			}
			if err != nil {
				t.Fatalf("error %v, want success", err)
			}
			if in.Type != tt.typ || in.Room != tt.room {
				t.Errorf("type %q room %q, want %q %q", in.Type, in.Room, tt.typ, tt.room)
			}
			switch {
			case tt.payload == nil && in.payload != nil:
				t.Errorf("payload %q, want none", in.payload)
			case tt.payload != nil && in.payload == nil:
				t.Errorf("no payload, want %q", *tt.payload)
			case tt.payload != nil && string(in.payload) != *tt.payload:
				t.Errorf("payload %q, want %q", in.payload, *tt.payload)
			}
		})
	}
}

// TestDecodeInboundPayloadDoesNotAliasInput: the reader's buffer may be
// reused, so a payload must own its bytes.
func TestDecodeInboundPayloadDoesNotAliasInput(t *testing.T) {
	t.Parallel()
	b := []byte(`{"type":"publish","room":"a","data":{"k":1}}`)
	in, err := decodeInbound(b)
	if err != nil {
		t.Fatal(err)
	}
	for i := range b {
		b[i] = 'z'
	}
	if string(in.payload) != `{"k":1}` {
		t.Fatalf("payload changed with the input buffer: %q", in.payload)
	}
}

// replaceInvalidUTF8 is the reference for appendJSONString: each byte that
// does not start a valid UTF-8 sequence becomes one U+FFFD.
func replaceInvalidUTF8(s []byte) string {
	var b strings.Builder
	for len(s) > 0 {
		r, n := utf8.DecodeRune(s)
		if r == utf8.RuneError && n == 1 {
			b.WriteRune(utf8.RuneError)
		} else {
			b.Write(s[:n])
		}
		s = s[n:]
	}
	return b.String()
}

// checkJSONString checks wire.AppendString(prefix, s) against encoding/json.
func checkJSONString(t *testing.T, s []byte) {
	t.Helper()
	prefix := []byte("pre")
	out := wire.AppendString(bytes.Clone(prefix), s)
	if !bytes.HasPrefix(out, prefix) {
		t.Fatalf("appendJSONString overwrote its destination: %q", out)
	}
	out = out[len(prefix):]
	if !json.Valid(out) || !utf8.Valid(out) {
		t.Fatalf("wire.AppendString(%q) = %q, not valid UTF-8 JSON", s, out)
	}
	if bytes.Contains(out, []byte("\u2028")) || bytes.Contains(out, []byte("\u2029")) {
		t.Fatalf("wire.AppendString(%q) = %q leaves U+2028/U+2029 unescaped", s, out)
	}
	var got string
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("wire.AppendString(%q) = %q: %v", s, out, err)
	}
	ref, err := json.Marshal(string(s))
	if err != nil {
		t.Fatal(err)
	}
	var want string
	if err := json.Unmarshal(ref, &want); err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Fatalf("wire.AppendString(%q) decodes to %q, encoding/json's to %q", s, got, want)
	}
	if want := replaceInvalidUTF8(s); got != want {
		t.Fatalf("wire.AppendString(%q) decodes to %q, want %q", s, got, want)
	}
}

func TestAppendJSONStringMatchesEncodingJSON(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		in   string
	}{
		{"empty", ""},
		{"plain ASCII", "hello, world"},
		{"quotes", `say "hi" ""`},
		{"backslashes", `C:\path\\to\"x`},
		{"common escapes", "a\nb\rc\td"},
		{"backspace and form feed", "\b\f"},
		{"every control character", "\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f"},
		{"DEL", "\x7f"},
		{"HTML characters", "</script><b>&amp;"},
		{"line and paragraph separators", "a\u2028b\u2029c"},
		{"separators alone", "\u2028\u2029"},
		{"two-byte rune", "héllo"},
		{"three-byte rune", "✓ € ー"},
		{"four-byte rune", "😀𝄞"},
		{"encoded U+FFFD stays", "\uFFFD"},
		{"lone invalid byte", "\xff"},
		{"invalid byte inside text", "a\xffb"},
		{"run of invalid bytes, one U+FFFD each", "\xff\xfe\xfd"},
		{"truncated two-byte rune", "\xc3"},
		{"truncated three-byte rune at the end", "ab\xe2\x80"},
		{"truncated U+2028 before a valid one", "\xe2\x80\xe2\x80\xa8"},
		{"UTF-8 encoded surrogate", "\xed\xa0\x80"},
		{"overlong encoding", "\xc0\xaf"},
		{"beyond U+10FFFF", "\xf4\x90\x80\x80"},
		{"continuation byte alone", "\x80x"},
		{"mix", "\"\\\n\x00\u2028é\xff😀"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			checkJSONString(t, []byte(tt.in))
		})
	}
}

// TestAppendJSONStringExactOutput pins the escapes themselves, which a
// decode round trip cannot see.
func TestAppendJSONStringExactOutput(t *testing.T) {
	t.Parallel()
	tests := []struct{ in, want string }{
		{``, `""`},
		{`a"b`, `"a\"b"`},
		{`a\b`, `"a\\b"`},
		{"\n\r\t", `"\n\r\t"`},
		{"\x00\x1f", `"\u0000\u001f"`},
		{"\x7f", "\"\x7f\""},
		{"\u2028\u2029", `"\u2028\u2029"`},
		{"\xff", `"\ufffd"`},
		{"é", `"é"`},
	}
	for _, tt := range tests {
		if got := string(wire.AppendString(nil, []byte(tt.in))); got != tt.want {
			t.Errorf("wire.AppendString(%q) = %s, want %s", tt.in, got, tt.want)
		}
	}
}

func TestClassify(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		in   string
		want wire.Kind
	}{
		{"JSON object", `{"a":1}`, wire.JSON},
		{"empty object", `{}`, wire.JSON},
		{"JSON array", `[1,"x",null]`, wire.JSON},
		{"JSON number", `42`, wire.JSON},
		{"JSON string", `"hi"`, wire.JSON},
		{"JSON null", `null`, wire.JSON},
		{"JSON true", `true`, wire.JSON},
		// As text, so a protocol client decodes exactly these bytes; in
		// "data" a JSON decoder would drop the white space.
		{"JSON with surrounding whitespace", " 7\n", wire.Text},
		{"JSON with non-ASCII", `{"é":"✓"}`, wire.JSON},
		{"empty payload", ``, wire.Text},
		{"whitespace only", " \n", wire.Text},
		{"plain text", `hello`, wire.Text},
		{"truncated JSON", `{"a":`, wire.Text},
		{"two JSON values", `42 43`, wire.Text},
		{"non-ASCII text", `héllo ✓`, wire.Text},
		{"NUL is valid UTF-8", "\x00", wire.Text},
		{"invalid UTF-8", "\xff", wire.Binary},
		{"NUL and invalid byte", "\x00\xff", wire.Binary},
		{"truncated rune", "abc\xe2\x80", wire.Binary},
		// encoding/json accepts invalid UTF-8 inside strings; as "data" it
		// would make a text frame that is not UTF-8.
		{"JSON string with invalid UTF-8", "\"\xff\"", wire.Binary},
		{"JSON object with invalid UTF-8", "{\"a\":\"\xc3\"}", wire.Binary},
	}
	for _, tt := range tests {
		if got := wire.Classify([]byte(tt.in)); got != tt.want {
			t.Errorf("%s: wire.Classify(%q) = %d, want %d", tt.name, tt.in, got, tt.want)
		}
	}
}

// decodedEnvelope is any server envelope, decoded strictly enough to check
// which keys are present.
type decodedEnvelope struct {
	keys   []string
	fields map[string]json.RawMessage
}

func decodeEnvelope(t *testing.T, b []byte) decodedEnvelope {
	t.Helper()
	if !json.Valid(b) || !utf8.Valid(b) {
		t.Fatalf("envelope %q is not valid UTF-8 JSON", b)
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("envelope %q: %v", b, err)
	}
	return decodedEnvelope{keys: slices.Sorted(maps.Keys(m)), fields: m}
}

func (d decodedEnvelope) str(t *testing.T, key string) string {
	t.Helper()
	var s string
	if err := json.Unmarshal(d.fields[key], &s); err != nil {
		t.Fatalf("field %q = %s: %v", key, d.fields[key], err)
	}
	return s
}

// payload returns the envelope's payload field name and its bytes.
func (d decodedEnvelope) payload(t *testing.T) (string, []byte) {
	t.Helper()
	switch {
	case d.fields["data"] != nil:
		return "data", d.fields["data"]
	case d.fields["text"] != nil:
		return "text", []byte(d.str(t, "text"))
	case d.fields["binary"] != nil:
		b, err := base64.StdEncoding.DecodeString(d.str(t, "binary"))
		if err != nil {
			t.Fatalf("binary %s: %v", d.fields["binary"], err)
		}
		return "binary", b
	}
	t.Fatalf("envelope has no payload: %v", d.keys)
	return "", nil
}

var payloadCases = []struct {
	name  string
	in    []byte
	field string
}{
	{"JSON object", []byte(`{"a":[1,{"b":null}],"c":"\u2028"}`), "data"},
	{"JSON number", []byte(`-0.5`), "data"},
	{"JSON string", []byte(`"x\"y"`), "data"},
	{"text", []byte("héllo \"world\"\n\u2028"), "text"},
	{"empty", []byte{}, "text"},
	{"binary", []byte{0xff, 0x00, 0xfe, 0x80}, "binary"},
	{"JSON-looking bytes with invalid UTF-8", []byte("\"\xff\""), "binary"},
}

func TestEncodeMessage(t *testing.T) {
	t.Parallel()
	for _, tt := range payloadCases {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			m := Message{Room: `odd"room\` + "\u2028", Epoch: "ep-1", Seq: 18446744073709551615, Data: tt.in}
			d := decodeEnvelope(t, encodeMessage(m, wire.Classify(tt.in)))
			if want := []string{"epoch", tt.field, "room", "seq", "type"}; !slices.Equal(d.keys, slices.Sorted(slices.Values(want))) {
				t.Fatalf("keys %v, want %v", d.keys, want)
			}
			if d.str(t, "type") != "message" || d.str(t, "room") != m.Room || d.str(t, "epoch") != m.Epoch {
				t.Fatalf("type/room/epoch = %s %s %s", d.fields["type"], d.fields["room"], d.fields["epoch"])
			}
			var seq uint64
			if err := json.Unmarshal(d.fields["seq"], &seq); err != nil || seq != m.Seq {
				t.Fatalf("seq %s (%v), want %d", d.fields["seq"], err, m.Seq)
			}
			if field, p := d.payload(t); field != tt.field || !bytes.Equal(p, tt.in) {
				t.Fatalf("payload %s %q, want %s %q", field, p, tt.field, tt.in)
			}
		})
	}
}

func TestEncodeDirect(t *testing.T) {
	t.Parallel()
	for _, tt := range payloadCases {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			d := decodeEnvelope(t, encodeDirect(tt.in, wire.Classify(tt.in)))
			if want := slices.Sorted(slices.Values([]string{tt.field, "type"})); !slices.Equal(d.keys, want) {
				t.Fatalf("keys %v, want %v", d.keys, want)
			}
			if d.str(t, "type") != "direct" {
				t.Fatalf("type %s, want direct", d.fields["type"])
			}
			if field, p := d.payload(t); field != tt.field || !bytes.Equal(p, tt.in) {
				t.Fatalf("payload %s %q, want %s %q", field, p, tt.field, tt.in)
			}
		})
	}
}

func TestEncodeAck(t *testing.T) {
	t.Parallel()
	for _, id := range []string{"r1", `q"uo\te`, "\u2028é", strings.Repeat("x", 64)} {
		d := decodeEnvelope(t, encodeAck(requestID{id, true}))
		if !slices.Equal(d.keys, []string{"id", "type"}) || d.str(t, "type") != "ack" || d.str(t, "id") != id {
			t.Errorf("encodeAck(%q) = %v %s %s", id, d.keys, d.fields["type"], d.fields["id"])
		}
	}
}

func TestEncodeError(t *testing.T) {
	t.Parallel()
	e := &protoError{protocol.CodeRejected, `the "server" said no\` + "\n"}
	d := decodeEnvelope(t, encodeError(requestID{`r"1`, true}, e))
	if !slices.Equal(d.keys, []string{"code", "id", "message", "type"}) {
		t.Fatalf("keys %v", d.keys)
	}
	if d.str(t, "type") != "error" || d.str(t, "id") != `r"1` || d.str(t, "code") != string(e.code) || d.str(t, "message") != e.msg {
		t.Fatalf("got %v", d.fields)
	}
	// No id: the key is left out rather than sent empty.
	d = decodeEnvelope(t, encodeError(requestID{}, e))
	if !slices.Equal(d.keys, []string{"code", "message", "type"}) {
		t.Fatalf("keys without an id: %v", d.keys)
	}
}

func TestEncodeWelcome(t *testing.T) {
	t.Parallel()
	b := encodeWelcome(welcome{ConnID: "c", UserID: "u", HeartbeatMS: 1, TimeoutMS: 2, MaxMessageBytes: 3, MaxRooms: 4})
	var w welcome
	if err := json.Unmarshal(b, &w); err != nil {
		t.Fatal(err)
	}
	want := welcome{Type: "welcome", Protocol: protocol.Subprotocol, ConnID: "c", UserID: "u", HeartbeatMS: 1, TimeoutMS: 2, MaxMessageBytes: 3, MaxRooms: 4}
	if w != want {
		t.Fatalf("welcome %+v, want %+v", w, want)
	}
	if d := decodeEnvelope(t, encodeWelcome(welcome{ConnID: "c"})); slices.Contains(d.keys, "user_id") {
		t.Fatalf("anonymous welcome has a user_id: %v", d.keys)
	}
}

func TestControlEnvelopes(t *testing.T) {
	t.Parallel()
	for _, c := range []struct{ got, want string }{
		{string(pingEnvelope), `{"type":"ping"}`},
		{string(encodePong(requestID{})), `{"type":"pong"}`},
		{string(encodePong(requestID{`p"1`, true})), `{"type":"pong","id":"p\"1"}`},
		{string(encodePong(requestID{"", true})), `{"type":"pong","id":""}`},
	} {
		if c.got != c.want {
			t.Errorf("got %s, want %s", c.got, c.want)
		}
	}
}

// FuzzDecodeInbound: the decoder never panics, never returns an id over
// 64 bytes, fails only with decoder codes, and a successful publish or
// send always carries exactly one payload, faithfully decoded.
func FuzzDecodeInbound(f *testing.F) {
	for _, s := range []string{
		`{"type":"ping"}`,
		`{"type":"subscribe","room":"a","id":"r1"}`,
		`{"type":"publish","room":"a","data":{"x":1},"id":"r2"}`,
		`{"type":"publish","room":"a","text":"hi\u2028"}`,
		`{"type":"send","binary":"/w=="}`,
		`{"type":"subscribe","room":5,"id":"r1"}`,
		`[1]`,
		``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		in, err := decodeInbound(b)
		if len(in.ID.s) > maxRequestID {
			t.Fatalf("id of %d bytes", len(in.ID.s))
		}
		if err != nil {
			if !slices.Contains(protocol.ErrorCodes(), err.code) || err.msg == "" {
				t.Fatalf("error %q %q: unknown code or no message", err.code, err.msg)
			}
			if err.code != protocol.CodeBadRequest && err.code != protocol.CodeUnknownType {
				t.Fatalf("the decoder answered %q, a code only dispatch may use", err.code)
			}
			if in.payload != nil {
				t.Fatalf("payload set on error")
			}
			if !json.Valid(encodeError(in.ID, err)) {
				t.Fatalf("error reply is not valid JSON")
			}
			return
		}
		if !json.Valid(encodeAck(in.ID)) {
			t.Fatalf("ack is not valid JSON")
		}
		switch in.Type {
		case "ping", "pong":
		// An empty room is a room, refused by dispatch (invalid_room); no
		// room at all is the decoder's bad_request.
		case "subscribe", "unsubscribe":
			if in.RoomIn == nil {
				t.Fatalf("%s without a room accepted", in.Type)
			}
		case "publish", "send":
			if in.Type == "publish" && in.RoomIn == nil {
				t.Fatalf("publish without a room accepted")
			}
			if in.payload == nil {
				t.Fatalf("%s accepted without a payload", in.Type)
			}
			n := 0
			if in.Data != nil {
				n++
				if !bytes.Equal(in.payload, in.Data) || !json.Valid(in.payload) {
					t.Fatalf("data payload %q from %q", in.payload, in.Data)
				}
			}
			if in.Text != nil {
				n++
				if string(in.payload) != *in.Text {
					t.Fatalf("text payload %q from %q", in.payload, *in.Text)
				}
			}
			if in.Binary != nil {
				n++
				if want, err := base64.StdEncoding.DecodeString(*in.Binary); err != nil || !bytes.Equal(in.payload, want) {
					t.Fatalf("binary payload %q from %q", in.payload, *in.Binary)
				}
			}
			if n != 1 {
				t.Fatalf("%s accepted with %d payload fields", in.Type, n)
			}
			return
		default:
			t.Fatalf("unknown type %q accepted", in.Type)
		}
		if in.payload != nil {
			t.Fatalf("%s has a payload", in.Type)
		}
	})
}

// FuzzAppendJSONString: the output is valid JSON and decodes to the input
// with each invalid UTF-8 byte replaced by U+FFFD, as encoding/json does.
func FuzzAppendJSONString(f *testing.F) {
	for _, s := range []string{"", "plain", `"\`, "\x00\x1f\n", "\u2028\u2029", "é😀", "\xff", "\xe2\x80", "\xed\xa0\x80"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, s []byte) {
		checkJSONString(t, s)
	})
}
