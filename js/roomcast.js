// roomcast browser client for the roomcast.v1 protocol (see PROTOCOL.md).
//
// A plain ES module: no build step, no dependencies. It runs in modern
// browsers, and in Node 20 when given a WebSocket implementation.
//
//   import { connect } from "/roomcast.js";
//   const client = connect("/ws");
//   const chat = client.subscribe("chat", { onMessage: (m) => show(m.data) });
//   await client.publish("chat", { text: "hi" });

/** The WebSocket subprotocol this client speaks. */
export const PROTOCOL = "roomcast.v1";

/**
 * The protocol's vocabulary (PROTOCOL.md sections 3.5, 3.7 and 4), the same
 * names as the Go package github.com/roomcast/pubsub/protocol: a Go test
 * checks that every name and value here matches it.
 */
export const CLOSE = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  UNSUPPORTED_DATA: 1003,
  ABNORMAL: 1006,
  INVALID_PAYLOAD: 1007,
  POLICY_VIOLATION: 1008,
  MESSAGE_TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
  TRY_AGAIN_LATER: 1013,
  HEARTBEAT_TIMEOUT: 4001,
  SLOW_CONSUMER: 4002,
  DISCONNECTED: 4003,
  RATE_LIMITED: 4004,
  IDLE_TIMEOUT: 4005,
  ROOM_RESET: 4006,
});

/** Error codes of the server's "error" envelopes (PROTOCOL.md 3.5). */
export const ERROR = Object.freeze({
  BAD_REQUEST: "bad_request",
  UNKNOWN_TYPE: "unknown_type",
  INVALID_ROOM: "invalid_room",
  FORBIDDEN: "forbidden",
  TOO_MANY_ROOMS: "too_many_rooms",
  RATE_LIMITED: "rate_limited",
  NOT_SUBSCRIBED: "not_subscribed",
  NOT_SUPPORTED: "not_supported",
  REJECTED: "rejected",
  UNAVAILABLE: "unavailable",
  INTERNAL: "internal",
});

/** Why a recovery was refused (PROTOCOL.md 3.7). */
export const REASON = Object.freeze({
  EPOCH_CHANGED: "epoch_changed",
  HISTORY_TOO_SHORT: "history_too_short",
  TOO_MANY_MISSED: "too_many_missed",
  UNKNOWN_POSITION: "unknown_position",
});

/**
 * The error a request's Promise rejects with. `code` is one of the server's
 * error codes (PROTOCOL.md section 3.5) or one of the client's own:
 * "disconnected" (the request was not sent, or its connection dropped
 * before the reply; for a publish: the client was closed), "too_large"
 * (the envelope exceeds the server's max_message_bytes; sending it would
 * have closed the connection), "outbox_full" (too many publishes wait for
 * the server) and "expired" (a publish could not be confirmed within the
 * server's key window: it may or may not have been published).
 */
export class RoomcastError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {number} [closeCode] with "disconnected" after a drop: the close code
   */
  constructor(code, message, closeCode) {
    super(message);
    this.name = "RoomcastError";
    /** @type {string} */
    this.code = code;
    if (closeCode !== undefined) {
      /** @type {number | undefined} */
      this.closeCode = closeCode;
    }
  }
}

// Close codes after which reconnecting would not help: the server
// disconnected the client on purpose (4003), or the client broke the
// protocol (1003 binary frame, 1007 invalid UTF-8, 1008 policy).
// 4005: the server closed an idle connection; come back on the app's next
// action (connect again), not at once.
const FINAL_CLOSE_CODES = new Set([
  CLOSE.UNSUPPORTED_DATA, CLOSE.INVALID_PAYLOAD, CLOSE.POLICY_VIOLATION, CLOSE.DISCONNECTED, CLOSE.IDLE_TIMEOUT,
]);

// Error codes worth retrying a subscribe for, after a delay.
const TRANSIENT_CODES = new Set([ERROR.RATE_LIMITED, ERROR.UNAVAILABLE, ERROR.INTERNAL]);

/**
 * Opens a client connection to a roomcast server in protocol mode. The
 * client starts in state "connecting" and keeps itself connected (unless
 * `reconnect` is false) until `close()` is called.
 *
 * @param {string | URL} url the endpoint, absolute ("wss://host/ws") or
 *   relative to the page ("/ws"); http: and https: become ws: and wss:.
 * @param {import("./roomcast").ConnectOptions} [options]
 * @returns {Client}
 */
export function connect(url, options = {}) {
  return new Client(url, options);
}

/**
 * One logical connection to the server that survives reconnects. Create it
 * with `connect()`.
 */
