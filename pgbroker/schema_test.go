package pgbroker_test

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/pgbroker"
	"github.com/roomcast/pubsub/pubsubtest"
)

var update = flag.Bool("update", false, "rewrite schema.sql from SchemaSQL")

// schema.sql, the SQL shipped for teams that apply DDL themselves, is
// exactly what New installs; and a database set up by running it has the
// very catalog New makes.
func TestShippedSchemaSQLIsWhatTheBrokerInstalls(t *testing.T) {
	t.Parallel()
	want := pgbroker.SchemaSQL(pgbroker.DefaultSchema)
	if *update {
		if err := os.WriteFile("schema.sql", []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	shipped, err := os.ReadFile("schema.sql")
	if err != nil {
		t.Fatal(err)
	}
	if string(shipped) != want {
		t.Fatal("schema.sql differs from SchemaSQL(DefaultSchema): run go test -run TestShippedSchemaSQL -update .")
	}

	ctx := pubsubtest.Context(t)
	byHand, byBroker := newDatabase(t), newDatabase(t)
	conn, err := pgx.Connect(ctx, shared.DSNFor(byHand))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, string(shipped)); err != nil { // as psql -f would
		t.Fatal(err)
	}
	if _, err := pgbroker.New(ctx, newPool(t, shared.DSNFor(byBroker))); err != nil {
		t.Fatal(err)
	}
	a, b := catalog(t, shared.DSNFor(byHand)), catalog(t, shared.DSNFor(byBroker))
	if a != b {
		t.Fatalf("the catalog set up by schema.sql differs from New's:\n--- schema.sql\n%s\n--- New\n%s", a, b)
	}
	if !strings.Contains(a, "table rooms") || !strings.Contains(a, "function publish") {
		t.Fatalf("the catalog dump misses the schema:\n%s", a)
	}
	// Running it again is harmless.
	if _, err := conn.Exec(ctx, string(shipped)); err != nil {
		t.Fatal(err)
	}
	if again := catalog(t, shared.DSNFor(byHand)); again != a {
		t.Fatal("running schema.sql twice changed the catalog")
	}
}

// newDatabase creates an empty database, dropped at cleanup.
func newDatabase(t *testing.T) string {
	t.Helper()
	name := "db_" + uniqueSchema()
	admin := newPool(t, shared.DSN)
	if _, err := admin.Exec(pubsubtest.Context(t), "CREATE DATABASE "+name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		admin.Exec(ctx, "DROP DATABASE "+name+" WITH (FORCE)")
	})
	return name
}

