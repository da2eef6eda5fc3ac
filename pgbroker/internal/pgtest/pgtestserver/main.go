// Command pgtestserver runs a throwaway PostgreSQL server (see package
// pgtest) for tests outside Go, such as the real-browser suite: it prints
// "postgres ready: <DSN>" once the server accepts connections, and on
// SIGTERM or SIGINT stops it and removes its directory.
//
//	cd pgbroker && go run ./internal/pgtest/pgtestserver
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/roomcast/pubsub/pgbroker/internal/pgtest"
)

func main() {
	srv, err := pgtest.Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, "pgtestserver:", err)
		os.Exit(1)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	fmt.Printf("postgres ready: %s\n", srv.DSN)
	<-sig
	srv.Close()
}
