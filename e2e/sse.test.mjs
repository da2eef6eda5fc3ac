// Event streams (Server-Sent Events) in a real browser: a bare EventSource
// that recovers exactly across a dropped connection and across a restart
// of the server (its history kept in Redis), and the chat page listening
// over an event stream when a gateway breaks WebSocket.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import {
  buildProgram, freePort, launchBrowser, openPage, removeBuilds, snap, startExample, startProgram, startProxy, startRedis, uniq,
} from "./lib/harness.mjs";

let browser;
let chat;

before(async () => {
  [browser, chat] = await Promise.all([launchBrowser(), startExample("chat")]);
});

after(async () => {
  await browser?.close();
  if (chat) assert.equal(await chat.stop(), 0, "the chat server did not shut down cleanly");
  removeBuilds();
});

/**
 * Opens base's page in a fresh context and starts a bare EventSource on
 * room there: its events collect in window.events, with their ids.
 */
async function listen(t, base, room) {
  const page = await openPage(browser, `${base}/`);
  t.after(() => page.context().close());
  await page.evaluate((room) => {
    window.events = [];
    const es = new EventSource(`/ws?room=${encodeURIComponent(room)}`);
    window.es = es;
    es.addEventListener(room, (e) => window.events.push({ data: e.data, id: e.lastEventId }));
    es.addEventListener("+reset", (e) => window.events.push({ reset: e.data }));
  }, room);
  return page;
}

/** A raw WebSocket in its own page, for publishing text into room. */
async function publisher(t, base, room) {
  const page = await openPage(browser, `${base}/`);
  t.after(() => page.context().close());
  await page.evaluate(async (url) => {
    window.ws = new WebSocket(url);
    await new Promise((resolve, reject) => {
      window.ws.onopen = resolve;
      window.ws.onerror = reject;
    });
  }, `${base.replace(/^http/, "ws")}/ws?room=${encodeURIComponent(room)}`);
  return (text) => page.evaluate((text) => window.ws.send(text), text);
}

const received = (page) => page.evaluate(() => window.events.map((e) => e.data ?? `reset ${e.reset}`));

async function waitForEvents(page, n) {
  await page.waitForFunction((n) => window.events.length >= n, n, { timeout: 15_000 });
}

test("a bare EventSource gets exactly what it missed while its connection was cut", async (t) => {
  const proxy = await startProxy(chat.port);
  t.after(() => proxy.close());
  const room = "e2e-sse-cut-" + uniq();
  const page = await listen(t, proxy.url, room);
  const say = await publisher(t, chat.url, room);
  await page.waitForFunction(() => window.es.readyState === 1);
  await say("one");
  await say("two");
  await waitForEvents(page, 2);

  proxy.cut();
  await page.waitForFunction(() => window.es.readyState !== 1); // EventSource noticed: reconnecting
  for (const text of ["missed 1", "missed 2", "missed 3"]) await say(text);
  proxy.restore(); // EventSource reconnects by itself, with Last-Event-ID
  await waitForEvents(page, 5);
  await say("live");
  await waitForEvents(page, 6);
  assert.deepEqual(await received(page), ["one", "two", "missed 1", "missed 2", "missed 3", "live"]);
  assert.deepEqual(page.errors, []);
});

test("a bare EventSource recovers exactly across a server restart, history kept in Redis", async (t) => {
  // Two lives of a server on one Redis (redisbroker's two-node example,
  // one node each time): the second never saw the stream, yet the
  // EventSource's Last-Event-ID names positions Redis still holds.
  const redis = await startRedis();
  t.after(() => redis.stop());
  const bin = await buildProgram("redisbroker", "./examples/multinode");
  const start = async () => startProgram(bin, ["-redis", redis.addr, "-ports", String(await freePort())], /node 1: (http:\/\/\S+)/, "multinode");
  const first = await start();
  t.after(() => first.stop());
  const proxy = await startProxy(first.port);
  t.after(() => proxy.close());
  const room = "e2e-sse-restart-" + uniq();
  const page = await listen(t, proxy.url, room);
  await page.waitForFunction(() => window.es.readyState === 1);
  const sayFirst = await publisher(t, first.url, room);
  await sayFirst("before the restart");
  await waitForEvents(page, 1);

  assert.equal(await first.stop(), 0, "the first server did not shut down cleanly");
  const second = await start();
  t.after(() => second.stop());
  const saySecond = await publisher(t, second.url, room);
  await saySecond("while restarting 1");
  await saySecond("while restarting 2");
  proxy.retarget(second.port);
  await waitForEvents(page, 3);
  await saySecond("live again");
  await waitForEvents(page, 4);
  assert.deepEqual(await received(page), ["before the restart", "while restarting 1", "while restarting 2", "live again"]);
  assert.deepEqual(page.errors, []);
});

test("the chat page listens over an event stream when a gateway breaks WebSocket", async (t) => {
  const proxy = await startProxy(chat.port);
  t.after(() => proxy.close());
  proxy.blockWebSockets(true);
  const room = "e2e-sse-listen-" + uniq();
  const ann = await openPage(browser, `${proxy.url}/?nick=ann&room=${room}`);
  t.after(() => ann.context().close());
  await ann.locator('#status[data-state="listening"]').waitFor();
  await ann.locator("#log li", { hasText: "listening over an event stream" }).waitFor();
  assert.equal(await ann.locator("#text").isDisabled(), true, "sending waits for the WebSocket");

  const bob = await openPage(browser, `${chat.url}/?nick=bob&room=${room}`);
  t.after(() => bob.context().close());
  await bob.locator('#status[data-state="open"]').waitFor();
  await bob.fill("#text", "heard over the stream");
  await bob.press("#text", "Enter");
  await ann.locator("#log li.chat", { hasText: "heard over the stream" }).waitFor();
  await snap(ann, "chat-listening");
  assert.deepEqual(ann.errors, []);
});