// catalog describes the roomcast schema of the database at dsn: every
// table's columns, constraints, indexes and options, every function's and
// view's definition, the version rows.
func catalog(t *testing.T, dsn string) string {
	t.Helper()
	conn, err := pgx.Connect(pubsubtest.Context(t), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var b strings.Builder
	for _, q := range []string{
		`SELECT 'table ' || c.relname || ' ' || coalesce(array_to_string(c.reloptions, ','), '') FROM pg_class c
		 WHERE c.relnamespace = 'roomcast'::regnamespace AND c.relkind IN ('r', 'v') ORDER BY 1`,
		`SELECT table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable || ' ' || coalesce(column_default, '')
		   || ' ' || is_identity FROM information_schema.columns WHERE table_schema = 'roomcast' ORDER BY table_name, ordinal_position`,
		`SELECT conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint
		 WHERE connamespace = 'roomcast'::regnamespace ORDER BY 1`,
		`SELECT indexname || ' ' || indexdef FROM pg_indexes WHERE schemaname = 'roomcast' ORDER BY 1`,
		`SELECT 'function ' || p.proname || ' ' || pg_get_functiondef(p.oid) FROM pg_proc p
		 WHERE p.pronamespace = 'roomcast'::regnamespace ORDER BY p.proname`,
		`SELECT 'view ' || viewname || ' ' || definition FROM pg_views WHERE schemaname = 'roomcast' ORDER BY 1`,
		`SELECT 'trigger ' || t.tgname || ' ' || pg_get_triggerdef(t.oid) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
		 WHERE c.relnamespace = 'roomcast'::regnamespace AND NOT t.tgisinternal ORDER BY 1`,
		`SELECT 'version ' || version FROM roomcast.schema_version ORDER BY 1`,
	} {
		rows, err := conn.Query(pubsubtest.Context(t), q)
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			var line string
			if err := rows.Scan(&line); err != nil {
				t.Fatal(err)
			}
			b.WriteString(line + "\n")
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
	}
	return b.String()
}

// A database whose schema is at version 1 or 2 (testdata/schema_v1.sql,
// schema_v2.sql, as those versions shipped) is upgraded by New in place to
// the very catalog a fresh install has, its messages kept, and the
// upgraded node reads them.
func TestNewUpgradesVersion1InPlace(t *testing.T) {
	t.Parallel()
	for _, v := range []int{1, 2} {
		t.Run(fmt.Sprint("version ", v), func(t *testing.T) {
			t.Parallel()
			upgradeInPlace(t, v)
		})
	}
}

func upgradeInPlace(t *testing.T, v int) {
	ctx := pubsubtest.Context(t)
	sql, err := os.ReadFile(fmt.Sprintf("testdata/schema_v%d.sql", v))
	if err != nil {
		t.Fatal(err)
	}
	old, fresh := newDatabase(t), newDatabase(t)
	oldPool := newPool(t, shared.DSNFor(old))
	if _, err := oldPool.Exec(ctx, string(sql)); err != nil {
		t.Fatal(err)
	}
	if _, err := oldPool.Exec(ctx, `SELECT count(*) FROM roomcast.publish(ARRAY['lobby', 'lobby'], ARRAY['\x01', '\x02']::bytea[],
		ARRAY['', ''], ARRAY[1, 1]::bigint[], ARRAY[10, 10], ARRAY[0, 0]::bigint[], ARRAY[false, false], 1000000, 2, false)`); err != nil {
		t.Fatal(err)
	}
	b, err := pgbroker.New(ctx, oldPool)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pgbroker.New(ctx, newPool(t, shared.DSNFor(fresh))); err != nil {
		t.Fatal(err)
	}
	upgraded, want := catalog(t, shared.DSNFor(old)), catalog(t, shared.DSNFor(fresh))
	was, is := fmt.Sprintf("version %d\n", v), fmt.Sprintf("version %d\n", pgbroker.SchemaVersion)
	if !strings.Contains(upgraded, was+is) {
		t.Fatalf("the upgraded schema's versions:\n%s", upgraded)
	}
	if strings.Replace(upgraded, was, "", 1) != want {
		t.Fatalf("the schema upgraded from version %d differs from a fresh install:\n--- upgraded\n%s\n--- fresh\n%s", v, upgraded, want)
	}
	h, err := b.History(ctx, "lobby", pubsub.HistoryQuery{Limit: 10})
	if err != nil || len(h.Messages) != 2 || h.Messages[1].Seq != 2 {
		t.Fatalf("the history kept across the upgrade: %+v, %v", h, err)
	}
	got := make(chan pubsub.Message, 10)
	b.Bind(func(m pubsub.Message) { got <- m })
	t.Cleanup(func() { b.Close() })
	if err := b.Subscribe(ctx, "lobby"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Publish(ctx, "lobby", []byte("after"), pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: 10}}); err != nil {
		t.Fatal(err)
	}
	m := pubsubtest.Receive(t, got, "the message published after the upgrade")
	if m.Seq != 3 || string(m.Data) != "after" {
		t.Fatalf("delivered after the upgrade: %+v", m)
	}
}

