package redisbroker

import (
	"context"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/redisbroker/internal/redistest"
)

// The publish path against the alternatives the issue named, on a
// redis-server of its own: this broker's batches; one script per message
// through go-redis's AutoPipeline (commands of concurrent goroutines
// pipelined onto shared connections); one script per message on pooled
// connections (the shape before batching). 16 publishers over 100 rooms,
// 128-byte payloads, history 100 messages for 10 minutes. redis-cpu-µs/op
// is used_cpu_sys + used_cpu_user per publish.
//
//	go test -run '^$' -bench PublishPaths -benchtime 20000x .
func BenchmarkPublishPaths(b *testing.B) {
	srv, err := redistest.Start()
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Close()
	c := redis.NewClient(&redis.Options{Addr: srv.Addr})
	defer c.Close()
	ap, err := c.AutoPipeline()
	if err != nil {
		b.Fatal(err)
	}
	defer ap.Close()
	ctx := context.Background()
	data := []byte(strings.Repeat("x", 128))
	h := pubsub.HistoryOptions{Size: 100, TTL: 10 * time.Minute}

	// perMessage runs the publish script for a batch of one message.
	perMessage := func(s redis.Scripter, prefix, lane, room string) error {
		base := prefix + ":{" + room + "}"
		return publishScript.Run(ctx, s, []string{prefix + ":l:" + lane, base + ":m", base + ":h"},
			uuid.NewString(), 3600000, 1, 1, h.Size, ms(h.TTL), 0,
			uuid.NewString(), data).Err()
	}
	run := func(b *testing.B, publish func(lane, room string) error) {
		if err := c.FlushAll(ctx).Err(); err != nil {
			b.Fatal(err)
		}
		cpu0 := serverCPU(b, c)
		var n atomic.Int64
		b.SetParallelism(8) // 16 goroutines on 2 cores
		b.ResetTimer()
		start := time.Now()
		b.RunParallel(func(pb *testing.PB) {
			lane := uuid.NewString()
			for pb.Next() {
				if err := publish(lane, "room-"+strconv.FormatInt(n.Add(1)%100, 10)); err != nil {
					b.Error(err)
					return
				}
			}
		})
		took := time.Since(start)
		b.ReportMetric(float64(b.N)/took.Seconds(), "msgs/s")
		b.ReportMetric(float64((serverCPU(b, c)-cpu0).Microseconds())/float64(b.N), "redis-cpu-µs/op")
	}
	b.Run("batches", func(b *testing.B) {
		br := New(c, WithPrefix("batches"))
		br.Bind(func(pubsub.Message) {})
		defer br.Close()
		o := pubsub.PublishOptions{History: h}
		run(b, func(_, room string) error {
			_, err := br.Publish(ctx, room, data, o)
			return err
		})
	})
	b.Run("autopipeline-per-message", func(b *testing.B) {
		run(b, func(lane, room string) error { return perMessage(ap, "ap", lane, room) })
	})
	b.Run("pooled-per-message", func(b *testing.B) {
		run(b, func(lane, room string) error { return perMessage(c, "pooled", lane, room) })
	})
}

func serverCPU(b *testing.B, c *redis.Client) time.Duration {
	s, err := c.Info(context.Background(), "cpu").Result()
	if err != nil {
		b.Fatal(err)
	}
	var total float64
	for line := range strings.SplitSeq(s, "\n") {
		for _, k := range []string{"used_cpu_sys:", "used_cpu_user:"} {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), k); ok {
				f, _ := strconv.ParseFloat(v, 64)
				total += f
			}
		}
	}
	return time.Duration(total * float64(time.Second))
}

// The publish script's own cost in Redis, without the queue in front of
// it: batches of 1 and of 8 messages, each message in a room of its own
// (of 100, in turn), run by GOMAXPROCS goroutines as Publish runs a batch
// (its arguments, the script, the parsing of the result), history kept
// (100 messages, 10 minutes), 128-byte payloads, every room subscribed by
// a listening broker.
// script-µs/msg is Redis's time in the script per message (INFO
// commandstats, usec of EVALSHA and EVAL), far steadier on a busy machine
// than redis-cpu-µs/msg (used_cpu_sys + used_cpu_user, which also counts
// the event loop and the sockets); see BENCHMARKS.md, issue 16's third
// pass.
//
//	go test -run '^$' -bench PublishScript -benchtime 20000x .
func BenchmarkPublishScript(b *testing.B) {
	srv, err := redistest.Start()
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Close()
	c := redis.NewClient(&redis.Options{Addr: srv.Addr})
	defer c.Close()
	ctx := context.Background()
	br := New(c, WithPrefix("script"))
	br.Bind(func(pubsub.Message) {})
	defer br.Close()
	rooms := make([]string, 100)
	for i := range rooms {
		rooms[i] = "room-" + strconv.Itoa(i)
		if err := br.Subscribe(ctx, rooms[i]); err != nil {
			b.Fatal(err)
		}
	}
	data := []byte(strings.Repeat("x", 128))
	o := pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: 100, TTL: 10 * time.Minute}}
	for _, size := range []int{1, 8} {
		b.Run("batch="+strconv.Itoa(size), func(b *testing.B) {
			if err := c.ConfigResetStat(ctx).Err(); err != nil {
				b.Fatal(err)
			}
			cpu0 := serverCPU(b, c)
			var n atomic.Int64
			b.SetParallelism(1)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				lane := uuid.NewString()
				for pb.Next() {
					batch := make([]*pubReq, size)
					for i := range batch {
						room := rooms[n.Add(1)%int64(len(rooms))]
						batch[i] = &pubReq{ctx: ctx, room: room, data: data, o: o, id: uuid.NewString(), done: make(chan pubDone, 1)}
					}
					br.run(lane, batch)
					for _, q := range batch {
						if d := <-q.done; d.err != nil {
							b.Error(d.err)
							return
						}
					}
				}
			})
			b.StopTimer()
			msgs := float64(b.N * size)
			b.ReportMetric(float64((serverCPU(b, c)-cpu0).Microseconds())/msgs, "redis-cpu-µs/msg")
			b.ReportMetric(scriptMicros(b, c)/msgs, "script-µs/msg")
		})
	}
}

