package natsbroker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// markerTTL is how long the server keeps the delete marker it appends when
// a subject's last record expires (the smallest JetStream allows).
const markerTTL = time.Second

// streamConfig is the stream New creates or updates.
func (c *config) streamConfig() jetstream.StreamConfig {
	cfg := jetstream.StreamConfig{
		Name:        c.prefix,
		Description: "roomcast rooms: logs, presence and idempotency keys (github.com/roomcast/pubsub/natsbroker)",
		Subjects:    []string{c.prefix + ".r.>", c.prefix + ".k.>"},
		Retention:   jetstream.LimitsPolicy,
		Discard:     jetstream.DiscardOld,
		Storage:     c.storage,
		Replicas:    c.replicas,
		MaxMsgs:     -1,
		MaxBytes:    -1,
		// Rooms bound their own history (per room, see trim); a record's
		// life is its Nats-TTL.
		MaxMsgsPerSubject:      -1,
		AllowMsgTTL:            true,
		SubjectDeleteMarkerTTL: markerTTL,
		AllowRollup:            true,
		AllowDirect:            true,
		RePublish:              &jetstream.RePublish{Source: c.prefix + ".r.>", Destination: c.prefix + ".d.>"},
	}
	if c.maxBytes > 0 {
		cfg.MaxBytes = c.maxBytes
	}
	return cfg
}

// minServer is the oldest nats-server with per-message TTLs and subject
// delete markers, which rooms and presence need.
const minServer = "2.11.0"

// ensureStream creates the broker's stream, or brings an existing one to
// what the broker needs (its subjects, republishing, TTLs, direct gets),
// keeping the replicas, storage and size bound an operator gave it unless
// the options say otherwise.
func (b *Broker) ensureStream(ctx context.Context) error {
	var err error
	for range 3 {
		if err = b.ensureStreamOnce(ctx); !errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			break // created, updated or failed; or else another node created it meanwhile
		}
	}
	if err != nil {
		return fmt.Errorf("natsbroker: create or update stream %q: %w", b.cfg.prefix, err)
	}
	return nil
}

func (b *Broker) ensureStreamOnce(ctx context.Context) error {
	want := b.cfg.streamConfig()
	st, err := b.js.Stream(ctx, want.Name)
	switch {
	case errors.Is(err, jetstream.ErrStreamNotFound):
		_, err = b.js.CreateStream(ctx, want)
	case err == nil:
		have := st.CachedInfo().Config
		if !b.cfg.set.replicas {
			want.Replicas = have.Replicas
		}
		if !b.cfg.set.storage {
			want.Storage = have.Storage
		}
		if !b.cfg.set.maxBytes {
			want.MaxBytes = have.MaxBytes
		}
		if want.Storage != have.Storage {
			return fmt.Errorf("the stream has %s storage, WithStorage asks for %s: NATS cannot change it", have.Storage, want.Storage)
		}
		want.Description = have.Description
		_, err = b.js.UpdateStream(ctx, want)
	}
	return err
}

// serverAtLeast compares a server version with min (major.minor.patch).
func serverAtLeast(version, min string) bool {
	parse := func(v string) [3]int {
		var out [3]int
		v, _, _ = strings.Cut(v, "-")
		for i, p := range strings.SplitN(v, ".", 3) {
			out[i], _ = strconv.Atoi(p)
		}
		return out
	}
	a, m := parse(version), parse(min)
	for i := range a {
		if a[i] != m[i] {
			return a[i] > m[i]
		}
	}
	return true
}

// errConflict: a record was appended to the subject since the head the
// publish expected.
var errConflict = errors.New("natsbroker: the room changed under the publish")

// isConflict reports whether err is JetStream refusing an append because
// the subject's last sequence was not the one expected. The record was
// not stored.
func isConflict(err error) bool {
	var apiErr *jetstream.APIError
	if !errors.As(err, &apiErr) {
		return false
	}
	return apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant
}

// isStreamGone reports whether err says the stream does not exist (the
// server lost it, or someone deleted it), so it is worth creating again.
func isStreamGone(err error) bool {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamNotFound {
		return true
	}
	return errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, jetstream.ErrStreamNotFound)
}

