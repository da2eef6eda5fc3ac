// Unit tests for roomcast.js: `node --test js/`. A fake WebSocket plays the
// server and fake timers play time, so every test is deterministic and
// instant. No packages: node:test and node:assert only.

import { test } from "node:test";
import assert from "node:assert/strict";
import { connect, RoomcastError, PROTOCOL } from "./roomcast.js";

// ---- fakes ----

/** A WebSocket class whose instances the test drives as the server. */
function fakeWebSocketClass() {
  return class FakeWebSocket {
    static instances = [];
    static get last() {
      return FakeWebSocket.instances.at(-1);
    }
    constructor(url, protocol) {
      this.url = url;
      this.protocol = protocol;
      this.readyState = 0;
      this.sent = [];
      this.closedWith = null;
      this.onmessage = this.onclose = this.onerror = null;
      FakeWebSocket.instances.push(this);
    }
    send(text) {
      if (this.readyState !== 1) throw new Error("fake: send on a socket that is not open");
      this.sent.push(JSON.parse(text));
    }
    close(code, reason) {
      this.closedWith = { code, reason };
      this.readyState = 2; // a real one fires "close" later; the client must not need it
    }
    // ---- the server's side ----
    open() {
      this.readyState = 1;
    }
    recv(env) {
      this.onmessage?.({ data: typeof env === "string" ? env : JSON.stringify(env) });
    }
    welcome(extra = {}) {
      this.open();
      this.recv({
        type: "welcome", protocol: "roomcast.v1", conn_id: `conn-${FakeWebSocket.instances.length}`,
        heartbeat_ms: 1000, timeout_ms: 500, max_message_bytes: 65536, max_rooms: 100, ...extra,
      });
    }
    serverClose(code, reason = "") {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }
    /** The envelopes sent so far of one type. */
    sentOf(type) {
      return this.sent.filter((e) => e.type === type);
    }
  };
}

/** setTimeout/clearTimeout/now on a virtual clock that only advance() moves. */
function fakeTimers() {
  let now = 1_000_000;
  let nextId = 1;
  const queue = new Map();
  return {
    setTimeout(fn, ms) {
      const id = nextId++;
      queue.set(id, { at: now + ms, ms, fn });
      return id;
    },
    clearTimeout(id) {
      queue.delete(id);
    },
    now: () => now,
    /** The delays of the timers still pending, in ms as requested. */
    pendingDelays: () => [...queue.values()].map((t) => t.ms),
    /** Moves the clock forward, running due timers in order. */
    advance(ms) {
      const end = now + ms;
      for (;;) {
        let next = null;
        for (const [id, t] of queue) if (t.at <= end && (!next || t.at < next[1].at)) next = [id, t];
        if (!next) break;
        queue.delete(next[0]);
        now = next[1].at;
        next[1].fn();
      }
      now = end;
    },
  };
}

/** A client on fakes, with every onStateChange call recorded. */
function setup(options = {}) {
  const WS = fakeWebSocketClass();
  const timers = fakeTimers();
  const states = [];
  const client = connect("ws://test/ws", {
    WebSocket: WS, timers, jitter: 0,
    onStateChange: (state, detail) => states.push({ state, detail }),
    ...options,
  });
  return { client, WS, timers, states };
}

/** A client that has been welcomed. */
function setupOpen(options) {
  const s = setup(options);
  s.WS.last.welcome();
  return { ...s, ws: s.WS.last };
}

/** Answers the last subscribe on ws with an ack. */
function ackSubscribe(ws, fields = {}) {
  const req = ws.sentOf("subscribe").at(-1);
  ws.recv({ type: "ack", id: req.id, room: req.room, epoch: "e1", seq: 0, presence: "on", missed: 0, ...fields });
  return req;
}

function message(room, seq, extra = {}) {
  return { type: "message", room, epoch: "e1", seq, message_id: `m${seq}`, time: 1795263070148, data: { n: seq }, ...extra };
}

/** Runs fn with Math.random returning values from the list. */
function withRandom(values, fn) {
  const saved = Math.random;
  let i = 0;
  Math.random = () => values[i++ % values.length];
  try {
    return fn();
  } finally {
    Math.random = saved;
  }
}

// ---- connecting ----

test("connect offers roomcast.v1 and is open only after the welcome", () => {
  const { client, WS, states } = setup();
  const ws = WS.last;
  assert.equal(ws.url, "ws://test/ws");
  assert.equal(ws.protocol, PROTOCOL);
  assert.equal(client.state, "connecting");
  ws.open();
  assert.equal(client.state, "connecting", "an open socket without welcome is not open");
  ws.recv({ type: "welcome", protocol: "roomcast.v1", conn_id: "c-42", user_id: "ann", heartbeat_ms: 25000, timeout_ms: 10000, max_message_bytes: 65536, max_rooms: 100 });
  assert.equal(client.state, "open");
  assert.equal(client.connId, "c-42");
  assert.equal(client.userId, "ann");
  assert.deepEqual(states, [{
    state: "open",
    detail: { connId: "c-42", userId: "ann", heartbeatMs: 25000, timeoutMs: 10000, maxMessageBytes: 65536, maxRooms: 100 },
  }]);
});

test("a relative or http(s) URL resolves against the page to ws(s)", (t) => {
  const WS = fakeWebSocketClass();
  t.after(() => delete globalThis.location);
  globalThis.location = { href: "https://example.com/app/page" };
  connect("/ws?token=x", { WebSocket: WS, timers: fakeTimers() });
  assert.equal(WS.last.url, "wss://example.com/ws?token=x");
  globalThis.location = { href: "http://example.com/app/page" };
  connect("ws", { WebSocket: WS, timers: fakeTimers() });
  assert.equal(WS.last.url, "ws://example.com/app/ws");
  connect("https://other.example/ws", { WebSocket: WS, timers: fakeTimers() });
  assert.equal(WS.last.url, "wss://other.example/ws");
  delete globalThis.location;
  assert.throws(() => connect("/ws", { WebSocket: WS }), { name: "TypeError", message: /relative URLs need a page location/ });
});

