package main

import (
	"bytes"
	"strings"
	"testing"
)

// A short run of both implementations completes and reports each, with
// Redis's CPU and calls per publish.
func TestShortRun(t *testing.T) {
	var out, log bytes.Buffer
	err := run([]string{"-duration", "300ms", "-warmup", "100ms", "-rounds", "1", "-publishers", "1,4", "-rooms", "10"}, &out, &log)
	if err != nil {
		t.Fatalf("%v\n%s", err, log.String())
	}
	for _, want := range []string{"| roomcast | 1 | 1 |", "| centrifuge | 4 | 1 |", "× Redis CPU", "× script", "- roomcast, 4 publishers: evalsha", "- centrifuge, 1 publishers: evalsha"} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("the report lacks %q:\n%s", want, out.String())
		}
	}
}