// append stores a record on subject if the subject's last stored sequence
// is still expect (0: the subject is empty), and returns its stream
// sequence. A refusal is errConflict.
func (b *Broker) appendRecord(ctx context.Context, subject string, h nats.Header, data []byte, expect uint64) (uint64, error) {
	h.Set(hdrExpected, strconv.FormatUint(expect, 10))
	return b.store(ctx, subject, h, data)
}

// store publishes a record to the stream and waits for its ack.
func (b *Broker) store(ctx context.Context, subject string, h nats.Header, data []byte) (uint64, error) {
	ctx, done := b.link.call(ctx)
	defer done()
	if !b.nc.IsConnected() {
		return 0, ErrDisconnected
	}
	ack, err := b.js.PublishMsg(ctx, &nats.Msg{Subject: subject, Header: h, Data: data})
	if err = linkErr(ctx, err); err != nil {
		if isConflict(err) {
			return 0, errConflict
		}
		if isStreamGone(err) {
			b.streamLost()
		}
		return 0, err
	}
	return ack.Sequence, nil
}

// streamLost notes that the stream seems to be gone; the refresher
// creates it again.
func (b *Broker) streamLost() {
	select {
	case b.recreate <- struct{}{}:
	default:
	}
}

// stored is one message read back from the stream.
type stored struct {
	subject string
	sseq    uint64
	header  nats.Header
	data    []byte
	time    time.Time // the server's timestamp
}

// errNotFound: no message matched a read.
var errNotFound = errors.New("natsbroker: no such message")

// getLast reads the last message stored on subject from the stream's
// leader (a direct get may be served by a replica that lags), or
// errNotFound.
func (b *Broker) getLast(ctx context.Context, subject string) (stored, error) {
	return b.leaderGet(ctx, map[string]any{"last_by_subj": subject})
}

type msgGetResponse struct {
	Error   *jetstream.APIError `json:"error,omitempty"`
	Message *struct {
		Subject  string    `json:"subject"`
		Sequence uint64    `json:"seq"`
		Header   []byte    `json:"hdrs,omitempty"`
		Data     []byte    `json:"data,omitempty"`
		Time     time.Time `json:"time"`
	} `json:"message,omitempty"`
}

func (b *Broker) leaderGet(ctx context.Context, req map[string]any) (stored, error) {
	ctx, done := b.link.call(ctx)
	defer done()
	if !b.nc.IsConnected() {
		return stored{}, ErrDisconnected
	}
	body, _ := json.Marshal(req)
	reply, err := b.nc.RequestWithContext(ctx, "$JS.API.STREAM.MSG.GET."+b.cfg.prefix, body)
	if err = linkErr(ctx, err); err != nil {
		if errors.Is(err, nats.ErrNoResponders) {
			b.streamLost()
		}
		return stored{}, err
	}
	var resp msgGetResponse
	if err := json.Unmarshal(reply.Data, &resp); err != nil {
		return stored{}, errMalformed
	}
	if resp.Error != nil {
		switch resp.Error.ErrorCode {
		case jetstream.JSErrCodeMessageNotFound:
			return stored{}, errNotFound
		case jetstream.JSErrCodeStreamNotFound:
			b.streamLost()
		}
		return stored{}, resp.Error
	}
	if resp.Message == nil {
		return stored{}, errMalformed
	}
	m := resp.Message
	s := stored{subject: m.Subject, sseq: m.Sequence, data: m.Data, time: m.Time}
	if len(m.Header) > 0 {
		if s.header, err = nats.DecodeHeadersMsg(m.Header); err != nil {
			return stored{}, errMalformed
		}
	} else {
		s.header = nats.Header{}
	}
	return s, nil
}

// directBatchMax bounds the messages one direct get returns.
const directBatchMax = 256

