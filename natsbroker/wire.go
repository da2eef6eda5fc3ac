package natsbroker

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/roomcast/pubsub"
)

// The stream's layout (prefix P, room token R, see token):
//
//	P.r.R.m        the room's log: one record per message, and control
//	               records (open, touch); the server appends a delete
//	               marker when the last record expires.
//	P.r.R.p.C      connection C's presence entry in the room (join or
//	               leave record, rolled up: one per subject).
//	P.k.R.H        the idempotency key whose SHA-256 starts with H (hex):
//	               where the key's message landed.
//	P.d.>          where the stream republishes every P.r.> record as it
//	               is stored; a node subscribes to P.d.R.> for each room
//	               it serves.
//
// Every record's metadata is in headers (below), so `nats stream view`
// shows it; a message's payload is the record's data, verbatim.
const (
	hdrKind     = "Rc-Kind"      // log: msg, open, touch; presence: join, leave
	hdrEpoch    = "Rc-Epoch"     // the room's epoch
	hdrSeq      = "Rc-Seq"       // the room's sequence: a message's own; a control record's, the head's
	hdrID       = "Rc-Id"        // a message's id
	hdrTime     = "Rc-Time"      // when the record was appended (Unix ns, the appending node's clock)
	hdrKeep     = "Rc-Keep"      // the room's history size as of this record
	hdrAge      = "Rc-Age"       // the room's history TTL in ms as of this record; 0: no age bound
	hdrPtr      = "Rc-Ptr"       // anchor: "seq:sseq", every message after room seq seq has a stream seq after sseq
	hdrKey      = "Rc-Key"       // the hash of a message's idempotency key
	hdrKeyUntil = "Rc-Key-Until" // until when (Unix ns) the key counts
	hdrEvents   = "Rc-Events"    // presence: "1" when joins and leaves are announced

	hdrTTL       = "Nats-TTL"
	hdrRollup    = "Nats-Rollup"
	hdrExpected  = "Nats-Expected-Last-Subject-Sequence"
	hdrMarker    = "Nats-Marker-Reason"
	hdrStreamSeq = "Nats-Sequence"
	hdrStamp     = "Nats-Time-Stamp"
	hdrStatus    = "Status"
)

const (
	kindMsg   = "msg"
	kindOpen  = "open"
	kindTouch = "touch"
	kindJoin  = "join"
	kindLeave = "leave"
)

// anchorEvery is how far apart the anchors of a room's log are: reading
// history from seq s walks back about (top-s)/anchorEvery anchors, one
// read each, then reads forward in batches.
const anchorEvery = 32

var errMalformed = errors.New("natsbroker: malformed record in the stream")

// token turns a room name or connection id into one subject token: ASCII
// letters, digits, '-' and '_' stay, every other byte is '=' and two hex
// digits. It is reversible and never holds '.', '*', '>' or whitespace.
func token(s string) string {
	n := 0
	for i := 0; i < len(s); i++ {
		if !plain(s[i]) {
			n++
		}
	}
	if n == 0 {
		return s
	}
	const hexdigits = "0123456789ABCDEF"
	b := make([]byte, 0, len(s)+2*n)
	for i := 0; i < len(s); i++ {
		c := s[i]
		if plain(c) {
			b = append(b, c)
			continue
		}
		b = append(b, '=', hexdigits[c>>4], hexdigits[c&15])
	}
	return string(b)
}

func plain(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_'
}

// untoken reverses token.
func untoken(t string) (string, bool) {
	if t == "" {
		return "", false
	}
	escaped := false
	for i := 0; i < len(t); i++ {
		if t[i] == '=' {
			escaped = true
		} else if !plain(t[i]) {
			return "", false
		}
	}
	if !escaped {
		return t, true
	}
	b := make([]byte, 0, len(t))
	for i := 0; i < len(t); i++ {
		c := t[i]
		if c != '=' {
			b = append(b, c)
			continue
		}
		if i+2 >= len(t) {
			return "", false
		}
		v, err := strconv.ParseUint(t[i+1:i+3], 16, 8)
		if err != nil {
			return "", false
		}
		b = append(b, byte(v))
		i += 2
	}
	return string(b), true
}

// keyHash names an idempotency key within its room: 128 bits of SHA-256,
// so keys of any bytes and length make a short subject token.
func keyHash(key string) string {
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:16])
}

// subjects are one room's subjects.
type subjects struct {
	log      string // P.r.R.m
	presence string // P.r.R.p (a connection's entry is presence + "." + token(conn))
	keys     string // P.k.R (a key's record is keys + "." + keyHash(key))
	delivery string // P.d.R.>, what a node subscribes to
}

func (b *Broker) subjects(room string) subjects {
	t := token(room)
	p := b.cfg.prefix
	return subjects{
		log:      p + ".r." + t + ".m",
		presence: p + ".r." + t + ".p",
		keys:     p + ".k." + t,
		delivery: p + ".d." + t + ".>",
	}
}

