//go:build unix && !linux

package pubsub

import "syscall"

// canTryWrite: on Unix a socket's file descriptor can be written without
// waiting (Go keeps it non-blocking), which the writer pool relies on.
const canTryWrite = true

// writeNonBlocking writes p to fd with one write system call and returns
// what the kernel took; a full socket buffer is not an error (0, nil).
func writeNonBlocking(fd int, p []byte) (int, error) {
	for {
		n, err := syscall.Write(fd, p)
		switch err {
		case nil:
			return n, nil
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return 0, nil
		default:
			return 0, err
		}
	}
}

// readNonBlocking: only Linux parks connections (see poller), and only a
// parked connection reads this way.
func readNonBlocking(fd int, p []byte) (n int, eof bool, err error) {
	panic("pubsub: readNonBlocking without a poller")
}

// readable: without a peek of our own, a reader never waits early.
func readable(fd uintptr) bool { return true }
