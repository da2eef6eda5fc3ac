package pubsub_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/pubsubtest"
)

// Middleware and FromContext (middleware.go): the Handler serves
// WebSockets at its path and below, and every other request goes to the
// app, which finds the Handler in its context.

// middlewareServer serves an app wrapped in h.Middleware. The app answers
// /hello with whether FromContext gave it h, publishes the body of POST
// /publish/{room} through FromContext, and marks every other answer with
// the header X-App.
func middlewareServer(t *testing.T, opts ...pubsub.Option) *pubsubtest.Server {
	t.Helper()
	h := quietHandler(opts...)
	app := http.NewServeMux()
	app.HandleFunc("GET /hello", func(w http.ResponseWriter, r *http.Request) {
		if pubsub.FromContext(r.Context()) != h {
			http.Error(w, "FromContext did not return the handler", http.StatusInternalServerError)
			return
		}
		io.WriteString(w, "handler in context")
	})
	app.HandleFunc("POST /publish/{room}", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err == nil {
			err = pubsub.FromContext(r.Context()).Publish(r.Context(), r.PathValue("room"), body)
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	app.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-App", "next")
		http.NotFound(w, r)
	})
	return pubsubtest.Serve(t, h, h.Middleware(app))
}

// get answers a plain GET with its status and body, and whether the app
// served it.
func get(t *testing.T, srv *pubsubtest.Server, path string) (status int, body string, byApp bool) {
	t.Helper()
	resp, b := plainRequest(t, srv, http.MethodGet, path, nil, "")
	return resp.StatusCode, string(b), resp.Header.Get("X-App") == "next"
}

func TestMiddlewarePassesOtherRequestsToNextWithTheHandlerInContext(t *testing.T) {
	t.Parallel()
	srv := middlewareServer(t)
	if status, body, _ := get(t, srv, "/hello"); status != http.StatusOK || body != "handler in context" {
		t.Fatalf("GET /hello: HTTP %d %q", status, body)
	}
	if status, _, byApp := get(t, srv, "/elsewhere"); status != http.StatusNotFound || !byApp {
		t.Fatalf("GET /elsewhere: HTTP %d, served by the app: %v; want the app's 404", status, byApp)
	}
}

func TestFromContextIsNilWithoutMiddleware(t *testing.T) {
	t.Parallel()
	type key struct{}
	for _, ctx := range []context.Context{
		context.Background(),
		context.WithValue(context.Background(), key{}, "value"),
		httptest.NewRequest(http.MethodGet, "/", nil).Context(),
	} {
		if h := pubsub.FromContext(ctx); h != nil {
			t.Fatalf("FromContext(%v) = %p, want nil", ctx, h)
		}
	}
}

func TestMiddlewareHTTPHandlerPublishReachesWebSocketSubscriber(t *testing.T) {
	t.Parallel()
	srv := middlewareServer(t)
	p := srv.Dial("/ws")
	p.Subscribe("news")
	if resp, _ := plainRequest(t, srv, http.MethodPost, "/publish/news", nil, `{"headline":"hi"}`); resp.StatusCode != http.StatusNoContent {
		t.Fatalf("POST /publish/news: HTTP %d, want 204", resp.StatusCode)
	}
	if e := p.NextMessage("news"); string(e.Data) != `{"headline":"hi"}` {
		t.Fatalf("subscriber got %s", e)
	}
}

func TestMiddlewareServesWebSocketsAtWithPathAndBelow(t *testing.T) {
	t.Parallel()
	srv := middlewareServer(t, pubsub.WithPath("/live"))
	p := srv.Dial("/live")
	p.Subscribe("sports")
	raw := srv.DialRaw("/live/sports") // the room is the path below /live
	srv.Publish("sports", []byte(`"goal"`))
	p.NextMessage("sports")
	raw.ExpectText(`"goal"`)

	for _, tc := range []struct {
		path   string
		status int
		byApp  bool
	}{
		{"/live", http.StatusUpgradeRequired, false}, // the WebSocket endpoint, asked plainly
		{"/live/sports", http.StatusUpgradeRequired, false},
		{"/livestream", http.StatusNotFound, true}, // a prefix, not a path below /live
		{"/ws", http.StatusNotFound, true},         // the default path is not served
	} {
		if status, _, byApp := get(t, srv, tc.path); status != tc.status || byApp != tc.byApp {
			t.Errorf("GET %s: HTTP %d, served by the app: %v; want HTTP %d, by the app: %v",
				tc.path, status, byApp, tc.status, tc.byApp)
		}
	}
}