test("connect refuses bad options and a missing WebSocket", () => {
  const WS = fakeWebSocketClass();
  assert.throws(() => connect("ws://x/ws", { WebSocket: WS, jitter: 2 }), RangeError);
  assert.throws(() => connect("ws://x/ws", { WebSocket: WS, minDelay: 0 }), RangeError);
  assert.throws(() => connect("ws://x/ws", { WebSocket: WS, minDelay: 10, maxDelay: 5 }), RangeError);
  assert.throws(() => connect("ftp://x/ws", { WebSocket: WS }), TypeError);
  // An option given as undefined takes its default.
  const timers = fakeTimers();
  const c = connect("ws://x/ws", { WebSocket: WS, timers, minDelay: undefined, jitter: undefined, reconnect: undefined });
  withRandom([0], () => WS.last.serverClose(1006));
  assert.deepEqual([c.state, timers.pendingDelays()], ["reconnecting", [500]]);
  if (globalThis.WebSocket === undefined) {
    assert.throws(() => connect("ws://x/ws"), { name: "TypeError", message: /options\.WebSocket/ });
  }
});

test("subscribe sent before the welcome goes out after it, with its options, and the ack sets the position", () => {
  const { client, WS } = setup();
  const subscribed = [];
  const sub = client.subscribe("chat", { presence: true, info: { name: "Ann" }, history: 20, onSubscribe: (i) => subscribed.push(i) });
  assert.equal(sub.room, "chat");
  assert.equal(sub.position, null);
  const ws = WS.last;
  ws.welcome();
  assert.deepEqual(ws.sent, [{ type: "subscribe", id: "1", room: "chat", history: 20, presence: true, info: { name: "Ann" } }]);
  ws.recv({ type: "ack", id: "1", room: "chat", epoch: "e1", seq: 40, presence: "on", missed: 3 });
  // The 3 replayed messages (38..40) are still to come: the position is just before them.
  assert.deepEqual(sub.position, { epoch: "e1", seq: 37 });
  assert.deepEqual(subscribed, [{ epoch: "e1", seq: 40, presence: "on", missed: 3, resumed: false }]);
});

test("subscribing twice to one room throws; a bad info throws", () => {
  const { client } = setupOpen();
  client.subscribe("chat");
  assert.throws(() => client.subscribe("chat"), /already subscribed/);
  assert.throws(() => client.subscribe("news", { info: [1] }), TypeError);
  assert.throws(() => client.subscribe(""), TypeError);
});

// ---- messages ----

test("messages are parsed: JSON data, text and binary payloads, id and time", () => {
  const { client, ws } = setupOpen();
  const got = [];
  const sub = client.subscribe("chat", { onMessage: (m) => got.push(m) });
  ackSubscribe(ws);
  ws.recv({ type: "message", room: "chat", epoch: "e1", seq: 1, message_id: "m1", time: 1795263070148, data: { from: "ann", n: [1, 2] } });
  ws.recv({ type: "message", room: "chat", epoch: "e1", seq: 2, message_id: "m2", time: 1795263070150, text: "plain" });
  ws.recv({ type: "message", room: "chat", epoch: "e1", seq: 3, message_id: "m3", time: 1795263070151, binary: "AAEC/w==" });
  ws.recv({ type: "message", room: "chat", epoch: "e1", seq: 4, message_id: "m4", time: 1795263070152, data: 42, extra_field: "ignored" });
  assert.deepEqual(got[0], {
    room: "chat", epoch: "e1", seq: 1, id: "m1", time: new Date(1795263070148),
    data: { from: "ann", n: [1, 2] }, raw: { kind: "json" },
  });
  assert.deepEqual([got[1].data, got[1].raw.kind], ["plain", "text"]);
  assert.ok(got[2].data instanceof Uint8Array);
  assert.deepEqual([...got[2].data], [0, 1, 2, 255]);
  assert.equal(got[2].raw.kind, "binary");
  assert.deepEqual([got[3].data, got[3].raw.kind], [42, "json"]);
  assert.ok(got[0].time instanceof Date);
  assert.deepEqual(sub.position, { epoch: "e1", seq: 4 });
});

test("a message whose seq is not past the last one seen in its epoch is ignored", () => {
  const { client, ws } = setupOpen();
  const seqs = [];
  const sub = client.subscribe("chat", { onMessage: (m) => seqs.push(`${m.epoch}/${m.seq}`) });
  ackSubscribe(ws, { seq: 0 });
  for (const seq of [1, 2, 2, 1, 3]) ws.recv(message("chat", seq));
  ws.recv(message("chat", 1, { epoch: "e2" })); // a new epoch starts over
  ws.recv(message("chat", 1, { epoch: "e2" }));
  assert.deepEqual(seqs, ["e1/1", "e1/2", "e1/3", "e2/1"]);
  assert.deepEqual(sub.position, { epoch: "e2", seq: 1 });
});

test("messages replayed after a history ack are delivered, not taken for duplicates", () => {
  const { client, ws } = setupOpen();
  const seqs = [];
  client.subscribe("chat", { history: 2, onMessage: (m) => seqs.push(m.seq) });
  ackSubscribe(ws, { seq: 9, missed: 2 });
  for (const seq of [8, 9, 10]) ws.recv(message("chat", seq));
  assert.deepEqual(seqs, [8, 9, 10]);
});

test("messages of rooms not subscribed, unknown types and garbage are ignored", () => {
  const { client, ws } = setupOpen();
  const got = [];
  client.subscribe("chat", { onMessage: (m) => got.push(m) });
  ackSubscribe(ws);
  ws.recv(message("other", 1));
  ws.recv({ type: "something_new", room: "chat" });
  ws.recv("not json");
  ws.recv("null");
  ws.onmessage({ data: new ArrayBuffer(2) });
  assert.equal(got.length, 0);
  assert.equal(client.state, "open");
});

