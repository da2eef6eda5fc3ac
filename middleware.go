package pubsub

import (
	"context"
	"net/http"
	"strings"
)

type contextKey struct{}

// Middleware wraps a whole app: requests for the Handler's path (WithPath,
// default "/ws") and below it are served as WebSocket connections; every
// other request goes to next with the Handler in its context, so plain HTTP
// handlers can publish:
//
//	pubsub.FromContext(r.Context()).Publish(r.Context(), "orders:42", data)
func (h *Handler) Middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p := r.URL.Path
		if p == h.cfg.path || strings.HasPrefix(p, h.cfg.path+"/") {
			h.ServeHTTP(w, r)
			return
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), contextKey{}, h)))
	})
}

// FromContext returns the Handler that Middleware put into a request's
// context, or nil when the request did not pass through Middleware.
func FromContext(ctx context.Context) *Handler {
	h, _ := ctx.Value(contextKey{}).(*Handler)
	return h
}
