package pubsub_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/roomcast/pubsub/protocol"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub"
)

// Room state end to end: sequence and epoch, history, recovery, presence
// and slow-consumer policies, through real WebSocket clients.

// ---- helpers (this file only) ----

// stateFields are the room-state fields of a server envelope that the
// harness's envelope does not decode.
type stateFields struct {
	MessageID   string           `json:"message_id"`
	Time        int64            `json:"time"`
	Presence    string           `json:"presence"` // subscribe ack
	Recovered   *bool            `json:"recovered"`
	Reason      *protocol.Reason `json:"reason"`
	Missed      *int             `json:"missed"`
	Count       *int             `json:"count"`       // presence reply
	Connections *int             `json:"connections"` // presence reply
	Members     *[]memberView    `json:"members"`     // presence reply
	Info        json.RawMessage  `json:"info"`        // join and leave
}

type memberView struct {
	Conns  []string        `json:"conns"`
	UserID string          `json:"user_id"`
	Info   json.RawMessage `json:"info"`
}

func stateOf(t *testing.T, e envelope) stateFields {
	t.Helper()
	var f stateFields
	if err := json.Unmarshal(e.raw, &f); err != nil {
		t.Fatalf("decode %s: %v", e.raw, err)
	}
	return f
}

// subscribeWith sends a subscribe with fields (room and the rest) and
// expects its ack, with nothing of the room arriving before it.
func subscribeWith(p *protoClient, fields map[string]any) (envelope, stateFields) {
	p.t.Helper()
	fields["type"] = "subscribe"
	before := len(p.pending)
	e := p.request(fields)
	if e.Type != "ack" {
		p.t.Fatalf("subscribe %v: got %s, want an ack", fields, e.raw)
	}
	for _, x := range p.pending[before:] {
		if x.Room == fields["room"] {
			p.t.Fatalf("subscribe %v: %s arrived before the ack", fields, x.raw)
		}
	}
	return e, stateOf(p.t, e)
}

// since is the "since" field of a recovering subscribe.
func since(epoch string, seq uint64) map[string]any {
	return map[string]any{"epoch": epoch, "seq": seq}
}

func publish(t *testing.T, h *pubsub.Handler, room string, data []byte) {
	t.Helper()
	if err := h.Publish(testCtx(t), room, data); err != nil {
		t.Fatalf("Publish(%q): %v", room, err)
	}
}

// publishNumbered publishes {"n":from}..{"n":to} into room.
func publishNumbered(t *testing.T, h *pubsub.Handler, room string, from, to int) {
	t.Helper()
	for n := from; n <= to; n++ {
		publish(t, h, room, fmt.Appendf(nil, `{"n":%d}`, n))
	}
}

// expectSeqs reads messages of room and expects exactly seqs, in order,
// each carrying {"n":seq}.
func expectSeqs(p *protoClient, room string, seqs ...uint64) {
	p.t.Helper()
	for _, want := range seqs {
		e := p.readMessage(room)
		if e.Seq != want || string(e.Data) != fmt.Sprintf(`{"n":%d}`, want) {
			p.t.Fatalf("got seq %d data %s, want seq %d with {\"n\":%d}", e.Seq, e.Data, want, want)
		}
	}
}

func seqRange(from, to uint64) []uint64 {
	var out []uint64
	for s := from; s <= to; s++ {
		out = append(out, s)
	}
	return out
}

var markers atomic.Int64

// publishMarker publishes a unique JSON payload into room and returns it;
// a reader that reaches it has seen everything queued for it before.
func publishMarker(t *testing.T, h *pubsub.Handler, room string) string {
	t.Helper()
	m := fmt.Sprintf(`{"marker":%d}`, markers.Add(1))
	publish(t, h, room, []byte(m))
	return m
}

// readUntilMarker returns every envelope read before the marker message.
func readUntilMarker(p *protoClient, room, marker string) []envelope {
	p.t.Helper()
	var before []envelope
	for {
		e := p.read()
		if e.Type == "message" && e.Room == room && string(e.Data) == marker {
			return before
		}
		before = append(before, e)
	}
}

// events describes join and leave envelopes compactly, for comparison.
func events(es []envelope) []string {
	out := make([]string, 0, len(es))
	for _, e := range es {
		out = append(out, strings.TrimSpace(fmt.Sprintf("%s %s %s", e.Type, e.ConnID, e.UserID)))
	}
	return out
}

func event(typ string, p *protoClient) string {
	return strings.TrimSpace(fmt.Sprintf("%s %s %s", typ, p.welcome.ConnID, p.welcome.UserID))
}

// dialProtoAs is dialProto with request headers (for WithAuthenticate).
func dialProtoAs(t *testing.T, url string, header http.Header) *protoClient {
	t.Helper()
	c, resp, err := websocket.Dial(testCtx(t), url, &websocket.DialOptions{
		Subprotocols: []string{protocol.Subprotocol}, HTTPHeader: header,
	})
	if err != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		t.Fatalf("dial %s: %v (HTTP %d)", url, err, status)
	}
	c.SetReadLimit(-1)
	t.Cleanup(func() { c.CloseNow() })
	p := &protoClient{t: t, c: c}
	p.welcome = p.read()
	if p.welcome.Type != "welcome" {
		t.Fatalf("first envelope %s, want welcome", p.welcome.raw)
	}
	return p
}

// headerAuth identifies a client from X-User and X-Info request headers.
func headerAuth() pubsub.Option {
	return pubsub.WithAuthenticate(func(r *http.Request) (pubsub.Identity, error) {
		id := pubsub.Identity{UserID: r.Header.Get("X-User")}
		if info := r.Header.Get("X-Info"); info != "" {
			id.Info = json.RawMessage(info)
		}
		return id, nil
	})
}

func user(name string) http.Header { return http.Header{"X-User": {name}} }

func compactJSON(t *testing.T, b []byte) string {
	t.Helper()
	if len(b) == 0 {
		return ""
	}
	var out bytes.Buffer
	if err := json.Compact(&out, b); err != nil {
		t.Fatalf("invalid JSON %q: %v", b, err)
	}
	return out.String()
}

// ---- sequence, epoch, message id ----