test("direct messages reach every onDirect callback until it is stopped", () => {
  const { client, ws } = setupOpen();
  const a = [];
  const b = [];
  const stopA = client.onDirect((m) => a.push(m));
  client.onDirect((m) => b.push(m));
  ws.recv({ type: "direct", data: { notice: "ready" } });
  stopA();
  ws.recv({ type: "direct", text: "hi" });
  assert.deepEqual(a, [{ data: { notice: "ready" }, raw: { kind: "json" } }]);
  assert.deepEqual(b.map((m) => m.data), [{ notice: "ready" }, "hi"]);
});

test("join and leave events reach onJoin and onLeave as members", () => {
  const { client, ws } = setupOpen();
  const events = [];
  client.subscribe("chat", { presence: true, onJoin: (m) => events.push(["join", m]), onLeave: (m) => events.push(["leave", m]) });
  ackSubscribe(ws);
  ws.recv({ type: "join", room: "chat", conn_id: "c2", user_id: "bob", info: { name: "Bob" } });
  ws.recv({ type: "leave", room: "chat", conn_id: "c3" });
  assert.deepEqual(events, [
    ["join", { connId: "c2", userId: "bob", info: { name: "Bob" } }],
    ["leave", { connId: "c3", userId: null, info: null }],
  ]);
});

// ---- requests ----

/** An envelope without its idempotency key, for comparisons. */
const unkeyed = ({ key, ...rest }) => rest;

test("publish sends data, text or binary, each with a key of its own, and resolves with the ack's position", async () => {
  const { client, ws } = setupOpen();
  const p1 = client.publish("chat", { text: "hi" });
  const p2 = client.publish("chat", undefined, { text: "42" });
  const p3 = client.publish("files", undefined, { binary: new Uint8Array([0, 1, 2, 255]) });
  assert.deepEqual(ws.sent.map(unkeyed), [
    { type: "publish", room: "chat", data: { text: "hi" }, id: "1" },
    { type: "publish", room: "chat", text: "42", id: "2" },
    { type: "publish", room: "files", binary: "AAEC/w==", id: "3" },
  ]);
  const keys = ws.sent.map((e) => e.key);
  assert.ok(keys.every((k) => /^[0-9a-f]{32}$/.test(k)), `keys ${keys}`);
  assert.equal(new Set(keys).size, 3, "each publish has its own key");
  // Replies may come in any order relative to room messages; match by id.
  ws.recv({ type: "ack", id: "3", room: "files", epoch: "e", seq: 1, message_id: "m3" });
  ws.recv({ type: "ack", id: "1", room: "chat", epoch: "e", seq: 7, message_id: "m1" });
  ws.recv({ type: "ack", id: "2", room: "chat", epoch: "e", seq: 8, message_id: "m2", duplicate: true });
  assert.deepEqual(await Promise.all([p1, p2, p3]), [
    { room: "chat", epoch: "e", seq: 7, messageId: "m1", duplicate: false },
    { room: "chat", epoch: "e", seq: 8, messageId: "m2", duplicate: true },
    { room: "files", epoch: "e", seq: 1, messageId: "m3", duplicate: false },
  ]);
});

test("publish rejects with the server's error code and message", async () => {
  const { client, ws } = setupOpen();
  const p = client.publish("chat", 1);
  ws.recv({ type: "error", id: "1", code: "forbidden", message: "clients may not publish on this server" });
  await assert.rejects(p, (err) => {
    assert.ok(err instanceof RoomcastError);
    assert.ok(err instanceof Error);
    assert.equal(err.code, "forbidden");
    assert.equal(err.message, "clients may not publish on this server");
    return true;
  });
});

test("publish with no payload, or two, rejects without sending", async () => {
  const { client, ws } = setupOpen();
  await assert.rejects(client.publish("chat", undefined), TypeError);
  await assert.rejects(client.publish("chat", 1, { text: "x" }), TypeError);
  await assert.rejects(client.publish("chat", () => 1), TypeError);
  await assert.rejects(client.publish("chat", undefined, { binary: [1, 2] }), TypeError);
  assert.deepEqual(ws.sent, []);
});

test("publish larger than the server's max_message_bytes rejects with too_large and keeps the connection", async () => {
  const { client, WS } = setup();
  const ws = WS.last;
  ws.welcome({ max_message_bytes: 150 }); // a publish carries its key: 32 bytes more
  await assert.rejects(client.publish("chat", "é".repeat(60)), { code: "too_large" });
  assert.deepEqual(ws.sent, []);
  const ok = client.publish("chat", "é".repeat(10));
  ws.recv({ type: "ack", id: ws.sent[0].id });
  await ok;
  assert.equal(client.state, "open");
});

test("send while not open rejects at once; publish waits in the outbox and goes out first on the next connection", async () => {
  const { client, WS, timers } = setup();
  await assert.rejects(client.send(1), { code: "disconnected" });
  const early = client.publish("chat", 1);
  WS.last.serverClose(1006);
  assert.equal(client.state, "reconnecting");
  await assert.rejects(client.send(2), { code: "disconnected" });
  const later = client.publish("chat", 2);
  timers.advance(500);
  WS.last.welcome();
  assert.deepEqual(WS.last.sent.map(unkeyed), [
    { type: "publish", room: "chat", data: 1, id: "1" },
    { type: "publish", room: "chat", data: 2, id: "2" },
  ]);
  WS.last.recv({ type: "ack", id: "1", room: "chat", epoch: "e", seq: 1, message_id: "a" });
  WS.last.recv({ type: "ack", id: "2", room: "chat", epoch: "e", seq: 2, message_id: "b" });
  assert.equal((await early).seq, 1);
  assert.equal((await later).seq, 2);
});

