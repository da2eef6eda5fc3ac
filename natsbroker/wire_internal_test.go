package natsbroker

import (
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/roomcast/pubsub"
)

func TestTokenIsOneSubjectTokenAndReversible(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"chat", "chat"},
		{"orders:42", "orders=3A42"},
		{"a.b", "a=2Eb"},
		{"*", "=2A"},
		{">", "=3E"},
		{"x=y", "x=3Dy"},
		{"sp ace", "sp=20ace"},
		{"é", "=C3=A9"},
		{"Az09-_", "Az09-_"},
	} {
		if got := token(tc.in); got != tc.want {
			t.Errorf("token(%q) = %q, want %q", tc.in, got, tc.want)
		}
		if back, ok := untoken(tc.want); !ok || back != tc.in {
			t.Errorf("untoken(%q) = %q, %v; want %q", tc.want, back, ok, tc.in)
		}
	}
	for _, bad := range []string{"", "=", "=4", "=ZZ", "a.b", "a*", "=3"} {
		if got, ok := untoken(bad); ok {
			t.Errorf("untoken(%q) = %q, accepted a token token never makes", bad, got)
		}
	}
}

func FuzzToken(f *testing.F) {
	for _, s := range []string{"chat", "a.b:c@d/e", "=", "*>", "\x00\xff"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		tok := token(s)
		if s != "" && (tok == "" || strings.ContainsAny(tok, ".*> \t\r\n")) {
			t.Fatalf("token(%q) = %q: not one subject token", s, tok)
		}
		if back, ok := untoken(tok); s != "" && (!ok || back != s) {
			t.Fatalf("untoken(token(%q)) = %q, %v", s, back, ok)
		}
		_, _ = untoken(s) // never panics on anything
	})
}

func TestRecordHeadersRoundTrip(t *testing.T) {
	tm := time.Unix(0, time.Now().UnixNano())
	for _, r := range []record{
		{kind: kindMsg, epoch: "e1", seq: 33, id: "id1", time: tm, data: []byte("d"), keep: 100, age: 90 * time.Second, ptr: anchor{32, 900}, ttl: time.Hour, key: "abc", until: tm.Add(time.Minute)},
		{kind: kindOpen, epoch: "e2", time: tm, ttl: 2 * time.Second},
		{kind: kindTouch, epoch: "e3", seq: 7, time: tm, keep: 3, ttl: time.Hour, ptr: anchor{0, 0}},
	} {
		got, err := decodeRecord(r.header(), r.data)
		if err != nil {
			t.Fatalf("decode(%+v): %v", r, err)
		}
		if got.kind != r.kind || got.epoch != r.epoch || got.seq != r.seq || got.id != r.id || !got.time.Equal(r.time) ||
			got.keep != r.keep || got.age != r.age || got.ptr != r.ptr || got.ttl != r.ttl || got.key != r.key || !got.until.Equal(r.until) {
			t.Fatalf("decode(header(%+v)) = %+v", r, got)
		}
	}
	marker := nats.Header{}
	marker.Set(hdrMarker, "MaxAge")
	if r, err := decodeRecord(marker, nil); err != nil || !r.marker() {
		t.Fatalf("a delete marker decodes as %+v, %v", r, err)
	}
}

func FuzzDecodeRecord(f *testing.F) {
	f.Add("msg", "e", "1", "id", "5", "10", "0", "32:9", "k", "7", "60")
	f.Add("open", "e", "0", "", "5", "0", "0", "", "", "", "1h")
	f.Add("touch", "e", "x", "", "", "", "", "1:", "", "", "")
	f.Fuzz(func(t *testing.T, kind, epoch, seq, id, tm, keep, age, ptr, key, until, ttl string) {
		h := nats.Header{}
		for k, v := range map[string]string{hdrKind: kind, hdrEpoch: epoch, hdrSeq: seq, hdrID: id, hdrTime: tm, hdrKeep: keep, hdrAge: age, hdrPtr: ptr, hdrKey: key, hdrKeyUntil: until, hdrTTL: ttl} {
			if v != "" {
				h.Set(k, v)
			}
		}
		r, err := decodeRecord(h, []byte("data"))
		if err != nil {
			return
		}
		if r.kind == kindMsg && (r.seq == 0 || r.id == "") {
			t.Fatalf("accepted a message with no seq or id: %+v", r)
		}
		_, _ = decodeKeyRecord(h)
		_, _ = decodeEntry(h, []byte(seq))
	})
}

func TestEntriesRoundTrip(t *testing.T) {
	m := pubsub.Member{ConnID: "c1", UserID: "ann\r\nX-Evil: 1", Info: []byte(`{"n":1}`)}
	h, body := encodeEntry(m, false, true, 30*time.Second)
	e, err := decodeEntry(h, body)
	if err != nil || e.leave || !e.events || e.member.ConnID != "c1" || e.member.UserID != m.UserID || string(e.member.Info) != `{"n":1}` {
		t.Fatalf("decodeEntry(encodeEntry(%+v)) = %+v, %v", m, e, err)
	}
	h, body = encodeEntry(m, true, false, time.Second)
	if e, err := decodeEntry(h, body); err != nil || !e.leave || e.events {
		t.Fatalf("a leave record decodes as %+v, %v", e, err)
	}
}

func TestServerAtLeast(t *testing.T) {
	for _, tc := range []struct {
		v    string
		want bool
	}{
		{"2.11.0", true}, {"2.15.2", true}, {"3.0.0", true}, {"2.10.24", false}, {"2.11.0-beta.1", true}, {"1.99.99", false},
	} {
		if got := serverAtLeast(tc.v, minServer); got != tc.want {
			t.Errorf("serverAtLeast(%q) = %v", tc.v, got)
		}
	}
}

func TestTTLValuesRoundUpToWholeSeconds(t *testing.T) {
	for d, want := range map[time.Duration]string{0: "1", time.Millisecond: "1", time.Second: "1", 1500 * time.Millisecond: "2", time.Hour: "3600"} {
		if got := ttlValue(d); got != want {
			t.Errorf("ttlValue(%v) = %s, want %s", d, got, want)
		}
	}
	for v, want := range map[string]time.Duration{"3600": time.Hour, "1s": time.Second, "1h": time.Hour, "": 0, "never": 0} {
		if got := parseTTL(v); got != want {
			t.Errorf("parseTTL(%q) = %v, want %v", v, got, want)
		}
	}
}
