//go:build linux && 386

package pubsub

import "syscall"

// recvNoWait is recv_linux.go's for 386, where the standard library reaches
// recvfrom through socketcall (the syscall package has no SYS_RECVFROM
// there).
func recvNoWait(fd uintptr, p []byte, flags int) (int, syscall.Errno) {
	n, _, err := syscall.Recvfrom(int(fd), p, flags)
	if err != nil {
		if errno, ok := err.(syscall.Errno); ok {
			return 0, errno
		}
		return 0, syscall.EINVAL
	}
	return n, 0
}