export class Client {
  /**
   * @param {string | URL} url
   * @param {import("./roomcast").ConnectOptions} options
   */
  constructor(url, options) {
    const o = {
      ...options,
      reconnect: options.reconnect ?? true,
      minDelay: options.minDelay ?? 500,
      maxDelay: options.maxDelay ?? 30000,
      jitter: options.jitter ?? 0.5,
      connectTimeout: options.connectTimeout ?? 10000,
      outbox: options.outbox ?? 1000,
      fallback: options.fallback ?? "sse",
      fallbackAfter: options.fallbackAfter ?? 2,
    };
    if (!(o.minDelay > 0)) throw new RangeError("roomcast: minDelay must be > 0");
    if (!(o.maxDelay >= o.minDelay)) throw new RangeError("roomcast: maxDelay must be >= minDelay");
    if (!(o.jitter >= 0 && o.jitter <= 1)) throw new RangeError("roomcast: jitter must be from 0 to 1");
    if (!(o.connectTimeout > 0)) throw new RangeError("roomcast: connectTimeout must be > 0");
    if (!(Number.isInteger(o.outbox) && o.outbox >= 1)) throw new RangeError("roomcast: outbox must be an integer >= 1");
    if (o.fallback !== "sse" && o.fallback !== "none") throw new RangeError('roomcast: fallback must be "sse" or "none"');
    if (!(Number.isInteger(o.fallbackAfter) && o.fallbackAfter >= 1)) throw new RangeError("roomcast: fallbackAfter must be an integer >= 1");
    this._EventSource = o.EventSource ?? globalThis.EventSource;
    this._WebSocket = o.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError("roomcast: no WebSocket implementation; pass options.WebSocket");
    }
    this._url = resolveURL(url);
    this._opts = o;
    this._timers = {
      setTimeout: o.timers?.setTimeout ?? ((fn, ms) => globalThis.setTimeout(fn, ms)),
      clearTimeout: o.timers?.clearTimeout ?? ((/** @type {any} */ t) => globalThis.clearTimeout(t)),
      now: o.timers?.now ?? (() => performance.now()), // monotonic: immune to clock changes
    };

    /**
     * "connecting" (first attempt), "open" (welcomed), "reconnecting"
     * (waiting or dialing again after a drop), "closed" (for good).
     * @type {import("./roomcast").State}
     */
    this.state = "connecting";
    /** This connection's id from the server's welcome; null until then. @type {string | null} */
    this.connId = null;
    /** The authenticated user from the welcome; null when anonymous. @type {string | null} */
    this.userId = null;

