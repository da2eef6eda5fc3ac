package pgbroker

import (
	"strconv"
	"strings"
)

// NotifyPayloads exports notifyPayloads to the tests.
var NotifyPayloads = notifyPayloads

// BreakPipelinedWake makes the notification a batch sends in its own
// round trip fail (division by zero), and no other.
func BreakPipelinedWake(b *Broker) {
	b.sql.pipelinedWake = `SELECT 1 / 0 FROM unnest($1::text[])`
}

// HoldPipelinedWake makes the notification a batch sends in its own round
// trip wait, before notifying, for the transaction-level advisory lock key
// (which the test holds), and no other statement.
func HoldPipelinedWake(b *Broker, key int64) {
	b.sql.pipelinedWake = `SELECT pg_advisory_xact_lock(` + strconv.FormatInt(key, 10) + `), ` + strings.TrimPrefix(b.sql.pipelinedWake, "SELECT ")
}