test("send sends a send envelope, with its room, and resolves on ack", async () => {
  const { client, ws } = setupOpen();
  const p = client.send({ cmd: "typing" }, { room: "chat" });
  assert.deepEqual(ws.sent, [{ type: "send", data: { cmd: "typing" }, room: "chat", id: "1" }]);
  ws.recv({ type: "ack", id: "1" });
  await p;
  const q = client.send(undefined, { text: "x" });
  ws.recv({ type: "error", id: "2", code: "not_supported", message: "no handler" });
  await assert.rejects(q, { code: "not_supported" });
});

test("request ids count up per connection and start over after a reconnect", () => {
  const { client, ws, timers, WS } = setupOpen();
  client.send(1).catch(() => {});
  client.send(2).catch(() => {});
  assert.deepEqual(ws.sent.map((e) => e.id), ["1", "2"]);
  ws.serverClose(1006);
  timers.advance(500);
  WS.last.welcome();
  client.send(3).catch(() => {});
  assert.deepEqual(WS.last.sent.map((e) => e.id), ["1"]);
});

test("pending requests reject with disconnected when the connection drops, but a publish", async () => {
  const { client, ws, timers, WS } = setupOpen();
  const sub = client.subscribe("chat");
  ackSubscribe(ws);
  const pub = client.publish("chat", 1);
  const snd = client.send(2);
  const pres = sub.presence();
  ws.serverClose(1006, "");
  for (const p of [snd, pres]) {
    await assert.rejects(p, (err) => err instanceof RoomcastError && err.code === "disconnected" && err.closeCode === 1006);
  }
  ws.recv({ type: "ack", id: "2" }); // a late reply on the dead socket changes nothing
  // The publish waits: the next connection sends it again with its key.
  const key = ws.sentOf("publish")[0].key;
  timers.advance(500);
  WS.last.welcome();
  const again = WS.last.sentOf("publish");
  assert.equal(again.length, 1);
  assert.equal(again[0].key, key);
  WS.last.recv({ type: "ack", id: again[0].id, room: "chat", epoch: "e", seq: 3, message_id: "m", duplicate: true });
  assert.deepEqual(await pub, { room: "chat", epoch: "e", seq: 3, messageId: "m", duplicate: true });
});

test("presence() sends a presence request and resolves with the reply", async () => {
  const { client, ws } = setupOpen();
  const sub = client.subscribe("chat");
  ackSubscribe(ws);
  const p = sub.presence();
  const req = ws.sent.at(-1);
  assert.deepEqual(req, { type: "presence", room: "chat", id: "2" });
  ws.recv({
    type: "presence", id: "2", room: "chat", count: 2, connections: 3,
    members: [{ conns: ["c1", "c2"], user_id: "ann", info: { name: "Ann" } }, { conns: ["c3"] }],
  });
  assert.deepEqual(await p, {
    count: 2, connections: 3,
    members: [{ conns: ["c1", "c2"], userId: "ann", info: { name: "Ann" } }, { conns: ["c3"], userId: null, info: null }],
  });
  const counts = sub.presence();
  ws.recv({ type: "presence", id: "3", room: "chat", count: 5, connections: 6 });
  assert.deepEqual(await counts, { count: 5, connections: 6, members: [] });
  const off = sub.presence();
  ws.recv({ type: "error", id: "4", code: "not_supported", message: "this room does not track presence" });
  await assert.rejects(off, { code: "not_supported" });
});

test("unsubscribe stops callbacks at once, resolves on ack, and the room is not renewed", async () => {
  const { client, ws, timers, WS } = setupOpen();
  const got = [];
  const sub = client.subscribe("chat", { onMessage: (m) => got.push(m.seq), presence: true, onJoin: (m) => got.push(m) });
  ackSubscribe(ws);
  ws.recv(message("chat", 1));
  const done = sub.unsubscribe();
  assert.deepEqual(ws.sent.at(-1), { type: "unsubscribe", room: "chat", id: "2" });
  assert.equal(sub.active, false);
  ws.recv(message("chat", 2)); // still in flight before the server's ack
  ws.recv({ type: "join", room: "chat", conn_id: "x" });
  ws.recv({ type: "ack", id: "2" });
  await done;
  assert.deepEqual(got, [1]);
  client.subscribe("chat"); // allowed again
  client.subscribe("chat2").unsubscribe(); // never sent: nothing to undo
  ws.serverClose(1001);
  timers.advance(500);
  WS.last.welcome();
  assert.deepEqual(WS.last.sentOf("subscribe").map((e) => e.room), ["chat"]);
});

test("unsubscribe while disconnected resolves at once", async () => {
  const { client, ws } = setupOpen();
  const sub = client.subscribe("chat");
  ackSubscribe(ws);
  ws.serverClose(1006);
  await sub.unsubscribe();
  assert.equal(sub.active, false);
});

test("a subscribe refused for good ends the subscription; a rate-limited one is retried", () => {
  const { client, ws, timers } = setupOpen();
  const errors = [];
  const bad = client.subscribe("bad room", { onError: (e) => errors.push(e.code) });
  ws.recv({ type: "error", id: "1", code: "invalid_room", message: "bad" });
  assert.equal(bad.active, false);
  client.subscribe("bad room"); // the name is free again

  const busy = client.subscribe("busy", { onError: (e) => errors.push(e.code) });
  const req = ws.sent.at(-1);
  ws.recv({ type: "error", id: req.id, code: "rate_limited", message: "slow down" });
  assert.equal(busy.active, true);
  assert.deepEqual(errors, ["invalid_room", "rate_limited"]);
  const before = ws.sentOf("subscribe").length;
  timers.advance(499);
  assert.equal(ws.sentOf("subscribe").length, before);
  timers.advance(1);
  assert.deepEqual(ws.sent.at(-1).room, "busy");
});

// ---- reconnecting ----