    /** @type {Map<string, Subscription>} */
    this._subs = new Map();
    /** @type {Set<(msg: any) => void>} */
    this._direct = new Set();
    /** @type {Map<string, {ok: (env: any) => void, fail: (err: RoomcastError) => void}>} */
    this._pending = new Map();
    /** Publishes waiting for the server's answer, oldest first. @type {Outgoing[]} */
    this._outbox = [];
    this._keyTTL = 0; // key_ttl_ms from the welcome; 0 when the server does not say
    this._failedDials = 0; // WebSocket attempts in a row that got no welcome
    this._es = null; // the EventSource while listening (state "listening")
    this._listening = false;
    this._probing = false; // _es is a probe: does the server answer HTTP while the WebSocket fails?
    this._httpUp = false; // a probe stream opened since the last welcome: the WebSocket alone fails
    this._ws = null;
    this._nextId = 0;
    this._attempt = 0; // failed attempts since the last welcome
    this._retryTimer = null;
    this._deadTimer = null;
    this._lastSeen = 0;
    this._deadAfter = 0; // heartbeat_ms + timeout_ms from the welcome
    this._maxBytes = Infinity;
    this._dial();
  }

  /**
   * Subscribes to a room. The subscription lasts across reconnects: after
   * each one it is renewed with `since` set to `sub.position`, and
   * `onRecover` says whether exactly the missed messages followed. Throws
   * if this client already has a subscription to the room.
   *
   * @param {string} room
   * @param {import("./roomcast").SubscribeOptions} [options]
   * @returns {Subscription}
   */
  subscribe(room, options = {}) {
    if (typeof room !== "string" || room === "") throw new TypeError("roomcast: room must be a non-empty string");
    if (this.state === "closed") throw new Error("roomcast: the client is closed");
    if (this._subs.has(room)) throw new Error(`roomcast: already subscribed to ${JSON.stringify(room)}; unsubscribe first`);
    if (options.info !== undefined && (options.info === null || typeof options.info !== "object" || Array.isArray(options.info))) {
      throw new TypeError("roomcast: options.info must be a plain object");
    }
    JSON.stringify(options.info); // throws now, not at every (re)subscribe, if it has no JSON form
    const sub = new Subscription(this, room, options);
    this._subs.set(room, sub);
    if (this.state === "open") this._sendSubscribe(sub);
    if (this._listening) this._listen();
    return sub;
  }

  /**
   * Publishes into a room (the client need not be subscribed), exactly
   * once. The value is sent as JSON in "data"; to send a string or bytes as
   * they are, pass `undefined` as the value and `{text}` or `{binary}`.
   *
   * The publish waits in the client's outbox, under a random key, until the
   * server answers: while the client reconnects it waits there, and when a
   * connection drops before the answer it is sent again on the next one,
   * with the same key, before any newer publish. The server publishes a
   * key once (PROTOCOL.md section 3.10), so the message appears once, and
   * this client's publishes keep their order. Resolves, once, with where
   * it landed, whichever attempt got through. Rejects with a RoomcastError:
   * a server error code (forbidden, invalid_room…: not published;
   * rate_limited, unavailable and internal are tried again), "too_large",
   * "outbox_full" (the `outbox` option), "expired" (not confirmed within
   * the server's key window: it may or may not have been published), or
   * "disconnected" when the client is closed first.
   *
   * @param {string} room
   * @param {unknown} value
   * @param {import("./roomcast").PayloadOptions} [options]
   * @returns {Promise<import("./roomcast").Published>}
   */
  publish(room, value, options) {
    const p = payload(value, options);
    if (p instanceof Error) return Promise.reject(p);
    if (this.state === "closed") return Promise.reject(new RoomcastError("disconnected", "roomcast: the client is closed"));
    if (this._listening) {
      return Promise.reject(new RoomcastError("listening_only", "roomcast: listening over an event stream (the WebSocket cannot connect): publish through the application instead"));
    }
    if (this._outbox.length >= this._opts.outbox) {
      return Promise.reject(new RoomcastError("outbox_full", `roomcast: ${this._outbox.length} publishes already wait for the server`));
    }
    return new Promise((resolve, reject) => {
      const env = { type: "publish", room, key: randomKey(), ...p };
      if (this._tooLarge(env)) {
        reject(new RoomcastError("too_large", `roomcast: the message is larger than the server's limit of ${this._maxBytes} bytes`));
        return;
      }
      const o = { env, resolve, reject, sentAt: 0, sent: false, retry: null };
      this._outbox.push(o);
      if (this.state === "open") this._sendOutgoing(o);
    });
  }

  /**
   * Sends a message to the server's own message handler (type "send"), not
   * to a room; `options.room` is passed on to the handler. Same payload
   * rules, acknowledgement and errors as `publish`.
   *
   * @param {unknown} value
   * @param {import("./roomcast").SendOptions} [options]
   * @returns {Promise<void>}
   */
  send(value, options) {
    const p = payload(value, options);
    if (p instanceof Error) return Promise.reject(p);
    const env = options?.room === undefined ? { type: "send", ...p } : { type: "send", room: options.room, ...p };
    return this._request(env).then(() => undefined);
  }

  /**
   * Calls `callback` with each direct message (one the server addressed to
   * this connection or its user). Returns a function that stops it.
   *
   * @param {(msg: import("./roomcast").DirectMessage) => void} callback
   * @returns {() => void}
   */
  onDirect(callback) {
    this._direct.add(callback);
    return () => this._direct.delete(callback);
  }

  /**
   * Closes the connection for good (code 1000) and stops reconnecting.
   * Pending requests reject with code "disconnected". Calling it again does
   * nothing.
   */
  close() {
    if (this.state === "closed") return;
    this._drop(1000, "closed by the client", true);
  }

  // ---- listening over an event stream, when the WebSocket cannot connect ----

  /**
   * Listens to the subscribed rooms over an event stream (Server-Sent
   * Events, PROTOCOL.md section 8), where every subscription goes on from
   * its position; with no room, nothing is opened until one is subscribed.
   * The state is "listening": messages arrive, but requests (publish, send,
   * presence) fail with "listening_only". The WebSocket is tried again
   * every maxDelay; once it connects the client leaves the event stream and
   * resubscribes from the positions it reached.
   *
   * With probe, the stream only asks whether the server answers HTTP while
   * the WebSocket fails: a server that is down (restarting) fails both, and
   * the client keeps reconnecting; once the probe opens, the client closes
   * it before any event and dials the WebSocket at once. Only if that fails
   * too, with the server up, does it listen.
   */
  _listen(probe = false) {
    this._es?.close();
    this._es = null;
    this._probing = probe;
    const rooms = [...this._subs.keys()];
    if (rooms.length === 0) return;
    const url = new URL(this._url);
    url.protocol = url.protocol === "wss:" ? "https:" : "http:";
    for (const room of rooms) url.searchParams.append("room", room);
    url.searchParams.set("last_event_id", sseID(rooms.map((r) => this._subs.get(r).position)));
    const es = new this._EventSource(url.href, { withCredentials: true });
    this._es = es;
    const on = (name, fn) => es.addEventListener(name, (e) => { if (this._es === es) fn(e); });
    for (const room of rooms) {
      on(room, (e) => this._onStreamMessage(room, rooms, e, false));
      on(room + "+base64", (e) => this._onStreamMessage(room, rooms, e, true));
    }
    on("+reset", (e) => {
      const r = parseJSON(e.data);
      const sub = this._subs.get(r?.room);
      if (!sub) return;
      sub.position = positionOf(e.lastEventId, rooms, r.room) ?? sub.position;
      call(sub._opts.onRecover, { recovered: false, missed: 0, reason: String(r.reason ?? "unknown") });
    });
    on("+direct", (e) => {
      const msg = streamPayload(e.data, false);
      for (const cb of [...this._direct]) call(cb, msg);
    });
    on("+close", (e) => {
      const c = parseJSON(e.data) ?? {};
      if (FINAL_CLOSE_CODES.has(c.code)) this._drop(c.code, String(c.reason ?? ""), true);
    });
    es.onopen = () => {
      if (this._es !== es || !this._probing) return;
      // The server is up: try the WebSocket now, with no event taken.
      es.close();
      this._es = null;
      this._probing = false;
      this._httpUp = true;
      if (this._ws) return; // a dial is under way already
      this._timers.clearTimeout(this._retryTimer);
      this._dial();
    };
    es.onerror = () => {
      // EventSource reconnects by itself (with Last-Event-ID) unless the
      // server refused the stream: then try the WebSocket again (a probe
      // just ends; the reconnect schedule goes on).
      if (this._es === es && es.readyState === 2) {
        this._es = null;
        if (this._probing) {
          this._probing = false;
          return;
        }
        this._listening = this._httpUp = false;
        this._retryTimer = this._timers.setTimeout(() => this._dial(), this._opts.minDelay);
      }
    };
  }

  _onStreamMessage(room, rooms, e, base64) {
    const sub = this._subs.get(room);
    if (!sub?.active) return;
    const pos = positionOf(e.lastEventId, rooms, room);
    const p = sub.position;
    if (pos && p && pos.epoch === p.epoch && pos.seq <= p.seq) return; // seen already
    if (pos) sub.position = pos;
    const msg = streamPayload(e.data, base64);
    call(sub._opts.onMessage, {
      room,
      epoch: pos?.epoch ?? null,
      seq: pos?.seq ?? null,
      id: null, // an event stream carries positions, not message ids
      time: null,
      data: msg.data,
      raw: msg.raw,
    });
  }

  _stopListening() {
    this._es?.close();
    this._es = null;
    this._listening = this._probing = false;
  }

  // ---- connection lifecycle ----

  _dial() {
    this._retryTimer = null;
    let ws;
    try {
      ws = new this._WebSocket(this._url, PROTOCOL);
    } catch (err) {
      this._drop(CLOSE.ABNORMAL, `cannot open a WebSocket: ${err?.message ?? err}`);
      return;
    }
    this._ws = ws;
    this._nextId = 0;
    // A handshake that hangs (a stalled server, a half-open network) would
    // otherwise keep the client waiting for as long as the OS lets it.
    const limit = this._opts.connectTimeout;
    this._deadTimer = this._timers.setTimeout(() => {
      this._deadTimer = null;
      this._drop(CLOSE.ABNORMAL, `connect timeout: no welcome within ${limit} ms`);
    }, limit);
    ws.onmessage = (ev) => this._onFrame(ev.data);
    ws.onclose = (ev) => this._drop(ev.code || CLOSE.ABNORMAL, ev.reason || "");
    // Browsers follow an error with a close (1006), but Node 20's WebSocket
    // fires no close after a refused connection: the error is the drop.
    ws.onerror = () => this._drop(CLOSE.ABNORMAL, "connection failed");
  }

  /**
   * Ends the current socket, if any, and either schedules a reconnect or
   * enters "closed". Everything that ends a connection comes through here.
   */
  _drop(code, reason, final = false) {
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onmessage = ws.onclose = ws.onerror = null;
      if (ws.readyState === 0 || ws.readyState === 1) {
        try {
          ws.close(code === 1000 || (code >= 3000 && code <= 4999) ? code : 1000, reason.slice(0, 123));
        } catch {
          // already closing
        }
      }
    }
    this._timers.clearTimeout(this._deadTimer);
    this._timers.clearTimeout(this._retryTimer);
    this._deadTimer = this._retryTimer = null;
    const welcomed = this.connId !== null;
    this.connId = null;
    for (const sub of this._subs.values()) sub._stopRetry();
    for (const o of this._outbox) o.sent = false; // the next connection sends them again

    const pending = [...this._pending.values()];
    this._pending.clear();
    const err = new RoomcastError("disconnected", `roomcast: disconnected (close ${code}${reason ? ": " + reason : ""})`, code);

    if (final || !this._opts.reconnect || FINAL_CLOSE_CODES.has(code)) {
      this._stopListening();
      this.state = "closed";
      for (const p of pending) p.fail(err);
      const outbox = this._outbox;
      this._outbox = [];
      for (const o of outbox) {
        this._timers.clearTimeout(o.retry);
        o.reject(err);
      }
      this._emit("closed", { code, reason });
      return;
    }
    if (!welcomed) this._failedDials++;
    const canListen = this._opts.fallback === "sse" && typeof this._EventSource === "function";
    if (canListen && (this._listening || this._httpUp)) {
      // The server answers HTTP but the WebSocket does not connect (a
      // proxy that breaks it): listen over an event stream meanwhile, and
      // try the WebSocket again later.
      for (const p of pending) p.fail(err);
      this._retryTimer = this._timers.setTimeout(() => this._dial(), this._opts.maxDelay);
      if (!this._es) this._listen();
      if (!this._listening) {
        this._listening = true;
        this.state = "listening";
        this._emit("listening", { code, reason, transport: "sse" });
      }
      return;
    }
    const delay = this._backoff(this._attempt++);
    this.state = "reconnecting";
    this._retryTimer = this._timers.setTimeout(() => this._dial(), delay);
    // After fallbackAfter failures, ask meanwhile whether the server
    // answers HTTP (see _listen): a restarting server does not, a network
    // that breaks WebSocket does.
    if (canListen && this._failedDials >= this._opts.fallbackAfter && !this._es) this._listen(true);
    for (const p of pending) p.fail(err);
    this._emit("reconnecting", { code, reason, delay, attempt: this._attempt });
  }

  /** The delay before retry number `n` (0 first): exponential, capped, jittered. */
  _backoff(n) {
    const { minDelay, maxDelay, jitter } = this._opts;
    const base = Math.min(maxDelay, minDelay * 2 ** Math.min(n, 52));
    return base * (1 - jitter * Math.random());
  }

  _emit(state, detail) {
    call(this._opts.onStateChange, state, detail);
  }

  _onFrame(data) {
    this._lastSeen = this._timers.now();
    if (typeof data !== "string") return; // protocol mode is text only
    let env;
    try {
      env = JSON.parse(data);
    } catch {
      return;
    }
    if (env === null || typeof env !== "object") return;
    switch (env.type) {
      case "welcome":
        return this._onWelcome(env);
      case "ping":
        return this._write({ type: "pong" });
      case "message":
        return this._subs.get(env.room)?._onMessage(env);
      case "join":
      case "leave":
        return this._subs.get(env.room)?._onPresenceEvent(env);
      case "direct":
        for (const cb of [...this._direct]) call(cb, decodePayload(env));
        return;
      case "ack":
      case "presence": {
        const p = this._pending.get(env.id);
        if (p) {
          this._pending.delete(env.id);
          p.ok(env);
        }
        return;
      }
      case "error": {
        // An error without id answers a request sent without one; this
        // client always sends ids, so there is nobody to tell.
        const p = this._pending.get(env.id);
        if (p) {
          this._pending.delete(env.id);
          p.fail(new RoomcastError(String(env.code), String(env.message ?? env.code)));
        }
        return;
      }
      // pong and unknown types: ignored, as PROTOCOL.md asks.
    }
  }

  _onWelcome(env) {
    this._stopListening(); // the WebSocket is back (or a probe was still out)
    this._failedDials = 0;
    this._httpUp = false;
    this.connId = env.conn_id ?? null;
    this.userId = env.user_id ?? null;
    this._attempt = 0;
    this._maxBytes = env.max_message_bytes > 0 ? env.max_message_bytes : Infinity;
    this._keyTTL = env.key_ttl_ms > 0 ? env.key_ttl_ms : 0;
    this._deadAfter = (env.heartbeat_ms ?? 0) + (env.timeout_ms ?? 0);
    this._timers.clearTimeout(this._deadTimer); // the connect timeout
    this._deadTimer = null;
    this._watchHeartbeat();
    this.state = "open";
    // The outbox first, oldest first: nothing newer overtakes a publish
    // that waited.
    for (const o of [...this._outbox]) {
      if (o.retry === null) this._sendOutgoing(o);
    }
    for (const sub of this._subs.values()) this._sendSubscribe(sub);
    this._emit("open", {
      connId: this.connId,
      userId: this.userId,
      heartbeatMs: env.heartbeat_ms,
      timeoutMs: env.timeout_ms,
      maxMessageBytes: env.max_message_bytes,
      maxRooms: env.max_rooms,
    });
  }

  /**
   * Declares the connection dead when nothing at all arrived for
   * heartbeat_ms + timeout_ms; the server pings every heartbeat_ms.
   */
  _watchHeartbeat() {
    if (!(this._deadAfter > 0)) return;
    const check = () => {
      const silent = this._timers.now() - this._lastSeen;
      if (silent >= this._deadAfter) {
        this._deadTimer = null;
        this._drop(CLOSE.HEARTBEAT_TIMEOUT, "heartbeat timeout: nothing received from the server");
        return;
      }
      this._deadTimer = this._timers.setTimeout(check, this._deadAfter - silent);
    };
    this._deadTimer = this._timers.setTimeout(check, this._deadAfter);
  }

  // ---- requests ----

  /** Sends an envelope without id; false when there is no open connection. */
  _write(env) {
    if (this.state !== "open") return false;
    this._ws.send(JSON.stringify(env));
    return true;
  }

  /**
   * Sends env with a fresh id and calls ok(reply) or fail(err) once. Fails
   * at once with "disconnected" when not open, or "too_large".
   */
  _send(env, ok, fail) {
    if (this._listening) {
      fail(new RoomcastError("listening_only", "roomcast: listening over an event stream (the WebSocket cannot connect): requests need it"));
      return;
    }
    if (this.state !== "open") {
      fail(new RoomcastError("disconnected", `roomcast: not connected (state ${this.state})`));
      return;
    }
    const id = String(++this._nextId);
    const text = JSON.stringify({ ...env, id });
    if (this._tooLarge(text)) {
      fail(new RoomcastError("too_large", `roomcast: the message is larger than the server's limit of ${this._maxBytes} bytes`));
      return;
    }
    this._pending.set(id, { ok, fail });
    this._ws.send(text);
  }

  /** Whether env (an envelope, or its JSON) exceeds max_message_bytes, id included. */
  _tooLarge(env) {
    const text = typeof env === "string" ? env : JSON.stringify({ ...env, id: "0000000000" });
    return text.length * 3 > this._maxBytes && utf8Length(text) > this._maxBytes;
  }

  /**
   * Sends one attempt of an outbox entry. Its answer resolves it, or, for a
   * transient refusal, tries it again later with the same key; a dropped
   * connection leaves it for the next one. A publish first sent longer ago
   * than the server's key window fails with "expired" instead: the server
   * might not recognise it any more.
   */
  _sendOutgoing(o) {
    if (o.sent || this.state !== "open") return;
    if (this._keyTTL > 0 && o.sentAt > 0 && this._timers.now() - o.sentAt > this._keyTTL) {
      this._settle(o, () => o.reject(new RoomcastError("expired", "roomcast: the publish could not be confirmed within the server's key window; it may or may not have been published")));
      return;
    }
    if (o.sentAt === 0) o.sentAt = this._timers.now();
    o.sent = true;
    this._send(
      o.env,
      (ack) => this._settle(o, () => o.resolve({
        room: ack.room ?? o.env.room,
        epoch: ack.epoch ?? null,
        seq: ack.seq ?? null,
        messageId: ack.message_id ?? null,
        duplicate: ack.duplicate === true,
      })),
      (err) => {
        if (err.code === "disconnected") return; // o.sent was reset by the drop: the next connection sends it
        if (TRANSIENT_CODES.has(err.code)) {
          o.sent = false;
          o.retry = this._timers.setTimeout(() => {
            o.retry = null;
            this._sendOutgoing(o);
          }, 1000);
          return;
        }
        this._settle(o, () => o.reject(err));
      },
    );
  }

  /** Takes o out of the outbox and runs settle (its resolve or reject), once. */
  _settle(o, settle) {
    const i = this._outbox.indexOf(o);
    if (i < 0) return;
    this._outbox.splice(i, 1);
    this._timers.clearTimeout(o.retry);
    o.retry = null;
    settle();
  }

  /** _send as a Promise of the reply envelope. */
  _request(env) {
    return new Promise((resolve, reject) => this._send(env, resolve, reject));
  }

  /** Sends the subscribe for sub on the current connection. */
  _sendSubscribe(sub) {
    const env = { type: "subscribe", room: sub.room };
    const resuming = sub.position !== null;
    if (resuming) env.since = { epoch: sub.position.epoch, seq: sub.position.seq };
    else if (sub._opts.history > 0) env.history = sub._opts.history;
    if (sub._opts.presence) env.presence = true;
    if (sub._opts.info !== undefined) env.info = sub._opts.info;
    this._send(
      env,
      (ack) => sub._onAck(ack, resuming),
      (err) => sub._onSubscribeError(err),
    );
  }
}