func TestConcurrentPublishersAllSubscribersSeeOneGaplessSequence(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t)
	const (
		room       = "order"
		publishers = 4
		each       = 250
		total      = publishers * each
	)
	subs := make([]*protoClient, 3)
	for i := range subs {
		subs[i] = dialProto(t, wsURL(srv, "/ws"))
		subs[i].subscribe(room)
	}
	start := time.Now()
	ctx := testCtx(t)
	var wg sync.WaitGroup
	errs := make(chan error, publishers)
	for g := range publishers {
		wg.Go(func() {
			for i := range each {
				if err := h.Publish(ctx, room, fmt.Appendf(nil, `{"g":%d,"i":%d}`, g, i)); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	end := time.Now()

	var first []envelope
	for si, p := range subs {
		got := make([]envelope, 0, total)
		ids := make(map[string]bool, total)
		next := make([]int, publishers) // each publisher's next i, in publish order
		for k := range total {
			e := p.readMessage(room)
			f := stateOf(t, e)
			if e.Seq != uint64(k+1) {
				t.Fatalf("subscriber %d: message %d has seq %d, want %d (strictly +1 from 1)", si, k, e.Seq, k+1)
			}
			if e.Epoch == "" || (k > 0 && e.Epoch != got[0].Epoch) {
				t.Fatalf("subscriber %d: seq %d has epoch %q, want the room's one non-empty epoch", si, e.Seq, e.Epoch)
			}
			if f.MessageID == "" || ids[f.MessageID] {
				t.Fatalf("subscriber %d: seq %d has message_id %q: empty or already seen", si, e.Seq, f.MessageID)
			}
			ids[f.MessageID] = true
			if f.Time < start.Add(-time.Second).UnixMilli() || f.Time > end.Add(time.Second).UnixMilli() {
				t.Fatalf("subscriber %d: seq %d has time %d, want between %d and %d", si, e.Seq, f.Time, start.UnixMilli(), end.UnixMilli())
			}
			var d struct{ G, I int }
			if err := json.Unmarshal(e.Data, &d); err != nil {
				t.Fatalf("seq %d: data %s: %v", e.Seq, e.Data, err)
			}
			if d.I != next[d.G] {
				t.Fatalf("subscriber %d: publisher %d's message %d arrived where %d was due: one publisher's order was lost", si, d.G, d.I, next[d.G])
			}
			next[d.G]++
			got = append(got, e)
		}
		if si == 0 {
			first = got
			continue
		}
		for k := range got {
			a, b := first[k], got[k]
			if a.Epoch != b.Epoch || stateOf(t, a).MessageID != stateOf(t, b).MessageID || !bytes.Equal(a.Data, b.Data) {
				t.Fatalf("seq %d differs between subscribers: %s vs %s", k+1, a.raw, b.raw)
			}
		}
	}
}

// ---- history ----

func TestHistoryReturnsTheNewestKeptMessagesOldestFirst(t *testing.T) {
	t.Parallel()
	h, _ := newServer(t, pubsub.WithHistory(5, time.Minute))
	ctx := testCtx(t)
	const room = "hist"
	publishNumbered(t, h, room, 1, 8)

	for _, tt := range []struct {
		limit int
		want  []uint64
	}{
		{3, []uint64{6, 7, 8}},
		{5, []uint64{4, 5, 6, 7, 8}},
		{100, []uint64{4, 5, 6, 7, 8}}, // bounded by the room's size
		{0, nil},
	} {
		ms, err := h.History(ctx, room, tt.limit)
		if err != nil {
			t.Fatalf("History(%d): %v", tt.limit, err)
		}
		var got []uint64
		ids := map[string]bool{}
		for _, m := range ms {
			got = append(got, m.Seq)
			if string(m.Data) != fmt.Sprintf(`{"n":%d}`, m.Seq) || m.Room != room || m.Epoch == "" || m.Epoch != ms[0].Epoch ||
				m.ID == "" || ids[m.ID] || m.Time.IsZero() || m.Kind != pubsub.KindMessage {
				t.Fatalf("History(%d): message %+v: want its payload, room, the room's epoch, a unique id and a time", tt.limit, m)
			}
			ids[m.ID] = true
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("History(%d) = seqs %v, want %v", tt.limit, got, tt.want)
		}
	}
	if _, err := h.History(ctx, "bad room", 5); !errors.Is(err, pubsub.ErrInvalidRoom) {
		t.Errorf("History of an invalid room: %v, want ErrInvalidRoom", err)
	}
}

func TestHistoryIsSetPerRoomByRoomOptions(t *testing.T) {
	t.Parallel()
	h, _ := newServer(t,
		pubsub.WithHistory(2, time.Minute),
		pubsub.WithRoomOptions(func(room string, o *pubsub.RoomOptions) {
			switch room {
			case "long":
				o.HistorySize = 10
			case "none":
				o.HistorySize = 0
			}
		}))
	ctx := testCtx(t)
	want := map[string]int{"default": 2, "long": 10, "none": 0}
	for room := range want {
		publishNumbered(t, h, room, 1, 12)
	}
	for room, n := range want {
		ms, err := h.History(ctx, room, 100)
		if err != nil {
			t.Fatal(err)
		}
		if len(ms) != n || (n > 0 && ms[len(ms)-1].Seq != 12) {
			t.Errorf("room %q keeps %d messages (last %v), want the newest %d", room, len(ms), ms, n)
		}
	}
}

func TestRoomOptionsAreBroughtIntoRange(t *testing.T) {
	t.Parallel()
	h, _ := newServer(t, pubsub.WithRoomOptions(func(room string, o *pubsub.RoomOptions) {
		switch room {
		case "size-no-ttl":
			o.HistorySize = 5
		case "negative-size":
			o.HistorySize, o.HistoryTTL = -4, time.Minute
		case "huge-size":
			o.HistorySize, o.HistoryTTL = 100_000+1, time.Minute
		case "ttl-no-size":
			o.HistoryTTL = time.Minute
		case "bad-modes":
			o.Presence, o.SlowConsumer = 42, 42
		case "keep-latest":
			o.Presence, o.SlowConsumer = pubsub.PresenceCounts, pubsub.SlowConsumerKeepLatest
		}
	}))
	for room, want := range map[string]pubsub.RoomOptions{
		"size-no-ttl":   {HistorySize: 5, HistoryTTL: 10 * time.Minute},
		"negative-size": {},
		"huge-size":     {HistorySize: 100_000, HistoryTTL: time.Minute},
		"ttl-no-size":   {},
		"bad-modes":     {Presence: pubsub.PresenceOn, SlowConsumer: pubsub.SlowConsumerDisconnect},
		"keep-latest":   {Presence: pubsub.PresenceCounts, SlowConsumer: pubsub.SlowConsumerKeepLatest},
	} {
		if got := h.RoomStats(room).Options; got != want {
			t.Errorf("room %q: options %+v, want %+v", room, got, want)
		}
	}
	// The normalized values are the ones applied, not only reported.
	publishNumbered(t, h, "size-no-ttl", 1, 7)
	publishNumbered(t, h, "negative-size", 1, 7)
	if ms, _ := h.History(testCtx(t), "size-no-ttl", 100); len(ms) != 5 {
		t.Errorf("size-no-ttl keeps %d messages, want 5 (a size with no TTL gets DefaultHistoryTTL, not nothing)", len(ms))
	}
	if ms, _ := h.History(testCtx(t), "negative-size", 100); len(ms) != 0 {
		t.Errorf("negative-size keeps %d messages, want 0", len(ms))
	}
}

func TestRoomStateOptionsOutOfRangePanicAtNewHandler(t *testing.T) {
	t.Parallel()
	for name, opt := range map[string]pubsub.Option{
		"history size without ttl": pubsub.WithHistory(5, 0),
		"negative history size":    pubsub.WithHistory(-1, time.Minute),
		"history size too big":     pubsub.WithHistory(100_000+1, time.Minute),
		"negative history ttl":     pubsub.WithHistory(0, -time.Second),
		"unknown presence mode":    pubsub.WithPresence(9),
		"unknown policy":           pubsub.WithSlowConsumerPolicy(9),
		"negative max info":        pubsub.WithMaxInfoBytes(-1),
		"max info too big":         pubsub.WithMaxInfoBytes(64<<10 + 1),
	} {
		func() {
			defer func() {
				p := recover()
				if s, _ := p.(string); !strings.HasPrefix(s, "pubsub: ") {
					t.Errorf("%s: NewHandler recovered %v, want a panic with a \"pubsub: \" message", name, p)
				}
			}()
			pubsub.NewHandler(pubsub.WithLogger(quietLogger()), opt)
		}()
	}
}

func TestSubscribeWithHistoryReplaysTheLastMessagesBeforeLiveOnes(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t,
		pubsub.WithHistory(5, time.Minute),
		pubsub.WithRoomOptions(func(room string, o *pubsub.RoomOptions) {
			if room == "bare" {
				o.HistorySize = 0
			}
		}))
	url := wsURL(srv, "/ws")
	const room = "replay"
	publishNumbered(t, h, room, 1, 8)

	p := dialProto(t, url)
	ack, f := subscribeWith(p, map[string]any{"room": room, "history": 3})
	if ack.Room != room || ack.Epoch == "" || ack.Seq != 8 || f.Missed == nil || *f.Missed != 3 || f.Recovered != nil || f.Reason != nil {
		t.Fatalf("ack %s: want room, epoch, seq 8, missed 3 and no recovered/reason (no since was sent)", ack.raw)
	}
	expectSeqs(p, room, 6, 7, 8)
	publishNumbered(t, h, room, 9, 9)
	expectSeqs(p, room, 9)

	// More than the room keeps: bounded by its HistorySize.
	p2 := dialProto(t, url)
	if _, f := subscribeWith(p2, map[string]any{"room": room, "history": 50}); *f.Missed != 5 {
		t.Fatalf("history 50 in a room keeping 5: missed %d, want 5", *f.Missed)
	}
	expectSeqs(p2, room, 5, 6, 7, 8, 9)

	// A room without history replays nothing.
	publishNumbered(t, h, "bare", 1, 3)
	p3 := dialProto(t, url)
	if _, f := subscribeWith(p3, map[string]any{"room": "bare", "history": 10}); *f.Missed != 0 {
		t.Fatalf("history in a room that keeps nothing: missed %d, want 0", *f.Missed)
	}
	m := publishMarker(t, h, "bare")
	if before := readUntilMarker(p3, "bare", m); len(before) != 0 {
		t.Fatalf("a room without history replayed %d envelopes: %s", len(before), before[0].raw)
	}
}

func TestHistoryReplayIsCappedToWhatTheQueueHolds(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithHistory(100, time.Minute), pubsub.WithQueueLimits(8, 1<<20))
	const room = "capped"
	publishNumbered(t, h, room, 1, 50)
	// Protocol: the ack and 7 messages fill the 8-message queue exactly.
	p := dialProto(t, wsURL(srv, "/ws"))
	if ack, f := subscribeWith(p, map[string]any{"room": room, "history": 50}); ack.Seq != 50 || *f.Missed != 7 {
		t.Fatalf("ack %s: want seq 50 and missed 7 (a queue of 8 holds the ack and 7 messages)", ack.raw)
	}
	expectSeqs(p, room, seqRange(44, 50)...)
	// Raw: the newest messages, contiguous, no more than the queue holds.
	c := dial(t, wsURL(srv, "/ws?room="+room+"&history=50"))
	var got []int
	for len(got) == 0 || got[len(got)-1] != 50 {
		_, b := readFrame(t, c)
		var d struct{ N int }
		if err := json.Unmarshal(b, &d); err != nil || (len(got) > 0 && d.N != got[len(got)-1]+1) || len(got) == 8 {
			t.Fatalf("raw replay %v then %q: want the newest messages, contiguous, at most 8", got, b)
		}
		got = append(got, d.N)
	}
	publishNumbered(t, h, room, 51, 51)
	expectSeqs(p, room, 51)
	readText(t, c, `{"n":51}`)
	if s := h.Stats(); s.SlowConsumers != 0 {
		t.Fatalf("a history replay closed %d connections as slow consumers", s.SlowConsumers)
	}
}

func TestRawHistoryReplaysVerbatimFramesBeforeLiveOnes(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithHistory(5, time.Minute))
	const room = "rawhist"
	payloads := [][]byte{[]byte("one"), []byte("two"), []byte("three"), {0xff, 0x00, 0x04}, []byte(`{"n":5}`), []byte("six")}
	for _, p := range payloads {
		publish(t, h, room, p)
	}
	c := dial(t, wsURL(srv, "/ws?room="+room+"&history=3"))
	for _, want := range payloads[3:] {
		typ, got := readFrame(t, c)
		wantTyp := websocket.MessageText
		if want[0] == 0xff {
			wantTyp = websocket.MessageBinary
		}
		if typ != wantTyp || !bytes.Equal(got, want) {
			t.Fatalf("replayed %v %q, want %v %q", typ, got, wantTyp, want)
		}
	}
	publish(t, h, room, []byte("live"))
	readText(t, c, "live")

	// history=0 replays nothing: the first frame is live.
	c0 := dial(t, wsURL(srv, "/ws?room="+room+"&history=0"))
	publish(t, h, room, []byte("live2"))
	readText(t, c0, "live2")
}

