//go:build linux && !386

package pubsub

import (
	"syscall"
	"unsafe"
)

// recvNoWait is one recvfrom system call on the socket fd into p (not
// empty) with flags that keep it from waiting (MSG_DONTWAIT), as a raw
// system call, like writeNonBlocking.
func recvNoWait(fd uintptr, p []byte, flags int) (int, syscall.Errno) {
	n, _, errno := syscall.RawSyscall6(syscall.SYS_RECVFROM, fd,
		uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)), uintptr(flags), 0, 0)
	return int(n), errno
}