/** A client's subscription to one room. Create it with `client.subscribe()`. */
export class Subscription {
  /**
   * @param {Client} client
   * @param {string} room
   * @param {import("./roomcast").SubscribeOptions} options
   */
  constructor(client, room, options) {
    /** The room. @type {string} */
    this.room = room;
    /**
     * Where the subscription stands in the room: the last message
     * delivered, or, before any, the position the server's ack gave. It is
     * the `since` of the next resubscribe. Null until the first ack.
     * @type {import("./roomcast").Position | null}
     */
    this.position = null;
    /** True until unsubscribe() or a refused subscribe. @type {boolean} */
    this.active = true;
    this._client = client;
    this._opts = options;
    this._failures = 0;
    this._retry = null;
  }

  /**
   * Leaves the room: no callback of this subscription runs from now on.
   * Resolves once the server confirms, or at once when disconnected (the
   * subscription is not renewed). Rejects with a RoomcastError if the
   * server refuses (e.g. "rate_limited").
   *
   * @returns {Promise<void>}
   */
  unsubscribe() {
    if (!this.active) return Promise.resolve();
    this._end();
    if (this._client._listening) {
      this._client._listen(); // the event stream goes on without the room
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => {
      this._client._send(
        { type: "unsubscribe", room: this.room },
        () => resolve(),
        (err) => (err.code === "disconnected" || err.code === ERROR.NOT_SUBSCRIBED ? resolve() : reject(err)),
      );
    });
  }