func TestRawHistoryRejectsInvalidValuesWith400(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t, pubsub.WithHistory(5, time.Minute))
	for _, v := range []string{"abc", "-1", "1.5", strconv.Itoa(100_000 + 1)} {
		dialStatus(t, wsURL(srv, "/ws?room=r&history="+v), nil, http.StatusBadRequest)
	}
}

// ---- recovery ----

func TestRecoveryReplaysExactlyTheMissedMessagesAfterTheAck(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithHistory(100, time.Minute))
	url := wsURL(srv, "/ws")
	const room = "recover"

	p1 := dialProto(t, url)
	ack, f := subscribeWith(p1, map[string]any{"room": room})
	if ack.Room != room || ack.Epoch == "" || ack.Seq != 0 || f.Presence != "on" || f.Missed == nil || *f.Missed != 0 || f.Recovered != nil {
		t.Fatalf("first ack %s: want room, an epoch, seq 0, presence on, missed 0, no recovered", ack.raw)
	}
	epoch := ack.Epoch
	publishNumbered(t, h, room, 1, 3)
	expectSeqs(p1, room, 1, 2, 3)
	p1.c.CloseNow() // the connection drops

	publishNumbered(t, h, room, 4, 8) // missed while away

	p2 := dialProto(t, url)
	ack, f = subscribeWith(p2, map[string]any{"room": room, "since": since(epoch, 3)})
	if ack.Room != room || ack.Epoch != epoch || ack.Seq != 8 || f.Presence != "on" ||
		f.Recovered == nil || !*f.Recovered || f.Reason != nil || f.Missed == nil || *f.Missed != 5 {
		t.Fatalf("recovery ack %s: want epoch %q, seq 8, presence on, recovered true, missed 5, no reason", ack.raw, epoch)
	}
	expectSeqs(p2, room, 4, 5, 6, 7, 8)
	publishNumbered(t, h, room, 9, 10)
	expectSeqs(p2, room, 9, 10) // live, no gap and no duplicate at the junction
}

func TestRecoveryAtTheTopReplaysNothing(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithRoomOptions(func(room string, o *pubsub.RoomOptions) {
		if room == "kept" {
			o.HistorySize, o.HistoryTTL = 10, time.Minute
		}
	}))
	url := wsURL(srv, "/ws")
	// "kept" keeps history; "bare" keeps none but, while a keeper stays
	// subscribed, can still confirm that nothing was missed.
	for _, room := range []string{"kept", "bare"} {
		keeper := dialProto(t, url)
		keeper.subscribe(room)
		p := dialProto(t, url)
		ack, _ := subscribeWith(p, map[string]any{"room": room})
		publishNumbered(t, h, room, 1, 2)
		expectSeqs(p, room, 1, 2)
		p.mustAck(map[string]any{"type": "unsubscribe", "room": room})

		ack2, f := subscribeWith(p, map[string]any{"room": room, "since": since(ack.Epoch, 2)})
		if ack2.Epoch != ack.Epoch || ack2.Seq != 2 || f.Recovered == nil || !*f.Recovered || f.Missed == nil || *f.Missed != 0 || f.Reason != nil {
			t.Fatalf("%s: ack %s, want epoch %q, seq 2, recovered true, missed 0", room, ack2.raw, ack.Epoch)
		}
		publishNumbered(t, h, room, 3, 3)
		expectSeqs(p, room, 3)
	}
}

func TestRecoveryRefusalsSayWhyAndLeaveALiveSubscription(t *testing.T) {
	t.Parallel()
	type setup struct {
		since  map[string]any
		epoch  string // the epoch the ack must carry ("" for: not the since epoch)
		top    uint64
		reason protocol.Reason
	}
	for _, tt := range []struct {
		name string
		opts []pubsub.Option
		// prepare leaves p unsubscribed from room and returns the request.
		prepare func(t *testing.T, h *pubsub.Handler, p *protoClient, room string) setup
	}{
		{
			name: "foreign epoch",
			opts: []pubsub.Option{pubsub.WithHistory(10, time.Minute)},
			prepare: func(t *testing.T, h *pubsub.Handler, p *protoClient, room string) setup {
				ack, _ := subscribeWith(p, map[string]any{"room": room})
				publishNumbered(t, h, room, 1, 2)
				expectSeqs(p, room, 1, 2)
				p.mustAck(map[string]any{"type": "unsubscribe", "room": room})
				return setup{since("not-an-epoch", 1), ack.Epoch, 2, protocol.ReasonEpochChanged}
			},
		},
		{
			name: "history too short",
			opts: []pubsub.Option{pubsub.WithHistory(3, time.Minute)},
			prepare: func(t *testing.T, h *pubsub.Handler, p *protoClient, room string) setup {
				ack, _ := subscribeWith(p, map[string]any{"room": room})
				publishNumbered(t, h, room, 1, 1)
				expectSeqs(p, room, 1)
				p.mustAck(map[string]any{"type": "unsubscribe", "room": room})
				publishNumbered(t, h, room, 2, 11)
				return setup{since(ack.Epoch, 1), ack.Epoch, 11, protocol.ReasonHistoryTooShort}
			},
		},
		{
			name: "position ahead of the room",
			opts: []pubsub.Option{pubsub.WithHistory(10, time.Minute)},
			prepare: func(t *testing.T, h *pubsub.Handler, p *protoClient, room string) setup {
				ack, _ := subscribeWith(p, map[string]any{"room": room})
				publishNumbered(t, h, room, 1, 2)
				expectSeqs(p, room, 1, 2)
				p.mustAck(map[string]any{"type": "unsubscribe", "room": room})
				return setup{since(ack.Epoch, 7), ack.Epoch, 2, protocol.ReasonUnknownPosition}
			},
		},
		{
			name: "more missed than the queue holds",
			opts: []pubsub.Option{pubsub.WithHistory(100, time.Minute), pubsub.WithQueueLimits(8, 1<<20)},
			prepare: func(t *testing.T, h *pubsub.Handler, p *protoClient, room string) setup {
				ack, _ := subscribeWith(p, map[string]any{"room": room})
				publishNumbered(t, h, room, 1, 1)
				expectSeqs(p, room, 1)
				p.mustAck(map[string]any{"type": "unsubscribe", "room": room})
				publishNumbered(t, h, room, 2, 21) // 20 missed, all kept, 8 fit the queue
				return setup{since(ack.Epoch, 1), ack.Epoch, 21, protocol.ReasonTooManyMissed}
			},
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			h, srv := newServer(t, tt.opts...)
			const room = "refuse"
			p := dialProto(t, wsURL(srv, "/ws"))
			s := tt.prepare(t, h, p, room)
			ack, f := subscribeWith(p, map[string]any{"room": room, "since": s.since})
			if f.Recovered == nil || *f.Recovered || f.Reason == nil || *f.Reason != s.reason || f.Missed == nil || *f.Missed != 0 {
				t.Fatalf("ack %s: want recovered false, reason %q, missed 0", ack.raw, s.reason)
			}
			if ack.Seq != s.top || ack.Epoch == "" || (s.epoch != "" && ack.Epoch != s.epoch) || (s.epoch == "" && ack.Epoch == s.since["epoch"]) {
				t.Fatalf("ack %s: want seq %d and the room's current epoch", ack.raw, s.top)
			}
			// Nothing is replayed, and the subscription is live from the ack.
			publish(t, h, room, []byte(`{"live":true}`))
			e := p.readMessage(room)
			if e.Seq != s.top+1 || e.Epoch != ack.Epoch || string(e.Data) != `{"live":true}` {
				t.Fatalf("after a refused recovery got %s, want the live message (epoch %q, seq %d)", e.raw, ack.Epoch, s.top+1)
			}
		})
	}
}

