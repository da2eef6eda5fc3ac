package pgbroker_test

import (
	"context"
	"fmt"
	"net/http/httptest"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/client"
	"github.com/roomcast/pubsub/pgbroker"
)

// An order's status changes and the browsers watching the order are told,
// in one transaction: the message commits with the order, or not at all.
func ExampleBroker_PublishTx() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pool, err := pgxpool.New(ctx, shared.DSN) // the app's own database
	if err != nil {
		panic(err)
	}
	defer pool.Close()
	defer pool.Exec(context.Background(), `DROP TABLE example_orders; DROP SCHEMA example_orders CASCADE`)
	if _, err := pool.Exec(ctx, `CREATE TABLE example_orders (id int PRIMARY KEY, status text NOT NULL);
		INSERT INTO example_orders VALUES (42, 'paid')`); err != nil {
		panic(err)
	}
	b, err := pgbroker.New(ctx, pool, pgbroker.WithSchema("example_orders"), pgbroker.WithTxHistory(100, time.Hour))
	if err != nil {
		panic(err)
	}
	h := pubsub.NewHandler(pubsub.WithBroker(b), pubsub.WithHistory(100, time.Hour))
	srv := httptest.NewServer(h)
	defer srv.Close()
	defer h.Close()

	// A page watching order 42.
	watcher, err := client.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http"))
	if err != nil {
		panic(err)
	}
	defer watcher.Close()
	told := make(chan client.Message, 10)
	if _, err := watcher.Subscribe(ctx, "orders:42", func(m client.Message) { told <- m }); err != nil {
		panic(err)
	}

	// setStatus changes the order's status and tells its watchers, in one
	// transaction; fail rolls it back after both.
	setStatus := func(status string, fail bool) error {
		return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `UPDATE example_orders SET status = $1 WHERE id = 42`, status); err != nil {
				return err
			}
			if _, err := b.PublishTx(ctx, tx, "orders:42", fmt.Appendf(nil, `{"status":%q}`, status)); err != nil {
				return err
			}
			if fail {
				return fmt.Errorf("the carrier refused the parcel")
			}
			return nil
		})
	}
	fmt.Println(setStatus("shipped", false))
	fmt.Println(setStatus("lost", true)) // rolled back: nobody hears of it
	fmt.Println(setStatus("delivered", false))

	for range 2 {
		m := <-told
		fmt.Println(m.Seq, string(m.Data))
	}
	// Output:
	// <nil>
	// the carrier refused the parcel
	// <nil>
	// 1 {"status":"shipped"}
	// 2 {"status":"delivered"}
}