  /**
   * Asks the server who is in the room. Rejects with "not_supported" in a
   * room that does not track presence; `members` is empty in a room that
   * tracks counts only.
   *
   * @returns {Promise<import("./roomcast").Presence>}
   */
  presence() {
    return this._client._request({ type: "presence", room: this.room }).then((p) => ({
      count: p.count,
      connections: p.connections,
      members: (p.members ?? []).map((m) => ({
        conns: m.conns ?? [],
        userId: m.user_id ?? null,
        info: m.info ?? null,
      })),
    }));
  }

  _end() {
    this.active = false;
    this._stopRetry();
    if (this._client._subs.get(this.room) === this) this._client._subs.delete(this.room);
  }

  _stopRetry() {
    this._client._timers.clearTimeout(this._retry);
    this._retry = null;
  }

  _onAck(ack, resuming) {
    if (!this.active) return;
    this._failures = 0;
    if (typeof ack.epoch === "string" && typeof ack.seq === "number") {
      // The `missed` replayed messages end at ack.seq, so the position
      // just before them is where this subscription now stands.
      const missed = ack.missed ?? 0;
      this.position = { epoch: ack.epoch, seq: ack.seq - missed };
    }
    const o = this._opts;
    call(o.onSubscribe, {
      epoch: ack.epoch,
      seq: ack.seq,
      presence: ack.presence,
      missed: ack.missed ?? 0,
      resumed: resuming,
    });
    if (resuming && typeof ack.recovered === "boolean") {
      const r = { recovered: ack.recovered, missed: ack.missed ?? 0 };
      if (!ack.recovered) r.reason = ack.reason ?? "unknown";
      call(o.onRecover, r);
    }
  }

