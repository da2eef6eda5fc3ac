package natsbroker_test

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/pubsubtest"
)

// The benchmarks have the shape of redisbroker's (bench_test.go there), so
// the two are compared on one machine: the same publishers, rooms, history
// and payloads. They run against the embedded nats-server of the test
// binary (file storage, one replica), or, when ROOMCAST_BENCH_NATS names
// one, a nats-server of its own process, as redis-server is for Redis's:
//
//	go test -run '^$' -bench . -benchtime 20000x -count 3 .
//
//	go build -o /tmp/nats-server github.com/nats-io/nats-server/v2
//	/tmp/nats-server -js -sd "$(mktemp -d)" -a 127.0.0.1 -p 4333 &
//	ROOMCAST_BENCH_NATS=nats://127.0.0.1:4333 go test -run '^$' -bench . -benchtime 20000x -count 3 .

// benchURL is the NATS server the benchmarks use.
func benchURL() string {
	if u := os.Getenv("ROOMCAST_BENCH_NATS"); u != "" {
		return u
	}
	return shared.URL
}

// benchHistory is every benchmark's room history, as redisbroker's.
var benchHistory = pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: 100, TTL: time.Minute}}

// Throughput of Publish on one node: each publish is one append (a
// JetStream publish with an expected last subject sequence, and its ack).
// RunParallel starts GOMAXPROCS×16 publishing goroutines.
func BenchmarkPublishOneRoom(b *testing.B) {
	benchPublish(b, func(int64) string { return "bench" })
}

func BenchmarkPublishManyRooms(b *testing.B) {
	benchPublish(b, func(i int64) string { return fmt.Sprint("bench-", i%1000) })
}

// Each publish carries an idempotency key of its own, as a client's
// retried publish does: a read of the key's record, the append, and the
// key's record.
func BenchmarkPublishManyRoomsWithKeys(b *testing.B) {
	benchPublishOpts(b, func(i int64) string { return fmt.Sprint("bench-", i%1000) }, func(i int64) pubsub.PublishOptions {
		o := benchHistory
		o.Key, o.KeyTTL = fmt.Sprint("k", i), time.Minute
		return o
	})
}

func benchPublish(b *testing.B, room func(int64) string) {
	benchPublishOpts(b, room, func(int64) pubsub.PublishOptions { return benchHistory })
}