test("reconnect delays double from minDelay to maxDelay and reset after a welcome", () => {
  const { client, WS, timers, states } = setup({ minDelay: 100, maxDelay: 1000 });
  const delays = [];
  for (let i = 0; i < 6; i++) {
    WS.last.serverClose(1006);
    const d = states.at(-1).detail.delay;
    delays.push(d);
    assert.deepEqual(timers.pendingDelays(), [d]);
    const n = WS.instances.length;
    timers.advance(d - 1);
    assert.equal(WS.instances.length, n, "no attempt before the delay");
    timers.advance(1);
    assert.equal(WS.instances.length, n + 1);
  }
  assert.deepEqual(delays, [100, 200, 400, 800, 1000, 1000]);
  assert.deepEqual(states.map((s) => s.detail.attempt), [1, 2, 3, 4, 5, 6]);
  assert.equal(client.state, "reconnecting");
  WS.last.welcome();
  assert.equal(client.state, "open");
  WS.last.serverClose(1001, "server shutting down");
  assert.deepEqual(states.at(-1), { state: "reconnecting", detail: { code: 1001, reason: "server shutting down", delay: 100, attempt: 1 } });
});

test("reconnect jitter keeps each delay within [delay*(1-jitter), delay]", () => {
  const { WS, timers, states } = setup({ minDelay: 1000, maxDelay: 8000, jitter: 0.5 });
  const delays = withRandom([0, 0.999999, 0.5, 0.25], () => {
    const out = [];
    for (let i = 0; i < 4; i++) {
      WS.last.serverClose(1006);
      out.push(states.at(-1).detail.delay);
      timers.advance(out.at(-1));
    }
    return out;
  });
  assert.equal(delays[0], 1000); // random 0: the full delay
  assert.ok(Math.abs(delays[1] - 1000) < 1); // random ~1: half of 2000
  assert.equal(delays[2], 3000); // 4000 * (1 - 0.5*0.5)
  assert.equal(delays[3], 7000); // 8000 * (1 - 0.5*0.25)
  for (const [i, d] of delays.entries()) {
    const base = Math.min(8000, 1000 * 2 ** i);
    assert.ok(d >= base / 2 && d <= base, `delay ${d} outside [${base / 2}, ${base}]`);
  }
});

test("after a reconnect every room is renewed with since, and onRecover says it was recovered", () => {
  const { client, ws, timers, WS } = setupOpen();
  const seqs = [];
  const recoveries = [];
  const sub = client.subscribe("chat", { presence: true, info: { name: "Ann" }, history: 5, onMessage: (m) => seqs.push(m.seq), onRecover: (r) => recoveries.push(r) });
  client.subscribe("news");
  ws.recv({ type: "ack", id: "1", room: "chat", epoch: "e1", seq: 0, presence: "on", missed: 0 });
  ws.recv({ type: "ack", id: "2", room: "news", epoch: "n1", seq: 7, presence: "on", missed: 0 });
  ws.recv(message("chat", 1));
  ws.recv(message("chat", 2));
  ws.serverClose(4002, "slow consumer");
  assert.equal(client.state, "reconnecting");
  timers.advance(500);
  const ws2 = WS.last;
  assert.notEqual(ws2, ws);
  ws2.welcome();
  assert.deepEqual(ws2.sent, [
    { type: "subscribe", room: "chat", since: { epoch: "e1", seq: 2 }, presence: true, info: { name: "Ann" }, id: "1" },
    { type: "subscribe", room: "news", since: { epoch: "n1", seq: 7 }, id: "2" },
  ]);
  ws2.recv({ type: "ack", id: "1", room: "chat", epoch: "e1", seq: 4, presence: "on", recovered: true, missed: 2 });
  ws2.recv(message("chat", 3));
  ws2.recv(message("chat", 4));
  ws2.recv(message("chat", 5));
  assert.deepEqual(seqs, [1, 2, 3, 4, 5]);
  assert.deepEqual(recoveries, [{ recovered: true, missed: 2 }]);
  assert.deepEqual(sub.position, { epoch: "e1", seq: 5 });
});

test("when recovery fails onRecover gets the reason and the subscription goes live from the new position", () => {
  const { client, ws, timers, WS } = setupOpen();
  const seqs = [];
  const recoveries = [];
  const sub = client.subscribe("chat", { onMessage: (m) => seqs.push(`${m.epoch}/${m.seq}`), onRecover: (r) => recoveries.push(r) });
  ackSubscribe(ws, { seq: 10 });
  ws.recv(message("chat", 11));
  ws.serverClose(1006);
  timers.advance(500);
  WS.last.welcome();
  assert.deepEqual(WS.last.sent[0].since, { epoch: "e1", seq: 11 });
  WS.last.recv({ type: "ack", id: "1", room: "chat", epoch: "e9", seq: 3, presence: "on", recovered: false, reason: "epoch_changed", missed: 0 });
  assert.deepEqual(recoveries, [{ recovered: false, reason: "epoch_changed", missed: 0 }]);
  assert.deepEqual(sub.position, { epoch: "e9", seq: 3 });
  WS.last.recv(message("chat", 3, { epoch: "e9" })); // at the ack's seq: not live
  WS.last.recv(message("chat", 4, { epoch: "e9" }));
  assert.deepEqual(seqs, ["e1/11", "e9/4"]);
});

test("a reconnect before any message since the ack renews from the ack's position, replays included", () => {
  const { client, ws, timers, WS } = setupOpen();
  client.subscribe("chat", { history: 3 });
  ackSubscribe(ws, { seq: 20, missed: 3 }); // 18..20 not received yet
  ws.recv(message("chat", 18));
  ws.serverClose(1006);
  timers.advance(500);
  WS.last.welcome();
  assert.deepEqual(WS.last.sent[0], { type: "subscribe", room: "chat", since: { epoch: "e1", seq: 18 }, id: "1" });
});

test("a subscription never acked is retried as first asked (history, no since) after a reconnect", () => {
  const { client, ws, timers, WS } = setupOpen();
  client.subscribe("chat", { history: 3 });
  ws.serverClose(1006);
  timers.advance(500);
  WS.last.welcome();
  assert.deepEqual(WS.last.sent, [{ type: "subscribe", room: "chat", history: 3, id: "1" }]);
});