  _onSubscribeError(err) {
    if (!this.active || err.code === "disconnected") return; // renewed on the next welcome
    if (TRANSIENT_CODES.has(err.code)) {
      const c = this._client;
      this._retry = c._timers.setTimeout(() => {
        this._retry = null;
        if (this.active && c.state === "open") c._sendSubscribe(this);
      }, c._backoff(this._failures++));
    } else {
      this._end(); // refused for good: forget it
    }
    call(this._opts.onError, err);
  }

  _onMessage(env) {
    const p = this.position;
    if (p && env.epoch === p.epoch && env.seq <= p.seq) return; // seen already
    this.position = { epoch: env.epoch, seq: env.seq };
    const msg = decodePayload(env);
    call(this._opts.onMessage, {
      room: env.room,
      epoch: env.epoch,
      seq: env.seq,
      id: env.message_id,
      time: new Date(env.time),
      data: msg.data,
      raw: msg.raw,
    });
  }

  _onPresenceEvent(env) {
    const member = { connId: env.conn_id ?? null, userId: env.user_id ?? null, info: env.info ?? null };
    call(env.type === "join" ? this._opts.onJoin : this._opts.onLeave, member);
  }
}

// ---- helpers ----

/** Calls an application callback; its exception is reported, not propagated into the client. */
function call(fn, ...args) {
  if (typeof fn !== "function") return;
  try {
    fn(...args);
  } catch (err) {
    if (typeof globalThis.reportError === "function") globalThis.reportError(err);
    else queueMicrotask(() => { throw err; });
  }
}

