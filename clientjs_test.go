package pubsub_test

import (
	"bytes"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
)

func TestHandlerServesTheBrowserClientBelowItsPath(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t)
	for _, name := range []string{"roomcast.js", "roomcast.d.ts"} {
		want, err := os.ReadFile("js/" + name)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := http.Get(srv.URL + "/ws/" + name)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
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
		req, _ := http.NewRequest(http.MethodGet, srv.URL+"/ws/"+name, nil)
		req.Header.Set("If-None-Match", resp.Header.Get("ETag"))
		again, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		again.Body.Close()
		if again.StatusCode != http.StatusNotModified {
			t.Fatalf("revalidation: %d, want 304", again.StatusCode)
		}
	}
}

func TestOtherPlainRequestsBelowThePathStillGet426(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t)
	for _, target := range []string{"/ws/other.js", "/ws/js/roomcast.js", "/ws"} {
		resp, err := http.Get(srv.URL + target)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUpgradeRequired {
			t.Fatalf("GET %s: %d, want 426", target, resp.StatusCode)
		}
	}
	resp, err := http.Post(srv.URL+"/ws/roomcast.js", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUpgradeRequired {
		t.Fatalf("POST /ws/roomcast.js: %d, want 426", resp.StatusCode)
	}
}