func TestSubscribeRejectsMalformedRoomStateFields(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t, pubsub.WithHistory(10, time.Minute), pubsub.WithMaxInfoBytes(32))
	p := dialProto(t, wsURL(srv, "/ws"))
	for name, fields := range map[string]map[string]any{
		"since without seq":      {"since": map[string]any{"epoch": "e"}},
		"since without epoch":    {"since": map[string]any{"seq": 1}},
		"since with empty epoch": {"since": map[string]any{"epoch": "", "seq": 1}},
		"since seq negative":     {"since": map[string]any{"epoch": "e", "seq": -1}},
		"since seq a string":     {"since": map[string]any{"epoch": "e", "seq": "1"}},
		"since not an object":    {"since": "e:1"},
		"since with history":     {"since": since("e", 1), "history": 5},
		"history negative":       {"history": -1},
		"history too large":      {"history": 100_000 + 1},
		"history not a number":   {"history": "5"},
		"info a string":          {"info": "ann"},
		"info an array":          {"info": []int{1}},
		"info a number":          {"info": 5},
		"info too large":         {"info": map[string]string{"name": strings.Repeat("a", 40)}},
		"presence not a boolean": {"presence": "yes"},
	} {
		fields["type"] = "subscribe"
		fields["room"] = "bad"
		if e := p.request(fields); e.Type != "error" || e.Code != protocol.CodeBadRequest {
			t.Errorf("%s: got %s, want error %q", name, e.raw, protocol.CodeBadRequest)
		}
	}
	// None of them subscribed, and the connection still works.
	p.mustError(map[string]any{"type": "presence", "room": "bad"}, protocol.CodeNotSubscribed)
	subscribeWith(p, map[string]any{"room": "good", "info": map[string]string{"name": "ann"}})
	subscribeWith(p, map[string]any{"room": "good2", "info": nil})
}

// TestRecoveryUnderRapidResubscribesIsContiguous races a publisher against
// a client that keeps leaving and recovering: the client hands the
// publisher a few messages to publish right before each unsubscribe and
// each resubscribe, so publishes land in every window of the server's
// subscribe (before the broker subscription, between it and the history
// read, between that and going live). Across every resubscribe the client
// must see each seq exactly once, in order.
func TestRecoveryUnderRapidResubscribesIsContiguous(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithHistory(1000, time.Minute), pubsub.WithRateLimit(1e6, 1e6))
	const (
		room   = "race"
		rounds = 200
	)
	ctx := testCtx(t)
	p := dialProto(t, wsURL(srv, "/ws"))
	ack, _ := subscribeWith(p, map[string]any{"room": room})
	epoch := ack.Epoch

	tokens := make(chan struct{}, 44*rounds+10)
	give := func(n int) {
		for range n {
			tokens <- struct{}{}
		}
	}
	stop := make(chan struct{})
	var stopOnce sync.Once
	halt := func() { stopOnce.Do(func() { close(stop) }) }
	t.Cleanup(halt)
	published := make(chan int, 1)
	go func() {
		n := 0
		defer func() { published <- n }()
		for {
			select {
			case <-stop:
				return
			case <-tokens:
			}
			if err := h.Publish(ctx, room, []byte(strconv.Itoa(n+1))); err != nil {
				return
			}
			n++
		}
	}()

	var last uint64
	consume := func(e envelope) {
		t.Helper()
		if e.Type != "message" || e.Room != room || e.Epoch != epoch || e.Seq != last+1 || string(e.Data) != strconv.FormatUint(e.Seq, 10) {
			t.Fatalf("after seq %d got %s: want seq %d of epoch %q (every seq once, in order)", last, e.raw, last+1, epoch)
		}
		last = e.Seq
	}
	missedTotal, recoveredSome := 0, 0
	for round := range rounds {
		give(4)
		consume(p.read()) // progress: at least one message per round
		give(8)
		p.mustAck(map[string]any{"type": "unsubscribe", "room": room})
		for len(p.pending) > 0 { // messages that came before the unsubscribe's ack
			consume(p.read())
		}
		give(32) // enough to keep publishing through the whole subscribe
		ack, f := subscribeWith(p, map[string]any{"room": room, "since": since(epoch, last)})
		if ack.Epoch != epoch || f.Recovered == nil || !*f.Recovered || f.Missed == nil || uint64(*f.Missed) != ack.Seq-last {
			t.Fatalf("round %d: ack %s, want recovered true with missed = seq - %d", round, ack.raw, last)
		}
		missedTotal += *f.Missed
		if *f.Missed > 0 {
			recoveredSome++
		}
	}
	halt()
	total := <-published
	for last < uint64(total) {
		consume(p.read())
	}
	t.Logf("%d messages; %d of %d resubscribes recovered messages (%d in all)", last, recoveredSome, rounds, missedTotal)
	if recoveredSome == 0 {
		t.Fatalf("no resubscribe recovered anything: the race was not exercised")
	}
}

// TestRecoveryJunctionHasNoGapOrDuplicateDuringALongReplay makes the
// window between the server's history read and the subscription going live
// wide: hundreds of large JSON messages to replay (each is classified
// while the server builds the replay), while another goroutine keeps
// publishing. Live messages land in that window and must come after the
// replay, each once.
func TestRecoveryJunctionHasNoGapOrDuplicateDuringALongReplay(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithHistory(2000, time.Minute), pubsub.WithQueueLimits(8192, 64<<20))
	const (
		room   = "junction"
		missed = 300
	)
	ctx := testCtx(t)
	p := dialProto(t, wsURL(srv, "/ws"))
	ack, _ := subscribeWith(p, map[string]any{"room": room})
	epoch := ack.Epoch
	big := fmt.Appendf(nil, `{"pad":%q}`, strings.Repeat("x", 4<<10))

	var last uint64
	consume := func(e envelope) {
		t.Helper()
		if e.Type != "message" || e.Room != room || e.Epoch != epoch || e.Seq != last+1 {
			t.Fatalf("after seq %d got %.120s: want seq %d (every seq once, in order)", last, e.raw, last+1)
		}
		last = e.Seq
	}
	publish(t, h, room, big) // a room holding a message is kept while nobody is subscribed
	consume(p.read())
	published := 1 // publishes so far: the room's top seq
	for round := range 3 {
		p.mustAck(map[string]any{"type": "unsubscribe", "room": room})
		for len(p.pending) > 0 {
			consume(p.read())
		}
		for range missed {
			publish(t, h, room, big)
		}
		published += missed

		stop := make(chan struct{})
		count := make(chan int, 1)
		go func() {
			n := 0
			defer func() { count <- n }()
			// As costly per message as the replay: it keeps pace, no more.
			// At most 1600, so missed ones (300 + 1600) always fit the
			// 2000-message history, however slow the resubscribe.
			for n < 1600 {
				select {
				case <-stop:
					return
				default:
				}
				if h.Publish(ctx, room, big) != nil {
					return
				}
				n++
			}
		}()
		fields := map[string]any{"room": room, "since": since(epoch, last)}
		if round == 1 { // the same junction after a history replay
			fields = map[string]any{"room": room, "history": missed}
		}
		ack, f := subscribeWith(p, fields)
		close(stop)
		published += <-count
		if round == 1 {
			if *f.Missed != missed {
				t.Fatalf("round %d: ack %s, want missed %d", round, ack.raw, missed)
			}
			last = ack.Seq - missed // the replay is the room's newest messages
		} else if f.Recovered == nil || !*f.Recovered || *f.Missed < missed {
			t.Fatalf("round %d: ack %s, want recovered true with at least %d missed", round, ack.raw, missed)
		}
		for last < uint64(published) {
			consume(p.read())
		}
	}
}