/** Resolves a relative or http(s) URL against the page into a ws(s) URL. */
function resolveURL(url) {
  const base = globalThis.location?.href;
  let u;
  try {
    u = base === undefined ? new URL(url) : new URL(url, base);
  } catch {
    throw new TypeError(`roomcast: invalid URL ${JSON.stringify(String(url))}` + (base === undefined ? " (relative URLs need a page location)" : ""));
  }
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  else if (u.protocol !== "ws:" && u.protocol !== "wss:") throw new TypeError(`roomcast: unsupported URL scheme ${u.protocol}`);
  return u.href;
}

/**
 * The payload fields of a publish or send; an Error when the arguments
 * name none or several (returned, so the caller's Promise rejects).
 */
function payload(value, options) {
  const text = options?.text;
  const binary = options?.binary;
  const given = [value, text, binary].filter((x) => x !== undefined).length;
  if (given !== 1) return new TypeError("roomcast: give exactly one of a value, options.text or options.binary");
  if (text !== undefined) {
    if (typeof text !== "string") return new TypeError("roomcast: options.text must be a string");
    return { text };
  }
  if (binary !== undefined) {
    if (!(binary instanceof Uint8Array)) return new TypeError("roomcast: options.binary must be a Uint8Array");
    return { binary: toBase64(binary) };
  }
  if (typeof value === "function" || typeof value === "symbol") return new TypeError("roomcast: the value has no JSON form");
  return { data: value };
}