for (const code of [4003, 4005, 1008, 1003, 1007]) {
  test(`no reconnect after close ${code}: the client is closed and says why`, async () => {
    const { client, ws, timers, WS, states } = setupOpen();
    const pending = client.publish("chat", 1);
    ws.serverClose(code, "kicked");
    assert.equal(client.state, "closed");
    assert.deepEqual(states.at(-1), { state: "closed", detail: { code, reason: "kicked" } });
    assert.deepEqual(timers.pendingDelays(), []);
    timers.advance(60_000);
    assert.equal(WS.instances.length, 1);
    await assert.rejects(pending, { code: "disconnected" });
    assert.throws(() => client.subscribe("chat"), /closed/);
  });
}

for (const code of [1001, 1006, 1011, 1013, 4001, 4002, 4006]) {
  test(`reconnect after close ${code}`, () => {
    const { client, ws, timers, WS } = setupOpen();
    ws.serverClose(code);
    assert.equal(client.state, "reconnecting");
    timers.advance(500);
    assert.equal(WS.instances.length, 2);
  });
}

test("reconnect: false closes on the first drop", () => {
  const { client, WS, timers, states } = setup({ reconnect: false });
  WS.last.serverClose(1006);
  assert.equal(client.state, "closed");
  assert.deepEqual(states, [{ state: "closed", detail: { code: 1006, reason: "" } }]);
  timers.advance(60_000);
  assert.equal(WS.instances.length, 1);
});

test("close() closes the socket with 1000, rejects pending requests and never reconnects", async () => {
  const { client, ws, timers, WS, states } = setupOpen();
  const pending = client.publish("chat", 1);
  client.close();
  assert.deepEqual(ws.closedWith, { code: 1000, reason: "closed by the client" });
  assert.equal(client.state, "closed");
  assert.equal(client.connId, null);
  assert.deepEqual(states.at(-1), { state: "closed", detail: { code: 1000, reason: "closed by the client" } });
  await assert.rejects(pending, { code: "disconnected" });
  await assert.rejects(client.publish("chat", 1), { code: "disconnected" });
  client.close();
  timers.advance(60_000);
  assert.equal(WS.instances.length, 1);
  assert.equal(states.length, 2, "open, closed; the second close() is a no-op");
});

test("close() while waiting to reconnect cancels the attempt", () => {
  const { client, ws, timers, WS } = setupOpen();
  ws.serverClose(1006);
  client.close();
  timers.advance(60_000);
  assert.equal(WS.instances.length, 1);
  assert.equal(client.state, "closed");
});

test("an error event is a failed connection even when no close event follows", () => {
  const { client, WS, timers, states } = setup();
  WS.last.onerror({ type: "error" }); // Node 20 after ECONNREFUSED: error, never close
  assert.equal(client.state, "reconnecting");
  assert.deepEqual(states.at(-1).detail, { code: 1006, reason: "connection failed", delay: 500, attempt: 1 });
  timers.advance(500);
  assert.equal(WS.instances.length, 2);
});

test("a WebSocket constructor that throws on a reconnect counts as a failed attempt", () => {
  let fail = false;
  const WS = fakeWebSocketClass();
  const Flaky = class extends WS {
    constructor(...args) {
      if (fail) throw new SyntaxError("boom");
      super(...args);
    }
  };
  const timers = fakeTimers();
  const states = [];
  const client = connect("ws://test/ws", { WebSocket: Flaky, timers, jitter: 0, onStateChange: (s, d) => states.push({ s, d }) });
  fail = true;
  WS.last.serverClose(1006);
  timers.advance(500);
  assert.equal(client.state, "reconnecting");
  assert.match(states.at(-1).d.reason, /boom/);
  assert.equal(states.at(-1).d.delay, 1000);
  fail = false;
  timers.advance(1000);
  assert.equal(WS.instances.length, 2);
});

// ---- heartbeats ----

test("a server ping is answered with a pong", () => {
  const { ws } = setupOpen();
  ws.recv({ type: "ping" });
  assert.deepEqual(ws.sent, [{ type: "pong" }]);
});

test("silence for heartbeat_ms + timeout_ms closes the socket and reconnects; any frame resets the clock", () => {
  const { client, ws, timers, WS, states } = setupOpen(); // heartbeat 1000 + timeout 500
  timers.advance(1400);
  ws.recv({ type: "ping" }); // a sign of life at 1400
  timers.advance(1400); // 2800: 1400 silent
  assert.equal(client.state, "open");
  ws.recv(message("nowhere", 1)); // anything counts, at 2800
  timers.advance(1499);
  assert.equal(client.state, "open");
  timers.advance(1);
  assert.equal(client.state, "reconnecting");
  assert.deepEqual(ws.closedWith, { code: 4001, reason: "heartbeat timeout: nothing received from the server" });
  assert.equal(states.at(-1).detail.code, 4001);
  timers.advance(500);
  assert.equal(WS.instances.length, 2);
  WS.last.welcome();
  assert.equal(client.state, "open");
});

test("before the welcome only the connect timeout runs, and nothing after close", () => {
  const { client, timers } = setup();
  assert.deepEqual(timers.pendingDelays(), [10000]);
  client.close();
  assert.deepEqual(timers.pendingDelays(), []);
});

test("no welcome within connectTimeout closes the attempt and retries", () => {
  const { client, WS, timers, states } = setup({ connectTimeout: 3000 });
  const first = WS.last;
  first.open(); // the handshake completed, but no welcome comes
  timers.advance(2999);
  assert.equal(client.state, "connecting");
  timers.advance(1);
  assert.equal(client.state, "reconnecting");
  assert.deepEqual(first.closedWith, { code: 1000, reason: "connect timeout: no welcome within 3000 ms" });
  assert.equal(states.at(-1).detail.code, 1006);
  timers.advance(500);
  WS.last.welcome({ heartbeat_ms: 25000, timeout_ms: 10000 });
  timers.advance(3000); // the new connection's connect timeout was cancelled by its welcome
  assert.equal(client.state, "open");
});

