// Package metrics exports a roomcast Handler's counters as Prometheus
// metrics: connections, messages, slow consumers, refusals, why
// connections closed, and, for the rooms a host opts in to, how each
// room's subscribers keep up. It is its own module, so the core keeps its
// two dependencies.
//
// # Quick start
//
//	ps := pubsub.NewHandler()
//	defer ps.Close()
//	if _, err := metrics.Register(prometheus.DefaultRegisterer, ps); err != nil {
//		log.Fatal(err)
//	}
//	mux := http.NewServeMux()
//	mux.Handle("/ws", ps)
//	mux.Handle("GET /metrics", promhttp.Handler()) // beside the Go runtime's metrics
//
// A scrape reads the Handler (Handler.Stats, Handler.Closed and, per
// room, Handler.RoomStats): the Collector starts no goroutine and adds
// nothing to a message's path. An app with its own registry registers
// NewCollector(ps) there instead; several Handlers in one registry are
// told apart with prometheus.WrapRegistererWith (see Register).
// dashboard.json, beside this file, is a Grafana dashboard of these
// metrics: import it and pick the Prometheus data source. Its tests keep
// it true: every metric and label it queries is in a real scrape, every
// metric has a panel, and every query answers on a real Prometheus.
//
// # Metrics
//
// Node-wide, always exported, one series each unless labelled:
//
//	roomcast_connections                   gauge    open connections (WebSockets and event streams)
//	roomcast_rooms                         gauge    rooms with a subscriber on this node
//	roomcast_connections_accepted_total    counter  connections accepted
//	roomcast_connections_refused_total     counter  requests refused before a connection was made (any status)
//	roomcast_connections_closed_total      counter  connections ended, labels code and reason
//	roomcast_messages_received_total       counter  raw frames and protocol requests from clients (heartbeats aside)
//	roomcast_messages_sent_total           counter  room and direct messages written to clients
//	roomcast_messages_published_total      counter  messages published into rooms (server and clients)
//	roomcast_messages_deduplicated_total   counter  publishes whose idempotency key was sequenced already
//	roomcast_messages_dropped_total        counter  messages a drop-oldest or keep-latest room discarded
//	roomcast_messages_rate_limited_total   counter  client messages refused by the rate limit
//	roomcast_slow_consumers_total          counter  connections closed as slow consumers (4002)
//	roomcast_hook_panics_total             counter  panics recovered from the host's hooks
//
// Per room, label room, only for the rooms named by WithRooms or matched by
// WithRoomFilter:
//
//	roomcast_room_subscribers              gauge    subscribers on this node
//	roomcast_room_queued_messages          gauge    messages waiting in the subscribers' queues, summed
//	roomcast_room_max_queued_messages      gauge    the deepest subscriber queue, in messages
//	roomcast_room_queued_bytes             gauge    payload bytes waiting in the subscribers' queues, summed
//	roomcast_room_max_lag_seconds          gauge    age of the oldest waiting message of any subscriber
//	roomcast_room_messages_dropped_total   counter  messages the room's drop policy discarded
//	roomcast_room_slow_consumers_total     counter  subscribers closed because the room's messages did not fit
//	roomcast_rooms_omitted                 gauge    rooms WithRoomFilter matched past WithMaxRooms (no label)
//
// A connection's queue is its own, shared by all its rooms: one subscribed
// to several opted-in rooms counts its whole queue in each. A room's
// counters start when it gets its first subscriber on this node, so they
// restart after it empties (rate and increase handle that).
//
// # Labels and cardinality
//
// No series is labelled by connection, user or address. The labels, and
// all their values:
//
//   - code, reason (roomcast_connections_closed_total): a fixed set, all of
//     it exported from the first scrape, zeros included. code is one of
//     roomcast's close codes (1000, 1001, 1003, 1006, 1007, 1008, 1009,
//     1011, 1013, 4001 to 4006; PROTOCOL.md section 4), one of the other
//     RFC 6455 codes a peer can send (1002, 1005: a close frame with no
//     code, as a browser's ws.close() sends, 1010, 1012, 1014), or "other"
//     for any code outside them, which a client may pick freely from 3000
//     to 4999. reason is that code's name in snake_case ("slow_consumer",
//     "disconnected"), never the free-text close reason. 21 series.
//   - room (roomcast_room_*): only rooms the host chose. WithRooms names
//     them (exported on every scrape, zero while empty); WithRoomFilter
//     matches rooms that have a subscriber on this node. Together they
//     export at most WithMaxRooms rooms per scrape (default 100, hard cap
//     1000): seven series each, plus roomcast_rooms_omitted. The cap bounds
//     one scrape; rooms that come and go still make new series over time,
//     so filter on rooms whose names are stable.
//
// In all, a Handler exports 33 series, plus 7 per opted-in room and one
// for the count of rooms omitted.
//
// # OpenTelemetry
//
// OpenTelemetry pipelines need no second package. An OpenTelemetry
// Collector scrapes this endpoint with its prometheus receiver. An app
// that pushes OTLP instead reads a registry holding this Collector through
// the OpenTelemetry Go Prometheus bridge, which turns the counters into
// monotonic sums and the gauges into gauges, labels kept:
//
//	reg := prometheus.NewRegistry()
//	reg.MustRegister(metrics.NewCollector(ps))
//	producer := otelprom.NewMetricProducer(otelprom.WithGatherer(reg)) // go.opentelemetry.io/contrib/bridges/prometheus
//	reader := sdkmetric.NewPeriodicReader(exporter, sdkmetric.WithProducer(producer))
//	otel.SetMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader)))
//
// The names stay Prometheus names (roomcast_messages_sent_total), which
// is what a Prometheus or Grafana behind the pipeline queries anyway.
package metrics