/** The payload of a message or direct envelope, as {data, raw: {kind}}. */
function decodePayload(env) {
  if ("data" in env) return { data: env.data, raw: { kind: "json" } };
  if ("text" in env) return { data: env.text, raw: { kind: "text" } };
  return { data: fromBase64(env.binary ?? ""), raw: { kind: "binary" } };
}

function toBase64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

function fromBase64(b64) {
  const s = atob(b64);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

/** The last_event_id of an event stream for these positions (null: none in that room). */
function sseID(positions) {
  const json = JSON.stringify(positions.map((p) => (p ? [p.epoch, p.seq] : ["", 0])));
  return toBase64(new TextEncoder().encode(json)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** A room's position in an event stream's id (base64url of [[epoch, seq], ...]), or null. */
function positionOf(id, rooms, room) {
  const i = rooms.indexOf(room);
  if (i < 0 || !id) return null;
  try {
    const b64 = id.replace(/-/g, "+").replace(/_/g, "/");
    const list = JSON.parse(new TextDecoder().decode(fromBase64(b64 + "===".slice((b64.length + 3) % 4))));
    const [epoch, seq] = list[i];
    return typeof epoch === "string" && epoch !== "" && typeof seq === "number" ? { epoch, seq } : null;
  } catch {
    return null;
  }
}

function parseJSON(s) {
  try {
    return JSON.parse(s);
  } catch {
    return null;
  }
}

/**
 * An event stream's payload as the protocol's kinds: bytes for a base64
 * event, JSON when the text is JSON with nothing around it (as the server
 * would have put it in "data"), else text.
 */
function streamPayload(text, base64) {
  if (base64) return { data: fromBase64(text), raw: { kind: "binary" } };
  if (text !== "" && text.trim() === text) {
    try {
      return { data: JSON.parse(text), raw: { kind: "json" } };
    } catch {
      // text
    }
  }
  return { data: text, raw: { kind: "text" } };
}

/**
 * A publish waiting in the outbox.
 * @typedef {object} Outgoing
 * @property {object} env the publish envelope, its key included (no id: each attempt gets one)
 * @property {(p: import("./roomcast").Published) => void} resolve
 * @property {(err: RoomcastError) => void} reject
 * @property {number} sentAt when its first attempt went out; 0 before
 * @property {boolean} sent an attempt is out on the current connection
 * @property {any} retry the timer of a retry after a transient refusal, or null
 */

/**
 * A random idempotency key: 128 bits as 32 hex digits, from
 * crypto.getRandomValues (available in every context, unlike randomUUID,
 * which needs a secure one).
 */
function randomKey() {
  const b = new Uint8Array(16);
  globalThis.crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

function utf8Length(s) {
  return new TextEncoder().encode(s).length;
}
