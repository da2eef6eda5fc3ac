//go:build !unix

package pubsub

// canTryWrite: off Unix, every connection is written by its own writer
// goroutine, which waits on the socket like any net.Conn write.
const canTryWrite = false

func writeNonBlocking(fd int, p []byte) (int, error) {
	panic("pubsub: writeNonBlocking without canTryWrite")
}

// readNonBlocking: only Linux parks connections (see poller), and only a
// parked connection reads this way.
func readNonBlocking(fd int, p []byte) (n int, eof bool, err error) {
	panic("pubsub: readNonBlocking without a poller")
}

// readable: without a peek of our own, a reader never waits early.
func readable(fd uintptr) bool { return true }
