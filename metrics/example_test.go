package metrics_test

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"time"

	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/metrics"
)

// Mount /metrics beside /ws. An app on the default registry needs only
// metrics.Register(prometheus.DefaultRegisterer, ps) and
// promhttp.Handler(); this one keeps a registry of its own.
func Example() {
	ps := pubsub.NewHandler()
	defer ps.Close()

	reg := prometheus.NewRegistry()
	if _, err := metrics.Register(reg, ps, metrics.WithRooms("lobby")); err != nil {
		fmt.Println("register:", err)
		return
	}
	mux := http.NewServeMux()
	mux.Handle("/ws", ps)
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	srv := httptest.NewServer(mux)
	defer srv.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http")+"/ws?room=lobby", nil)
	if err != nil {
		fmt.Println("dial:", err)
		return
	}
	defer c.CloseNow()
	if err := ps.Publish(ctx, "lobby", []byte("hello")); err != nil {
		fmt.Println("publish:", err)
		return
	}
	if _, _, err := c.Read(ctx); err != nil { // the message is written: counted as sent
		fmt.Println("read:", err)
		return
	}

	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		fmt.Println("scrape:", err)
		return
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		switch line := sc.Text(); {
		case strings.HasPrefix(line, "roomcast_messages_published_total "),
			strings.HasPrefix(line, "roomcast_room_subscribers"),
			strings.HasPrefix(line, `roomcast_connections_closed_total{code="4002"`):
			fmt.Println(line)
		}
	}
	// Output:
	// roomcast_connections_closed_total{code="4002",reason="slow_consumer"} 0
	// roomcast_messages_published_total 1
	// roomcast_room_subscribers{room="lobby"} 1
}
