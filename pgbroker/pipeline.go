package pgbroker

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// position is where a batch left one of its rooms: its epoch, its seq
// before the batch, and the time of the batch's messages.
type position struct {
	epoch string
	base  int64
	at    time.Time
}

// pipelines reports whether a publisher sends its batches' notifications
// on the batch's own connection (see queryPipelined): when the nodes
// listen, and the pool prepares its statements (pgx's default mode; the
// others are for poolers that do not keep prepared statements).
func (b *Broker) pipelines() bool {
	return !b.cfg.pollOnly && b.prepares()
}

// prepares reports whether the pool prepares its statements and keeps
// them (pgx's default mode; the others are for poolers that do not keep
// prepared statements).
func (b *Broker) prepares() bool {
	return b.pool.Config().ConnConfig.DefaultQueryExecMode == pgx.QueryExecModeCacheStatement
}

// queryPipelined publishes a batch with args (publish_batch's, mode
// last) and, in the same round trip, right after the batch's Sync, sends
// the notification of rooms, in a transaction of its own: the server runs
// it once the batch committed (or failed: a notification only wakes), and
// neither this node's notifier nor a second round trip is needed. notified
// is false when the notification failed: the caller hands the rooms to the
// notifier.
//
// With p_mode 0 (lockFree, the batches of rooms nobody holds) it sends
// the function's statement itself rather than calling the function (a
// call costs the server more than a statement), after the function's plan
// settings made for this transaction only (set_config's is_local): the
// host's pool sessions keep their own.
func (b *Broker) queryPipelined(ctx context.Context, args []any, mode int, rooms []string) (got map[string]position, notified bool, err error) {
	conn, err := b.pool.Acquire(ctx)
	if err != nil {
		return nil, false, err
	}
	defer conn.Release()
	plain := mode == lockFree
	var batch, settings, wake pgx.ExtendedQueryBuilder
	var batchSD, settingsSD *pgconn.StatementDescription
	if plain {
		if settingsSD, err = b.prepare(ctx, conn, b.sql.planSettings, &settings, nil); err != nil {
			return nil, false, err
		}
		batchSD, err = b.prepare(ctx, conn, b.sql.publishPlain, &batch, args[:len(args)-1])
	} else {
		batchSD, err = b.prepare(ctx, conn, b.sql.publishBatch, &batch, args)
	}
	if err != nil {
		return nil, false, err
	}
	payloads := notifyPayloads(rooms)
	wakeSD, err := b.prepare(ctx, conn, b.sql.pipelinedWake, &wake, []any{payloads})
	if err != nil {
		return nil, false, err
	}
	pid := conn.Conn().PgConn().PID()
	b.sentOwn(pid, payloads)
	defer func() {
		if !notified {
			b.forgetOwn(pid, payloads)
		}
	}()
	p := conn.Conn().PgConn().StartPipeline(ctx)
	if plain {
		p.SendQueryStatement(settingsSD, settings.ParamValues, settings.ParamFormats, settings.ResultFormats)
	}
	p.SendQueryStatement(batchSD, batch.ParamValues, batch.ParamFormats, batch.ResultFormats)
	p.SendPipelineSync()
	p.SendQueryStatement(wakeSD, wake.ParamValues, wake.ParamFormats, wake.ResultFormats)
	p.SendPipelineSync()
	if err := p.Flush(); err != nil {
		p.Close()
		return nil, false, err
	}
	if plain {
		if err := discardResult(p); err != nil {
			p.Close() // reads up to each Sync: nothing was published
			return nil, false, err
		}
	}
	got, err = b.batchResult(conn, p)
	notified = pipelineStep(p, func(rr *pgconn.ResultReader) error { _, err := rr.Close(); return err }) == nil
	if p.Close() != nil {
		notified = false
	}
	if err != nil {
		return nil, notified, err
	}
	return got, notified, nil
}

// discardResult reads the next query's result, which comes before the
// next Sync, and returns its error.
func discardResult(p *pgconn.Pipeline) error {
	res, err := p.GetResults()
	if err != nil {
		return err
	}
	rr, ok := res.(*pgconn.ResultReader)
	if !ok {
		return fmt.Errorf("pipeline: got %T, want a query's result", res)
	}
	_, err = rr.Close()
	return err
}

// prepare prepares sql on conn (once per connection: pgx keeps it) and
// encodes args for it into qb.
func (b *Broker) prepare(ctx context.Context, conn *pgxpool.Conn, sql string, qb *pgx.ExtendedQueryBuilder, args []any) (*pgconn.StatementDescription, error) {
	sd, err := conn.Conn().Prepare(ctx, sql, sql)
	if err != nil {
		return nil, err
	}
	if err := qb.Build(conn.Conn().TypeMap(), sd, args); err != nil {
		return nil, err
	}
	return sd, nil
}

