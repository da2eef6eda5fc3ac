package pubsub_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"time"

	"github.com/coder/websocket"
	"github.com/roomcast/pubsub"
)

// The quick start: mount a Handler, let a client join room "orders:42",
// and publish into the room from backend code.
func Example() {
	h := pubsub.NewHandler()
	defer h.Close() // closes every connection and waits for them

	mux := http.NewServeMux()
	mux.Handle("/ws", h) // clients connect here
	srv := httptest.NewServer(mux)
	defer srv.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	// Any WebSocket client can connect; with no subprotocol it is in raw
	// mode, and ?room= names its room. In a browser:
	//   new WebSocket("wss://example.com/ws?room=orders:42")
	url := "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws?room=orders:42"
	c, _, err := websocket.Dial(ctx, url, nil)
	if err != nil {
		fmt.Println("dial:", err)
		return
	}
	defer c.CloseNow()

	// A raw-mode client is in its room once the upgrade succeeded, so it
	// gets everything published from now on.
	if err := h.Publish(ctx, "orders:42", []byte(`{"status":"shipped"}`)); err != nil {
		fmt.Println("publish:", err)
		return
	}

	_, msg, err := c.Read(ctx)
	if err != nil {
		fmt.Println("read:", err)
		return
	}
	fmt.Printf("client got: %s\n", msg)
	// Output: client got: {"status":"shipped"}
}

// An echo server: with WithOnMessage, client messages go to the server's
// handler instead of being published, and Reply answers the sender alone.
func ExampleWithOnMessage() {
	h := pubsub.NewHandler(
		pubsub.WithOnMessage(func(ctx context.Context, m *pubsub.ClientMessage) error {
			return m.Reply(append([]byte("echo: "), m.Data...))
		}),
	)
	defer h.Close()

	mux := http.NewServeMux()
	mux.Handle("/ws", h)
	srv := httptest.NewServer(mux)
	defer srv.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	// No room: this raw-mode client only talks to the server.
	c, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http")+"/ws", nil)
	if err != nil {
		fmt.Println("dial:", err)
		return
	}
	defer c.CloseNow()

	for _, text := range []string{"hello", "bye"} {
		if err := c.Write(ctx, websocket.MessageText, []byte(text)); err != nil {
			fmt.Println("write:", err)
			return
		}
		_, msg, err := c.Read(ctx)
		if err != nil {
			fmt.Println("read:", err)
			return
		}
		fmt.Println(string(msg))
	}
	// Output:
	// echo: hello
	// echo: bye
}