// ---- presence ----

func TestPresenceEventsGoOnlyToSubscribersThatAskedForThem(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t)
	const room = "lobby"
	url := wsURL(srv, "/ws")
	raw := dial(t, wsURL(srv, "/ws?room="+room)) // a member, never told of others

	watcher := dialProto(t, url)
	if _, f := subscribeWith(watcher, map[string]any{"room": room, "presence": true}); f.Presence != "on" {
		t.Fatalf("ack presence %q, want on", f.Presence)
	}
	quiet := dialProto(t, url)
	subscribeWith(quiet, map[string]any{"room": room})
	joiner := dialProto(t, url)
	subscribeWith(joiner, map[string]any{"room": room, "presence": true})
	joiner.mustAck(map[string]any{"type": "unsubscribe", "room": room})

	m := publishMarker(t, h, room)
	// The watcher's own join comes first: it is a member too.
	want := []string{event("join", watcher), event("join", quiet), event("join", joiner), event("leave", joiner)}
	if got := events(readUntilMarker(watcher, room, m)); !slices.Equal(got, want) {
		t.Fatalf("watcher got %q, want %q", got, want)
	}
	if got := readUntilMarker(quiet, room, m); len(got) != 0 {
		t.Fatalf("a subscriber that did not ask for presence got %s", got[0].raw)
	}
	readText(t, raw, m) // raw clients get payloads only

	if p, err := h.Presence(testCtx(t), room); err != nil || p.Count != 3 || p.Connections != 3 {
		t.Fatalf("h.Presence = %+v, %v; want the raw client, the watcher and the quiet one", p, err)
	}
}

func TestPresenceCountsAUserWithManyTabsAsOneMember(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, headerAuth())
	const room = "doc"
	url := wsURL(srv, "/ws")
	watcher := dialProto(t, url)
	subscribeWith(watcher, map[string]any{"room": room, "presence": true})
	if got := events([]envelope{watcher.read()}); !slices.Equal(got, []string{event("join", watcher)}) {
		t.Fatalf("watcher's first event %q, want its own join", got)
	}

	tab1 := dialProtoAs(t, url, user("ann"))
	subscribeWith(tab1, map[string]any{"room": room})
	tab2 := dialProtoAs(t, url, user("ann"))
	subscribeWith(tab2, map[string]any{"room": room})
	m := publishMarker(t, h, room)
	if got, want := events(readUntilMarker(watcher, room, m)), []string{event("join", tab1)}; !slices.Equal(got, want) {
		t.Fatalf("after two tabs of ann joined the watcher got %q, want only %q", got, want)
	}

	reply := watcher.request(map[string]any{"type": "presence", "room": room})
	f := stateOf(t, reply)
	annConns := []string{tab1.welcome.ConnID, tab2.welcome.ConnID}
	slices.Sort(annConns)
	if reply.Type != "presence" || reply.Room != room || f.Count == nil || *f.Count != 2 || *f.Connections != 3 || f.Members == nil || len(*f.Members) != 2 {
		t.Fatalf("presence reply %s: want count 2, connections 3, two members", reply.raw)
	}
	members := *f.Members
	if members[0].UserID != "" || !slices.Equal(members[0].Conns, []string{watcher.welcome.ConnID}) ||
		members[1].UserID != "ann" || !slices.Equal(members[1].Conns, annConns) {
		t.Fatalf("members %+v: want the anonymous watcher, then ann with conns %v (sorted)", members, annConns)
	}
	p, err := h.Presence(testCtx(t), room)
	if err != nil || p.Count != 2 || p.Connections != 3 || len(p.Members) != 2 ||
		!slices.Equal(p.Members[1].Conns, annConns) || p.Members[1].UserID != "ann" {
		t.Fatalf("h.Presence = %+v, %v; want what the presence reply said", p, err)
	}

	tab1.mustAck(map[string]any{"type": "unsubscribe", "room": room}) // ann still has tab2
	m = publishMarker(t, h, room)
	if got := readUntilMarker(watcher, room, m); len(got) != 0 {
		t.Fatalf("one of ann's two tabs left and the watcher got %s, want nothing", got[0].raw)
	}
	tab2.c.CloseNow() // the last tab goes away
	leave := watcher.read()
	if got, want := events([]envelope{leave}), []string{event("leave", tab2)}; !slices.Equal(got, want) || leave.Room != room {
		t.Fatalf("after ann's last tab closed the watcher got %s, want %q", leave.raw, want)
	}
	if p, _ := h.Presence(testCtx(t), room); p.Count != 1 || p.Connections != 1 {
		t.Fatalf("h.Presence after ann left = %+v, want 1 member, 1 connection", p)
	}
}

func TestPresenceCountsEachAnonymousConnectionAsItsOwnMember(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t)
	const room = "anon"
	url := wsURL(srv, "/ws")
	watcher := dialProto(t, url)
	subscribeWith(watcher, map[string]any{"room": room, "presence": true})
	a := dialProto(t, url)
	subscribeWith(a, map[string]any{"room": room})
	b := dialProto(t, url)
	subscribeWith(b, map[string]any{"room": room})
	m := publishMarker(t, h, room)
	want := []string{event("join", watcher), event("join", a), event("join", b)}
	if got := events(readUntilMarker(watcher, room, m)); !slices.Equal(got, want) {
		t.Fatalf("watcher got %q, want %q", got, want)
	}
	p, err := h.Presence(testCtx(t), room)
	if err != nil || p.Count != 3 || p.Connections != 3 || len(p.Members) != 3 {
		t.Fatalf("h.Presence = %+v, %v; want 3 members of one connection each", p, err)
	}
	for _, mem := range p.Members {
		if mem.UserID != "" || len(mem.Conns) != 1 {
			t.Fatalf("member %+v: want anonymous with one connection", mem)
		}
	}
}

func TestPresenceInfoComesFromTheClientUnlessTheServerSetsIt(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, headerAuth())
	const room = "info"
	url := wsURL(srv, "/ws")
	watcher := dialProto(t, url)
	subscribeWith(watcher, map[string]any{"room": room, "presence": true, "info": map[string]string{"name": "watcher"}})
	ann := dialProtoAs(t, url, http.Header{"X-User": {"ann"}, "X-Info": {`{"name": "Ann"}`}})
	subscribeWith(ann, map[string]any{"room": room, "info": map[string]string{"name": "Mallory"}})
	bob := dialProtoAs(t, url, user("bob"))
	subscribeWith(bob, map[string]any{"room": room, "info": map[string]string{"name": "Bob"}})

	m := publishMarker(t, h, room)
	evs := readUntilMarker(watcher, room, m)
	if len(evs) != 3 {
		t.Fatalf("watcher got %d events, want 3 joins", len(evs))
	}
	for i, want := range []string{`{"name":"watcher"}`, `{"name":"Ann"}`, `{"name":"Bob"}`} {
		if got := compactJSON(t, stateOf(t, evs[i]).Info); got != want {
			t.Errorf("join %d (%s) carries info %s, want %s", i, evs[i].raw, got, want)
		}
	}

	reply := watcher.request(map[string]any{"type": "presence", "room": room})
	members := *stateOf(t, reply).Members
	wantInfo := map[string]string{"": `{"name":"watcher"}`, "ann": `{"name":"Ann"}`, "bob": `{"name":"Bob"}`}
	if len(members) != 3 {
		t.Fatalf("presence reply %s: want 3 members", reply.raw)
	}
	for _, mem := range members {
		if got := compactJSON(t, mem.Info); got != wantInfo[mem.UserID] {
			t.Errorf("member %q has info %s, want %s", mem.UserID, got, wantInfo[mem.UserID])
		}
	}
	p, _ := h.Presence(testCtx(t), room)
	for _, mem := range p.Members {
		if got := compactJSON(t, mem.Info); got != wantInfo[mem.UserID] {
			t.Errorf("h.Presence member %q has info %s, want %s", mem.UserID, got, wantInfo[mem.UserID])
		}
	}
}

