package metrics

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/roomcast/pubsub"
)

// roomState is what one room's series say, summed up from its RoomStats.
type roomState struct {
	subscribers              int
	queued, maxQueued, bytes int
	maxLagSeconds            float64
	dropped, slowConsumers   uint64
}

func roomStateOf(st pubsub.RoomStats) roomState {
	s := roomState{subscribers: st.Subscribers, dropped: st.Dropped, slowConsumers: st.SlowConsumers}
	for _, c := range st.Connections {
		s.queued += c.QueueMessages
		s.bytes += c.QueueBytes
		s.maxQueued = max(s.maxQueued, c.QueueMessages)
		s.maxLagSeconds = max(s.maxLagSeconds, c.Lag.Seconds())
	}
	return s
}

// roomMetric is one per-room metric, labelled room.
type roomMetric struct {
	desc  *prometheus.Desc
	typ   prometheus.ValueType
	value func(roomState) float64
}

func roomGauge(n, help string, v func(roomState) float64) roomMetric {
	return roomMetric{prometheus.NewDesc(name(n), help, []string{"room"}, nil), prometheus.GaugeValue, v}
}

func roomCounter(n, help string, v func(roomState) uint64) roomMetric {
	return roomMetric{prometheus.NewDesc(name(n), help, []string{"room"}, nil), prometheus.CounterValue,
		func(s roomState) float64 { return float64(v(s)) }}
}

// roomMetrics are exported for each room the host opted in to; doc.go
// lists them.
var roomMetrics = []roomMetric{
	roomGauge("room_subscribers", "Subscribers of the room on this node.",
		func(s roomState) float64 { return float64(s.subscribers) }),
	roomGauge("room_queued_messages", "Messages waiting in the outbound queues of the room's subscribers, summed; a connection in several rooms counts its whole queue in each.",
		func(s roomState) float64 { return float64(s.queued) }),
	roomGauge("room_max_queued_messages", "Messages waiting in the deepest outbound queue among the room's subscribers.",
		func(s roomState) float64 { return float64(s.maxQueued) }),
	roomGauge("room_queued_bytes", "Payload bytes waiting in the outbound queues of the room's subscribers, summed; a connection in several rooms counts its whole queue in each.",
		func(s roomState) float64 { return float64(s.bytes) }),
	roomGauge("room_max_lag_seconds", "Age of the oldest message waiting in any of the room's subscribers' queues; 0 when nothing waits.",
		func(s roomState) float64 { return s.maxLagSeconds }),
	roomCounter("room_messages_dropped_total", "Messages the room's drop policy discarded, all subscribers on this node together; restarts when the room gets its first subscriber on this node.",
		func(s roomState) uint64 { return s.dropped }),
	roomCounter("room_slow_consumers_total", "Subscribers closed because the room's messages did not fit their queue; restarts when the room gets its first subscriber on this node.",
		func(s roomState) uint64 { return s.slowConsumers }),
}

var omittedDesc = prometheus.NewDesc(name("rooms_omitted"),
	"Rooms on this node that WithRoomFilter matched but the WithMaxRooms cap left without per-room series in this scrape.",
	nil, nil)

// collectRooms sends the per-room series of the rooms the host opted in to.
func (c *Collector) collectRooms(ch chan<- prometheus.Metric) {
	rooms, omitted, err := c.selectRooms()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(omittedDesc, err)
		return
	}
	for _, room := range rooms {
		s := roomStateOf(c.h.RoomStats(room))
		for _, m := range roomMetrics {
			ch <- prometheus.MustNewConstMetric(m.desc, m.typ, m.value(s), room)
		}
	}
	ch <- prometheus.MustNewConstMetric(omittedDesc, prometheus.GaugeValue, float64(omitted))
}

// selectRooms lists the rooms to export: those of WithRooms, then the
// rooms on this node WithRoomFilter matches, in name order, up to the cap;
// omitted counts the matches past it. A panic in the filter is returned as
// an error, so it fails the scrape instead of the process (a registry
// collects on goroutines of its own).
func (c *Collector) selectRooms() (rooms []string, omitted int, err error) {
	rooms = append(rooms, c.cfg.rooms...)
	if c.cfg.filter == nil {
		return rooms, 0, nil
	}
	defer func() {
		if v := recover(); v != nil {
			rooms, omitted, err = nil, 0, fmt.Errorf("metrics: the WithRoomFilter func panicked: %v", v)
		}
	}()
	for _, room := range c.h.Rooms() {
		if c.cfg.named[room] || !c.cfg.filter(room) {
			continue
		}
		if len(rooms) < c.cfg.maxRooms {
			rooms = append(rooms, room)
		} else {
			omitted++
		}
	}
	return rooms, omitted, nil
}