// Middleware wraps a whole app: the WebSocket endpoint is served at /ws,
// and every other handler finds the Handler in its request's context, so
// a plain HTTP endpoint can publish.
func ExampleHandler_Middleware() {
	h := pubsub.NewHandler()
	defer h.Close()

	app := http.NewServeMux()
	app.HandleFunc("POST /orders/{id}/ship", func(w http.ResponseWriter, r *http.Request) {
		// ... ship the order, then tell everyone watching it.
		room := "orders:" + r.PathValue("id") // Publish rejects an invalid room name
		if err := pubsub.FromContext(r.Context()).Publish(r.Context(), room, []byte("shipped")); err != nil {
			http.Error(w, "could not notify watchers", http.StatusInternalServerError)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	srv := httptest.NewServer(h.Middleware(app))
	defer srv.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	url := "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws?room=orders:42"
	c, _, err := websocket.Dial(ctx, url, nil)
	if err != nil {
		fmt.Println("dial:", err)
		return
	}
	defer c.CloseNow()

	resp, err := srv.Client().Post(srv.URL+"/orders/42/ship", "", nil)
	if err != nil {
		fmt.Println("post:", err)
		return
	}
	resp.Body.Close()
	fmt.Println("POST /orders/42/ship:", resp.Status)

	_, msg, err := c.Read(ctx)
	if err != nil {
		fmt.Println("read:", err)
		return
	}
	fmt.Println("client got:", string(msg))
	// Output:
	// POST /orders/42/ship: 204 No Content
	// client got: shipped
}

// A graceful shutdown needs both http.Server.Shutdown and Handler.Shutdown,
// in this order, under one deadline. http.Server.Shutdown does not close
// hijacked connections, and every WebSocket is one: it returns while they
// are still open, and does not wait for them.
func ExampleHandler_Shutdown() {
	h := pubsub.NewHandler()
	mux := http.NewServeMux()
	mux.Handle("/ws", h)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println("listen:", err)
		return
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	// A client in room "news", reading until its connection closes. (A
	// WebSocket client answers the server's close frame while it reads.)
	// It is in the room before its handshake completes, so it gets every
	// message published once Dial returns.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, _, err := websocket.Dial(ctx, "ws://"+ln.Addr().String()+"/ws?room=news", nil)
	if err != nil {
		fmt.Println("dial:", err)
		return
	}
	defer c.CloseNow()
	got := make(chan string, 8)
	go func() {
		defer close(got)
		for {
			_, msg, err := c.Read(ctx)
			var ce websocket.CloseError
			if errors.As(err, &ce) {
				got <- fmt.Sprintf("closed: %d %s", ce.Code, ce.Reason)
				return
			} else if err != nil {
				got <- fmt.Sprint("read: ", err)
				return
			}
			got <- "message: " + string(msg)
		}
	}()

	if err := h.Publish(ctx, "news", []byte("last edition")); err != nil {
		fmt.Println("publish:", err)
		return
	}

	// Later, typically on SIGTERM (see signal.NotifyContext):
	sctx, scancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer scancel()
	// 1. Stop accepting connections and let in-flight HTTP requests finish.
	//    The WebSockets stay open meanwhile, so whatever those requests
	//    publish still reaches its subscribers.
	if err := srv.Shutdown(sctx); err != nil {
		fmt.Println("http shutdown:", err)
	}
	// 2. Refuse new upgrades with 503, flush each connection's queue, close
	//    it with 1001 "going away", wait for its goroutines, close the broker.
	//    If sctx ends first, the rest are closed at once.
	if err := h.Shutdown(sctx); err != nil {
		fmt.Println("pubsub shutdown:", err)
	}
	// srv.RegisterOnShutdown(func() { h.Shutdown(sctx) }) also starts step
	// 2, but http.Server runs that hook on its own goroutine and waits for
	// nothing, so the program would still have to wait for it itself.

	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		fmt.Println("serve:", err)
	}
	for line := range got {
		fmt.Println(line)
	}
	// Output:
	// message: last edition
	// closed: 1001 server shutting down
}

// An authenticate hook identifies a client from its upgrade request, before
// any WebSocket resource is spent; returning an error refuses the upgrade
// with 401 Unauthorized (403 Forbidden if it wraps ErrForbidden).
func ExampleWithAuthenticate() {
	sessions := map[string]string{"token-of-ada": "ada"} // your session store

	h := pubsub.NewHandler(
		pubsub.WithAuthenticate(func(r *http.Request) (pubsub.Identity, error) {
			token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			user, known := sessions[token]
			if !ok || !known {
				return pubsub.Identity{}, pubsub.ErrUnauthorized // logged at Debug, never sent
			}
			return pubsub.Identity{UserID: user}, nil
		}),
	)
	defer h.Close()

	mux := http.NewServeMux()
	mux.Handle("/ws", h)
	srv := httptest.NewServer(mux)
	defer srv.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	url := "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws?room=lobby"

	// Without a token: refused before the upgrade.
	_, resp, err := websocket.Dial(ctx, url, nil)
	if err == nil {
		fmt.Println("dial without a token: upgraded")
		return
	}
	fmt.Println("without a token:", resp.Status)

	// With one: connected, as ada. (Browsers cannot set headers on a
	// WebSocket; there, use a session cookie or a token in the query.)
	c, _, err := websocket.Dial(ctx, url, &websocket.DialOptions{
		HTTPHeader: http.Header{"Authorization": {"Bearer token-of-ada"}},
	})
	if err != nil {
		fmt.Println("dial:", err)
		return
	}
	defer c.CloseNow()
	for _, cl := range h.Connections("lobby") {
		fmt.Println("in lobby:", cl.UserID)
	}
	// Output:
	// without a token: 401 Unauthorized
	// in lobby: ada
}