func TestPresenceCountsRoomSendsNoEventsAndListsOnlyCounts(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithRoomOptions(func(room string, o *pubsub.RoomOptions) {
		if room == "stadium" {
			o.Presence = pubsub.PresenceCounts
		}
	}))
	const room = "stadium"
	url := wsURL(srv, "/ws")
	a := dialProto(t, url)
	if _, f := subscribeWith(a, map[string]any{"room": room, "presence": true}); f.Presence != "counts" {
		t.Fatalf("ack presence %q, want counts", f.Presence)
	}
	b := dialProto(t, url)
	subscribeWith(b, map[string]any{"room": room, "presence": true})
	b.mustAck(map[string]any{"type": "unsubscribe", "room": room})
	c := dialProto(t, url)
	subscribeWith(c, map[string]any{"room": room})
	m := publishMarker(t, h, room)
	if got := readUntilMarker(a, room, m); len(got) != 0 {
		t.Fatalf("a counts-only room sent %s", got[0].raw)
	}
	reply := a.request(map[string]any{"type": "presence", "room": room})
	f := stateOf(t, reply)
	if reply.Type != "presence" || f.Count == nil || *f.Count != 2 || f.Connections == nil || *f.Connections != 2 || f.Members != nil {
		t.Fatalf("presence reply %s: want count 2, connections 2 and no members", reply.raw)
	}
	if p, err := h.Presence(testCtx(t), room); err != nil || p.Count != 2 || p.Connections != 2 || p.Members != nil {
		t.Fatalf("h.Presence = %+v, %v; want counts 2/2 and no members", p, err)
	}
}

func TestPresenceOffRoomTracksNothing(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithPresence(pubsub.PresenceOff))
	const room = "dark"
	url := wsURL(srv, "/ws")
	a := dialProto(t, url)
	if _, f := subscribeWith(a, map[string]any{"room": room, "presence": true}); f.Presence != "off" {
		t.Fatalf("ack presence %q, want off", f.Presence)
	}
	b := dialProto(t, url)
	subscribeWith(b, map[string]any{"room": room})
	m := publishMarker(t, h, room)
	if got := readUntilMarker(a, room, m); len(got) != 0 {
		t.Fatalf("a presence-off room sent %s", got[0].raw)
	}
	a.mustError(map[string]any{"type": "presence", "room": room}, protocol.CodeNotSupported)
	if p, err := h.Presence(testCtx(t), room); err != nil || p.Count != 0 || p.Connections != 0 || p.Members != nil {
		t.Fatalf("h.Presence = %+v, %v; want the zero Presence", p, err)
	}
}

func TestPresenceRequestNeedsASubscription(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t)
	url := wsURL(srv, "/ws")
	a := dialProto(t, url)
	b := dialProto(t, url)
	b.subscribe("room")
	a.mustError(map[string]any{"type": "presence", "room": "room"}, protocol.CodeNotSubscribed)
}

func TestIdentityInfoThatIsNotJSONFailsTheUpgradeWith500(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t, headerAuth())
	header := http.Header{"X-User": {"ann"}, "X-Info": {`{"name": Ann}`}}
	dialStatus(t, wsURL(srv, "/ws"), header, http.StatusInternalServerError, protocol.Subprotocol)
	dialStatus(t, wsURL(srv, "/ws?room=r"), header, http.StatusInternalServerError)
	// Valid info is accepted.
	dialProtoAs(t, wsURL(srv, "/ws"), http.Header{"X-User": {"ann"}, "X-Info": {`{"name":"Ann"}`}})
}

// ---- slow consumers ----

// bigText is an n-byte text payload starting with tag.
func bigText(tag string, n int) []byte {
	b := bytes.Repeat([]byte{'x'}, n)
	copy(b, tag)
	return b
}

// disconnects records WithOnDisconnect events.
func disconnects() (pubsub.Option, <-chan pubsub.DisconnectEvent) {
	ch := make(chan pubsub.DisconnectEvent, 16)
	return pubsub.WithOnDisconnect(func(ev pubsub.DisconnectEvent) { ch <- ev }), ch
}

func expectDisconnect(t *testing.T, ch <-chan pubsub.DisconnectEvent, connID string, code protocol.CloseCode) {
	t.Helper()
	ctx := testCtx(t)
	for {
		select {
		case ev := <-ch:
			if ev.Client.ID != connID {
				continue
			}
			if ev.Code != code {
				t.Fatalf("connection %s closed with %d %q, want %d", connID, ev.Code, ev.Reason, code)
			}
			return
		case <-ctx.Done():
			t.Fatalf("connection %s: no disconnect event", connID)
		}
	}
}

// publishUntil publishes payload(i) into room, i = 1, 2, ..., until done
// holds after a publish; it returns the number published.
func publishUntil(t *testing.T, h *pubsub.Handler, room string, limit int, payload func(i int) []byte, done func() bool) int {
	t.Helper()
	for i := 1; i <= limit; i++ {
		publish(t, h, room, payload(i))
		if done() {
			return i
		}
	}
	t.Fatalf("room %q: condition not reached after %d publishes", room, limit)
	return 0
}

func TestSlowConsumerInADisconnectRoomIsClosedWith4002AndCounted(t *testing.T) {
	t.Parallel()
	onDisc, discs := disconnects()
	h, srv := newServer(t, pubsub.WithQueueLimits(8, 1<<20), onDisc)
	const room = "feed"
	p := dialProto(t, wsURL(srv, "/ws"))
	p.subscribe(room)
	// p reads nothing from here on: socket buffers fill, then its queue.
	payload := bigText("feed", 16<<10)
	publishUntil(t, h, room, 20_000, func(int) []byte { return payload },
		func() bool { return h.Stats().SlowConsumers > 0 })
	if got := h.Stats().SlowConsumers; got != 1 {
		t.Fatalf("Stats().SlowConsumers = %d, want 1", got)
	}
	if got := h.RoomStats(room).SlowConsumers; got != 1 {
		t.Fatalf("RoomStats(%q).SlowConsumers = %d, want 1", room, got)
	}
	if got := h.Stats().Dropped; got != 0 {
		t.Fatalf("Stats().Dropped = %d, want 0: a disconnect room never drops", got)
	}
	expectClose(t, p.c, protocol.CloseSlowConsumer)
	expectDisconnect(t, discs, p.welcome.ConnID, protocol.CloseSlowConsumer)
}

// gapReader reads one room's messages, counting what it got and the seqs
// it never saw.
type gapReader struct {
	got, gaps int
	last      uint64
}

func (g *gapReader) add(t *testing.T, e envelope) {
	t.Helper()
	if e.Seq <= g.last {
		t.Fatalf("seq %d after %d: out of order or repeated", e.Seq, g.last)
	}
	g.gaps += int(e.Seq - g.last - 1)
	g.last = e.Seq
	g.got++
}

func TestDropOldestRoomKeepsASlowConsumerWithACountedGap(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithQueueLimits(16, 4<<20),
		pubsub.WithRoomOptions(func(room string, o *pubsub.RoomOptions) {
			if room == "feed" {
				o.SlowConsumer = pubsub.SlowConsumerDropOldest
			}
		}))
	const (
		room = "feed"
		n    = 2000 // 32 MB: far more than socket buffers and the queue hold
	)
	p := dialProto(t, wsURL(srv, "/ws"))
	p.subscribe(room)
	id := p.welcome.ConnID
	for i := 1; i <= n; i++ {
		publish(t, h, room, bigText(strconv.Itoa(i)+":", 16<<10))
		if st, _ := h.ConnStats(id); st.QueueMessages > 16 {
			t.Fatalf("after publish %d the queue holds %d messages, want at most 16", i, st.QueueMessages)
		}
	}
	st, err := h.ConnStats(id)
	if err != nil {
		t.Fatal(err)
	}
	if st.Dropped == 0 {
		t.Fatalf("ConnStats.Dropped = 0 after %d unread messages of 16 KiB, want drops", n)
	}
	if rs := h.RoomStats(room); rs.Dropped != st.Dropped || rs.Options.SlowConsumer != pubsub.SlowConsumerDropOldest || rs.SlowConsumers != 0 {
		t.Fatalf("RoomStats: dropped %d, policy %v, slow consumers %d; want %d, drop-oldest, 0", rs.Dropped, rs.Options.SlowConsumer, rs.SlowConsumers, st.Dropped)
	}
	if s := h.Stats(); s.Dropped != st.Dropped || s.SlowConsumers != 0 {
		t.Fatalf("Stats: dropped %d, slow consumers %d; want %d, 0", s.Dropped, s.SlowConsumers, st.Dropped)
	}
	var g gapReader
	for g.last < n {
		e := p.readMessage(room)
		g.add(t, e)
		if want := strconv.FormatUint(e.Seq, 10) + ":"; !strings.HasPrefix(*e.Text, want) {
			t.Fatalf("seq %d carries %.10q, want the payload published as %s", e.Seq, *e.Text, want)
		}
	}
	if uint64(g.gaps) != st.Dropped || g.got+g.gaps != n {
		t.Fatalf("received %d with %d missing seqs, counted %d dropped: want missing = dropped and received + dropped = %d", g.got, g.gaps, st.Dropped, n)
	}
	// Still connected and live, with no more gaps.
	publish(t, h, room, []byte(`{"after":true}`))
	if e := p.readMessage(room); e.Seq != n+1 {
		t.Fatalf("after catching up got seq %d, want %d", e.Seq, n+1)
	}
	t.Logf("received %d of %d, dropped %d", g.got, n, st.Dropped)
}