// parseDelivery splits a republished record's subject P.d.R.rest into the
// room and the rest ("m", or "p.C").
func (b *Broker) parseDelivery(subject string) (room, rest string, ok bool) {
	s, ok := strings.CutPrefix(subject, b.cfg.prefix+".d.")
	if !ok {
		return "", "", false
	}
	t, rest, ok := strings.Cut(s, ".")
	if !ok {
		return "", "", false
	}
	room, ok = untoken(t)
	return room, rest, ok
}

// record is one record of a room's log, as read back from the stream.
type record struct {
	kind   string // kindMsg, kindOpen, kindTouch; "" for a server's delete marker
	epoch  string
	seq    uint64
	sseq   uint64 // the stream's sequence of this record
	id     string
	time   time.Time // Rc-Time
	data   []byte
	keep   int
	age    time.Duration
	ptr    anchor
	ttl    time.Duration // Nats-TTL
	key    string
	until  time.Time // the key's expiry
	stored time.Time // the server's timestamp, when known
}

// anchor: every message of the room with a seq after seq is stored after
// stream sequence sseq.
type anchor struct {
	seq, sseq uint64
}

// marker reports whether the record is the server's note that the
// subject's last record expired: the room's state is gone.
func (r record) marker() bool { return r.kind == "" }

// message is the record as the Handler sees it.
func (r record) message(room string) pubsub.Message {
	return pubsub.Message{Kind: pubsub.KindMessage, Room: room, ID: r.id, Epoch: r.epoch, Seq: r.seq, Time: r.time, Data: r.data}
}

// next is the anchor a record appended after r carries.
func (r record) next() anchor {
	if r.seq > 0 && r.seq%anchorEvery == 0 {
		return anchor{r.seq, r.sseq}
	}
	return r.ptr
}

// header encodes a log record's metadata for publishing.
func (r record) header() nats.Header {
	h := nats.Header{}
	h.Set(hdrKind, r.kind)
	h.Set(hdrEpoch, r.epoch)
	h.Set(hdrSeq, strconv.FormatUint(r.seq, 10))
	if r.id != "" {
		h.Set(hdrID, r.id)
	}
	h.Set(hdrTime, strconv.FormatInt(r.time.UnixNano(), 10))
	h.Set(hdrKeep, strconv.Itoa(r.keep))
	h.Set(hdrAge, strconv.FormatInt(r.age.Milliseconds(), 10))
	if r.ptr.sseq > 0 {
		h.Set(hdrPtr, strconv.FormatUint(r.ptr.seq, 10)+":"+strconv.FormatUint(r.ptr.sseq, 10))
	}
	if r.key != "" {
		h.Set(hdrKey, r.key)
		h.Set(hdrKeyUntil, strconv.FormatInt(r.until.UnixNano(), 10))
	}
	h.Set(hdrTTL, ttlValue(r.ttl))
	return h
}

// ttlValue is a Nats-TTL header value: whole seconds, rounded up.
func ttlValue(d time.Duration) string {
	s := (d + time.Second - 1) / time.Second
	return strconv.FormatInt(int64(max(s, 1)), 10)
}

// parseTTL reads a Nats-TTL value: seconds, or a Go duration.
func parseTTL(v string) time.Duration {
	if v == "" {
		return 0
	}
	if n, err := strconv.ParseInt(v, 10, 64); err == nil && n > 0 {
		return time.Duration(n) * time.Second
	}
	if d, err := time.ParseDuration(v); err == nil && d > 0 {
		return d
	}
	return 0
}

// decodeRecord reads a log record from a stored or republished message's
// headers and data. sseq and stored come from the caller (the headers of
// a direct get or a republish, or the API's reply).
func decodeRecord(h nats.Header, data []byte) (record, error) {
	r := record{ttl: parseTTL(h.Get(hdrTTL))}
	if h.Get(hdrMarker) != "" {
		return r, nil
	}
	r.kind = h.Get(hdrKind)
	switch r.kind {
	case kindMsg, kindOpen, kindTouch:
	default:
		return record{}, errMalformed
	}
	r.epoch = h.Get(hdrEpoch)
	seq, err := strconv.ParseUint(h.Get(hdrSeq), 10, 64)
	if err != nil || r.epoch == "" {
		return record{}, errMalformed
	}
	r.seq = seq
	ns, err := strconv.ParseInt(h.Get(hdrTime), 10, 64)
	if err != nil {
		return record{}, errMalformed
	}
	r.time = time.Unix(0, ns)
	if r.keep, err = strconv.Atoi(h.Get(hdrKeep)); err != nil || r.keep < 0 {
		return record{}, errMalformed
	}
	age, err := strconv.ParseInt(h.Get(hdrAge), 10, 64)
	if err != nil || age < 0 {
		return record{}, errMalformed
	}
	r.age = time.Duration(age) * time.Millisecond
	if p := h.Get(hdrPtr); p != "" {
		a, s, ok := strings.Cut(p, ":")
		ps, err1 := strconv.ParseUint(a, 10, 64)
		pss, err2 := strconv.ParseUint(s, 10, 64)
		if !ok || err1 != nil || err2 != nil {
			return record{}, errMalformed
		}
		r.ptr = anchor{ps, pss}
	}
	if r.kind == kindMsg {
		r.id = h.Get(hdrID)
		if r.id == "" || r.seq == 0 {
			return record{}, errMalformed
		}
		r.data = data
		if r.key = h.Get(hdrKey); r.key != "" {
			u, err := strconv.ParseInt(h.Get(hdrKeyUntil), 10, 64)
			if err != nil {
				return record{}, errMalformed
			}
			r.until = time.Unix(0, u)
		}
	}
	return r, nil
}

