// Package client is a Go client for roomcast servers, speaking protocol
// mode (the WebSocket subprotocol "roomcast.v1", specified in PROTOCOL.md
// at the repository root). It is for services, command-line tools and
// tests; it depends only on the standard library and coder/websocket.
//
//	c, err := client.Dial(ctx, "wss://example.com/ws",
//		client.WithHeader(http.Header{"Authorization": {"Bearer " + token}}))
//	if err != nil { ... }
//	defer c.Close()
//
//	sub, err := c.Subscribe(ctx, "chat", func(m client.Message) {
//		fmt.Printf("%s #%d: %s\n", m.Room, m.Seq, m.Data)
//	}, client.History(20))
//
//	pub, err := c.Publish(ctx, "chat", []byte(`{"text":"hi"}`)) // once, whatever the network does
//
// # Requests
//
// Subscribe, Unsubscribe, Publish, Send and Presence wait for the server's
// answer, bounded by their context. (Writing the request is bounded by
// the Client itself, never by that context: a caller giving up does not
// cost the connection.) A refusal is an *Error whose Code is one of the
// error codes of package protocol, such as protocol.CodeForbidden (use
// errors.As). While the Client has no connection they fail at once with
// ErrDisconnected, but Publish, which waits in the outbox; after Close,
// with ErrClosed.
//
// # Publishing exactly once
//
// Publish gives each publish a random key and keeps it in an outbox until
// the server answers. When the connection drops before the answer, the
// Client sends it again on the next connection, with the same key, before
// any newer publish; the server sequences a key once (PROTOCOL.md section
// 3.10), so every publish appears in its room exactly once, in the order
// the Client made them, and Publish returns where it landed, whichever
// attempt got through. A publish not confirmed within the server's key
// window fails with ErrExpired rather than risk a second copy.
//
// # Delivery
//
// Each subscription has one goroutine that runs its Handler (and its
// OnPresence and OnRecover callbacks) one call at a time, in the room's
// order, fed by a buffer of WithBufferSize messages. The connection's
// reader only appends to these buffers, so a slow handler never blocks the
// reader, other subscriptions, or the acks that requests wait for: a
// handler may itself call Publish, Subscribe or Unsubscribe. When a buffer
// is full the Client does not drop the message silently and does not
// wait: it closes the connection, waits until that handler has emptied
// its buffer, reconnects, and recovers what the handler missed from the
// room's history (the server's WithHistory). WithOnState reports it as
// ErrSlowHandler. Direct messages (WithOnDirect) have a goroutine and a
// buffer of their own, but no history to recover from.
//
// # Reconnection and recovery
//
// When the connection ends the Client reconnects with exponential backoff
// and jitter (WithReconnect), except after close codes that ask it not to:
// 1003, 1007 and 1008 (the client is at fault), 4005 (closed as idle:
// dial again when there is something to do) and 4003 (the server
// disconnected it on purpose), or when an upgrade is refused with a 4xx
// status. It then stops: Done is closed and Err says why. It reconnects
// after any other end: 1001 (server shutting down), 1006 (connection
// lost), 1011, 1013, 4001 (heartbeat timeout), 4002 (slow consumer on the
// server), 4006 (the server lost messages of a room: recovery tells what
// can be had).
//
// After reconnecting it subscribes every Subscription again with "since"
// set to its position (the last message it received), and tells
// OnRecover the outcome before the replayed messages: Recovered with the
// number Missed, then exactly the missed messages, in order, with no gap
// and no duplicate; or not Recovered, with a Reason (history too short,
// epoch changed…), and the subscription goes on from the room's current
// position: reload the room's state from the application.
//
// # Heartbeats
//
// The Client answers the server's pings. When nothing at all arrives for
// the welcome's heartbeat_ms + timeout_ms, it considers the connection
// dead, closes it and reconnects (ErrHeartbeatTimeout).
//
// # Payloads
//
// A payload is bytes. Publish and Send put valid JSON in "data", other
// valid UTF-8 in "text" and anything else in "binary", so the server
// stores exactly the bytes given (JSON with surrounding whitespace goes as
// text for that reason). Received payloads carry the Kind the server chose
// from their bytes: a text payload that is valid JSON, such as "42",
// arrives as KindJSON.
//
// # Goroutines
//
// A Client runs one goroutine that manages the connection, one reader per
// connection, one that resends the outbox when a connection comes up, one
// goroutine per subscription and one for direct messages. Close ends them
// all and returns once they have ended. (A publish refused as rate limited
// or unavailable is tried again from a timer, which Close stops.)
package client
