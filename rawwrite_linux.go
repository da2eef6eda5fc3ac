//go:build linux

package pubsub

import (
	"syscall"
	"unsafe"
)

// canTryWrite: a socket's file descriptor can be written without waiting
// (Go keeps it non-blocking), which the writer pool relies on.
const canTryWrite = true

// writeNonBlocking writes p to the socket fd with one write system call
// and returns what the kernel took; a full socket buffer is not an error
// (0, nil). It is a raw system call: one that cannot block needs none of
// the Go scheduler's bookkeeping for a call that may (entersyscall, and
// sysmon handing the P to another thread when the call lasts), which cost
// about a fifth of the CPU of a delivery to a large room in
// BENCHMARKS.md's scenario A.
func writeNonBlocking(fd int, p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		n, _, errno := syscall.RawSyscall(syscall.SYS_WRITE, uintptr(fd),
			uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
		switch errno {
		case 0:
			return int(n), nil
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return 0, nil
		default:
			return 0, errno
		}
	}
}

// readNonBlocking reads what the socket fd holds into p, without waiting:
// n bytes, or the end of the stream (eof), or nothing yet (0, false, nil).
func readNonBlocking(fd int, p []byte) (n int, eof bool, err error) {
	for {
		r, errno := recvNoWait(uintptr(fd), p, syscall.MSG_DONTWAIT)
		switch errno {
		case 0:
			return r, r == 0, nil
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return 0, false, nil
		default:
			return 0, false, errno
		}
	}
}

// readable is a syscall.RawConn Read callback: it reports whether the
// socket fd has a byte to read, the end of the stream or an error, by
// peeking without waiting; false makes the RawConn wait for readability.
func readable(fd uintptr) bool {
	var b [1]byte
	for {
		_, errno := recvNoWait(fd, b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		if errno != syscall.EINTR {
			return errno != syscall.EAGAIN
		}
	}
}
