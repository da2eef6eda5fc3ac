package pubsub_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"testing"
	"unicode/utf8"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/pubsubtest"
)

// Payloads (doc.go, "Payloads"): bytes, whoever sends them. Raw clients get
// them verbatim, as text when they are UTF-8 and binary otherwise; protocol
// clients get the exact bytes in the field they classify as ("data" for
// JSON, "text" for other UTF-8, "binary" for the rest). A message is framed
// once per mode (frame.go).

// payloadOf returns the payload field of a message or direct envelope
// ("data", "text" or "binary") and its bytes. The envelope must be valid
// UTF-8 JSON with exactly one payload field.
func payloadOf(t *testing.T, e pubsubtest.Envelope) (string, []byte) {
	t.Helper()
	if !utf8.Valid(e.Raw) || !json.Valid(e.Raw) {
		t.Fatalf("envelope %q is not valid UTF-8 JSON", e.Raw)
	}
	n, field := 0, ""
	var p []byte
	if e.Data != nil {
		n, field, p = n+1, "data", e.Data
	}
	if e.Text != nil {
		n, field, p = n+1, "text", []byte(*e.Text)
	}
	if e.Binary != nil {
		b, err := base64.StdEncoding.DecodeString(*e.Binary)
		if err != nil {
			t.Fatalf("envelope %s: binary is not std base64: %v", e, err)
		}
		n, field, p = n+1, "binary", b
	}
	if n != 1 {
		t.Fatalf("envelope %s has %d payload fields, want 1", e, n)
	}
	return field, p
}

// expectRawFrame reads c's next frame and expects data, binary when kind
// is, text (valid UTF-8) otherwise.
func expectRawFrame(t *testing.T, c *pubsubtest.RawConn, kind string, data []byte) {
	t.Helper()
	binary, b := c.Read()
	if binary != (kind == "binary") || !bytes.Equal(b, data) {
		t.Fatalf("raw client got %q (binary %v), want %q (binary %v)", b, binary, data, kind == "binary")
	}
	if !binary && !utf8.Valid(b) {
		t.Fatalf("raw client got a text frame that is not UTF-8: %q", b)
	}
}

func TestRawBinaryFramesArePublishedVerbatimAsBinary(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithClientPublish(true))
	alice := srv.DialRaw("/ws?room=files")
	bob := srv.DialRaw("/ws?room=files")

	blob := []byte{0xff, 0x00, 0xfe, 0x80, 'x', 0xc3} // not UTF-8
	alice.SendBinary(blob)
	bob.ExpectBinary(blob)
	alice.ExpectBinary(blob)

	// The frame type follows the payload, not the sender's frame: UTF-8
	// bytes sent in a binary frame reach raw clients as text.
	alice.SendBinary([]byte("plain"))
	bob.ExpectText("plain")
}

func TestRawServerPublishArrivesAsTextOrBinaryByContent(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	c := srv.DialRaw("/ws?room=feed")
	for _, tt := range []struct {
		name string
		data []byte
		kind string
	}{
		{"plain text", []byte("héllo ✓"), "text"},
		{"JSON", []byte(`{"price":42}`), "text"},
		{"not UTF-8", []byte{0xc3, 0x28, 0x00, 0xff}, "binary"},
	} {
		srv.Publish("feed", tt.data)
		expectRawFrame(t, c, tt.kind, tt.data)
	}
}