func benchPublishOpts(b *testing.B, room func(int64) string, opts func(int64) pubsub.PublishOptions) {
	br := newBroker(b, benchURL(), uniquePrefix())
	br.Bind(func(pubsub.Message) {})
	data := make([]byte, 128)
	var n atomic.Int64
	b.SetParallelism(16)
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		ctx := context.Background()
		for pb.Next() {
			i := n.Add(1)
			if _, err := br.Publish(ctx, room(i), data, opts(i)); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
}

// Latency from Publish on node A to deliver on node B, through NATS, with
// publishers running flat out: every payload carries its publish time.
// Reports throughput and the p50/p99 of the latency. publishers=N is
// redisbroker's shape (one room); rooms=100/publishers=N is issue 15's
// (each publish goes to the next of 100 rooms, node B subscribed to all).
//
//	go test -run '^$' -bench Latency -benchtime 20000x .
func BenchmarkLatencyAcrossNodes(b *testing.B) {
	for _, n := range []int{1, 8} {
		b.Run(fmt.Sprint("publishers=", n), func(b *testing.B) { benchLatency(b, 1, n) })
	}
	for _, n := range []int{1, 16} {
		b.Run(fmt.Sprint("rooms=100/publishers=", n), func(b *testing.B) { benchLatency(b, 100, n) })
	}
}

func benchLatency(b *testing.B, rooms, publishers int) {
	prefix := uniquePrefix()
	a := newBroker(b, benchURL(), prefix)
	bb := newBroker(b, benchURL(), prefix)
	a.Bind(func(pubsub.Message) {})
	lat := newLatencies(b.N)
	bb.Bind(func(m pubsub.Message) {
		if m.Kind == pubsub.KindMessage {
			lat.add(time.Since(time.Unix(0, int64(binary.BigEndian.Uint64(m.Data)))))
		}
	})
	for r := range rooms {
		if err := bb.Subscribe(pubsubtest.Context(b), fmt.Sprint("lat-", r)); err != nil {
			b.Fatal(err)
		}
	}
	publishFlatOut(b, publishers, func(i int64, data []byte) error {
		_, err := a.Publish(context.Background(), fmt.Sprint("lat-", i%int64(rooms)), data, benchHistory)
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
	opts := []pubsub.Option{pubsub.WithHistory(100, time.Minute), pubsub.WithQueueLimits(1<<20, 1<<30)}
	a := benchNode(b, prefix, opts)
	bn := benchNode(b, prefix, opts)
	ws, _, err := websocket.Dial(pubsubtest.Context(b), bn.WS("/ws"), &websocket.DialOptions{Subprotocols: []string{"roomcast.v1"}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ws.CloseNow() })
	ws.SetReadLimit(-1)
	if err := ws.Write(pubsubtest.Context(b), websocket.MessageText, []byte(`{"type":"subscribe","room":"e2e","id":"1"}`)); err != nil {
		b.Fatal(err)
	}
	for { // the welcome, then the ack
		_, p, err := ws.Read(pubsubtest.Context(b))
		if err != nil {
			b.Fatal(err)
		}
		if strings.Contains(string(p), `"type":"ack"`) {
			break
		}
	}
	lat := newLatencies(b.N)
	read := make(chan struct{})
	go func() {
		defer close(read)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		for range b.N {
			for {
				_, p, err := ws.Read(ctx)
				if err != nil {
					return
				}
				var e struct {
					Type string `json:"type"`
					Data int64  `json:"data"`
				}
				if json.Unmarshal(p, &e) == nil && e.Type == "message" {
					lat.add(time.Since(time.Unix(0, e.Data)))
					break
				}
			}
		}
	}()
	publishFlatOut(b, publishers, func(_ int64, data []byte) error {
		return a.Handler.Publish(context.Background(), "e2e", fmt.Append(nil, int64(binary.BigEndian.Uint64(data))))
	})
	lat.report(b)
	ws.CloseNow()
	<-read
}

// benchNode is a Handler on its own broker and connection, served.
func benchNode(b *testing.B, prefix string, opts []pubsub.Option) *pubsubtest.Server {
	br := newBroker(b, benchURL(), prefix)
	return pubsubtest.Start(b, append([]pubsub.Option{pubsub.WithBroker(br)}, opts...)...)
}

// publishFlatOut publishes b.N payloads of 64 bytes from n goroutines, as
// fast as each publish returns, and reports the rate. Each payload starts
// with its publish time (Unix ns, big-endian).
func publishFlatOut(b *testing.B, n int, publish func(i int64, data []byte) error) {
	var next atomic.Int64
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for range n {
		wg.Go(func() {
			for {
				i := next.Add(1)
				if i > int64(b.N) {
					return
				}
				data := binary.BigEndian.AppendUint64(make([]byte, 0, 64), uint64(time.Now().UnixNano()))
				data = append(data, make([]byte, 56)...)
				if err := publish(i, data); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
}

// latencies collects b.N delivery latencies.
type latencies struct {
	mu   sync.Mutex
	d    []time.Duration
	want int
	all  chan struct{} // closed when want arrived
}

func newLatencies(n int) *latencies {
	return &latencies{d: make([]time.Duration, 0, n), want: n, all: make(chan struct{})}
}

func (l *latencies) add(d time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.d = append(l.d, d); len(l.d) == l.want {
		close(l.all)
	}
}

// report waits for every delivery and reports the p50 and p99.
func (l *latencies) report(b *testing.B) {
	select {
	case <-l.all:
	case <-time.After(time.Minute):
		l.mu.Lock()
		got := len(l.d)
		l.mu.Unlock()
		b.Fatalf("only %d of %d messages were delivered", got, l.want)
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