// streamMeta reads the stream sequence and server timestamp a direct get
// or a republish adds to a record's headers.
func streamMeta(h nats.Header) (uint64, time.Time, error) {
	sseq, err := strconv.ParseUint(h.Get(hdrStreamSeq), 10, 64)
	if err != nil || sseq == 0 {
		return 0, time.Time{}, errMalformed
	}
	t, _ := time.Parse(time.RFC3339Nano, h.Get(hdrStamp))
	return sseq, t, nil
}

// keyRecord is where an idempotency key's message landed.
type keyRecord struct {
	epoch string
	seq   uint64
	id    string
	time  time.Time
	until time.Time
	sseq  uint64 // the key record's own stream sequence
}

func (k keyRecord) header(ttl time.Duration) nats.Header {
	h := nats.Header{}
	h.Set(hdrEpoch, k.epoch)
	h.Set(hdrSeq, strconv.FormatUint(k.seq, 10))
	h.Set(hdrID, k.id)
	h.Set(hdrTime, strconv.FormatInt(k.time.UnixNano(), 10))
	h.Set(hdrKeyUntil, strconv.FormatInt(k.until.UnixNano(), 10))
	h.Set(hdrTTL, ttlValue(ttl))
	return h
}

func decodeKeyRecord(h nats.Header) (keyRecord, error) {
	k := keyRecord{epoch: h.Get(hdrEpoch), id: h.Get(hdrID)}
	seq, err1 := strconv.ParseUint(h.Get(hdrSeq), 10, 64)
	t, err2 := strconv.ParseInt(h.Get(hdrTime), 10, 64)
	u, err3 := strconv.ParseInt(h.Get(hdrKeyUntil), 10, 64)
	if err1 != nil || err2 != nil || err3 != nil || k.epoch == "" || k.id == "" || seq == 0 {
		return keyRecord{}, errMalformed
	}
	k.seq, k.time, k.until = seq, time.Unix(0, t), time.Unix(0, u)
	return k, nil
}

// keyOf is the key record of a message that carries a key.
func keyOf(r record) keyRecord {
	return keyRecord{epoch: r.epoch, seq: r.seq, id: r.id, time: r.time, until: r.until}
}

// entry is one connection's presence record.
type entry struct {
	leave  bool // a leave record, or the server's marker after the entry expired
	marker bool
	events bool
	member pubsub.Member
	sseq   uint64
}

// memberBody is a presence record's data: JSON keeps any user id intact.
type memberBody struct {
	Conn string `json:"c"`
	User string `json:"u,omitempty"`
	Info []byte `json:"i,omitempty"`
}

func encodeEntry(m pubsub.Member, leave, events bool, ttl time.Duration) (nats.Header, []byte) {
	h := nats.Header{}
	if leave {
		h.Set(hdrKind, kindLeave)
	} else {
		h.Set(hdrKind, kindJoin)
	}
	if events {
		h.Set(hdrEvents, "1")
	}
	h.Set(hdrRollup, "sub")
	h.Set(hdrTTL, ttlValue(ttl))
	body, _ := json.Marshal(memberBody{Conn: m.ConnID, User: m.UserID, Info: m.Info})
	return h, body
}

func decodeEntry(h nats.Header, data []byte) (entry, error) {
	if h.Get(hdrMarker) != "" {
		return entry{leave: true, marker: true}, nil
	}
	var e entry
	switch h.Get(hdrKind) {
	case kindJoin:
	case kindLeave:
		e.leave = true
	default:
		return entry{}, errMalformed
	}
	e.events = h.Get(hdrEvents) == "1"
	var body memberBody
	if err := json.Unmarshal(data, &body); err != nil || body.Conn == "" {
		return entry{}, errMalformed
	}
	e.member = pubsub.Member{ConnID: body.Conn, UserID: body.User}
	if len(body.Info) > 0 {
		e.member.Info = json.RawMessage(body.Info)
	}
	return e, nil
}

// memberKey makes a user one member whatever its number of connections,
// and an anonymous connection a member of its own.
func memberKey(m pubsub.Member) string {
	if m.UserID != "" {
		return "u:" + m.UserID
	}
	return "c:" + m.ConnID
}

func describeRecord(r record) string {
	if r.marker() {
		return "marker"
	}
	return fmt.Sprintf("%s %s/%d@%d", r.kind, r.epoch, r.seq, r.sseq)
}
