package impl

import (
	"context"
	"crypto/sha1"
	"encoding/base64"
	"errors"
	"net"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"unsafe"
)

// floor is not a usable server: it is the cost of the simplest design that
// makes one write system call per delivery, so that every implementation's
// figures can be read as a ratio to it. It uses no WebSocket library. Its
// upgrade is the minimum a client accepts (the request's key, answered with
// 101 and Sec-WebSocket-Accept); then it keeps only the connection's file
// descriptor, a duplicate of net/http's, which it closes with everything
// else it held: no goroutine, no buffer, no net.Conn, and it never reads.
// A publish builds one unmasked text frame and writes it to each of the
// room's descriptors with one raw write system call (a full socket drops
// the frame; the benchmark's clients read faster than that). It sends no
// pings and answers none, and learns that a client left only when the
// driver asks it to Prune between scenarios.
type floor struct {
	mu     sync.RWMutex
	rooms  map[string][]int32
	n      int
	closed bool
}

func newFloor() (Server, error) {
	return &floor{rooms: map[string][]int32{}}, nil
}

// wsGUID is RFC 6455's magic string for Sec-WebSocket-Accept.
const wsGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

func (s *floor) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		key := r.Header.Get("Sec-WebSocket-Key")
		if r.Method != http.MethodGet || key == "" || !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
			http.Error(w, "WebSocket only", http.StatusUpgradeRequired)
			return
		}
		room := r.URL.Query().Get("room")
		if room == "" {
			room = Room
		}
		nc, _, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer nc.Close() // the duplicate below keeps the socket open
		sum := sha1.Sum([]byte(key + wsGUID))
		resp := "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " +
			base64.StdEncoding.EncodeToString(sum[:]) + "\r\n\r\n"
		if _, err := nc.Write([]byte(resp)); err != nil {
			return
		}
		tc, ok := nc.(*net.TCPConn)
		if !ok {
			return
		}
		rc, err := tc.SyscallConn()
		if err != nil {
			return
		}
		fd := -1
		_ = rc.Control(func(u uintptr) {
			syscall.ForkLock.RLock()
			if d, err := syscall.Dup(int(u)); err == nil {
				syscall.CloseOnExec(d)
				fd = d
			}
			syscall.ForkLock.RUnlock()
		})
		if fd < 0 {
			return
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.closed {
			_ = syscall.Close(fd)
			return
		}
		s.rooms[room] = append(s.rooms[room], int32(fd))
		s.n++
	})
}

// Publish writes one pre-built frame to each descriptor of room. The
// descriptors share net/http's non-blocking mode, so a write never waits.
func (s *floor) Publish(_ context.Context, room string, data []byte) error {
	frame := make([]byte, 0, len(data)+10)
	switch n := len(data); {
	case n <= 125:
		frame = append(frame, 0x81, byte(n))
	case n <= 0xffff:
		frame = append(frame, 0x81, 126, byte(n>>8), byte(n))
	default:
		return errors.New("floor: payload too large")
	}
	frame = append(frame, data...)
	p := uintptr(unsafe.Pointer(&frame[0]))
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, fd := range s.rooms[room] {
		_, _, _ = syscall.RawSyscall(syscall.SYS_WRITE, uintptr(fd), p, uintptr(len(frame)))
	}
	return nil
}

func (s *floor) Subscribers() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.n
}

// Prune closes the descriptors whose peer has closed: it reads and
// discards what each one holds without waiting, and drops those at the end
// of their stream.
func (s *floor) Prune() {
	var buf [4096]byte
	s.mu.Lock()
	defer s.mu.Unlock()
	for room, fds := range s.rooms {
		keep := fds[:0]
		for _, fd := range fds {
			if floorAlive(int(fd), buf[:]) {
				keep = append(keep, fd)
				continue
			}
			_ = syscall.Close(int(fd))
			s.n--
		}
		if len(keep) == 0 {
			delete(s.rooms, room)
		} else {
			s.rooms[room] = keep
		}
	}
}

func floorAlive(fd int, buf []byte) bool {
	for {
		n, _, err := syscall.Recvfrom(fd, buf, syscall.MSG_DONTWAIT)
		switch {
		case err == syscall.EINTR:
		case err == syscall.EAGAIN:
			return true
		case err != nil || n == 0:
			return false
		}
	}
}

func (s *floor) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for _, fds := range s.rooms {
		for _, fd := range fds {
			_ = syscall.Close(int(fd))
		}
	}
	s.rooms, s.n = map[string][]int32{}, 0
	return nil
}
