package bench

import (
	"bytes"
	"strconv"
)

// The server's payload is a JSON object, padded to the scenario's size:
//
//	{"run":3,"seq":17,"t":1732190000123456789,"pad":"xxxx…"}
//
// run names the scenario run (clients ignore other runs), seq counts the
// run's messages from 1, and t is the server's time.Now().UnixNano() just
// before the publish call.

// AppendPayload appends a payload of at least size bytes (exactly size
// when size is larger than the fields alone).
func AppendPayload(b []byte, run, seq, t int64, size int) []byte {
	start := len(b)
	b = append(b, `{"run":`...)
	b = strconv.AppendInt(b, run, 10)
	b = append(b, `,"seq":`...)
	b = strconv.AppendInt(b, seq, 10)
	b = append(b, `,"t":`...)
	b = strconv.AppendInt(b, t, 10)
	b = append(b, `,"pad":"`...)
	for len(b)-start < size-2 {
		b = append(b, 'x')
	}
	return append(b, '"', '}')
}

// ParsePayload finds run, seq and t in a payload, or in a centrifuge push
// that wraps one. It is a scan for the three keys, not a JSON decoder:
// clients share the server's CPU, so they must be cheap.
func ParsePayload(b []byte) (run, seq, t int64, ok bool) {
	var ok1, ok2, ok3 bool
	run, ok1 = intField(b, `"run":`)
	seq, ok2 = intField(b, `"seq":`)
	t, ok3 = intField(b, `"t":`)
	return run, seq, t, ok1 && ok2 && ok3
}

func intField(b []byte, key string) (int64, bool) {
	i := bytes.Index(b, []byte(key))
	if i < 0 {
		return 0, false
	}
	i += len(key)
	var n int64
	j := i
	for ; j < len(b) && b[j] >= '0' && b[j] <= '9'; j++ {
		n = n*10 + int64(b[j]-'0')
	}
	return n, j > i
}