// tickerValue is the number at the start of a ticker payload "v=<n>|...".
func tickerValue(t *testing.T, e envelope) int {
	t.Helper()
	if e.Text == nil {
		t.Fatalf("ticker message %s has no text", e.raw)
	}
	s, _, _ := strings.Cut(strings.TrimPrefix(*e.Text, "v="), "|")
	v, err := strconv.Atoi(s)
	if err != nil {
		t.Fatalf("ticker message %.40q: %v", *e.Text, err)
	}
	return v
}

func TestKeepLatestRoomQueuesOnlyTheNewestValue(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithSlowConsumerPolicy(pubsub.SlowConsumerKeepLatest))
	const (
		room = "ticker"
		n    = 1000 // 32 MB unread: the writer blocks early
	)
	p := dialProto(t, wsURL(srv, "/ws"))
	p.subscribe(room)
	id := p.welcome.ConnID
	for i := 1; i <= n; i++ {
		publish(t, h, room, bigText(fmt.Sprintf("v=%d|", i), 32<<10))
		if st, _ := h.ConnStats(id); st.QueueMessages > 1 {
			t.Fatalf("after value %d the queue holds %d messages of a keep-latest room, want at most 1", i, st.QueueMessages)
		}
	}
	st, _ := h.ConnStats(id)
	got, prev := 0, 0
	for prev < n {
		v := tickerValue(t, p.readMessage(room))
		if v <= prev {
			t.Fatalf("value %d after %d", v, prev)
		}
		prev = v
		got++
	}
	if got+int(st.Dropped) != n || st.Dropped == 0 {
		t.Fatalf("received %d values, %d counted dropped: want both to add up to %d, with drops", got, st.Dropped, n)
	}
	if got > n/2 {
		t.Fatalf("received %d of %d values: a keep-latest room should have collapsed the backlog", got, n)
	}
	if rs := h.RoomStats(room); rs.Dropped != st.Dropped || rs.SlowConsumers != 0 {
		t.Fatalf("RoomStats dropped %d, slow consumers %d; want %d, 0", rs.Dropped, rs.SlowConsumers, st.Dropped)
	}
	if s := h.Stats(); s.Dropped != st.Dropped || s.SlowConsumers != 0 {
		t.Fatalf("Stats dropped %d, slow consumers %d; want %d, 0", s.Dropped, s.SlowConsumers, st.Dropped)
	}
	t.Logf("received %d of %d values", got, n)
}

func TestKeepLatestAndDisconnectRoomsOnOneConnectionEachApplyTheirOwnPolicy(t *testing.T) {
	t.Parallel()
	onDisc, discs := disconnects()
	h, srv := newServer(t, pubsub.WithQueueLimits(8, 4<<20), onDisc,
		pubsub.WithRoomOptions(func(room string, o *pubsub.RoomOptions) {
			if room == "ticker" {
				o.SlowConsumer = pubsub.SlowConsumerKeepLatest
			}
		}))
	p := dialProto(t, wsURL(srv, "/ws"))
	p.subscribe("ticker")
	p.subscribe("feed")
	// Nothing is read: ticker values collapse, feed messages pile up until
	// the queue overflows on one of them.
	payload := bigText("feed", 16<<10)
	ticks := 0
	for i := 1; h.Stats().SlowConsumers == 0; i++ {
		if i > 20_000 {
			t.Fatal("no slow consumer after 20000 feed messages")
		}
		ticks++
		publish(t, h, "ticker", fmt.Appendf(nil, "v=%d|", ticks))
		publish(t, h, "feed", payload)
	}
	ticker, feed := h.RoomStats("ticker"), h.RoomStats("feed")
	if feed.SlowConsumers != 1 || ticker.SlowConsumers != 0 {
		t.Fatalf("slow consumers: feed %d, ticker %d; want the feed room to count the disconnect", feed.SlowConsumers, ticker.SlowConsumers)
	}
	if ticker.Dropped == 0 || feed.Dropped != 0 {
		t.Fatalf("dropped: ticker %d, feed %d; want ticker values replaced, no feed message dropped", ticker.Dropped, feed.Dropped)
	}
	expectClose(t, p.c, protocol.CloseSlowConsumer)
	expectDisconnect(t, discs, p.welcome.ConnID, protocol.CloseSlowConsumer)
}

func TestStatsShowAStuckSubscriberFirstWithItsQueueAndLag(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithQueueLimits(16, 4<<20), pubsub.WithSlowConsumerPolicy(pubsub.SlowConsumerDropOldest))
	const room = "stats"
	url := wsURL(srv, "/ws")
	stuck := dialProto(t, url)
	stuck.subscribe(room)
	reader := dialProto(t, url)
	reader.subscribe(room)
	payload := bigText("s", 16<<10)
	// The reader reads each message before the next is published; the
	// stuck one reads nothing until its queue has turned over.
	publishUntil(t, h, room, 20_000, func(int) []byte { return payload }, func() bool {
		reader.readMessage(room)
		st, err := h.ConnStats(stuck.welcome.ConnID)
		return err == nil && st.Dropped >= 16
	})
	rs := h.RoomStats(room)
	if rs.Subscribers != 2 || len(rs.Connections) != 2 {
		t.Fatalf("RoomStats: %d subscribers, %d connections; want 2", rs.Subscribers, len(rs.Connections))
	}
	first, second := rs.Connections[0], rs.Connections[1]
	if first.Client.ID != stuck.welcome.ConnID || second.Client.ID != reader.welcome.ConnID {
		t.Fatalf("RoomStats order: %s then %s, want the stuck one (%s) first", first.Client.ID, second.Client.ID, stuck.welcome.ConnID)
	}
	if first.QueueMessages == 0 || first.QueueBytes < first.QueueMessages*len(payload) || first.Lag <= 0 || first.Dropped < 16 {
		t.Fatalf("stuck subscriber stats %+v: want queued messages and bytes, lag > 0, drops", first)
	}
	if second.QueueMessages != 0 || second.QueueBytes != 0 || second.Lag != 0 || second.Dropped != 0 {
		t.Fatalf("reader stats %+v: want an empty queue, no lag, no drops", second)
	}
	cs, err := h.ConnStats(stuck.welcome.ConnID)
	if err != nil || cs.Client.ID != stuck.welcome.ConnID || cs.QueueMessages == 0 || cs.Lag <= 0 {
		t.Fatalf("ConnStats(stuck) = %+v, %v; want its queue and lag", cs, err)
	}
	if _, err := h.ConnStats("no-such-connection"); !errors.Is(err, pubsub.ErrConnNotFound) {
		t.Fatalf("ConnStats of an unknown id: %v, want ErrConnNotFound", err)
	}
}

// ---- reported bugs (skipped unless ROOMCAST_KNOWN_BUGS is set) ----

