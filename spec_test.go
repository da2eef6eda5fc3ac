package pubsub_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// PROTOCOL.md, statement by statement: each test pins what the document
// says (its section in the name) to what the server does, so the two
// cannot drift apart. A client written from the document alone meets no
// surprise.

// §2: `history=` with an empty value is invalid, like every value that is
// not a number from 0 to 100000.
func TestSpec2EmptyHistoryIsRefusedWith400(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	for _, q := range []string{"history=", "history=x", "history=-1", "history=100001"} {
		srv.Refused("/ws?room=r&"+q, http.StatusBadRequest)
	}
	srv.DialRaw("/ws?room=r&history=0")
}

// §3.2: an id is any JSON string of at most 64 bytes, "" included; null is
// no id; a longer one is refused and not echoed.
func TestSpec32AnEmptyStringIsAnID(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithClientPublish(true))
	c := srv.Dial("/ws")
	c.Send(`{"type":"ping","id":""}`)
	if e := c.Next(); string(e.Raw) != `{"type":"pong","id":""}` {
		t.Fatalf("ping with id \"\": %s, want a pong with id \"\"", e.Raw)
	}
	c.Send(`{"type":"publish","room":"r","text":"x","id":""}`)
	if e := c.Next(); e.Type != "ack" || !bytes.Contains(e.Raw, []byte(`"id":""`)) {
		t.Fatalf("publish with id \"\": %s, want an ack with id \"\"", e.Raw)
	}
	c.Send(`{"type":"publish","room":"r","text":"x","id":null}`)
	c.Send(`{"type":"ping","id":"after"}`)
	if e := c.Next(); e.Type != "pong" || e.ID != "after" {
		t.Fatalf("a publish with id null was answered: %s", e.Raw)
	}
	c.Send(`{"type":"subscribe","room":"r","id":"` + strings.Repeat("i", 65) + `"}`)
	if e := c.Next(); e.Type != "error" || e.Code != protocol.CodeBadRequest || bytes.Contains(e.Raw, []byte(`"id"`)) {
		t.Fatalf("an id of 65 bytes: %s, want bad_request without the id", e.Raw)
	}
}

// §3.2: a presence request is answered by a presence envelope (or an
// error), with its id; pong is not a request.
func TestSpec32PresenceIsAnsweredByPresenceAndPongByNothing(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	c := srv.Dial("/ws")
	c.Subscribe("r")
	if e := c.Request(pubsubtest.Fields{"type": "presence", "room": "r"}); e.Type != "presence" || e.Count == nil || *e.Count != 1 {
		t.Fatalf("presence request: %s, want a presence envelope with its id", e.Raw)
	}
	c.Send(`{"type":"pong","id":"p"}`)
	c.Send(`{"type":"ping","id":"after"}`)
	if e := c.Next(); e.Type != "pong" || e.ID != "after" {
		t.Fatalf("a pong was answered: %s", e.Raw)
	}
}

// §3.3: a missing room is bad_request; a present room that fails the
// name rule, "" included, is invalid_room.
func TestSpec33AMissingRoomIsBadRequestAnEmptyOneInvalid(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithClientPublish(true), pubsub.WithOnMessage(func(context.Context, *pubsub.ClientMessage) error { return nil }))
	c := srv.Dial("/ws")
	for _, typ := range []string{"subscribe", "unsubscribe", "presence", "publish"} {
		f := pubsubtest.Fields{"type": typ, "text": "x"}
		c.Error(f, protocol.CodeBadRequest)
		f = pubsubtest.Fields{"type": typ, "room": nil, "text": "x"}
		c.Error(f, protocol.CodeBadRequest)
		c.Error(pubsubtest.Fields{"type": typ, "room": "", "text": "x"}, protocol.CodeInvalidRoom)
	}
	c.Error(pubsubtest.Fields{"type": "send", "room": "", "text": "x"}, protocol.CodeInvalidRoom)
	c.Ack(pubsubtest.Fields{"type": "send", "text": "x"}) // send's room is optional
}

// §3.3: null stands for a field's absence, except the payload's data.
func TestSpec33NullIsAbsenceButDataNullIsThePayloadNull(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithClientPublish(true), pubsub.WithHistory(10, time.Hour))
	c := srv.Dial("/ws")
	ack := c.SubscribeWith(pubsubtest.Fields{"room": "r", "since": nil, "history": nil, "presence": nil, "info": nil})
	if ack.Recovered != nil || ack.Missed == nil || *ack.Missed != 0 {
		t.Fatalf("subscribe with nulls: %s, want a plain subscribe", ack.Raw)
	}
	c.Ack(pubsubtest.Fields{"type": "publish", "room": "r", "data": nil, "key": nil})
	if m := c.NextMessage("r"); string(m.Data) != "null" {
		t.Fatalf("data null: %s, want the payload null", m.Raw)
	}
	c.Error(pubsubtest.Fields{"type": "publish", "room": "r", "text": nil}, protocol.CodeBadRequest)
}