// ---- application errors ----

test("an exception in an application callback is reported and does not stop the client", (t) => {
  const reported = [];
  const saved = globalThis.reportError;
  globalThis.reportError = (e) => reported.push(e.message);
  t.after(() => {
    if (saved === undefined) delete globalThis.reportError;
    else globalThis.reportError = saved;
  });
  const { client, ws, timers, WS } = setupOpen({
    onStateChange: () => {
      throw new Error("app bug in onStateChange");
    },
  });
  const seqs = [];
  client.subscribe("chat", {
    onMessage: (m) => {
      seqs.push(m.seq);
      throw new Error("app bug in onMessage");
    },
  });
  ackSubscribe(ws);
  ws.recv(message("chat", 1));
  ws.recv(message("chat", 2));
  ws.serverClose(1006);
  timers.advance(500);
  assert.equal(WS.instances.length, 2, "the reconnect was still scheduled");
  assert.deepEqual(seqs, [1, 2]);
  assert.deepEqual(reported, ["app bug in onStateChange", "app bug in onMessage", "app bug in onMessage", "app bug in onStateChange"]);
});

// ---- the outbox: publishing exactly once ----

test("a publish whose ack was lost is sent again with the same key, before newer publishes", async () => {
  const { client, ws, timers, WS } = setupOpen();
  const first = client.publish("chat", "a");
  const second = client.publish("chat", "b");
  const keys = ws.sentOf("publish").map((e) => e.key);
  ws.recv({ type: "ack", id: ws.sent[0].id, room: "chat", epoch: "e", seq: 1, message_id: "m1" });
  assert.deepEqual(await first, { room: "chat", epoch: "e", seq: 1, messageId: "m1", duplicate: false });
  ws.serverClose(1006); // the second's ack is lost
  const third = client.publish("chat", "c"); // made while reconnecting
  timers.advance(500);
  WS.last.welcome();
  const sent = WS.last.sentOf("publish");
  assert.deepEqual(sent.map((e) => e.data), ["b", "c"], "the unanswered one first, then the newer one");
  assert.equal(sent[0].key, keys[1]);
  WS.last.recv({ type: "ack", id: sent[0].id, room: "chat", epoch: "e", seq: 2, message_id: "m2", duplicate: true });
  WS.last.recv({ type: "ack", id: sent[1].id, room: "chat", epoch: "e", seq: 3, message_id: "m3" });
  assert.equal((await second).seq, 2);
  assert.equal((await third).seq, 3);
  assert.equal(client._outbox.length, 0);
});

test("a transient refusal is tried again with the same key; a final one rejects", async () => {
  const { client, ws, timers } = setupOpen();
  const p = client.publish("chat", 1);
  const key = ws.sent[0].key;
  ws.recv({ type: "error", id: ws.sent[0].id, code: "unavailable", message: "broker down" });
  assert.equal(ws.sentOf("publish").length, 1, "not at once");
  timers.advance(1000);
  const retry = ws.sentOf("publish")[1];
  assert.equal(retry.key, key);
  ws.recv({ type: "ack", id: retry.id, room: "chat", epoch: "e", seq: 1, message_id: "m" });
  assert.equal((await p).seq, 1);
  const q = client.publish("chat", 2);
  ws.recv({ type: "error", id: ws.sent.at(-1).id, code: "forbidden", message: "no" });
  await assert.rejects(q, { code: "forbidden" });
});

test("the outbox is bounded: one more publish rejects with outbox_full", async () => {
  const WS = fakeWebSocketClass();
  const timers = fakeTimers();
  const client = connect("ws://h/ws", { WebSocket: WS, timers, outbox: 2 });
  const a = client.publish("r", 1);
  const b = client.publish("r", 2);
  await assert.rejects(client.publish("r", 3), { code: "outbox_full" });
  client.close();
  await assert.rejects(a, { code: "disconnected" });
  await assert.rejects(b, { code: "disconnected" });
  assert.throws(() => connect("ws://h/ws", { WebSocket: WS, timers, outbox: 0 }), RangeError);
});

test("a publish first sent longer ago than the server's key window rejects with expired rather than risk a double", async () => {
  const { client, WS, timers } = setup();
  WS.last.welcome({ key_ttl_ms: 2000 });
  const p = client.publish("chat", 1);
  WS.last.serverClose(1006);
  timers.advance(500);
  WS.last.serverClose(1006); // still down...
  timers.advance(3000);
  WS.last.welcome({ key_ttl_ms: 2000 });
  await assert.rejects(p, { code: "expired" });
  assert.deepEqual(WS.last.sentOf("publish"), [], "not sent again");
});

// ---- listening over an event stream when the WebSocket cannot connect ----

/** An EventSource class whose instances the test drives as the server. */
function fakeEventSourceClass() {
  return class FakeEventSource {
    static instances = [];
    static get last() {
      return FakeEventSource.instances.at(-1);
    }
    constructor(url, init) {
      this.url = new URL(url);
      this.init = init;
      this.readyState = 0;
      this.listeners = new Map();
      this.onerror = null;
      FakeEventSource.instances.push(this);
    }
    addEventListener(name, fn) {
      this.listeners.set(name, [...(this.listeners.get(name) ?? []), fn]);
    }
    close() {
      this.readyState = 2;
    }
    // ---- the server's side ----
    open() {
      this.readyState = 1;
      this.onopen?.();
    }
    emit(name, data, lastEventId = "") {
      for (const fn of this.listeners.get(name) ?? []) fn({ data, lastEventId });
    }
  };
}

/** The id of an event stream at these positions, as the server writes it. */
const streamID = (positions) =>
  Buffer.from(JSON.stringify(positions)).toString("base64url");

