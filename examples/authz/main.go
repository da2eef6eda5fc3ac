// Command authz is a team chat whose access rules are the point: each user
// (identified by a token, here a query parameter for brevity; use a cookie
// or a header in a real app) belongs to one team, may read and write the
// room "team:<their team>", may read the room "news", and only admins may
// write it, from the backend's POST /news. Its test (main_test.go) shows
// how a host app tests its own rules with the pubsubtest kit: every rule
// is checked with real WebSocket clients against the real Handler.
//
//	go run ./examples/authz
//	wscat -c 'ws://127.0.0.1:8080/ws?room=team:red&token=ann'
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"strings"
	"time"

	"github.com/roomcast/pubsub"
)

// user is what a token stands for.
type user struct {
	name  string
	team  string
	admin bool
}

// users would be a database; tokens would be sessions.
var users = map[string]user{
	"ann":   {name: "ann", team: "red"},
	"bob":   {name: "bob", team: "red"},
	"carol": {name: "carol", team: "blue", admin: true},
}

// newApp returns the app's HTTP handler (the WebSocket endpoint at /ws,
// the admin's POST /news) and its pubsub Handler.
func newApp(opts ...pubsub.Option) (http.Handler, *pubsub.Handler) {
	ps := pubsub.NewHandler(append([]pubsub.Option{
		pubsub.WithAuthenticate(authenticate),
		pubsub.WithAuthorize(authorize),
	}, opts...)...)
	mux := http.NewServeMux()
	mux.Handle("/ws", ps)
	mux.HandleFunc("POST /news", func(w http.ResponseWriter, r *http.Request) {
		u, ok := users[r.URL.Query().Get("token")]
		if !ok || !u.admin {
			http.Error(w, "admins only", http.StatusForbidden)
			return
		}
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 4096))
		if err != nil {
			http.Error(w, "bad body", http.StatusBadRequest)
			return
		}
		if err := ps.Publish(r.Context(), "news", body); err != nil {
			http.Error(w, "could not publish", http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	return mux, ps
}

// authenticate identifies the user from the upgrade request.
func authenticate(r *http.Request) (pubsub.Identity, error) {
	u, ok := users[r.URL.Query().Get("token")]
	if !ok {
		return pubsub.Identity{}, pubsub.ErrUnauthorized
	}
	return pubsub.Identity{UserID: u.name}, nil
}

// authorize is the app's rule book, asked before every subscribe and every
// client publish.
func authorize(_ context.Context, c pubsub.Client, a pubsub.Action, room string) error {
	u := users[c.UserID]
	team, isTeam := strings.CutPrefix(room, "team:")
	switch {
	case isTeam && team == u.team:
		return nil // read and write your own team's room
	case room == "news" && a == pubsub.ActionSubscribe:
		return nil // everyone reads the news; it is written from the backend
	}
	return pubsub.ErrForbidden
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "address to listen on")
	flag.Parse()
	app, ps := newApp()
	defer ps.Close()
	fmt.Printf("authz listening on http://%s (tokens: ann and bob of team red, carol of team blue, an admin)\n", *addr)
	srv := &http.Server{Addr: *addr, Handler: app, ReadHeaderTimeout: 10 * time.Second}
	if err := srv.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
		log.Fatal(err)
	}
}
