// Package leaktest fails a test binary whose goroutines outlive its tests.
// Each module's TestMain ends with it.
package leaktest

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"time"
)

// Watched are the code paths a leaked goroutine runs: this project's,
// coder/websocket's and net/http's.
var Watched = []string{"roomcast/pubsub", "coder/websocket", "net/http."}

// After returns code, the tests' exit code, unless they passed and
// goroutines running Watched code (or extra) are still there after ten
// seconds: then it prints their stacks and returns 1.
func After(code int, extra ...string) int {
	if code != 0 {
		return code
	}
	if leaked := wait(10*time.Second, append(append([]string(nil), Watched...), extra...)); leaked != "" {
		fmt.Fprintf(os.Stderr, "goroutines leaked after the tests:\n%s\n", leaked)
		return 1
	}
	return 0
}

// wait returns the stacks of goroutines still running watched code once
// timeout has passed, or "" as soon as there are none.
func wait(timeout time.Duration, watched []string) string {
	deadline := time.Now().Add(timeout)
	for {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		var leaked []string
		for _, g := range strings.Split(string(buf), "\n\n") {
			if strings.Contains(g, "internal/leaktest.") || strings.Contains(g, "testing.(*M).") {
				continue // this check, and the test binary's main goroutine
			}
			for _, w := range watched {
				if strings.Contains(g, w) {
					leaked = append(leaked, g)
					break
				}
			}
		}
		if len(leaked) == 0 {
			return ""
		}
		if time.Now().After(deadline) {
			return strings.Join(leaked, "\n\n")
		}
		time.Sleep(50 * time.Millisecond) // polling the runtime, not a test's timing
	}
}