test("after failed WebSocket attempts the client listens over an event stream, from its positions", async () => {
  const ES = fakeEventSourceClass();
  const { client, WS, timers, states } = setupOpen({ EventSource: ES, fallbackAfter: 2 });
  const got = [];
  const recs = [];
  client.subscribe("news", { onMessage: (m) => got.push(m), onRecover: (r) => recs.push(r) });
  ackSubscribe(WS.last, { seq: 5 });
  // The connection drops; two attempts get no welcome: the client asks
  // whether the server answers HTTP, with an event stream.
  WS.last.serverClose(1006);
  timers.advance(500);
  WS.last.serverClose(1006);
  assert.equal(client.state, "reconnecting");
  assert.equal(ES.instances.length, 0);
  timers.advance(1000);
  WS.last.serverClose(1006);
  assert.equal(client.state, "reconnecting");
  const probe = ES.last;
  // It does: the probe is closed before any event, and the WebSocket
  // tried at once. It fails again, with the server up: listen.
  const dials = WS.instances.length;
  probe.open();
  assert.equal(probe.readyState, 2);
  assert.equal(WS.instances.length, dials + 1);
  WS.last.serverClose(1006);
  assert.equal(client.state, "listening");
  assert.equal(states.at(-1).state, "listening");
  const es = ES.last;
  assert.notEqual(es, probe);
  assert.equal(es.url.protocol, "http:");
  assert.deepEqual(es.url.searchParams.getAll("room"), ["news"]);
  assert.equal(es.url.searchParams.get("last_event_id"), streamID([["e1", 5]]));
  assert.deepEqual(es.init, { withCredentials: true });

  es.emit("news", '{"n":6}', streamID([["e1", 6]]));
  es.emit("news", "plain text", streamID([["e1", 7]]));
  es.emit("news+base64", "AAEC", streamID([["e1", 8]]));
  es.emit("news", '{"n":6}', streamID([["e1", 6]])); // a repeat: dropped
  assert.deepEqual(got.map((m) => [m.seq, m.data, m.raw.kind]), [
    [6, { n: 6 }, "json"], [7, "plain text", "text"], [8, new Uint8Array([0, 1, 2]), "binary"],
  ]);
  es.emit("+reset", '{"room":"news","reason":"history_too_short"}', streamID([["e1", 20]]));
  assert.deepEqual(recs, [{ recovered: false, missed: 0, reason: "history_too_short" }]);

  // Requests need the WebSocket.
  await assert.rejects(client.publish("news", 1), { code: "listening_only" });
  await assert.rejects(client.send(1), { code: "listening_only" });

  // A new room opens a new stream, with the positions reached.
  client.subscribe("alerts");
  assert.equal(es.readyState, 2);
  assert.deepEqual(ES.last.url.searchParams.getAll("room"), ["news", "alerts"]);
  assert.equal(ES.last.url.searchParams.get("last_event_id"), streamID([["e1", 20], ["", 0]]));

  // The WebSocket is tried again every maxDelay; once it connects, the
  // client leaves the stream and resubscribes from there.
  timers.advance(30000);
  WS.last.welcome();
  assert.equal(client.state, "open");
  assert.equal(ES.last.readyState, 2);
  const resub = WS.last.sentOf("subscribe").find((e) => e.room === "news");
  assert.deepEqual(resub.since, { epoch: "e1", seq: 20 });
});

test("a server that is down (restarting) never sends the client to listening: it comes back on the WebSocket", () => {
  const ES = fakeEventSourceClass();
  const { client, WS, timers, states } = setupOpen({ EventSource: ES, fallbackAfter: 2 });
  const got = [];
  client.subscribe("news", { onMessage: (m) => got.push(m) });
  ackSubscribe(WS.last, { seq: 5 });
  WS.last.serverClose(1001); // the server goes away
  for (let i = 0; i < 4; i++) {
    timers.advance(30000);
    WS.last.serverClose(1006); // refused: nothing listens (the probe stream keeps retrying by itself)
  }
  assert.equal(client.state, "reconnecting");
  assert.ok(!states.some((s) => s.state === "listening"), "never listening while the server is down");
  // The server is back, and the probe stream happens to reach it first:
  // it is closed before any event, and the WebSocket dialled at once.
  const dials = WS.instances.length;
  const probe = ES.last;
  probe.open();
  probe.emit("news", '{"n":6}', streamID([["e1", 6]])); // ignored: recovery is the WebSocket's
  assert.equal(probe.readyState, 2);
  assert.equal(WS.instances.length, dials + 1);
  WS.last.welcome();
  assert.equal(client.state, "open");
  assert.deepEqual(got, []);
  assert.deepEqual(WS.last.sentOf("subscribe").find((e) => e.room === "news").since, { epoch: "e1", seq: 5 });
});

test("once listening, the WebSocket is tried every maxDelay, whatever the stream does", () => {
  const ES = fakeEventSourceClass();
  const { client, WS, timers } = setupOpen({ EventSource: ES, fallbackAfter: 1 });
  client.subscribe("news");
  ackSubscribe(WS.last, { seq: 5 });
  WS.last.serverClose(1006);
  timers.advance(500);
  WS.last.serverClose(1006); // a dial that got no welcome: probe
  ES.last.open(); // the server answers HTTP
  WS.last.serverClose(1006); // but not WebSocket
  assert.equal(client.state, "listening");
  const dials = WS.instances.length;
  ES.last.open(); // EventSource reconnected by itself: no extra dial
  timers.advance(29000);
  assert.equal(WS.instances.length, dials);
  timers.advance(1000);
  assert.equal(WS.instances.length, dials + 1);
  WS.last.serverClose(1006);
  assert.equal(client.state, "listening");
});

test("fallback none never opens an event stream", () => {
  const ES = fakeEventSourceClass();
  const { client, WS, timers } = setup({ EventSource: ES, fallback: "none", fallbackAfter: 1 });
  WS.last.serverClose(1006);
  timers.advance(500);
  WS.last.serverClose(1006);
  assert.equal(client.state, "reconnecting");
  assert.equal(ES.instances.length, 0);
  assert.throws(() => connect("ws://h/ws", { WebSocket: WS, fallback: "yes" }), RangeError);
});