// Deleting a room's row (by hand: the broker's sweep deletes only rooms
// with no messages) deletes its messages, as the foreign key's ON DELETE
// CASCADE of version 1 did; other rooms' messages stay.
func TestDeletingARoomDeletesItsMessages(t *testing.T) {
	t.Parallel()
	ctx := pubsubtest.Context(t)
	s := uniqueSchema()
	pool := newPool(t, shared.DSN)
	b, err := pgbroker.New(ctx, pool, pgbroker.WithSchema(s))
	if err != nil {
		t.Fatal(err)
	}
	h := pubsub.PublishOptions{History: pubsub.HistoryOptions{Size: 10}}
	for _, room := range []string{"a", "a", "b", "c"} {
		if _, err := b.Publish(ctx, room, []byte("x"), h); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := pool.Exec(ctx, `DELETE FROM `+s+`.rooms WHERE name IN ('a', 'b')`); err != nil {
		t.Fatal(err)
	}
	var left []string
	rows, err := pool.Query(ctx, `SELECT coalesce(r.name, '(none)') FROM `+s+`.messages m LEFT JOIN `+s+`.rooms r ON r.id = m.room_id ORDER BY 1`)
	if err != nil {
		t.Fatal(err)
	}
	left, err = pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil || !slices.Equal(left, []string{"c"}) {
		t.Fatalf("messages left after deleting rooms a and b: %v, %v; want [c]", left, err)
	}
}

// Nodes starting at once install the schema once, under the advisory
// lock, and all start.
func TestNodesStartingAtOnceInstallTheSchemaOnce(t *testing.T) {
	t.Parallel()
	s := uniqueSchema()
	pool := newPool(t, shared.DSN, func(c *pgxpool.Config) { c.MaxConns = 16 })
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() {
			_, err := pgbroker.New(pubsubtest.Context(t), pool, pgbroker.WithSchema(s))
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	var n int
	if err := pool.QueryRow(pubsubtest.Context(t), `SELECT count(*) FROM `+s+`.schema_version`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("%d version rows, %v; want 1", n, err)
	}
}

// WithoutSchemaInstall only checks the version: a missing schema and a
// newer one are errors; once the SQL is applied the broker starts.
func TestWithoutSchemaInstallChecksTheVersion(t *testing.T) {
	t.Parallel()
	s := uniqueSchema()
	pool := newPool(t, shared.DSN)
	ctx := pubsubtest.Context(t)
	if _, err := pgbroker.New(ctx, pool, pgbroker.WithSchema(s), pgbroker.WithoutSchemaInstall()); !errors.Is(err, pgbroker.ErrSchemaMissing) {
		t.Fatalf("New on a database without the schema: %v, want ErrSchemaMissing", err)
	}
	if _, err := pool.Exec(ctx, pgbroker.SchemaSQL(s)); err != nil {
		t.Fatal(err)
	}
	if _, err := pgbroker.New(ctx, pool, pgbroker.WithSchema(s), pgbroker.WithoutSchemaInstall()); err != nil {
		t.Fatalf("New after the schema was applied by hand: %v", err)
	}
	if _, err := pool.Exec(ctx, `INSERT INTO `+s+`.schema_version (version) VALUES ($1)`, pgbroker.SchemaVersion+1); err != nil {
		t.Fatal(err)
	}
	for _, opts := range [][]pgbroker.Option{{pgbroker.WithSchema(s)}, {pgbroker.WithSchema(s), pgbroker.WithoutSchemaInstall()}} {
		if _, err := pgbroker.New(ctx, pool, opts...); !errors.Is(err, pgbroker.ErrSchemaNewer) {
			t.Fatalf("New on a newer schema: %v, want ErrSchemaNewer", err)
		}
	}
}

func TestBadOptionsPanic(t *testing.T) {
	t.Parallel()
	pool := newPool(t, shared.DSN)
	for _, o := range []pgbroker.Option{
		pgbroker.WithSchema(""), pgbroker.WithSchema("Upper"), pgbroker.WithSchema("a-b"), pgbroker.WithSchema(strings.Repeat("x", 41)),
		pgbroker.WithPollInterval(time.Millisecond), pgbroker.WithPollInterval(time.Minute),
		pgbroker.WithPollOnly(5 * time.Second), pgbroker.WithDeliveryWindow(10 * time.Millisecond),
		pgbroker.WithPresenceTTL(time.Millisecond), pgbroker.WithRoomTTL(time.Millisecond),
		pgbroker.WithSweepInterval(0), pgbroker.WithSweepInterval(time.Hour),
		pgbroker.WithPublishConns(0), pgbroker.WithPublishConns(65), pgbroker.WithMaxBatch(0), pgbroker.WithMaxBatch(10_001),
		pgbroker.WithTxHistory(-1, 0), pgbroker.WithTxHistory(1, -time.Second),
	} {
		func() {
			defer func() {
				if r := recover(); r == nil || !strings.HasPrefix(fmt.Sprint(r), "pgbroker: ") {
					t.Errorf("New with a bad option: recovered %v, want a pgbroker: panic", r)
				}
			}()
			pgbroker.New(context.Background(), pool, o)
		}()
	}
}
