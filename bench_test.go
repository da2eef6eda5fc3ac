package pubsub_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub"
)

// BenchmarkPublishRawRoom measures a server-side publish end to end: one
// Handler.Publish of a 128-byte JSON payload into a room of n raw-mode
// subscribers on real loopback WebSocket connections, until every
// subscriber has read it. ns/delivery is the time per message per
// subscriber. The subscribers' reads run in this process, so the numbers
// (and allocs/op) include the client side. Publishes go out in windows of
// 64 messages, well under the queue bound, so no subscriber is ever a
// slow consumer. The 10,000-subscriber case without sockets is
// BenchmarkFanOut in bench_internal_test.go.
//
//	go test -run '^$' -bench PublishRawRoom -benchmem .
func BenchmarkPublishRawRoom(b *testing.B) {
	for _, n := range []int{1, 100} {
		b.Run(fmt.Sprintf("subscribers=%d", n), func(b *testing.B) { benchPublishRaw(b, n) })
	}
}

func benchPublishRaw(b *testing.B, n int) {
	h := quietHandler()
	srv := httptest.NewServer(h)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	var readers sync.WaitGroup
	defer func() {
		cancel()
		h.Close()
		srv.Close()
		readers.Wait()
	}()

	const window = 64
	total := int64(b.N) * int64(n)
	var received atomic.Int64
	// A reader that brings received to the end of a window (or of the
	// run) signals it; exactly one Add returns each such value.
	windows := make(chan struct{}, b.N/window+2)
	url := "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws?room=bench"
	for range n {
		c, _, err := websocket.Dial(ctx, url, nil)
		if err != nil {
			b.Fatal(err)
		}
		readers.Go(func() {
			defer c.CloseNow()
			for {
				_, r, err := c.Reader(ctx)
				if err != nil {
					return
				}
				if _, err := io.Copy(io.Discard, r); err != nil {
					return
				}
				if v := received.Add(1); v%(window*int64(n)) == 0 || v == total {
					windows <- struct{}{}
				}
			}
		})
	}
	// A raw client joins its room before the upgrade completes.
	if got := len(h.Connections("bench")); got != n {
		b.Fatalf("%d subscribers in the room, want %d", got, n)
	}
	payload := []byte(`{"type":"tick","seq":123456,"at":1732190000123,"pad":"` + strings.Repeat("x", 128-60) + `"}`)

	b.ReportAllocs()
	b.SetBytes(int64(len(payload)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := h.Publish(ctx, "bench", payload); err != nil {
			b.Fatal(err)
		}
		if (i+1)%window == 0 || i+1 == b.N {
			select {
			case <-windows:
			case <-ctx.Done():
				b.Fatalf("subscribers got %d of %d deliveries", received.Load(), int64(i+1)*int64(n))
			}
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(total), "ns/delivery")
	if st := h.Stats(); st.SlowConsumers != 0 {
		b.Fatalf("%d slow consumers: the windows overflowed a queue", st.SlowConsumers)
	}
}

// BenchmarkClientMessages measures the inbound path: raw-mode clients on
// real loopback connections send 128-byte messages, which the server reads
// and hands to a message hook. ns/op is per message received, the clients'
// writes in the same process included. With one client each message finds
// the reader idle (the worst case for waiting on readability first); with
// 100, reads overlap.
//
//	go test -run '^$' -bench ClientMessages -benchmem .
func BenchmarkClientMessages(b *testing.B) {
	for _, n := range []int{1, 100} {
		b.Run(fmt.Sprintf("clients=%d", n), func(b *testing.B) { benchClientMessages(b, n) })
	}
}

func benchClientMessages(b *testing.B, n int) {
	var got atomic.Int64
	done := make(chan struct{})
	total := int64(b.N)
	h := quietHandler(
		pubsub.WithRateLimit(1e9, 1<<30),
		pubsub.WithOnMessage(func(context.Context, *pubsub.ClientMessage) error {
			if got.Add(1) == total {
				close(done)
			}
			return nil
		}))
	srv := httptest.NewServer(h)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer func() {
		cancel()
		h.Close()
		srv.Close()
	}()
	url := "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws"
	conns := make([]*websocket.Conn, n)
	for i := range conns {
		c, _, err := websocket.Dial(ctx, url, nil)
		if err != nil {
			b.Fatal(err)
		}
		defer c.CloseNow()
		conns[i] = c
	}
	payload := []byte(strings.Repeat("m", 128))
	b.ReportAllocs()
	b.SetBytes(int64(len(payload)))
	b.ResetTimer()
	var senders sync.WaitGroup
	for i, c := range conns {
		count := b.N / n
		if i < b.N%n {
			count++
		}
		senders.Go(func() {
			for range count {
				if err := c.Write(ctx, websocket.MessageText, payload); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	senders.Wait()
	select {
	case <-done:
	case <-ctx.Done():
		b.Fatalf("the server got %d of %d messages", got.Load(), total)
	}
}

// BenchmarkMemoryBrokerPublish measures what an idempotency key costs the
// in-process broker: a publish of 128 bytes into one of 100 rooms keeping
// 100 messages, with no key and with a fresh key each time (a client
// publish always carries one).
//
//	go test -run '^$' -bench MemoryBrokerPublish -benchmem .
func BenchmarkMemoryBrokerPublish(b *testing.B) {
	data := []byte(strings.Repeat("x", 128))
	for _, keyed := range []bool{false, true} {
		name := "no key"
		if keyed {
			name = "key"
		}
		b.Run(name, func(b *testing.B) {
			br := pubsub.NewMemoryBroker()
			defer br.Close()
			ctx := context.Background()
			o := pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: 100, TTL: time.Hour}, KeyTTL: 5 * time.Minute}
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				if keyed {
					o.Key = "k" + strconv.Itoa(i)
				}
				if _, err := br.Publish(ctx, "room"+strconv.Itoa(i%100), data, o); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkUpgrade measures the server's side of a raw-mode connect: the
// request checks, admission, the room's join, coder/websocket's Accept,
// the 101 and the hand-off to the reader, over real loopback TCP. The
// client is a bare socket that writes one prepared request and reads the
// 101, so nearly all of ns/op and allocs/op is the server's (with
// net/http's own). Connections stay open, in rooms of 5 as in the
// benchmarks module's scenario E, and are closed (untimed) every 500.
//
//	go test -run '^$' -bench Upgrade -benchmem .
func BenchmarkUpgrade(b *testing.B) {
	h := quietHandler()
	srv := httptest.NewServer(h)
	defer func() {
		h.Close()
		srv.Close()
	}()
	addr := strings.TrimPrefix(srv.URL, "http://")
	reqs := make([][]byte, 100)
	for i := range reqs {
		reqs[i] = []byte("GET /ws?room=r" + strconv.Itoa(i) + " HTTP/1.1\r\nHost: " + addr +
			"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
	}
	const batch = 500
	open := make([]net.Conn, 0, batch)
	closeAll := func() {
		for _, c := range open {
			c.Close()
		}
		open = open[:0]
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		for h.Stats().Connections > 0 {
			select {
			case <-ctx.Done():
				b.Fatalf("%d connections still open", h.Stats().Connections)
			case <-time.After(time.Millisecond):
			}
		}
	}
	buf := make([]byte, 512)
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		open = append(open, c)
		if _, err := c.Write(reqs[(i/5)%len(reqs)]); err != nil {
			b.Fatal(err)
		}
		n := 0
		for !bytes.HasSuffix(buf[:n], []byte("\r\n\r\n")) {
			m, err := c.Read(buf[n:])
			if err != nil {
				b.Fatal(err)
			}
			n += m
		}
		if !bytes.HasPrefix(buf[:n], []byte("HTTP/1.1 101 ")) {
			b.Fatalf("answer: %q", buf[:n])
		}
		if len(open) == batch {
			b.StopTimer()
			closeAll()
			b.StartTimer()
		}
	}
	b.StopTimer()
	closeAll()
}