// A drop policy may discard a queued message of another room to make room
// (DropOldest takes the oldest droppable message of any room). Each room's
// Dropped counter must count the messages that room lost, so that a
// subscriber's gap in a room matches that room's counter.
func TestDropsAreCountedAgainstTheRoomThatLostTheMessage(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithQueueLimits(8, 4<<20), pubsub.WithSlowConsumerPolicy(pubsub.SlowConsumerDropOldest))
	p := dialProto(t, wsURL(srv, "/ws"))
	p.subscribe("busy")
	p.subscribe("quiet")
	id := p.welcome.ConnID
	payload := bigText("busy", 16<<10)
	busyTop := publishUntil(t, h, "busy", 20_000, func(int) []byte { return payload }, func() bool {
		st, _ := h.ConnStats(id)
		return st.Dropped >= 8 // the queue is full and has turned over
	})
	publishNumbered(t, h, "quiet", 1, 4) // lands in the full queue
	gaps := map[string]*gapReader{"busy": {}, "quiet": {}}
	for gaps["quiet"].last < 4 {
		e := p.read()
		g := gaps[e.Room]
		if e.Type != "message" || g == nil {
			t.Fatalf("unexpected %s", e.raw)
		}
		g.add(t, e)
	}
	if gaps["busy"].last != uint64(busyTop) {
		t.Fatalf("busy: last seq %d, want %d (the newest is never dropped first)", gaps["busy"].last, busyTop)
	}
	for room, g := range gaps {
		if got := h.RoomStats(room).Dropped; got != uint64(g.gaps) {
			t.Errorf("room %q: the subscriber misses %d seqs, RoomStats.Dropped = %d; want them equal", room, g.gaps, got)
		}
	}
}

// The ack of a subscribe says how many messages are replayed after it
// (missed), and recovered:true promises exactly the missed ones. In a
// keep-latest room the replay must not be collapsed by the room's policy
// behind the ack's back.
func TestReplayInAKeepLatestRoomDeliversWhatTheAckAnnounces(t *testing.T) {
	t.Parallel()
	h, srv := newServer(t, pubsub.WithHistory(10, time.Minute), pubsub.WithSlowConsumerPolicy(pubsub.SlowConsumerKeepLatest))
	const room = "ticker"
	url := wsURL(srv, "/ws")
	p := dialProto(t, url)
	ack, _ := subscribeWith(p, map[string]any{"room": room})
	publishNumbered(t, h, room, 1, 1)
	expectSeqs(p, room, 1)
	p.mustAck(map[string]any{"type": "unsubscribe", "room": room})
	publishNumbered(t, h, room, 2, 6)

	// After the ack come exactly the missed messages: the room's newest
	// ones up to the ack's seq.
	check := func(p *protoClient, fields map[string]any) {
		t.Helper()
		ack2, f := subscribeWith(p, fields)
		m := publishMarker(t, h, room)
		var seqs []uint64
		for _, e := range readUntilMarker(p, room, m) {
			seqs = append(seqs, e.Seq)
		}
		if len(seqs) != *f.Missed {
			t.Errorf("ack %s announced missed=%d, then %d messages came: %v", ack2.raw, *f.Missed, len(seqs), seqs)
		}
		if want := seqRange(ack2.Seq-uint64(*f.Missed)+1, ack2.Seq); !slices.Equal(seqs, want) {
			t.Errorf("ack %s, then seqs %v; want %v", ack2.raw, seqs, want)
		}
	}
	check(p, map[string]any{"room": room, "since": since(ack.Epoch, 1)}) // recovered:true, missed 5
	check(dialProto(t, url), map[string]any{"room": room, "history": 3})
}

// "keep-latest: the newest value always arrives" (PROTOCOL.md 3.9), or the
// connection is closed as a slow consumer; the newest value must not be
// discarded while the connection stays open. Two ways it is lost today:
// the queue is full of a disconnect room's messages when the value comes
// (the value itself is dropped), or a drop-oldest room's message evicts
// it (it is the oldest droppable frame).
func TestKeepLatestNewestValueIsNotLostBehindAFullQueue(t *testing.T) {
	t.Parallel()
	newClient := func(t *testing.T, other pubsub.SlowConsumerPolicy) (*pubsub.Handler, *protoClient) {
		h, srv := newServer(t, pubsub.WithQueueLimits(4, 4<<20),
			pubsub.WithRoomOptions(func(room string, o *pubsub.RoomOptions) {
				switch room {
				case "ticker":
					o.SlowConsumer = pubsub.SlowConsumerKeepLatest
				case "other":
					o.SlowConsumer = other
				}
			}))
		p := dialProto(t, wsURL(srv, "/ws"))
		p.subscribe("ticker")
		p.subscribe("other")
		return h, p
	}
	payload := bigText("other", 16<<10)

	t.Run("queue full of a disconnect room", func(t *testing.T) {
		t.Parallel()
		h, p := newClient(t, pubsub.SlowConsumerDisconnect)
		// Fill the socket and then the queue, stopping exactly at the
		// bound (one more would close the connection).
		top := 0
		for {
			st, err := h.ConnStats(p.welcome.ConnID)
			if err != nil {
				t.Fatal(err)
			}
			if st.QueueMessages >= 4 {
				break
			}
			if top++; top > 20_000 {
				t.Fatal("the queue never filled")
			}
			publish(t, h, "other", payload)
		}
		publish(t, h, "ticker", []byte("v=1|newest"))
		expectTickerValue(t, h, p, top)
	})

	t.Run("evicted by a drop-oldest room", func(t *testing.T) {
		t.Parallel()
		h, p := newClient(t, pubsub.SlowConsumerDropOldest)
		top := publishUntil(t, h, "other", 20_000, func(int) []byte { return payload }, func() bool {
			st, _ := h.ConnStats(p.welcome.ConnID)
			return st.Dropped >= 64 // the queue has turned over many times: the writer is stuck
		})
		publish(t, h, "ticker", []byte("v=1|newest"))
		for range 4 { // each evicts the oldest droppable frame
			publish(t, h, "other", payload)
			top++
		}
		expectTickerValue(t, h, p, top)
	})
}

// expectTickerValue reads p until room "other" reaches seq top and then a
// marker, and expects a "ticker" message among them, or a 4002 close.
func expectTickerValue(t *testing.T, h *pubsub.Handler, p *protoClient, top int) {
	t.Helper()
	ctx := testCtx(t)
	sawTicker, marker := false, ""
	for {
		_, b, err := p.c.Read(ctx)
		var ce websocket.CloseError
		if errors.As(err, &ce) && protocol.CloseCode(ce.Code) == protocol.CloseSlowConsumer {
			return // closed, not silently stale: acceptable
		}
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		var e envelope
		if err := json.Unmarshal(b, &e); err != nil {
			t.Fatal(err)
		}
		switch {
		case e.Type == "message" && e.Room == "ticker":
			sawTicker = true
		case e.Type == "message" && e.Room == "other" && e.Seq == uint64(top):
			marker = publishMarker(t, h, "other") // the queue is drained by now
		case marker != "" && string(e.Data) == marker:
			if !sawTicker {
				st, _ := h.ConnStats(p.welcome.ConnID)
				t.Fatalf("the connection is open and caught up, but the ticker's newest value never came (dropped %d)", st.Dropped)
			}
			return
		}
	}
}

// A server that lost its state (here: a new Handler, as after a restart)
// tells a client coming back with its old position that it cannot recover.
func TestRecoveryAfterTheServerLostItsStateSaysEpochChanged(t *testing.T) {
	t.Parallel()
	h1, srv1 := newServer(t, pubsub.WithHistory(10, time.Minute))
	a := dialProto(t, wsURL(srv1, "/ws"))
	a.subscribe("orders")
	if err := h1.Publish(testCtx(t), "orders", []byte(`{"n":1}`)); err != nil {
		t.Fatal(err)
	}
	last := a.readMessage("orders")

	h2, srv2 := newServer(t, pubsub.WithHistory(10, time.Minute))
	b := dialProto(t, wsURL(srv2, "/ws"))
	ack := b.request(map[string]any{"type": "subscribe", "room": "orders",
		"since": map[string]any{"epoch": last.Epoch, "seq": last.Seq}})
	var got struct {
		Recovered *bool           `json:"recovered"`
		Reason    protocol.Reason `json:"reason"`
		Missed    int             `json:"missed"`
		Epoch     string          `json:"epoch"`
	}
	if err := json.Unmarshal(ack.raw, &got); err != nil {
		t.Fatal(err)
	}
	if ack.Type != "ack" || got.Recovered == nil || *got.Recovered || got.Reason != protocol.ReasonEpochChanged || got.Missed != 0 || got.Epoch == last.Epoch {
		t.Fatalf("ack %s: want recovered false, reason %q, nothing replayed, a new epoch", ack.raw, protocol.ReasonEpochChanged)
	}
	// The subscription is live on the new server.
	if err := h2.Publish(testCtx(t), "orders", []byte(`{"n":2}`)); err != nil {
		t.Fatal(err)
	}
	if m := b.readMessage("orders"); m.Seq != 1 || m.Epoch != got.Epoch {
		t.Fatalf("live message %s: want seq 1 of epoch %q", m.raw, got.Epoch)
	}
}
