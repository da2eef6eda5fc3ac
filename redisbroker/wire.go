package redisbroker

import (
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"time"

	"github.com/roomcast/pubsub"
)

var errMalformed = errors.New("malformed message from Redis")

// appendField appends s as len ":" s, the framing the scripts use.
func appendField(b []byte, s string) []byte {
	b = strconv.AppendInt(b, int64(len(s)), 10)
	b = append(b, ':')
	return append(b, s...)
}

// record is a member as the scripts store and announce it.
func record(m pubsub.Member) string {
	b := make([]byte, 0, 64+len(m.ConnID)+len(m.UserID)+len(m.Info))
	b = appendField(b, m.ConnID)
	b = appendField(b, m.UserID)
	b = appendField(b, string(m.Info))
	return string(b)
}

// memberKey makes a user one member whatever its number of connections,
// and an anonymous connection a member of its own.
func memberKey(m pubsub.Member) string {
	if m.UserID != "" {
		return "u:" + m.UserID
	}
	return "c:" + m.ConnID
}

// field splits one len ":" bytes field off s.
func field(s string) (string, string, bool) {
	i := strings.IndexByte(s, ':')
	if i < 1 {
		return "", "", false
	}
	n, err := strconv.Atoi(s[:i])
	if err != nil || n < 0 || n > len(s)-i-1 {
		return "", "", false
	}
	return s[i+1 : i+1+n], s[i+1+n:], true
}

func fields(s string, n int) ([]string, string, bool) {
	out := make([]string, n)
	for i := range out {
		var ok bool
		if out[i], s, ok = field(s); !ok {
			return nil, "", false
		}
	}
	return out, s, true
}

func parseMicros(s string) (time.Time, bool) {
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return time.Time{}, false
	}
	return time.UnixMicro(n), true
}

func parseMember(rec string) (pubsub.Member, bool) {
	f, rest, ok := fields(rec, 3)
	if !ok || rest != "" {
		return pubsub.Member{}, false
	}
	m := pubsub.Member{ConnID: f[0], UserID: f[1]}
	if f[2] != "" {
		m.Info = json.RawMessage(f[2])
	}
	return m, true
}

// decode turns a published payload into the Message it announces.
func decode(room, payload string) (pubsub.Message, error) {
	if payload == "" {
		return pubsub.Message{}, errMalformed
	}
	kind, rest := payload[0], payload[1:]
	switch kind {
	case 'm':
		f, data, ok := fields(rest, 4)
		if !ok {
			return pubsub.Message{}, errMalformed
		}
		seq, err := strconv.ParseUint(f[1], 10, 64)
		t, tok := parseMicros(f[3])
		if err != nil || !tok {
			return pubsub.Message{}, errMalformed
		}
		return pubsub.Message{Kind: pubsub.KindMessage, Room: room, Epoch: f[0], Seq: seq, ID: f[2], Time: t, Data: []byte(data)}, nil
	case 'j', 'l':
		f, rec, ok := fields(rest, 2)
		if !ok {
			return pubsub.Message{}, errMalformed
		}
		t, tok := parseMicros(f[1])
		m, mok := parseMember(rec)
		if !tok || !mok {
			return pubsub.Message{}, errMalformed
		}
		k := pubsub.KindJoin
		if kind == 'l' {
			k = pubsub.KindLeave
		}
		return pubsub.Message{Kind: k, Room: room, Epoch: f[0], Time: t, Member: m}, nil
	}
	return pubsub.Message{}, errMalformed
}

// entries decodes the seq and f(id) f(time) data pairs the history and
// range scripts return after the epoch and top.
func entries(room, epoch string, vals []any) ([]pubsub.Message, error) {
	if len(vals)%2 != 0 {
		return nil, errMalformed
	}
	out := make([]pubsub.Message, 0, len(vals)/2)
	for i := 0; i < len(vals); i += 2 {
		seqS, _ := vals[i].(string)
		v, _ := vals[i+1].(string)
		f, data, ok := fields(v, 2)
		if !ok {
			return nil, errMalformed
		}
		seq, err := strconv.ParseUint(seqS, 10, 64)
		t, tok := parseMicros(f[1])
		if err != nil || !tok {
			return nil, errMalformed
		}
		out = append(out, pubsub.Message{Kind: pubsub.KindMessage, Room: room, Epoch: epoch, Seq: seq, ID: f[0], Time: t, Data: []byte(data)})
	}
	return out, nil
}

// position reads the epoch and top every history and range reply starts with.
func position(vals []any) (string, uint64, error) {
	if len(vals) < 2 {
		return "", 0, errMalformed
	}
	epoch, _ := vals[0].(string)
	top := uint64(0)
	if s, ok := vals[1].(string); ok {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return "", 0, errMalformed
		}
		top = n
	}
	return epoch, top, nil
}