// TestProtocolClientPublishPayloadKinds: what a protocol client publishes
// reaches protocol clients in the field its bytes classify as, with the
// exact bytes, and raw clients as the verbatim frame.
func TestProtocolClientPublishPayloadKinds(t *testing.T) {
	t.Parallel()
	// str is a JSON string literal; b64 is one holding base64.
	str := func(s string) string { b, _ := json.Marshal(s); return string(b) }
	b64 := func(b string) string { return str(base64.StdEncoding.EncodeToString([]byte(b))) }
	tests := []struct {
		name  string
		field string // the publish envelope's payload field
		value string // its JSON value, sent as written
		want  string // the payload bytes every subscriber gets
		kind  string // the field a protocol subscriber gets it in
	}{
		{"data object", "data", `{"a":[1,{"b":null}],"c":"é"}`, `{"a":[1,{"b":null}],"c":"é"}`, "data"},
		{"data object with inner spaces", "data", `{ "a" : 1 }`, `{ "a" : 1 }`, "data"},
		{"data number", "data", `-12.5e3`, `-12.5e3`, "data"},
		{"data string", "data", `"say \"hi\" \u00e9"`, `"say \"hi\" \u00e9"`, "data"},
		{"data null", "data", `null`, `null`, "data"},
		{"text", "text", `"hello, world"`, "hello, world", "text"},
		{"text with escapes and separators", "text", `"h\u00e9llo\n\"✓\"\u2028\ud83d\ude00"`, "héllo\n\"✓\"\u2028😀", "text"},
		{"empty text", "text", `""`, "", "text"},
		// Documented: the server classifies bytes, so text that is valid
		// JSON arrives as data.
		{"text that is JSON arrives as data", "text", `"42"`, "42", "data"},
		{"text that is a JSON object arrives as data", "text", str(`{"x":1}`), `{"x":1}`, "data"},
		{"binary", "binary", b64("\xff\x00\xfe\x80"), "\xff\x00\xfe\x80", "binary"},
		{"binary with a NUL and invalid UTF-8", "binary", b64("a\x00\xc3"), "a\x00\xc3", "binary"},
		{"binary that is UTF-8 arrives as text", "binary", b64("hi ✓"), "hi ✓", "text"},
		{"binary that is JSON arrives as data", "binary", b64(`[1,2]`), `[1,2]`, "data"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			srv := pubsubtest.Start(t, pubsub.WithClientPublish(true))
			pub := srv.Dial("/ws")
			sub := srv.Dial("/ws")
			sub.Subscribe("kinds")
			raw := srv.DialRaw("/ws/kinds")
			// A raw client joins its room before the upgrade completes.
			pub.Subscribe("kinds")
			// Sent as written: the payload's own bytes are the point.
			pub.Send(`{"type":"publish","room":"kinds","id":"k1",` + str(tt.field) + `:` + tt.value + `}`)
			if e := pub.Reply("k1"); e.Type != "ack" { // the publisher's own message may precede the ack
				t.Fatalf("got %s, want the ack", e)
			}

			for _, p := range []*pubsubtest.Conn{sub, pub} {
				m := p.NextMessage("kinds")
				kind, b := payloadOf(t, m)
				if kind != tt.kind || string(b) != tt.want {
					t.Fatalf("protocol client got %s %q (%s), want %s %q", kind, b, m, tt.kind, tt.want)
				}
				if m.Epoch == "" || m.Seq != 1 {
					t.Fatalf("message %s: want an epoch and seq 1", m)
				}
			}
			expectRawFrame(t, raw, tt.kind, []byte(tt.want))
		})
	}
}

// serverPayloads are what the backend may publish: JSON, other UTF-8
// text, and bytes that are not UTF-8 (even ones encoding/json accepts).
var serverPayloads = []struct {
	name string
	data string
	kind string
}{
	{"JSON object", `{"order":42,"items":["a","b"]}`, "data"},
	{"JSON string", `"shipped"`, "data"},
	{"JSON number", `3.14`, "data"},
	{"non-JSON text", "order shipped ✓", "text"},
	{"text with control characters", "a\x00b\x1fc", "text"},
	{"empty", "", "text"},
	{"non-UTF-8 bytes", "\x89PNG\r\n\x1a\n\x00\xff", "binary"},
	{"JSON syntax with invalid UTF-8", "\"\xff\"", "binary"},
}

func TestServerPublishPayloadKinds(t *testing.T) {
	t.Parallel()
	for _, tt := range serverPayloads {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			srv := pubsubtest.Start(t)
			p := srv.Dial("/ws")
			p.Subscribe("kinds")
			raw := srv.DialRaw("/ws/kinds") // joined before the upgrade completed
			srv.Publish("kinds", []byte(tt.data))
			m := p.NextMessage("kinds")
			if kind, b := payloadOf(t, m); kind != tt.kind || string(b) != tt.data {
				t.Fatalf("protocol client got %s %q (%s), want %s %q", kind, b, m, tt.kind, tt.data)
			}
			expectRawFrame(t, raw, tt.kind, []byte(tt.data))
		})
	}
}

func TestServerDirectMessagePayloadKinds(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	p := srv.Dial("/ws")
	for _, tt := range serverPayloads {
		if err := srv.PublishToConn(pubsubtest.Context(t), p.Welcome.ConnID, []byte(tt.data)); err != nil {
			t.Fatal(err)
		}
		e := p.Next()
		if e.Type != "direct" {
			t.Fatalf("%s: got %s, want a direct message", tt.name, e)
		}
		if kind, b := payloadOf(t, e); kind != tt.kind || string(b) != tt.data {
			t.Fatalf("%s: got %s %q, want %s %q", tt.name, kind, b, tt.kind, tt.data)
		}
	}
}