// scriptMicros is Redis's time in scripts (EVALSHA and EVAL) since the
// last CONFIG RESETSTAT, in µs.
func scriptMicros(b *testing.B, c *redis.Client) float64 {
	s, err := c.Info(context.Background(), "commandstats").Result()
	if err != nil {
		b.Fatal(err)
	}
	var total float64
	for line := range strings.SplitSeq(s, "\n") {
		stats, ok := strings.CutPrefix(strings.TrimSpace(line), "cmdstat_evalsha:")
		if !ok {
			stats, ok = strings.CutPrefix(strings.TrimSpace(line), "cmdstat_eval:")
		}
		if !ok {
			continue
		}
		for kv := range strings.SplitSeq(stats, ",") {
			if v, ok := strings.CutPrefix(kv, "usec="); ok {
				f, _ := strconv.ParseFloat(v, 64)
				total += f
			}
		}
	}
	return total
}

// groupByRoom keeps the batch's order within each room and the rooms in
// the order of their first publish, below and above the size where it
// switches to a map.
func TestGroupByRoomKeepsOrder(t *testing.T) {
	for _, rooms := range []int{1, 3, 16, 17, 40} {
		var batch []*pubReq
		for i := range 3 * rooms {
			batch = append(batch, &pubReq{room: strconv.Itoa(i % rooms), id: strconv.Itoa(i)})
		}
		groups := groupByRoom(batch)
		if len(groups) != rooms {
			t.Fatalf("%d rooms: %d groups", rooms, len(groups))
		}
		for r, g := range groups {
			if g.room != strconv.Itoa(r) || len(g.reqs) != 3 {
				t.Fatalf("%d rooms: group %d is room %s with %d publishes", rooms, r, g.room, len(g.reqs))
			}
			for j, q := range g.reqs {
				if want := strconv.Itoa(r + j*rooms); q.id != want {
					t.Fatalf("%d rooms: room %s's publish %d is %s, want %s", rooms, g.room, j, q.id, want)
				}
			}
		}
	}
}

// One batch of several rooms, keyed and unkeyed publishes mixed in a room
// (whose arguments then carry a key ttl per message) and not in another
// (whose arguments carry none): each message gets its room's next seq, a
// key seen before in the batch answers as a duplicate, and the history
// holds what was sequenced, in order.
func TestABatchMixesKeyedAndUnkeyedPublishes(t *testing.T) {
	t.Parallel()
	srv, err := redistest.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	c := redis.NewClient(&redis.Options{Addr: srv.Addr})
	t.Cleanup(func() { c.Close() })
	br := New(c, WithPrefix("mixed"))
	t.Cleanup(func() { br.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	h := pubsub.HistoryOptions{Size: 100, TTL: time.Minute}
	req := func(room, data, key string) *pubReq {
		return &pubReq{ctx: ctx, room: room, data: []byte(data), id: "id-" + data, done: make(chan pubDone, 1),
			o: pubsub.PublishOptions{History: h, Key: key, KeyTTL: time.Minute}}
	}
	batch := []*pubReq{
		req("a", "a1", "k1"), req("b", "b1", ""), req("a", "a2", ""), req("c", "c1", "k2"),
		req("a", "a3", "k1"), req("b", "b2", ""), req("a", "a4", ""), req("c", "c2", "k2"),
	}
	br.run("lane", batch)
	type want struct {
		seq uint64
		dup string // the id of the message the key sequenced
	}
	wants := []want{{1, ""}, {1, ""}, {2, ""}, {1, ""}, {1, "id-a1"}, {2, ""}, {3, ""}, {1, "id-c1"}}
	for i, q := range batch {
		d := <-q.done
		if d.err != nil {
			t.Fatalf("%s: %v", q.data, d.err)
		}
		w := wants[i]
		if d.res.Seq != w.seq || d.res.Duplicate != (w.dup != "") || (w.dup != "" && d.res.ID != w.dup) {
			t.Fatalf("%s: %+v, want seq %d, duplicate of %q", q.data, d.res, w.seq, w.dup)
		}
	}
	for room, want := range map[string][]string{"a": {"a1", "a2", "a4"}, "b": {"b1", "b2"}, "c": {"c1"}} {
		res, err := br.History(ctx, room, pubsub.HistoryQuery{Limit: 10})
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for i, m := range res.Messages {
			if m.Seq != uint64(i+1) {
				t.Fatalf("room %s: history entry %d has seq %d", room, i, m.Seq)
			}
			got = append(got, string(m.Data))
		}
		if !slices.Equal(got, want) {
			t.Fatalf("room %s: history %q, want %q", room, got, want)
		}
	}
}