// §3.7: subscribing again to a joined room changes nothing and acks with
// the subscription's position; everything after it follows.
func TestSpec37ARepeatSubscribeAcksWithItsPosition(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithHistory(10, time.Hour))
	c := srv.Dial("/ws")
	first := c.Subscribe("r")
	if first.Seq != 0 || first.Epoch == "" {
		t.Fatalf("subscribe to an empty room: %s, want seq 0 and an epoch", first.Raw)
	}
	for i := range 3 {
		srv.Publish("r", []byte(fmt.Sprint(i)))
	}
	again := c.Ack(pubsubtest.Fields{"type": "subscribe", "room": "r", "history": 10})
	if again.Room != "r" || again.Epoch != first.Epoch || again.Seq != 3 || again.Presence != "on" || again.Missed == nil || *again.Missed != 0 {
		t.Fatalf("repeated subscribe: %s, want room r at seq 3, presence on, nothing missed", again.Raw)
	}
	c.Messages("r", 3) // queued before the ack; nothing is replayed after it
	srv.Publish("r", []byte("3"))
	if m := c.NextMessage("r"); m.Seq != 4 {
		t.Fatalf("after the repeated subscribe: %s, want seq 4", m.Raw)
	}
}

// §3.7: history replays the last N kept messages, never more than the
// welcome's max_replay (the queue bound less one), each at most the ack's
// seq.
func TestSpec37HistoryReplaysAtMostMaxReplay(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithHistory(50, time.Hour), pubsub.WithQueueLimits(32, 1<<20))
	for i := 1; i <= 50; i++ {
		srv.Publish("r", []byte(fmt.Sprint(i)))
	}
	c := srv.Dial("/ws")
	var w struct {
		MaxReplay int `json:"max_replay"`
	}
	if err := json.Unmarshal(c.Welcome.Raw, &w); err != nil || w.MaxReplay != 31 {
		t.Fatalf("welcome %s: want max_replay 31", c.Welcome.Raw)
	}
	ack := c.SubscribeWith(pubsubtest.Fields{"room": "r", "history": 100})
	if ack.Missed == nil || *ack.Missed != 31 || ack.Seq != 50 {
		t.Fatalf("history 100 with 50 kept and max_replay 31: %s, want missed 31 at seq 50", ack.Raw)
	}
	for i, m := range c.Messages("r", 31) {
		if m.Seq != uint64(20+i) || m.Seq > ack.Seq {
			t.Fatalf("replayed %s, want seq %d (the newest 31, none past the ack)", m.Raw, 20+i)
		}
	}
}

// §3.7 and §3.8: info is measured as sent, white space included.
func TestSpec37InfoIsMeasuredInBytesAsSent(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithMaxInfoBytes(20))
	c := srv.Dial("/ws")
	exact := `{"n":   "0123456"  }` // 20 bytes, 13 of them without white space
	c.Send(`{"type":"subscribe","room":"a","id":"exact","info":` + exact + `}`)
	if e := c.Reply("exact"); e.Type != "ack" {
		t.Fatalf("info of exactly 20 bytes with a limit of 20: %s, want an ack", e.Raw)
	}
	c.Send(`{"type":"subscribe","room":"b","id":"over","info":` + exact[:1] + " " + exact[1:] + `}`)
	if e := c.Reply("over"); e.Type != "error" || e.Code != protocol.CodeBadRequest {
		t.Fatalf("info of 21 bytes (one of white space) with a limit of 20: %s, want bad_request", e.Raw)
	}
}

// §3.8: a subscriber that asks for events gets its own join; members that
// were there before are not announced; info is absent when a member has
// none, and is the smallest connection's for a user with several.
func TestSpec38OwnJoinAndInfoOfAUserWithSeveralConnections(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithAuthenticate(func(r *http.Request) (pubsub.Identity, error) {
		return pubsub.Identity{UserID: r.URL.Query().Get("user")}, nil
	}))
	early := srv.Dial("/ws?user=early")
	early.Subscribe("r")
	ann := srv.Dial("/ws?user=ann")
	ann.SubscribeWith(pubsubtest.Fields{"room": "r", "presence": true})
	if e := ann.Next(); e.Type != "join" || e.UserID != "ann" || e.Info != nil {
		t.Fatalf("ann got %s, want her own join, with no info", e.Raw)
	}
	bob1 := srv.Dial("/ws?user=bob")
	bob2 := srv.Dial("/ws?user=bob")
	bob1.SubscribeWith(pubsubtest.Fields{"room": "r", "info": json.RawMessage(`{"tab":1}`)})
	bob2.SubscribeWith(pubsubtest.Fields{"room": "r", "info": json.RawMessage(`{"tab":2}`)})
	if e := ann.Next(); e.Type != "join" || e.UserID != "bob" {
		t.Fatalf("ann got %s, want bob's join (early's was before her subscribe)", e.Raw)
	}
	p := ann.Request(pubsubtest.Fields{"type": "presence", "room": "r"})
	smallest, want := bob1.Welcome.ConnID, `{"tab":1}`
	if bob2.Welcome.ConnID < smallest {
		want = `{"tab":2}`
	}
	for _, m := range p.Members {
		if m.UserID == "bob" && (len(m.Conns) != 2 || string(m.Info) != want) {
			t.Fatalf("presence %s: bob's info %s, want %s (his smallest connection's)", p.Raw, m.Info, want)
		}
	}
}

// §1: an authenticate hook's error is 401 (or 403 with ErrForbidden),
// never 500; only a panic is 500.
func TestSpec1AnAuthenticationErrorIs401NotA500(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithAuthenticate(func(r *http.Request) (pubsub.Identity, error) {
		switch r.URL.Query().Get("as") {
		case "forbidden":
			return pubsub.Identity{}, pubsub.ErrForbidden
		case "panic":
			panic("the hook's own bug")
		}
		return pubsub.Identity{}, errors.New("no session")
	}))
	srv.Refused("/ws", http.StatusUnauthorized)
	srv.Refused("/ws?as=forbidden", http.StatusForbidden)
	srv.Refused("/ws?as=panic", http.StatusInternalServerError)
}
