//go:build !linux

package pubsub

// poller: off Linux no connection parks; each keeps its reader goroutine,
// waiting for input (see socket.waitReadable).
type poller struct{}

// parkable reports whether this platform parks idle connections.
const parkable = false

// parkResult is what park did: never parked here.
type parkResult uint8

const (
	parked parkResult = iota
	notHere
	lockBusy
)

func (p *poller) park(c *conn) parkResult { return notHere }
func (p *poller) unpark(c *conn) bool     { return false }
func (p *poller) stop()                   {}
func (p *poller) has(c *conn) bool        { return false }
