package pubsub

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"net/http"
	"strings"
	"time"
)

// The browser client, embedded so a page needs no bundler and no CDN. The
// Handler serves it below its path (WithPath), an ES module:
//
//	import { connect } from "/ws/roomcast.js";
//
// with its TypeScript declarations beside it, at roomcast.d.ts. Mount the
// Handler on the path and below it (mux.Handle("/ws/", h) beside
// mux.Handle("/ws", h)), or use Middleware, so these requests reach it.
//
//go:embed js/roomcast.js js/roomcast.d.ts
var clientFiles embed.FS

type clientFile struct {
	body  []byte
	etag  string
	ctype string
}

var clientAssets = func() map[string]clientFile {
	out := make(map[string]clientFile)
	for name, ctype := range map[string]string{
		"roomcast.js":   "text/javascript; charset=utf-8",
		"roomcast.d.ts": "application/typescript; charset=utf-8",
	} {
		b, err := clientFiles.ReadFile("js/" + name)
		if err != nil {
			panic("pubsub: embedded client missing: " + err.Error()) // a build defect, caught by every test
		}
		sum := sha256.Sum256(b)
		out[name] = clientFile{body: b, etag: `"` + hex.EncodeToString(sum[:8]) + `"`, ctype: ctype}
	}
	return out
}()

// serveClient serves the embedded browser client for a plain GET or HEAD of
// <path>/roomcast.js or <path>/roomcast.d.ts. It reports whether it did.
func (h *Handler) serveClient(w http.ResponseWriter, r *http.Request) bool {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return false
	}
	name, ok := strings.CutPrefix(r.URL.Path, h.cfg.path+"/")
	if !ok {
		return false
	}
	f, ok := clientAssets[name]
	if !ok {
		return false
	}
	w.Header().Set("Content-Type", f.ctype)
	w.Header().Set("ETag", f.etag)
	// Revalidate every time: a page must never run a client older than the
	// server it talks to. The ETag makes that a 304 without a body.
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	http.ServeContent(w, r, name, time.Time{}, bytes.NewReader(f.body))
	return true
}
