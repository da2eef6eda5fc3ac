// Command chat is the chat of examples/chat (package chatapp: the page,
// rooms, nicknames, members, history on joining, recovery after a
// reconnect) with its rooms in PostgreSQL: every message is a row of the
// database, so the chat survives restarts of the server, and several
// servers on one database are one chat.
//
//	cd pgbroker && go run ./examples/chat -postgres 'postgres://user:pass@localhost:5432/app'
//	go run ./examples/chat -postgres "$DATABASE_URL" -addr :9000
//
// Then open http://127.0.0.1:8080/?nick=ann and http://127.0.0.1:8080/?nick=bob.
// Stop the server (Ctrl-C) while a page is open, send nothing or send from
// a second server on the same database (another -addr), start it again:
// the page reconnects and recovers exactly the messages it missed, since
// the room's epoch and history are in the database.
//
// The broker installs its schema ("roomcast", see -schema) on first start.
// Every message is kept (-archive, the default): read the archive with
// plain SQL,
//
//	SELECT room, seq, published_at, convert_from(data, 'UTF8') FROM roomcast.history ORDER BY room, seq;
//
// while the page and recovery keep to the chat's history bounds (the last
// 100 messages of a room, for an hour).
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/examples/chat/chatapp"
	"github.com/roomcast/pubsub/pgbroker"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "address to listen on (port 0 picks a free one)")
	dsn := flag.String("postgres", os.Getenv("DATABASE_URL"), "PostgreSQL connection string (default $DATABASE_URL)")
	schema := flag.String("schema", pgbroker.DefaultSchema, "the PostgreSQL schema of the chat's tables")
	archive := flag.Bool("archive", true, "keep every message in the database, not only the history the chat serves")
	flag.Parse()
	if *dsn == "" {
		fmt.Fprintln(os.Stderr, "chat: give a PostgreSQL connection string: -postgres 'postgres://…' (or set DATABASE_URL)")
		os.Exit(2)
	}

	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	context.AfterFunc(ctx, stop) // after the first signal, a second one kills at once

	if err := run(ctx, logger, *addr, *dsn, *schema, *archive); err != nil {
		logger.Error("chat", "err", err)
		os.Exit(1)
	}
}

// run serves the chat on addr with its rooms in the database at dsn until
// ctx ends, then shuts down gracefully.
func run(ctx context.Context, logger *slog.Logger, addr, dsn, schema string, archive bool) error {
	h, pool, err := newHandler(ctx, logger, dsn, schema, archive)
	if err != nil {
		return err
	}
	defer pool.Close() // after the Handler, which chatapp.Serve closes
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		h.Close()
		return err
	}
	// The first line names the address actually bound (useful with port
	// 0); scripts may parse it.
	host := displayHost(ln)
	fmt.Printf("chat server listening on http://%s (rooms in PostgreSQL, schema %s)\n", host, schema)
	fmt.Printf("open http://%s/?nick=ann and http://%s/?nick=bob in two tabs\n", host, host)
	return chatapp.Serve(ctx, ln, h)
}

// newHandler returns the chat's Handler on a PostgreSQL broker, and the
// pool it uses.
func newHandler(ctx context.Context, logger *slog.Logger, dsn, schema string, archive bool) (*pubsub.Handler, *pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, nil, err
	}
	if cfg.MaxConns < 10 {
		cfg.MaxConns = 10 // see pgbroker's Connections
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, nil, err
	}
	ictx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	opts := []pgbroker.Option{pgbroker.WithSchema(schema), pgbroker.WithLogger(logger)}
	if archive {
		opts = append(opts, pgbroker.WithArchive(func(string) bool { return true }))
	}
	b, err := pgbroker.New(ictx, pool, opts...)
	if err != nil {
		pool.Close()
		return nil, nil, err
	}
	h := pubsub.NewHandler(append(chatapp.Options(), pubsub.WithLogger(logger), pubsub.WithBroker(b))...)
	return h, pool, nil
}

// displayHost is how to reach ln from this machine: an unspecified listen
// address (":8080") is shown as localhost.
func displayHost(ln net.Listener) string {
	if a, ok := ln.Addr().(*net.TCPAddr); ok && a.IP.IsUnspecified() {
		return net.JoinHostPort("localhost", strconv.Itoa(a.Port))
	}
	return ln.Addr().String()
}
