// Package pubsub adds real-time rooms to any net/http app, over WebSocket.
//
// NewHandler returns an http.Handler. Mount it, point clients at it, and
// publish into rooms from your backend code:
//
//	ps := pubsub.NewHandler()
//	defer ps.Close()
//	mux.Handle("/ws", ps)                         // clients connect here
//	ps.Publish(ctx, "orders:42", []byte(`{"status":"shipped"}`)) // from any backend code
//
// # Three ways to talk to it
//
// Raw mode is for any WebSocket client with no library: a browser's bare
// new WebSocket(url), wscat, websocat. The client offers no subprotocol
// and names one room: "/ws?room=lobby", or the path below the mount point
// ("/ws/lobby", where WithPath matches the mount, or a route pattern with a
// {room...} wildcard). Every message of the room reaches it verbatim, as a
// text frame when the payload is valid UTF-8 and as a binary frame
// otherwise. Each frame it sends is published to its room, when the host
// allows client publishing (WithClientPublish, WithAuthorize), or handed to
// the WithOnMessage handler when one is set. A raw client may also name no
// room at all and only get direct messages (PublishToConn, PublishToUser,
// ClientMessage.Reply).
//
// Protocol mode is for clients that offer the subprotocol "roomcast.v1":
// JSON envelopes over one connection with many rooms, subscribe,
// unsubscribe and publish with acknowledgements, coded errors and
// heartbeats. PROTOCOL.md at the repository root specifies it.
//
// Event streams (Server-Sent Events) are for clients that only listen: a
// GET of the same endpoint with Accept: text/event-stream (a browser's
// bare EventSource, curl -N) names its rooms ("/ws?room=news&room=alerts")
// and gets each message as an event named after its room, its payload
// verbatim. Every event's id is the stream's position, so an EventSource
// that reconnects, sending Last-Event-ID, gets exactly what it missed, or
// a "+reset" event saying it cannot: exact recovery with no library at
// all. With "events=message" the payloads come as unnamed events instead,
// which EventSource's onmessage gets and htmx's SSE extension swaps into
// the page (a request from htmx gets them by default). Over HTTP/2 the
// stream is served by its request's ServeHTTP call, which lasts as long
// as the stream.
//
// # Payloads
//
// A payload is bytes; the server stores no type for it. Raw clients get the
// bytes verbatim. Protocol clients get them in the field that fits, and
// decode exactly the bytes: valid JSON with no white space around it in
// "data" (embedded as JSON), other valid UTF-8 in "text" (a JSON string),
// anything else in "binary" (standard base64). So a text payload that is
// itself valid JSON, such as "42", arrives as data 42.
//
// # Hooks
//
// WithAuthenticate identifies a client from its upgrade request and can
// refuse it (401, or 403 with ErrForbidden) before any WebSocket resource
// is spent. WithAuthorize decides each subscribe and each client publish
// per room. WithOnConnect and WithOnDisconnect observe connections.
// WithOnMessage handles messages addressed to the server. A hook that
// panics costs only its request: the panic is recovered, logged, counted in
// Stats.HookPanics, and answered with 500, "internal" or close code 1011.
//
// # Secure defaults
//
// Cross-origin browser upgrades are refused unless WithOriginPatterns
// allows them. Connections are bounded per user (WithMaxConnectionsPerUser)
// and, when the host sets it, per server (WithMaxConnections), before any
// WebSocket resource is spent. The handshake itself is read by the host's
// http.Server: set its ReadHeaderTimeout, or a client that never finishes
// its request line holds a connection open. Clients may not publish until
// the host says so. Every client input is bounded: message size
// (WithMaxMessageBytes), rooms per connection (WithMaxRooms), room names
// (ValidRoomName), message rate (WithRateLimit). Each With function
// documents its default.
//
// # Close codes
//
// Besides the standard codes (1000 normal, 1001 going away, 1003 binary in
// protocol mode, 1007 invalid UTF-8, 1008 policy violation, 1009 message too
// big, 1011 internal error, 1013 try again later), the server closes with:
//
//	4001  heartbeat timeout: the peer showed no life in time
//	4002  slow consumer: its outbound queue overflowed, or a write timed out
//	4003  disconnected by the server (Disconnect, DisconnectUser)
//	4004  rate limited (raw mode; protocol mode gets an error envelope)
//	4005  idle timeout (WithIdleTimeout; off by default)
//	4006  room reset: the broker lost messages of a joined room (KindReset)
//
// Package protocol names them (protocol.CloseSlowConsumer, with a String
// method), and the protocol's error codes and recovery reasons, for the
// server, the Go client and the host alike: DisconnectEvent.Code is a
// protocol.CloseCode.
//
// # The browser client
//
// The Handler serves its browser client, an ES module with TypeScript
// declarations, below its path: a page imports it from "/ws/roomcast.js"
// with no bundler and no CDN. Mount the Handler on the path and below it
// (mux.Handle("/ws", h) and mux.Handle("/ws/", h)), or use Middleware.
//
// # Room state
//
// Every message of a room carries the room's epoch, a sequence number and a
// unique ID. WithHistory (or WithRoomOptions, per room) makes rooms keep
// their last messages, bounded by count and by age; History reads them. A
// protocol client that reconnects subscribes with the position of the last
// message it got and receives exactly what it missed, or is told why it
// cannot (see PROTOCOL.md). Rooms are reclaimed once they have no
// subscribers and nothing left to keep, so a server that sees millions of
// distinct rooms does not grow with them.
//
// Presence tracks a room's members across the cluster: a user with several
// tabs is one member. Subscribers that ask get join and leave events;
// PresenceCounts keeps very large rooms cheap (no events, counts only).
//
// A subscriber that cannot keep up meets its room's SlowConsumerPolicy:
// SlowConsumerDisconnect (the default), SlowConsumerDropOldest, or
// SlowConsumerKeepLatest (for tickers). Each outcome is counted in Stats,
// RoomStats and ConnStats, which also show every subscriber's queue depth
// and lag.
//
// # Guarantees
//
//   - Within a room, messages carry a strictly increasing sequence number
//     (from 1 in each epoch) and every subscriber receives them in that
//     order. Live delivery is at most once per connection.
//   - Under SlowConsumerDisconnect a connection that stays open has missed
//     nothing: one whose queue would overflow is closed with 4002, never
//     silently skipped. Under the dropping policies the drops show as
//     gaps in seq and in the counters.
//   - A subscription's live stream has no hole within an epoch, whatever
//     the broker. When this node learns that messages of a room are gone
//     for good (its link to the cluster broke for longer than the history
//     covers, or the broker lost the room's state), the room's subscribers
//     here are closed with 4006 before anything past the hole: their last
//     position is the last message before it, so a resubscribe from it
//     recovers, or is told it cannot (history_too_short, epoch_changed).
//     The Handler checks every delivery itself, so a broker that skips
//     messages without saying so cannot make a subscriber skip them.
//   - With history, a client that resubscribes with its last (epoch, seq)
//     gets exactly the messages it missed, in order, before any live one,
//     with no gap and no duplicate even while publishes race with the
//     resubscribe; or it is told that recovery is impossible (epoch
//     changed, history too short) so it can reload state.
//   - Nothing grows without bound: each connection's outbound queue is
//     bounded in messages and bytes (WithQueueLimits); each room's history
//     by count and age; idle rooms are reclaimed. A slow consumer never
//     slows the publisher or other subscribers.
//   - Publish encodes a message once, whatever the number of subscribers,
//     and never blocks on a subscriber's socket.
//   - Bad input (malformed JSON, unknown types, oversized or binary frames
//     where text is expected, invalid room names, floods) gets a documented
//     error code or close code and never affects other connections.
//   - Shutdown drains: new upgrades get 503, each connection is sent what it
//     had queued and then closed with 1001, and every goroutine the Handler
//     started has ended when Shutdown returns.
//
// # Memory
//
// NewHandler starts no goroutine. ServeHTTP returns as soon as a
// connection is upgraded: net/http then frees the request's buffers and
// stack, which would otherwise live as long as the connection. The
// connection is served by a reader goroutine that the Handler owns, and
// its heartbeats by one goroutine for all connections. On Linux an idle connection has no goroutine at
// all: when nothing is left to read, its reader parks the connection with
// the Handler's poller (one epoll instance and one goroutine for every
// connection, through the standard library's syscall package) and ends;
// the poller starts a new reader when input arrives or the connection
// closes. Pongs to raw mode's heartbeat pings are taken, and a client's
// own pings answered, without waking coder/websocket, so an idle
// connection parks again right after either (a client that pings, as
// Python's websockets does every 20 seconds, keeps no goroutine). Elsewhere an idle connection keeps its one reader
// goroutine, waiting for input. What an idle connection costs is in
// BENCHMARKS.md ("Idle connections of each kind"). Consequences of returning early: the
// request's context ends at the upgrade (hooks get a context that lives as
// long as the connection instead), and middleware around the Handler sees
// the request finish at the upgrade, so a request logger reports the
// upgrade, not the connection's life. Hooks run on the connection's reader
// goroutine, or on the request's goroutine before the upgrade.
//
// Writing needs no goroutine per connection. A publish queues; a pool of
// at most GOMAXPROCS goroutines, running while something is queued,
// writes each waiting connection's queue with one system call that never
// waits, each message framed once and its bytes written as they are to
// every subscriber. A publish to a room of at most 8 subscribers on this
// node, with the built-in broker (which delivers on the publisher's
// goroutine), writes those system calls itself before it returns, for the
// subscribers no other writer has: a few writes cost less than waking a
// pool goroutine for them. Neither ever waits on one connection: a
// connection whose socket is full (its client reads slowly) or held by
// another write (a pong or close frame waiting on a full socket), one whose
// net.Conn is not the standard library's own TCP or Unix connection (TLS,
// or a listener that wraps its connections), and the close get a writer
// goroutine of their own, which waits on the socket up to WithWriteTimeout.
//
// # Goroutines and locks
//
// Every goroutine has one owner that starts it and waits for it:
//
//   - The connection's reader (conn.serveRead, reader.go): started by
//     conn.start once the upgrade registered the connection; counted in
//     the Handler's live group (at registration, under the Handler's mu, so
//     never after Shutdown began waiting); waited for by Shutdown and
//     Close. It reads, dispatches, runs the hooks of its connection, and at
//     the end waits for the connection's other goroutines before leaving
//     its rooms. On Linux it ends when it parks the connection
//     (conn.waitInput), handing the live count to the poller, which
//     starts the next reader (on input, on the close, from
//     beginClose or socket.Close, or from its sweep of connections closed
//     under the Handler) and hands the count back to it: a connection has
//     at most one reader at a time, or is parked.
//   - The poller (poller.run, poller_linux.go): one per Handler, started
//     by the first park, stopped and waited for by the Handler once every
//     connection has ended (Shutdown, Close).
//   - The writer pool (writerPool.work, writer.go): at most GOMAXPROCS
//     goroutines, started by writerPool.push when a connection has
//     something queued and fewer are running, ending when no connection
//     waits; the Handler's writers group, waited for by Shutdown and Close
//     after the readers.
//   - No goroutine of its own: a publish that writes a small room's
//     frames (inlineWrites, writer.go) does so on the publisher's
//     goroutine, as the pool's stand-in for the connections it claimed
//     (counted in each one's wg until it is written), after the room's
//     lock is released.
//   - A connection's own writer (conn.writeLoop): for a full or busy
//     socket, TLS or a host's wrapped connection, and the close. Started
//     by the connection (startWriterLocked, or handOverLocked, which hands
//     the pool's count over); counted in the connection's wg; waited for
//     by its reader.
//   - The heartbeats (heartbeats.run, heartbeat.go): one goroutine per
//     Handler, started by the first connection's heartbeat (scheduled by
//     conn.start, cancelled by beginClose), stopped and waited for by the
//     Handler once every connection has ended. It runs each connection's
//     heartbeat (conn.heartbeat) when due, which counts in the
//     connection's wg while it runs (unless closing began) and schedules
//     the next, so no heartbeat outlives its connection.
//   - Shutdown's waiter: Shutdown starts one goroutine that waits for the
//     groups above and closes a channel, and returns only after receiving
//     from it.
//   - An HTTP/2 event stream keeps its ServeHTTP call (net/http's
//     goroutine) until the stream ends; the Handler counts it with every
//     ServeHTTP call and Shutdown and Close wait for it.
//
// A connection's wg gets no Add once the connection is closing (every Add
// is made under its mu, after checking), so its reader's Wait, after
// beginClose, sees them all. Brokers own their goroutines and stop them in
// Close; the memory broker has none.
//
// Locks are taken in this order, never the other way: the broker's own
// (the memory broker's, then one room's), a registry shard's, a room's,
// a connection's, a socket's, the poller's; the writer pool's comes after
// a connection's too. The Handler's mu, the writer pool's and the
// poller's are leaves: nothing else is taken while one is held. No lock of the
// Handler, a room or a connection is held across a hook call, a broker
// call or a socket write; the socket's own lock is held across a write,
// to keep our frames and coder/websocket's control frames whole. A room's
// deliveries never overlap (the Broker contract), which is why deliver
// writes a subscription's catch-up state under the room's read lock:
// catchUp, the only other writer, takes the write lock.
//
// # Where things are
//
// One concept per file; the data path reads in one direction, publish →
// broker → room → queue → writer → socket:
//
//	doc.go         this overview
//	pubsub.go      Handler, NewHandler, the publish API, Shutdown and Close
//	upgrade.go     ServeHTTP: request checks, authentication, admission, mode, hijack, registration
//	hooks.go       Identity, Client and the hooks' events; calling hooks, their verdicts
//	options.go     every Option, its default and range; RoomOptions
//	middleware.go  Middleware and FromContext
//	conn.go        one connection's life: close, heartbeats, the end
//	reader.go      reading a connection and dispatching its requests; subscribe
//	sse.go         event streams: their rooms, events, ids and recovery
//	room.go        the room registry, joining, catching up, fan-out, resets
//	queue.go       a connection's bounded outbound queue and the slow-consumer policies
//	writer.go      the writer pool and a connection's own writer
//	socket.go      the hijacked connection under coder/websocket
//	poller_linux.go  where idle connections wait for input without a goroutine (epoll); poller_other.go elsewhere
//	rawwrite_*.go  the system calls that never wait, per platform
//	frame.go       a message framed once per mode, shared by every queue
//	protocol.go    encoding and decoding protocol-mode envelopes (no I/O)
//	stats.go       Stats, RoomStats, ConnStats
//	broker.go      the Broker interface and the types it carries
//	memory.go      the in-process broker, the default
//	clientjs.go    the embedded browser client
//
// Beside it: package protocol (the wire vocabulary), package client (the
// Go client), package pubsubtest (the test kit), package brokertest (the
// Broker conformance suite), js/ (the browser client), a module per
// broker on another engine (redisbroker, pgbroker, natsbroker), and the
// metrics module (Prometheus).
//
// # Shutdown
//
// http.Server.Shutdown does not close hijacked connections such as
// WebSockets, and does not wait for them. Drain both, with one deadline:
//
//	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
//	defer cancel()
//	srv.Shutdown(ctx) // stop accepting; finish plain HTTP requests
//	ps.Shutdown(ctx)  // flush and close every WebSocket with 1001
//
// Close is the immediate variant: no flush, no close handshake.
//
// # More than one node
//
// A Broker carries publishes between nodes and owns each room's sequence,
// history and presence. The default, NewMemoryBroker, serves a single
// process; adapters for other engines live in their own modules, and
// brokertest checks each against the Broker contract.
//
// # Testing an app
//
// Package pubsubtest serves a Handler (or the whole app) on a loopback
// port and dials real raw and protocol clients, so an app tests its own
// authentication, authorization and publishing end to end.
package pubsub