// batchResult reads publish_batch's rows (or its statement's), one per room it published to,
// and the Sync after them.
func (b *Broker) batchResult(conn *pgxpool.Conn, p *pgconn.Pipeline) (map[string]position, error) {
	got := make(map[string]position)
	m := conn.Conn().TypeMap()
	err := pipelineStep(p, func(rr *pgconn.ResultReader) error {
		fields := rr.FieldDescriptions()
		if len(fields) != 4 {
			rr.Close()
			return fmt.Errorf("publish_batch returned %d columns, want 4", len(fields))
		}
		for rr.NextRow() {
			var (
				room string
				pos  position
			)
			for i, dst := range []any{&room, &pos.epoch, &pos.base, &pos.at} {
				if err := m.Scan(fields[i].DataTypeOID, fields[i].Format, rr.Values()[i], dst); err != nil {
					rr.Close()
					return fmt.Errorf("publish_batch's column %s: %w", strconv.Quote(fields[i].Name), err)
				}
			}
			got[room] = pos
		}
		_, err := rr.Close()
		return err
	})
	return got, err
}

// pipelineStep reads the next query's result with read, then the Sync
// that follows it (an error at the commit comes before it), and returns
// the first error.
func pipelineStep(p *pgconn.Pipeline, read func(*pgconn.ResultReader) error) error {
	res, err := p.GetResults()
	if err == nil {
		if rr, ok := res.(*pgconn.ResultReader); ok {
			err = read(rr)
		} else {
			err = fmt.Errorf("pipeline: got %T, want a query's result", res)
		}
	}
	for {
		res, serr := p.GetResults()
		if _, ok := res.(*pgconn.PipelineSync); ok && serr == nil {
			return err
		}
		if serr == nil {
			serr = fmt.Errorf("pipeline: got %T, want the Sync", res)
		}
		if err == nil {
			err = serr
		}
		var pgErr *pgconn.PgError
		if !errors.As(serr, &pgErr) {
			return err // the connection broke
		}
	}
}

// ownWake is a notification as the listening connection receives it: the
// process id of the session that sent it, and its payload.
type ownWake struct {
	pid     uint32
	payload string
}

// ownWakeTTL bounds how long a notification this node sent is looked for
// on its listening connection; ownWakesMax bounds how many are.
const (
	ownWakeTTL  = 10 * time.Second
	ownWakesMax = 4096
)

// sentOwn records notifications this node is about to send from the
// session pid, after a batch whose rooms it marks for its own reader once
// the batch committed: when they come back to its listening connection,
// reading those rooms again would find nothing new (tookOwn). A foreign
// notification is never taken for one: PostgreSQL delivers a session's
// notifications in its commit order, so another broker's notification
// from the same pooled session with the same payload arrives after this
// one's. A notification that did not go out is forgotten (forgetOwn); one
// that was lost (the listener was reconnecting) expires.
func (b *Broker) sentOwn(pid uint32, payloads []string) {
	now := time.Now()
	b.omu.Lock()
	defer b.omu.Unlock()
	if len(b.own) >= ownWakesMax {
		clear(b.own) // then a few rooms are read twice
	}
	for _, p := range payloads {
		k := ownWake{pid, p}
		b.own[k] = append(b.own[k], now)
	}
}

// forgetOwn undoes sentOwn for notifications that did not go out.
func (b *Broker) forgetOwn(pid uint32, payloads []string) {
	b.omu.Lock()
	defer b.omu.Unlock()
	for _, p := range payloads {
		k := ownWake{pid, p}
		if ts := b.own[k]; len(ts) > 1 {
			b.own[k] = ts[:len(ts)-1]
		} else {
			delete(b.own, k)
		}
	}
}

// tookOwn reports whether the notification the listening connection
// received from the session pid is one this node sent (see sentOwn), and
// no longer looks for it.
func (b *Broker) tookOwn(pid uint32, payload string) bool {
	k := ownWake{pid, payload}
	b.omu.Lock()
	defer b.omu.Unlock()
	ts := b.own[k]
	for len(ts) > 0 && time.Since(ts[0]) > ownWakeTTL {
		ts = ts[1:]
	}
	if len(ts) == 0 {
		delete(b.own, k)
		return false
	}
	if len(ts) == 1 {
		delete(b.own, k)
	} else {
		b.own[k] = ts[1:]
	}
	return true
}

// clearOwn forgets every notification sent, when the listening
// connection (re)connects: those not received are lost.
func (b *Broker) clearOwn() {
	b.omu.Lock()
	clear(b.own)
	b.omu.Unlock()
}
