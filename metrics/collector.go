package metrics

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/roomcast/pubsub"
)

// Collector is a prometheus.Collector that reads a Handler's counters when
// it is scraped. Its connections are all of the Handler's: WebSockets, raw
// and protocol mode, and event streams. It starts no goroutine and costs nothing per message: the
// Handler counts anyway, and a scrape reads its Stats, Closed and, for the
// rooms the host opted in to, RoomStats. It is safe for concurrent scrapes.
type Collector struct {
	h   *pubsub.Handler
	cfg config
}

var _ prometheus.Collector = (*Collector)(nil)

// NewCollector returns a Collector of h. It panics with a "metrics: "
// message when h is nil or an option is out of range.
func NewCollector(h *pubsub.Handler, opts ...Option) *Collector {
	if h == nil {
		panic("metrics: NewCollector: nil Handler")
	}
	return &Collector{h: h, cfg: newConfig(opts)}
}

// Register registers a new Collector of h with reg, and returns it (to
// Unregister it later). With prometheus.DefaultRegisterer, promhttp.Handler
// serves it beside the Go runtime's metrics. To serve several Handlers from
// one registry, tell them apart with a constant label:
//
//	reg := prometheus.WrapRegistererWith(prometheus.Labels{"handler": "chat"}, prometheus.DefaultRegisterer)
//	metrics.Register(reg, chat)
func Register(reg prometheus.Registerer, h *pubsub.Handler, opts ...Option) (*Collector, error) {
	c := NewCollector(h, opts...)
	if err := reg.Register(c); err != nil {
		return nil, fmt.Errorf("metrics: register: %w", err)
	}
	return c, nil
}

// Describe sends the description of every metric the Collector can
// export.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range nodeMetrics {
		ch <- m.desc
	}
	ch <- closedDesc
	for _, m := range roomMetrics {
		ch <- m.desc
	}
	ch <- omittedDesc
}

// Collect reads the Handler and sends its metrics.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	st := c.h.Stats()
	for _, m := range nodeMetrics {
		ch <- prometheus.MustNewConstMetric(m.desc, m.typ, m.value(st))
	}
	for i, n := range closeCounts(c.h.Closed()) {
		l := closeLabels[i]
		ch <- prometheus.MustNewConstMetric(closedDesc, prometheus.CounterValue, float64(n), l.code, l.reason)
	}
	if c.cfg.roomsOn() {
		c.collectRooms(ch)
	}
}

func name(s string) string { return "roomcast_" + s }

// nodeMetric is one metric of the Handler's Stats.
type nodeMetric struct {
	desc  *prometheus.Desc
	typ   prometheus.ValueType
	value func(pubsub.Stats) float64
}

func gauge(n, help string, v func(pubsub.Stats) int) nodeMetric {
	return nodeMetric{prometheus.NewDesc(name(n), help, nil, nil), prometheus.GaugeValue,
		func(s pubsub.Stats) float64 { return float64(v(s)) }}
}

func counter(n, help string, v func(pubsub.Stats) uint64) nodeMetric {
	return nodeMetric{prometheus.NewDesc(name(n), help, nil, nil), prometheus.CounterValue,
		func(s pubsub.Stats) float64 { return float64(v(s)) }}
}

// nodeMetrics are the node-wide metrics, one series each; doc.go lists them.
var nodeMetrics = []nodeMetric{
	gauge("connections", "Connections open on this node: WebSockets and event streams.",
		func(s pubsub.Stats) int { return s.Connections }),
	gauge("rooms", "Rooms with at least one subscriber on this node.",
		func(s pubsub.Stats) int { return s.Rooms }),
	counter("connections_accepted_total", "Connections accepted: WebSocket upgrades and event streams.",
		func(s pubsub.Stats) uint64 { return s.Accepted }),
	counter("connections_refused_total", "Requests to the endpoint refused before a connection was made: not a WebSocket or event stream request, origin, authentication, room, connection limits, shutdown.",
		func(s pubsub.Stats) uint64 { return s.Refused }),
	counter("messages_received_total", "Messages received from clients: raw-mode frames and protocol-mode requests (subscribe, publish...), heartbeats aside.",
		func(s pubsub.Stats) uint64 { return s.MessagesIn }),
	counter("messages_sent_total", "Room and direct messages written to clients.",
		func(s pubsub.Stats) uint64 { return s.MessagesOut }),
	counter("messages_published_total", "Messages published into rooms, by the server and by clients.",
		func(s pubsub.Stats) uint64 { return s.Published }),
	counter("messages_deduplicated_total", "Publishes not published again because their idempotency key was sequenced already.",
		func(s pubsub.Stats) uint64 { return s.Duplicates }),
	counter("messages_dropped_total", "Messages a drop-oldest or keep-latest room discarded for a subscriber that could not keep up.",
		func(s pubsub.Stats) uint64 { return s.Dropped }),
	counter("messages_rate_limited_total", "Client messages refused by the rate limit.",
		func(s pubsub.Stats) uint64 { return s.RateLimited }),
	counter("slow_consumers_total", "Connections closed as slow consumers (4002): their queue overflowed or a write timed out.",
		func(s pubsub.Stats) uint64 { return s.SlowConsumers }),
	counter("hook_panics_total", "Panics recovered from the host's hooks.",
		func(s pubsub.Stats) uint64 { return s.HookPanics }),
}

var closedDesc = prometheus.NewDesc(name("connections_closed_total"),
	"Connections ended, by close code: the server's, or a WebSocket peer's when it closed first (1006 when lost without one, as a dropped event stream is). "+
		`Codes outside roomcast's and RFC 6455's are counted as code="other"; reason is the code's name.`,
	[]string{"code", "reason"}, nil)
