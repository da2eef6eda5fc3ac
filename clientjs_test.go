package pubsub_test

import (
	"bytes"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/roomcast/pubsub/pubsubtest"
)

// The embedded browser client (clientjs.go), served below the Handler's
// path.

func TestHandlerServesTheBrowserClientBelowItsPath(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	for _, name := range []string{"roomcast.js", "roomcast.d.ts"} {
		want, err := os.ReadFile("js/" + name)
		if err != nil {
			t.Fatal(err)
		}
		resp, body := plainRequest(t, srv, http.MethodGet, "/ws/"+name, nil, "")
		if resp.StatusCode != http.StatusOK || !bytes.Equal(body, want) {
			t.Fatalf("GET /ws/%s: %d, %d bytes; want 200 and the %d bytes of js/%s", name, resp.StatusCode, len(body), len(want), name)
		}
		if name == "roomcast.js" && !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/javascript") {
			t.Fatalf("Content-Type %q, want text/javascript (browsers refuse modules otherwise)", resp.Header.Get("Content-Type"))
		}
		if resp.Header.Get("Cache-Control") != "no-cache" || resp.Header.Get("ETag") == "" {
			t.Fatalf("cache headers %v: want no-cache with an ETag", resp.Header)
		}

		// A page that has it revalidates for free.
		again, _ := plainRequest(t, srv, http.MethodGet, "/ws/"+name, http.Header{"If-None-Match": {resp.Header.Get("ETag")}}, "")
		if again.StatusCode != http.StatusNotModified {
			t.Fatalf("revalidation: %d, want 304", again.StatusCode)
		}
	}
}

func TestOtherPlainRequestsBelowThePathStillGet426(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	for _, target := range []string{"/ws/other.js", "/ws/js/roomcast.js", "/ws"} {
		if resp, _ := plainRequest(t, srv, http.MethodGet, target, nil, ""); resp.StatusCode != http.StatusUpgradeRequired {
			t.Fatalf("GET %s: %d, want 426", target, resp.StatusCode)
		}
	}
	if resp, _ := plainRequest(t, srv, http.MethodPost, "/ws/roomcast.js", http.Header{"Content-Type": {"text/plain"}}, ""); resp.StatusCode != http.StatusUpgradeRequired {
		t.Fatalf("POST /ws/roomcast.js: %d, want 426", resp.StatusCode)
	}
}
