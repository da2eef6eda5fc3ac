package pubsub_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// The client message rate limit (WithRateLimit): past the burst a raw
// client is closed with 4004, a protocol client's request is answered
// rate_limited and dropped; heartbeats aside, everything a client sends
// counts, garbage included.

func TestRawRateLimitClosesWith4004(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithClientPublish(true), pubsub.WithRateLimit(1, 3))
	flooder := srv.DialRaw("/ws?room=busy")
	listener := srv.DialRaw("/ws?room=busy")

	for _, m := range []string{"m1", "m2", "m3", "m4"} {
		flooder.Send(m)
	}
	flooder.ExpectClose(protocol.CloseRateLimited)
	// The burst of three went through; the fourth did not.
	listener.ExpectText("m1")
	listener.ExpectText("m2")
	listener.ExpectText("m3")
	srv.Publish("busy", []byte("marker"))
	listener.ExpectText("marker")
	if got := srv.Stats().RateLimited; got != 1 {
		t.Fatalf("Stats().RateLimited = %d, want 1", got)
	}
}

// TestProtocolRateLimitDropsMessageThenRecovers: past the burst a request
// is answered rate_limited and dropped (never published); once the bucket
// refills, requests go through again.
func TestProtocolRateLimitDropsMessageThenRecovers(t *testing.T) {
	t.Parallel()
	// 2 tokens a second: the burst of 3 must be spent within half a second,
	// which pipelining makes safe; heartbeat pings are the retry clock.
	srv := pubsubtest.Start(t, pubsub.WithClientPublish(true), pubsub.WithRateLimit(2, 3),
		pubsub.WithHeartbeat(20*time.Millisecond, 5*time.Second))
	p := srv.Dial("/ws")
	// Every request is sent before any reply is read.
	reqs := []pubsubtest.Fields{
		{"type": "subscribe", "room": "flood"},
		{"type": "publish", "room": "flood", "text": "a"},
		{"type": "publish", "room": "flood", "text": "b"},
		{"type": "publish", "room": "flood", "text": "dropped"},
	}
	for i, r := range reqs {
		r["id"] = fmt.Sprint("p", i)
		p.Send(r)
	}
	for i, r := range reqs[:3] {
		if e := p.Reply(r["id"].(string)); e.Type != "ack" {
			t.Fatalf("request %d within the burst: got %s, want ack", i, e)
		}
	}
	if e := p.Reply("p3"); e.Type != "error" || e.Code != protocol.CodeRateLimited || e.ID == "" {
		t.Fatalf("request past the burst: got %s, want rate_limited with its id", e)
	}
	if srv.Stats().RateLimited == 0 {
		t.Fatal("Stats().RateLimited did not count the refusal")
	}
	recovered := false
	for range 500 { // ~10s of pings at most; a token takes 500ms
		p.Ping()
		e := p.Request(pubsubtest.Fields{"type": "publish", "room": "flood", "text": "c"})
		if e.Type == "ack" {
			recovered = true
			break
		}
		if e.Code != protocol.CodeRateLimited {
			t.Fatalf("got %s while waiting for the bucket to refill", e)
		}
	}
	if !recovered {
		t.Fatal("the rate limit never let a request through again")
	}
	// The dropped publish never reached the room: seq has no gap.
	for i, want := range []string{"a", "b", "c"} {
		m := p.NextMessage("flood")
		if m.Text == nil || *m.Text != want || m.Seq != uint64(i+1) {
			t.Fatalf("got %s, want text %q seq %d", m, want, i+1)
		}
	}
}

func TestProtocolMalformedEnvelopesCountAgainstTheRateLimit(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t, pubsub.WithRateLimit(0.001, 3))
	p := srv.Dial("/ws")
	for i := range 3 {
		p.Send(`{"id":` + fmt.Sprint(i) + `,`) // not even JSON
		if e := p.Next(); e.Type != "error" || e.Code != protocol.CodeBadRequest {
			t.Fatalf("garbage %d: got %s, want bad_request", i, e)
		}
	}
	p.Send(`not json either`)
	if e := p.Next(); e.Type != "error" || e.Code != protocol.CodeRateLimited {
		t.Fatalf("garbage past the burst: got %s, want rate_limited", e)
	}
	// A pong is never limited: the connection stays open and quiet.
	p.Send(`{"type":"pong"}`)
	p.Send(`{"type":"ping","id":"x"}`)
	if e := p.Next(); e.Type != "error" || e.Code != protocol.CodeRateLimited || e.ID != "x" {
		t.Fatalf("ping past the burst: got %s, want rate_limited for x", e)
	}
}

func TestDefaultRateLimitAllowsABurstOf50(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	p := srv.Dial("/ws")
	const sent = 80
	for i := range sent { // pipelined: far faster than the 20/s refill
		p.Send(pubsubtest.Fields{"type": "ping", "id": fmt.Sprint(i)})
	}
	pongs, limited := 0, 0
	for range sent {
		switch e := p.Next(); {
		case e.Type == "pong":
			pongs++
		case e.Type == "error" && e.Code == protocol.CodeRateLimited:
			limited++
		default:
			t.Fatalf("unexpected %s", e)
		}
	}
	// The whole burst, then refusals (a refill of 20/s adds only a few
	// while 80 pipelined frames go by).
	if pongs < 50 || limited == 0 {
		t.Fatalf("%d answered, %d rate-limited of %d: want the default burst of %d, then refusals", pongs, limited, sent, 50)
	}
}