// direct runs a direct get (served by the stream's leader or any current
// replica) that may answer with several messages, and calls fn for each
// until fn returns false or the server says it sent them all; it returns
// the headers of the batch's end (Nats-Num-Pending, Nats-UpTo-Sequence),
// if one came. A request that matches nothing is errNotFound.
func (b *Broker) direct(ctx context.Context, req map[string]any, fn func(stored) bool) (nats.Header, error) {
	ctx, done := b.link.call(ctx)
	defer done()
	if !b.nc.IsConnected() {
		return nil, ErrDisconnected
	}
	batch, _ := req["batch"].(int)
	inbox, replies, done := b.replies.open(max(batch, 1) + 2)
	defer done()
	body, _ := json.Marshal(req)
	if err := b.nc.PublishRequest("$JS.API.DIRECT.GET."+b.cfg.prefix, inbox, body); err != nil {
		return nil, err
	}
	single := batch == 0 && req["multi_last"] == nil
	for {
		var m *nats.Msg
		select {
		case m = <-replies:
		case <-ctx.Done():
			return nil, linkErr(ctx, ctx.Err())
		}
		if len(m.Data) == 0 && m.Header.Get(hdrStatus) != "" {
			switch m.Header.Get(hdrStatus) {
			case "204": // the end of a batch
				return m.Header, nil
			case "404":
				return nil, errNotFound
			case "503":
				return nil, nats.ErrNoResponders
			default:
				return nil, fmt.Errorf("natsbroker: direct get: %s %s", m.Header.Get(hdrStatus), m.Header.Get("Description"))
			}
		}
		sseq, t, err := streamMeta(m.Header)
		if err != nil {
			return nil, err
		}
		if !fn(stored{subject: m.Header.Get("Nats-Subject"), sseq: sseq, header: m.Header, data: m.Data, time: t}) || single {
			return nil, nil
		}
	}
}

// each calls fn, in stream order, for every message stored on filter (a
// subject, wildcards allowed) from stream sequence from, reading in
// batches, until fn returns false or there are no more.
func (b *Broker) each(ctx context.Context, filter string, from uint64, fn func(stored) bool) error {
	for {
		n, stop := 0, false
		eob, err := b.direct(ctx, map[string]any{"seq": from, "next_by_subj": filter, "batch": directBatchMax}, func(m stored) bool {
			n++
			from = m.sseq + 1
			if !fn(m) {
				stop = true
				return false
			}
			return true
		})
		if errors.Is(err, errNotFound) || stop {
			return nil
		}
		if err != nil {
			return err
		}
		if n == 0 || eob == nil || eob.Get("Nats-Num-Pending") == "0" {
			return nil
		}
	}
}

// replies routes the answers of direct gets, which may be several
// messages per request, from one wildcard subscription to the waiting
// callers.
type replies struct {
	prefix string
	sub    *nats.Subscription

	mu      sync.Mutex
	next    uint64
	waiting map[string]chan *nats.Msg
}

func (r *replies) start(nc *nats.Conn) error {
	r.prefix = nc.NewInbox() + "."
	r.waiting = make(map[string]chan *nats.Msg)
	sub, err := nc.Subscribe(r.prefix+"*", r.route)
	if err != nil {
		return err
	}
	// Direct gets answer in bursts: let nats.go hold them rather than
	// call the subscription slow.
	_ = sub.SetPendingLimits(-1, -1)
	r.sub = sub
	return nil
}

// open returns a reply subject whose messages arrive on the channel, which
// holds up to n; done forgets it.
func (r *replies) open(n int) (string, <-chan *nats.Msg, func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.next++
	id := strconv.FormatUint(r.next, 36)
	ch := make(chan *nats.Msg, n)
	r.waiting[id] = ch
	return r.prefix + id, ch, func() {
		r.mu.Lock()
		delete(r.waiting, id)
		r.mu.Unlock()
	}
}

func (r *replies) route(m *nats.Msg) {
	id := strings.TrimPrefix(m.Subject, r.prefix)
	r.mu.Lock()
	ch := r.waiting[id]
	r.mu.Unlock()
	if ch == nil {
		return // the caller gave up
	}
	select {
	case ch <- m:
	default: // more than asked for: the caller stops reading at its batch
	}
}

func (r *replies) stop() {
	if r.sub != nil {
		_ = r.sub.Unsubscribe()
	}
}

// purge removes a subject's records from the stream, all but its newest
// keep (at least 1, so a room's head stays).
func (b *Broker) purge(ctx context.Context, subject string, keep uint64) error {
	if !b.nc.IsConnected() {
		return ErrDisconnected
	}
	return b.stream.Purge(ctx, jetstream.WithPurgeSubject(subject), jetstream.WithPurgeKeep(max(keep, 1)))
}

// purgeBefore removes a subject's records stored before sseq.
func (b *Broker) purgeBefore(ctx context.Context, subject string, sseq uint64) error {
	if !b.nc.IsConnected() {
		return ErrDisconnected
	}
	return b.stream.Purge(ctx, jetstream.WithPurgeSubject(subject), jetstream.WithPurgeSequence(sseq))
}
