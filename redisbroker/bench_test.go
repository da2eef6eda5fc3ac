package redisbroker_test

import (
	"context"
	"encoding/json"
	"strings"

	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"

	"encoding/binary"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/roomcast/pubsub"
)

// Throughput of Publish on one node: each publish is one script round
// trip (sequence, history append, trim, PUBLISH). Run with -cpu to vary
// the publishing goroutines (RunParallel starts GOMAXPROCS×16 of them).
//
//	go test -run '^$' -bench Publish -benchtime 20000x .
func BenchmarkPublishOneRoom(b *testing.B) {
	benchPublish(b, func(int64) string { return "bench" })
}

func BenchmarkPublishManyRooms(b *testing.B) {
	benchPublish(b, func(i int64) string { return fmt.Sprint("bench-", i%1000) })
}

func benchPublish(b *testing.B, room func(int64) string) {
	br := newBroker(b, shared.Addr, uniquePrefix())
	br.Bind(func(pubsub.Message) {})
	b.Cleanup(func() { br.Close() })
	h := pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: 100, TTL: time.Minute}}
	data := make([]byte, 128)
	var n atomic.Int64
	b.SetParallelism(16)
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		ctx := pubsubtest.Context(b)
		for pb.Next() {
			if _, err := br.Publish(ctx, room(n.Add(1)), data, h); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
}

// Latency from Publish on node A to deliver on node B, through Redis,
// with publishers running flat out: every payload carries its publish
// time. Reports throughput and the p50/p99 of the latency.
//
//	go test -run '^$' -bench Latency -benchtime 20000x .
func BenchmarkLatencyAcrossNodes(b *testing.B) {
	for _, n := range []int{1, 8} {
		b.Run(fmt.Sprint("publishers=", n), func(b *testing.B) { benchLatency(b, 1, n) })
	}
	// Issue 15's shape, beside natsbroker's: each publish to the next of
	// 100 rooms, node B subscribed to all.
	for _, n := range []int{1, 16} {
		b.Run(fmt.Sprint("rooms=100/publishers=", n), func(b *testing.B) { benchLatency(b, 100, n) })
	}
}

func benchLatency(b *testing.B, rooms, publishers int) {
	prefix := uniquePrefix()
	a := newBroker(b, shared.Addr, prefix)
	bb := newBroker(b, shared.Addr, prefix)
	a.Bind(func(pubsub.Message) {})
	lat := newLatencies(b.N)
	bb.Bind(func(m pubsub.Message) {
		if m.Kind == pubsub.KindMessage {
			lat.add(time.Since(time.Unix(0, int64(binary.BigEndian.Uint64(m.Data)))))
		}
	})
	b.Cleanup(func() { a.Close(); bb.Close() })
	for r := range rooms {
		if err := bb.Subscribe(pubsubtest.Context(b), fmt.Sprint("lat-", r)); err != nil {
			b.Fatal(err)
		}
	}
	var next atomic.Int64
	runPublishers(b, publishers, func(data []byte) error {
		room := fmt.Sprint("lat-", next.Add(1)%int64(rooms))
		_, err := a.Publish(pubsubtest.Context(b), room, data, pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: 100, TTL: time.Minute}})
		return err
	})
	lat.report(b)
}

// The same end to end: Handler.Publish on node A to a protocol-mode
// WebSocket client of node B.
//
//	go test -run '^$' -bench EndToEnd -benchtime 20000x .
func BenchmarkEndToEndAcrossNodes(b *testing.B) {
	for _, n := range []int{1, 8} {
		b.Run(fmt.Sprint("publishers=", n), func(b *testing.B) { benchEndToEnd(b, n) })
	}
}

func benchEndToEnd(b *testing.B, publishers int) {
	prefix := uniquePrefix()
	a := benchNode(b, prefix)
	bn := benchNode(b, prefix)
	c := benchDial(b, bn)
	lat := newLatencies(b.N)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range b.N {
			ts, ok := c.next()
			if !ok {
				return
			}
			lat.add(time.Since(time.Unix(0, ts)))
		}
	}()
	runPublishers(b, publishers, func(data []byte) error {
		return a.Handler.Publish(pubsubtest.Context(b), "e2e", []byte(fmt.Sprint(int64(binary.BigEndian.Uint64(data)))))
	})
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		b.Fatal("the client did not get every message")
	}
	lat.report(b)
}

// runPublishers publishes b.N timestamped payloads from n goroutines and
// reports the rate.
func runPublishers(b *testing.B, n int, publish func([]byte) error) {
	var next atomic.Int64
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for range n {
		wg.Go(func() {
			for next.Add(1) <= int64(b.N) {
				data := binary.BigEndian.AppendUint64(make([]byte, 0, 64), uint64(time.Now().UnixNano()))
				data = append(data, make([]byte, 56)...)
				if err := publish(data); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
}

type latencies struct {
	mu   sync.Mutex
	d    []time.Duration
	done chan struct{}
	want int
}

func newLatencies(n int) *latencies {
	return &latencies{d: make([]time.Duration, 0, n), done: make(chan struct{}), want: n}
}

func (l *latencies) add(d time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.d = append(l.d, d)
	if len(l.d) == l.want {
		close(l.done)
	}
}

func (l *latencies) report(b *testing.B) {
	select {
	case <-l.done:
	case <-time.After(30 * time.Second):
		b.Fatalf("only %d of %d messages were delivered", len(l.d), l.want)
	}
	b.StopTimer()
	l.mu.Lock()
	defer l.mu.Unlock()
	slices.Sort(l.d)
	q := func(p float64) float64 { return float64(l.d[int(p*float64(len(l.d)-1))].Microseconds()) }
	b.ReportMetric(q(0.50), "p50-µs")
	b.ReportMetric(q(0.99), "p99-µs")
	b.ReportMetric(0, "ns/op")
}

func benchNode(b *testing.B, prefix string) *node {
	br := newBroker(b, shared.Addr, prefix)
	srv := pubsubtest.Start(b, pubsub.WithBroker(br), pubsub.WithHistory(100, time.Minute), pubsub.WithQueueLimits(1<<20, 1<<30))
	return &node{Server: srv, b: br}
}

// benchClient reads message envelopes and returns their payload as a
// Unix-nanosecond timestamp.
type benchClient struct {
	c *websocket.Conn
	b *testing.B
}

func benchDial(b *testing.B, n *node) *benchClient {
	ctx := pubsubtest.Context(b)
	c, _, err := websocket.Dial(ctx, n.url(""), &websocket.DialOptions{Subprotocols: []string{protocol.Subprotocol}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.CloseNow() })
	if err := c.Write(ctx, websocket.MessageText, []byte(`{"type":"subscribe","room":"e2e","id":"1"}`)); err != nil {
		b.Fatal(err)
	}
	bc := &benchClient{c: c, b: b}
	for { // welcome, then the ack
		_, p, err := c.Read(ctx)
		if err != nil {
			b.Fatal(err)
		}
		if strings.Contains(string(p), `"type":"ack"`) {
			return bc
		}
	}
}

func (bc *benchClient) next() (int64, bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		_, p, err := bc.c.Read(ctx)
		if err != nil {
			return 0, false
		}
		var e struct {
			Type string `json:"type"`
			Data int64  `json:"data"`
		}
		if json.Unmarshal(p, &e) == nil && e.Type == "message" {
			return e.Data, true
		}
	}
}
