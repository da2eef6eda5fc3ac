package pgbroker

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
)

// sweepLimit bounds the rooms (and, times ten, the keys and events) one
// sweep call handles; a sweep that reaches it runs again at once, up to
// sweepRounds times per tick.
const (
	sweepLimit  = 200
	sweepRounds = 10
)

// keepLoop is the broker's housekeeping goroutine: it refreshes this
// node's presence entries every third of the presence TTL, keeps the
// rooms it is subscribed to alive every quarter of the room TTL, and runs
// the sweep every sweep interval.
func (b *Broker) keepLoop() {
	refresh := time.NewTicker(b.cfg.presenceTTL / 3)
	defer refresh.Stop()
	touch := time.NewTicker(b.cfg.roomTTL / 4)
	defer touch.Stop()
	sweep := time.NewTicker(b.cfg.sweep)
	defer sweep.Stop()
	var refreshing, touching, sweeping failure
	for {
		select {
		case <-b.ctx.Done():
			return
		case <-refresh.C:
			ctx, cancel := context.WithTimeout(b.ctx, b.cfg.presenceTTL/3)
			refreshing.report(b, b.refresh(ctx), "presence refresh failed; this node's members expire if it keeps failing")
			cancel()
		case <-touch.C:
			ctx, cancel := context.WithTimeout(b.ctx, b.timeout())
			touching.report(b, b.touch(ctx), "keeping this node's rooms alive failed")
			cancel()
		case <-sweep.C:
			ctx, cancel := context.WithTimeout(b.ctx, b.timeout())
			_, err := b.Sweep(ctx)
			sweeping.report(b, err, "the sweep failed")
			cancel()
		}
	}
}

// failure logs the first failure of a streak at Error, and its end.
type failure struct{ on bool }

func (f *failure) report(b *Broker, err error, msg string) {
	switch {
	case err != nil && !f.on && b.ctx.Err() == nil:
		b.log.Error("pgbroker: "+msg, "err", err)
		f.on = true
	case err == nil && f.on:
		b.log.Info("pgbroker: works again: " + msg)
		f.on = false
	}
}

// touch marks the rooms this node is subscribed to as in use, so the
// sweep does not reclaim an idle room that has subscribers.
func (b *Broker) touch(ctx context.Context) error {
	b.mu.Lock()
	rooms := make([]string, 0, len(b.subs))
	for room := range b.subs {
		rooms = append(rooms, room)
	}
	b.mu.Unlock()
	for len(rooms) > 0 {
		n := min(len(rooms), refreshBatch)
		if _, err := b.pool.Exec(ctx, b.sql.touch, rooms[:n]); err != nil {
			return err
		}
		rooms = rooms[n:]
	}
	return nil
}

// SweepStats is what one sweep did.
type SweepStats struct {
	Rooms     int   // rooms looked at
	Trimmed   int64 // messages deleted (outside their history bounds and the delivery window)
	Reclaimed int   // idle rooms deleted
	Keys      int64 // expired idempotency keys deleted
	Events    int64 // presence events deleted (older than the delivery window)
	Expired   int   // rooms whose expired presence entries were removed
}

// Sweep runs the cluster's housekeeping now, as every node does each
// WithSweepInterval, and returns what it did; it returns at once, having
// done nothing, while another node sweeps.
func (b *Broker) Sweep(ctx context.Context) (SweepStats, error) {
	var total SweepStats
	for range sweepRounds {
		var s SweepStats
		var rooms, reclaimed, expired int32
		err := b.pool.QueryRow(ctx, b.sql.sweep, us(b.cfg.window), us(b.cfg.roomTTL), sweepLimit).
			Scan(&rooms, &s.Trimmed, &reclaimed, &s.Keys, &s.Events, &expired)
		if err != nil {
			if errors.Is(err, pgx.ErrNoRows) {
				return total, nil // another node is sweeping
			}
			return total, err
		}
		total.Rooms += int(rooms)
		total.Trimmed += s.Trimmed
		total.Reclaimed += int(reclaimed)
		total.Keys += s.Keys
		total.Events += s.Events
		total.Expired += int(expired)
		if rooms < sweepLimit && s.Keys < 10*sweepLimit && s.Events < 10*sweepLimit && expired < sweepLimit {
			break
		}
	}
	return total, nil
}
