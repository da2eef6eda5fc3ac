// Package wire holds what the server and the Go client must do alike when
// they put a payload into a roomcast.v1 envelope: choose its field and
// write JSON strings.
package wire

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"unicode/utf8"
)

// Kind is the envelope field a payload travels in.
type Kind uint8

const (
	JSON   Kind = iota // "data": the bytes are JSON, embedded as they are
	Text               // "text": other UTF-8, as a JSON string
	Binary             // "binary": anything else, in standard base64
)

// Classify chooses the field for p so the receiver gets exactly p back:
// invalid UTF-8 is binary (a text frame must be UTF-8, and json.Valid
// accepts invalid UTF-8 inside strings); JSON without surrounding white
// space is data (a JSON decoder would drop that white space, so such JSON
// goes as text); everything else is text.
func Classify(p []byte) Kind {
	switch {
	case !utf8.Valid(p):
		return Binary
	case len(p) > 0 && startsJSON(p[0]) && !isSpace(p[len(p)-1]) && json.Valid(p):
		return JSON
	default:
		return Text
	}
}

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\r' || c == '\n' }

// startsJSON reports whether a JSON value can start with c: an object, an
// array, a string, a number, true, false or null. Most text cannot, and
// skips json.Valid (which allocates its error).
func startsJSON(c byte) bool {
	switch c {
	case '{', '[', '"', '-', 't', 'f', 'n':
		return true
	}
	return '0' <= c && c <= '9'
}

// AppendPayload appends the payload field of kind k ("data", "text" or
// "binary"), without a leading comma.
func AppendPayload(b, p []byte, k Kind) []byte {
	switch k {
	case JSON:
		b = append(b, `"data":`...)
		return append(b, p...)
	case Text:
		b = append(b, `"text":`...)
		return AppendString(b, p)
	default:
		b = append(b, `"binary":"`...)
		b = base64.StdEncoding.AppendEncode(b, p)
		return append(b, '"')
	}
}

const hexDigits = "0123456789abcdef"

// AppendString appends s as a JSON string. Invalid UTF-8 becomes U+FFFD,
// as encoding/json does; U+2028 and U+2029 are escaped, since they end a
// line in JavaScript source.
func AppendString[S ~string | ~[]byte](b []byte, s S) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := decodeRune(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i++
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

func decodeRune[S ~string | ~[]byte](s S) (rune, int) {
	switch v := any(s).(type) {
	case string:
		return utf8.DecodeRuneInString(v)
	case []byte:
		return utf8.DecodeRune(v)
	}
	return utf8.DecodeRuneInString(string(s)) // a named string or byte-slice type
}

// Errors of DecodePayload, which each side turns into its own.
var (
	ErrPayloadCount  = errors.New(`exactly one of "data", "text" or "binary" is required`)
	ErrPayloadBase64 = errors.New(`"binary" is not standard base64`)
)

// DecodePayload returns the bytes an envelope's one payload field carries,
// and its kind: data is the raw "data" value, text and binary the decoded
// "text" and "binary" strings (nil when absent). The bytes of data are
// data itself, not a copy.
func DecodePayload(data json.RawMessage, text, binary *string) ([]byte, Kind, error) {
	n := 0
	for _, present := range []bool{data != nil, text != nil, binary != nil} {
		if present {
			n++
		}
	}
	switch {
	case n != 1:
		return nil, 0, ErrPayloadCount
	case data != nil:
		return data, JSON, nil
	case text != nil:
		return []byte(*text), Text, nil
	}
	p, err := base64.StdEncoding.DecodeString(*binary)
	if err != nil {
		return nil, 0, ErrPayloadBase64
	}
	return p, Binary, nil
}
