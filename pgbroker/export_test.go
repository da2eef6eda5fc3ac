package pgbroker

// NotifyPayloads exports notifyPayloads to the tests.
var NotifyPayloads = notifyPayloads

// BreakPipelinedWake makes the notification a batch sends in its own
// round trip fail (division by zero), and no other.
func BreakPipelinedWake(b *Broker) {
	b.sql.pipelinedWake = `SELECT 1 / 0 FROM unnest($1::text[])`
}
